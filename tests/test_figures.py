"""Figure sizes, significance marks on the heatmaps, the patch overlay on a document image and the token strip."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.backend_bases import MouseEvent
from PIL import Image

from analysis import figures
from analysis.figures import (COLUMN_IN, DOUBLE_COLUMN_IN, figure_size, plot_patch_overlay, plot_patching_heatmaps,
                              plot_probe_heatmap, plot_token_strip, token_boxes)


@pytest.fixture
def drawn(monkeypatch):
    """The figures (and the data) handed to save_figure, kept for inspection after it closes them."""
    seen = []
    real = figures.save_figure

    def spy(fig, data, out_dir, name):
        seen.append((fig, data.copy()))
        return real(fig, data, out_dir, name)

    monkeypatch.setattr(figures, "save_figure", spy)
    return seen


def wrote_all(paths, name):
    assert [p.name for p in paths] == [f"{name}.pdf", f"{name}.png", f"{name}.csv"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_figure_size():
    assert figure_size() == pytest.approx((COLUMN_IN, COLUMN_IN * 0.65))
    assert figure_size("double", aspect=0.5) == pytest.approx((DOUBLE_COLUMN_IN, DOUBLE_COLUMN_IN / 2))
    assert figure_size(5.0, 1.0) == (5.0, 5.0)
    with pytest.raises(ValueError, match="'triple'"):
        figure_size("triple")


def test_save_figure_writes_whole_files_or_none(tmp_path, monkeypatch):
    """Each file is rendered in memory and renamed into place: a save that fails leaves no file of that name and no
    temp file, and the figure is closed either way."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    data = pd.DataFrame({"x": [0, 1], "y": [1, 0]})
    wrote_all(figures.save_figure(fig, data, tmp_path, "ok"), "ok")
    assert pd.read_csv(tmp_path / "ok.csv").equals(data) and not plt.get_fignums()

    fig, ax = plt.subplots()
    real = fig.savefig

    def png_fails(buf, format, **kw):
        if format == "png":
            buf.write(b"half a png")
            raise OSError("disk full")
        return real(buf, format=format, **kw)

    monkeypatch.setattr(fig, "savefig", png_fails)
    with pytest.raises(OSError, match="disk full"):
        figures.save_figure(fig, data, tmp_path, "broken")
    assert sorted(p.name for p in tmp_path.iterdir() if "broken" in p.name) == ["broken.pdf"]
    assert not plt.get_fignums()


# ---- significance marks -------------------------------------------------------------------------------------------
def marks(fig):
    return [c for ax in fig.axes for c in ax.collections if c.get_gid() == "significance"]


