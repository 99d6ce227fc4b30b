"""Figures: returned as matplotlib Figures (drawn into given axes when asked), saved as PDF + PNG + CSV only when a
folder is given; sizes, significance marks on the heatmaps, the patch overlay on a document image, the token strip."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.backend_bases import MouseEvent
from matplotlib.figure import Figure
from PIL import Image

from analysis import figures
from analysis.figures import (
    COLUMN_IN,
    DOUBLE_COLUMN_IN,
    figure_size,
    plot_atp_agreement,
    plot_knockout_curves,
    plot_layer_profile,
    plot_leakage,
    plot_patch_overlay,
    plot_patching_heatmaps,
    plot_probe_heatmap,
    plot_retention_curves,
    plot_token_strip,
    plot_transfer_matrix,
    token_boxes,
)


@pytest.fixture(autouse=True)
def no_open_figures():
    """Every test starts and ends with no open figure, so `plt.get_fignums()` says what a call left open."""
    plt.close("all")
    yield
    plt.close("all")


def wrote_all(out_dir, name):
    paths = [out_dir / f"{name}.{x}" for x in ("pdf", "png", "csv")]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths), sorted(p.name for p in out_dir.iterdir())
    assert paths[0].read_bytes().startswith(b"%PDF") and paths[1].read_bytes().startswith(b"\x89PNG")
    return paths


def test_figure_size():
    assert figure_size() == pytest.approx((COLUMN_IN, COLUMN_IN * 0.65))
    assert figure_size("double", aspect=0.5) == pytest.approx((DOUBLE_COLUMN_IN, DOUBLE_COLUMN_IN / 2))
    assert figure_size(5.0, 1.0) == (5.0, 5.0)
    with pytest.raises(ValueError, match="'triple'"):
        figure_size("triple")


def test_save_figure_writes_whole_files_or_none(tmp_path, monkeypatch):
    """Each file is rendered in memory and renamed into place: a save that fails leaves no file of that name and no
    temp file. save_figure leaves the figure open; the CSV is written only when data is given."""
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    data = pd.DataFrame({"x": [0, 1], "y": [1, 0]})
    paths = figures.save_figure(fig, tmp_path, "ok", data)
    assert paths == wrote_all(tmp_path, "ok")
    assert pd.read_csv(tmp_path / "ok.csv").equals(data) and plt.get_fignums() == [fig.number]
    assert [p.name for p in figures.save_figure(fig, tmp_path / "new", "bare")] == ["bare.pdf", "bare.png"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["bare.pdf", "bare.png"]
    with pytest.raises(ValueError, match="file name"):
        figures.save_figure(fig, tmp_path, "sub/name")
    with pytest.raises(ValueError, match="DataFrame"):
        figures.save_figure(fig, tmp_path, "x", data={"x": [0]})

    real = fig.savefig

    def png_fails(buf, format, **kw):
        if format == "png":
            buf.write(b"half a png")
            raise OSError("disk full")
        return real(buf, format=format, **kw)

    monkeypatch.setattr(fig, "savefig", png_fails)
    with pytest.raises(OSError, match="disk full"):
        figures.save_figure(fig, tmp_path, "broken", data)
    assert sorted(p.name for p in tmp_path.iterdir() if "broken" in p.name) == ["broken.pdf"]


def test_a_plot_that_fails_to_save_still_closes_its_figure(tmp_path, monkeypatch):
    def disk_full(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(figures, "save_figure", disk_full)
    with pytest.raises(OSError, match="disk full"):
        plot_layer_profile(profile_rows(), tmp_path)
    assert not plt.get_fignums()


# ---- every figure: returned, shown or saved -----------------------------------------------------------------------
def profile_rows():
    return pd.DataFrame([{"layer": layer, "position_group": g, "value": layer * (k + 1), "ci_low": 0.0,
                          "ci_high": 5.0} for layer in range(3) for k, g in enumerate(("last", "pii"))])


def leakage_rows(models=("m",)):
    return pd.DataFrame([{"model": m, "framing": f, "pii_type": p, "metric": metric, "value": 0.5, "ci_low": 0.2,
                          "ci_high": 0.8} for m in models for f in ("direct", "caption") for p in ("SSN", "Email")
                         for metric in ("ASR", "RR")])


def retention_rows():
    return pd.DataFrame([{"layer": layer, "position_group": "last", "metric": "char_accuracy", "control": "none",
                          "turn_distance": d, "value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
                         for layer in range(2) for d in range(3)])


def transfer_rows(layers=(0, 1)):
    return pd.DataFrame([{"layer": layer, "turn_train": a, "turn_test": b, "value": 0.5 + 0.1 * (a == b)}
                         for layer in layers for a in range(3) for b in range(3)])


def patching_rows(seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"layer": layer, "component": c, "position_group": g, "metric": "score_logit_diff",
                          "direction": "denoise", "method": "exact", "value": rng.normal()}
                         for layer in range(3) for c in ("resid_post", "attn_out")
                         for g in ("pii_patches", "other_image", "final")])


def knockout_rows(windows=(1, 2)):
    return pd.DataFrame([{"layer": layer, "window": w, "position_group": g, "metric": "logit_diff",
                          "value": 1.0 - 0.1 * layer, "clean": 1.0} for w in windows for layer in range(3)
                         for g in ("pii_patches", "final")])


def atp_rows(directions=("denoise", "noise")):
    rng = np.random.default_rng(2)
    return pd.DataFrame([{"session_id": s, "direction": d, "layer": layer, "component": "resid_pre",
                          "position_group": "final", "metric": "logit_diff", "method": m, "value": rng.normal(),
                          "clean": 2.0, "corrupt": -1.0} for s in ("a", "b") for d in directions
                         for layer in range(3) for m in ("atp", "exact")])


FIGURES = {  # name -> (draw(out_dir, **ax_or_axes), the keyword for axes, how many panels these rows make)
    "layer_profile": (lambda out, **kw: plot_layer_profile(profile_rows(), out, **kw), "ax", 1),
    "leakage": (lambda out, **kw: plot_leakage(leakage_rows(), out, **kw), "axes", 2),
    "probe_heatmap": (lambda out, **kw: plot_probe_heatmap(probe_rows(), out, **kw), "ax", 1),
    "retention_curves": (lambda out, **kw: plot_retention_curves(retention_rows(), out, **kw), "ax", 1),
    "transfer_matrix": (lambda out, **kw: plot_transfer_matrix(transfer_rows(), out, **kw), "axes", 2),
    "patching": (lambda out, **kw: plot_patching_heatmaps(patching_rows(), out, **kw), "axes", 2),
    "knockout": (lambda out, **kw: plot_knockout_curves(knockout_rows(), out, **kw), "axes", 2),
    "atp_agreement": (lambda out, **kw: plot_atp_agreement(atp_rows(), out, **kw), "axes", 2),
    "patch_overlay": (lambda out, **kw: plot_patch_overlay(overlay_rows(), np.zeros((60, 100, 3)), out, **kw),
                      "axes", 1),
    "token_strip": (lambda out, **kw: plot_token_strip(session_rows(), out, **kw), None, 1),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_is_returned_open_without_a_folder_and_saved_and_closed_with_one(name, tmp_path, monkeypatch):
    draw = FIGURES[name][0]
    monkeypatch.chdir(tmp_path)
    fig = draw(None)
    assert isinstance(fig, Figure) and fig.axes
    assert plt.get_fignums() == [fig.number]  # open: a notebook shows it
    assert not any(tmp_path.iterdir())  # and nothing written
    plt.close(fig)

    out = tmp_path / "figures"
    saved = draw(out)
    assert isinstance(saved, Figure) and saved.axes
    assert not plt.get_fignums()  # saved and closed: a pipeline draws hundreds
    wrote_all(out, name)  # each figure's default name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]


@pytest.mark.parametrize("name", [n for n, (_, kw, _) in FIGURES.items() if kw])
def test_figure_draws_into_the_axes_it_is_given(name, tmp_path):
    draw, keyword, n_panels = FIGURES[name]
    fig, axes = plt.subplots(1, n_panels + 1, squeeze=False)  # one more, left alone
    mine, spare = list(axes[0, :n_panels]), axes[0, n_panels]
    given = mine[0] if keyword == "ax" else mine
    assert draw(None, **{keyword: given}) is fig
    drawn = [ax for ax in mine if ax.lines or ax.patches or ax.images or ax.collections]
    assert drawn == mine, f"{name}: drew into {len(drawn)} of the {n_panels} axes given"
    assert not (spare.lines or spare.patches or spare.images or spare.collections)
    assert plt.get_fignums() == [fig.number]
    # with a folder: the figure is saved, and stays open (it is the caller's)
    draw(tmp_path, **{keyword: given})
    wrote_all(tmp_path, name)
    assert plt.get_fignums() == [fig.number]


@pytest.mark.parametrize("name", [n for n, (_, kw, _) in FIGURES.items() if kw == "axes"])
def test_figure_refuses_the_wrong_number_of_axes(name):
    draw, _, n_panels = FIGURES[name]
    fig, axes = plt.subplots(1, n_panels + 1)
    with pytest.raises(ValueError, match=f"{n_panels + 1} axes given"):
        draw(None, axes=axes)
    with pytest.raises(ValueError, match="Axes"):
        draw(None, axes=["not an axes"] * n_panels)


def test_leakage_axes_are_metrics_by_models():
    fig, axes = plt.subplots(2, 2)
    plot_leakage(leakage_rows(models=("a", "b")), axes=axes)
    assert [ax.get_title() for ax in axes[0]] == ["a", "b"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["ASR", "RR"]
    assert all(len(ax.patches) == 4 for ax in axes.flat)  # two framings x two PII types each


def test_transfer_matrix_own_grid_turns_spare_panels_off():
    fig = plot_transfer_matrix(transfer_rows(layers=(0, 1, 2, 3, 4)))
    assert len(fig.axes) == 8 and sum(ax.axison for ax in fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes[:5]] == [f"layer {k}" for k in range(5)]


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


def test_probe_heatmap_marks_only_significant_cells(tmp_path):
    fig = plot_probe_heatmap(probe_rows(), tmp_path, name="plain")
    assert not marks(fig) and fig.axes[0].get_legend() is None  # no column, no marks: unchanged

    sig = probe_rows(lambda d: (d["layer"] == 2) & (d["position_group"] == "pii"))
    fig = plot_probe_heatmap(sig, tmp_path, name="marked")
    wrote_all(tmp_path, "marked")
    (dots,) = marks(fig)
    # rows of the grid: last @ turn 0, pii @ turn 0, last @ turn 2, pii @ turn 2; star at the cell's top right
    cells = sorted((round(x - 0.32), round(y + 0.28)) for x, y in dots.get_offsets())
    assert cells == [(2, 1), (2, 3)]
    assert "BH" in fig.axes[0].get_legend().get_texts()[0].get_text()
    assert pd.read_csv(tmp_path / "marked.csv")["significant"].sum() == 2  # the CSV says which cells are marked

    # averaged over two targets: starred only where both targets are significant
    other = sig.assign(target="dob", significant=(sig["layer"] == 2) & (sig["turn"] == 0))
    fig = plot_probe_heatmap(pd.concat([sig, other]), tmp_path, name="two_targets")
    assert len(marks(fig)[0].get_offsets()) == 1

    with pytest.raises(ValueError, match="'significant'"):
        plot_probe_heatmap(sig.assign(significant="yes"), tmp_path)


def test_patching_heatmaps_mark_significant_cells(tmp_path):
    df = patching_rows()
    assert not marks(plot_patching_heatmaps(df, tmp_path, name="plain"))
    # significant only in the second panel: its cells are starred, the note still appears once
    df["significant"] = (df["component"] == "attn_out") & (df["layer"] >= 1)
    fig = plot_patching_heatmaps(df, tmp_path, name="marked")
    wrote_all(tmp_path, "marked")
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


def test_patch_overlay_aligns_patches_with_pixels(tmp_path):
    w, h = 200, 120  # 10 x 6 patches of 20 x 20 pixels
    image = Image.new("RGB", (w, h), "white")
    df = overlay_rows()
    df = pd.concat([df, df.assign(value=df["value"] + 0.2)])  # two rows per patch: averaged
    fig = plot_patch_overlay(df, image, tmp_path, title="probe accuracy")
    wrote_all(tmp_path, "patch_overlay")
    assert len(pd.read_csv(tmp_path / "patch_overlay.csv")) == len(df)
    im = next(i for i in fig.axes[0].images if i.get_gid() == "heat")
    assert im.get_extent() == pytest.approx([0, w, h, 0])  # the heat layer covers the image exactly
    assert im.get_array().shape == (6, 10)
    assert heat_at(fig, 7 * 20 + 10, 2 * 20 + 10) == pytest.approx(1.1)  # the hot patch's pixels
    assert heat_at(fig, 7 * 20 + 1, 2 * 20 + 19) == pytest.approx(1.1)
    assert heat_at(fig, 7 * 20 + 10, 3 * 20 + 10) == pytest.approx(0.2)  # the patch below
    assert heat_at(fig, 6 * 20 + 10, 2 * 20 + 10) == pytest.approx(0.2)  # the patch to the left
    assert fig.axes[-1].get_ylabel() == "value"  # the colourbar names the metric


def test_patch_overlay_panels_grid_and_errors(tmp_path):
    df = pd.concat([overlay_rows(hot=(0, 0)).assign(panel="layer 3", metric="char_accuracy"),
                    overlay_rows(hot=(5, 9)).assign(panel="layer 9", metric="char_accuracy")])
    df = pd.concat([df, df.head(1).assign(patch_row=-1, patch_col=-1, value=50.0)])  # a newline token: no patch
    fig = plot_patch_overlay(df, np.zeros((60, 100, 3)), tmp_path, grid=(6, 10), width="double")
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


def test_token_strip_collapses_images_and_labels_turns(tmp_path):
    df = session_rows()
    assert len(df) > 240
    fig = plot_token_strip(df, tmp_path, title="probe accuracy", max_tokens_per_line=16)
    wrote_all(tmp_path, "token_strip")
    boxes = pd.read_csv(tmp_path / "token_strip.csv", keep_default_na=False, na_values={"value": [""]})
    tokens = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "token"]
    assert tokens == boxes["label"].str.replace("$", r"\$").tolist()  # the CSV holds the boxes drawn
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


def test_fronts_figure_marks_the_non_dominated_settings(tmp_path):
    from analysis.figures import plot_fronts

    pts = pd.DataFrame({"method": ["blur"] * 3 + ["mask"] * 2, "L": [0.9, 0.5, 0.6, 0.1, 0.0],
                        "U": [1.0, 0.8, 0.7, 0.9, 0.4], "strength": [0, 0.5, 1, 0.5, 1]})
    fig = plot_fronts(pts, tmp_path)
    shown = pd.read_csv(tmp_path / "fronts.csv")
    assert shown["on_front"].tolist() == [True, True, False, True, True]
    assert (tmp_path / "fronts.pdf").stat().st_size > 0 and len(fig.axes) == 1
    with pytest.raises(ValueError, match="lacks column 'U'"):
        plot_fronts(pts.drop(columns="U"))


def test_framing_shift_figure_draws_before_and_after_per_framing(tmp_path):
    from analysis.figures import plot_framing_shift

    pts = pd.DataFrame({"method": ["mask", "mask", "blur", "blur"], "label": ["before", "after"] * 2,
                        "asr_caption": [1.0, 0.1, 1.0, 0.7], "asr_direct": [0.0, 0.0, 0.0, 0.0]})
    fig = plot_framing_shift(pts, tmp_path)
    long = pd.read_csv(tmp_path / "framing_shift.csv")
    # the shared "before" drawn once, then each method's after; framings in the benchmark's order
    assert long["row"].drop_duplicates().tolist() == ["before", "blur", "mask"]
    assert long[long["row"] == "mask"].set_index("framing")["ASR"].to_dict() == {"direct": 0.0, "caption": 0.1}
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (3, 2) and grid[2, 1] == 0.1 and grid[0, 1] == 1.0
    pts.loc[2, "asr_caption"] = 0.5  # another "before": each method's own row
    assert len(plot_framing_shift(pts).axes[0].images[0].get_array()) == 4


def test_patch_overlay_outlines_a_forms_pii_marks_scaled_onto_the_image_shown():
    from PIL import Image

    from analysis.figures import plot_patch_overlay

    df = pd.DataFrame({"patch_row": [0, 0, 1, 1], "patch_col": [0, 1, 0, 1], "value": [0.1, 0.9, 0.2, 0.3]})
    image = Image.new("RGB", (64, 32), "white")
    fig = plot_patch_overlay(df, image, marks={"ssn": [(10, 4, 50, 12)], "email": [(0, 20, 30, 30)]},
                             marks_size=(128, 64))  # boxes found on the full-size form, drawn on a half-size image
    boxes = {p.get_gid(): p for p in fig.axes[0].patches}
    assert set(boxes) == {"mark:ssn", "mark:email"}
    ssn = boxes["mark:ssn"]
    assert (ssn.get_x(), ssn.get_y(), ssn.get_width(), ssn.get_height()) == (5.0, 2.0, 20.0, 4.0)
    assert not plot_patch_overlay(df, image).axes[0].patches  # no marks, no outlines