def probe_rows(significant=None, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame([{"layer": layer, "position_group": g, "turn": t, "metric": "char_accuracy",
                        "control": "none", "target": "ssn", "value": rng.uniform()}
                       for layer in range(4) for g in ("last", "pii") for t in (0, 2)])
    if significant is not None:
        df["significant"] = significant(df)
    return df


def test_probe_heatmap_marks_only_significant_cells(tmp_path, drawn):
    plot_probe_heatmap(probe_rows(), tmp_path, name="plain")
    fig, _ = drawn[-1]
    assert not marks(fig) and fig.axes[0].get_legend() is None  # no column, no marks: unchanged

    sig = probe_rows(lambda d: (d["layer"] == 2) & (d["position_group"] == "pii"))
    wrote_all(plot_probe_heatmap(sig, tmp_path, name="marked"), "marked")
    fig, data = drawn[-1]
    (dots,) = marks(fig)
    # rows of the grid: last @ turn 0, pii @ turn 0, last @ turn 2, pii @ turn 2; star at the cell's top right
    cells = sorted((round(x - 0.32), round(y + 0.28)) for x, y in dots.get_offsets())
    assert cells == [(2, 1), (2, 3)]
    assert "BH" in fig.axes[0].get_legend().get_texts()[0].get_text()
    assert data["significant"].sum() == 2  # the CSV says which cells are marked

    # averaged over two targets: starred only where both targets are significant
    other = sig.assign(target="dob", significant=(sig["layer"] == 2) & (sig["turn"] == 0))
    plot_probe_heatmap(pd.concat([sig, other]), tmp_path, name="two_targets")
    assert len(marks(drawn[-1][0])[0].get_offsets()) == 1

    with pytest.raises(ValueError, match="'significant'"):
        plot_probe_heatmap(sig.assign(significant="yes"), tmp_path)


def test_patching_heatmaps_mark_significant_cells(tmp_path, drawn):
    rng = np.random.default_rng(1)
    df = pd.DataFrame([{"layer": layer, "component": c, "position_group": g, "metric": "score_logit_diff",
                        "direction": "denoise", "method": "exact", "value": rng.normal()}
                       for layer in range(3) for c in ("resid_post", "attn_out")
                       for g in ("pii_patches", "other_image", "final")])
    plot_patching_heatmaps(df, tmp_path, name="plain")
    assert not marks(drawn[-1][0])
    # significant only in the second panel: its cells are starred, the note still appears once
    df["significant"] = (df["component"] == "attn_out") & (df["layer"] >= 1)
    wrote_all(plot_patching_heatmaps(df, tmp_path, name="marked"), "marked")
    fig, _ = drawn[-1]
    assert [len(m.get_offsets()) for m in marks(fig)] == [0, 6]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1 and "BH" in legends[0].get_texts()[0].get_text()


# ---- patch overlay ------------------------------------------------------------------------------------------------
def overlay_rows(rows=6, cols=10, hot=(2, 7)):
    df = pd.DataFrame([{"patch_row": r, "patch_col": c, "value": 0.1} for r in range(rows) for c in range(cols)])
    df.loc[(df["patch_row"] == hot[0]) & (df["patch_col"] == hot[1]), "value"] = 1.0
    return df


def heat_at(fig, x, y):
    """The heat layer's value under image pixel (x, y), found the way matplotlib finds it under the mouse."""
    ax = fig.axes[0]
    im = next(i for i in ax.images if i.get_gid() == "heat")
    sx, sy = ax.transData.transform((x, y))
    return im.get_cursor_data(MouseEvent("motion_notify_event", fig.canvas, sx, sy))


def test_patch_overlay_aligns_patches_with_pixels(tmp_path, drawn):
    w, h = 200, 120  # 10 x 6 patches of 20 x 20 pixels
    image = Image.new("RGB", (w, h), "white")
    df = overlay_rows()
    df = pd.concat([df, df.assign(value=df["value"] + 0.2)])  # two rows per patch: averaged
    wrote_all(plot_patch_overlay(df, image, tmp_path, title="probe accuracy"), "patch_overlay")
    fig, data = drawn[-1]
    assert len(data) == len(df)
    im = next(i for i in fig.axes[0].images if i.get_gid() == "heat")
    assert im.get_extent() == pytest.approx([0, w, h, 0])  # the heat layer covers the image exactly
    assert im.get_array().shape == (6, 10)
    assert heat_at(fig, 7 * 20 + 10, 2 * 20 + 10) == pytest.approx(1.1)  # the hot patch's pixels
    assert heat_at(fig, 7 * 20 + 1, 2 * 20 + 19) == pytest.approx(1.1)
    assert heat_at(fig, 7 * 20 + 10, 3 * 20 + 10) == pytest.approx(0.2)  # the patch below
    assert heat_at(fig, 6 * 20 + 10, 2 * 20 + 10) == pytest.approx(0.2)  # the patch to the left
    assert fig.axes[-1].get_ylabel() == "value"  # the colourbar names the metric


def test_patch_overlay_panels_grid_and_errors(tmp_path, drawn):
    df = pd.concat([overlay_rows(hot=(0, 0)).assign(panel="layer 3", metric="char_accuracy"),
                    overlay_rows(hot=(5, 9)).assign(panel="layer 9", metric="char_accuracy")])
    df = pd.concat([df, df.head(1).assign(patch_row=-1, patch_col=-1, value=50.0)])  # a newline token: no patch
    plot_patch_overlay(df, np.zeros((60, 100, 3)), tmp_path, grid=(6, 10), width="double")
    fig, _ = drawn[-1]
    heats = [i for ax in fig.axes for i in ax.images if i.get_gid() == "heat"]
    assert [ax.get_title() for ax in fig.axes[:2]] == ["layer 3", "layer 9"]
    assert [np.unravel_index(np.nanargmax(i.get_array()), (6, 10)) for i in heats] == [(0, 0), (5, 9)]
    assert heats[0].get_clim() == heats[1].get_clim() == (0.1, 1.0)  # one scale for all panels; -1 left out
    assert fig.axes[-1].get_ylabel() == "char accuracy"
    with pytest.raises(ValueError, match="'patch_col'"):
        plot_patch_overlay(df.drop(columns="patch_col"), np.zeros((60, 100, 3)), tmp_path)
    with pytest.raises(ValueError, match="outside the grid"):
        plot_patch_overlay(df, np.zeros((60, 100, 3)), tmp_path, grid=(4, 4))
    with pytest.raises(ValueError, match="image of shape"):
        plot_patch_overlay(df, np.zeros((60, 100, 7)), tmp_path)


# ---- token strip --------------------------------------------------------------------------------------------------
def session_rows(seed=0):
    """A ~300-token, 6-turn session: turn 0 carries two images of 64 patch tokens each."""
    rng = np.random.default_rng(seed)
    words = ["My", " SSN", " is", " 123", "-", "45", "\n", " please", " $", "  "]
    rows, pos = [], 0
    for turn, n in enumerate([20, 30, 25, 15, 18, 12]):
        role = "user" if turn % 2 == 0 else "assistant"
        for k in range(n):
            if turn == 0 and k in (3, 10):
                for _ in range(64):
                    rows.append({"position": pos, "turn": 0, "role": role, "token": "<image>",
                                 "value": rng.uniform()})
                    pos += 1
            rows.append({"position": pos, "turn": turn, "role": role, "token": words[k % len(words)],
                         "value": np.nan if k % 6 == 5 else rng.normal()})
            pos += 1
    return pd.DataFrame(rows).sample(frac=1, random_state=0)  # any row order


def test_token_strip_collapses_images_and_labels_turns(tmp_path, drawn):
    df = session_rows()
    assert len(df) > 240
    wrote_all(plot_token_strip(df, tmp_path, title="probe accuracy", max_tokens_per_line=16), "token_strip")
    fig, boxes = drawn[-1]
    assert (pd.read_csv(tmp_path / "token_strip.csv")["label"] == boxes["label"]).all()
    images = boxes[boxes["is_image"]]
    assert images["label"].tolist() == ["[image \u00d764]"] * 2  # two runs, not one, not 128 boxes
    first = df[df["token"] == "<image>"].sort_values("position").head(64)
    assert images["value"].iloc[0] == pytest.approx(first["value"].mean())
    assert len(boxes) == len(df) - 2 * 63
    assert boxes["position_start"].is_monotonic_increasing
    labels = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "turn_label"]
    assert labels == [f"turn {t} ({'user' if t % 2 == 0 else 'assistant'})" for t in range(6)]
    assert boxes.groupby("line").size().max() <= 16  # wrapped
    assert boxes.groupby("line")["turn"].nunique().max() == 1  # every turn starts its own line
    assert boxes.groupby("turn")["line"].nunique()[1] == 2  # 30 tokens at 16 a line
    tokens = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "token"]
    assert len(tokens) == len(boxes) and "\u21b5" in tokens and r"\$" in tokens  # visible newline, literal $
    drawn_boxes = [p for p in fig.axes[0].patches]
    nan_box = drawn_boxes[int(np.flatnonzero(boxes["value"].isna().to_numpy())[0])]
    assert nan_box.get_facecolor()[3] == 0  # no value: uncoloured


def test_token_boxes_segment_column_and_errors():
    df = pd.DataFrame({"position": range(6), "turn": [0] * 6, "role": ["user"] * 6,
                       "token": ["a", "x", "y", "z", "b", "c"], "value": [1, 2, 4, np.nan, 0, 0],
                       "segment": ["user", "image", "image", "image", "user", "user"]})
    boxes = token_boxes(df)
    assert boxes["label"].tolist() == ["a", "[image \u00d73]", "b", "c"]
    assert boxes["value"].iloc[1] == pytest.approx(3.0)  # the mean of the values it has
    # wraps on characters too (a label and a space each): "a" | "[image ×3]" alone, too long to share | "b c"
    assert token_boxes(df, chars_per_line=8)["line"].tolist() == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="'token'"):
        token_boxes(df.drop(columns="token"))
    with pytest.raises(ValueError, match="'score'"):
        plot_token_strip(df, "/nonexistent", value="score")
