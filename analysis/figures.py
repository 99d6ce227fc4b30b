"""Figures: one function per figure type, each taking the tidy DataFrame it plots and returning a matplotlib Figure.

Every `plot_*` draws into the `ax` (or `axes`, for a figure of several panels) it is given, else into a new figure
of its own. Given an output folder it also saves the figure as PDF + PNG + the CSV of the data it shows
(`save_figure`) and closes a figure it made (pipelines draw hundreds); without one, nothing is written and the open
figure is returned, for a notebook to show. The backend is matplotlib's choice (without a display it picks a
non-interactive one; in Jupyter, the inline backend).

Style: colour-blind-safe palette (Okabe-Ito), sized for a single paper column (3.4 in) unless asked otherwise.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.tables import FRAMING_ORDER, MISSING, PII_ORDER, sort_rows
from probes.data.files import atomic_write_bytes
from probes.mitigation.fronts import non_dominated

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
COLUMN_IN = 3.4
DOUBLE_COLUMN_IN = 7.0


def paper_style() -> None:
    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
        "ytick.labelsize": 7, "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO), "axes.spines.top": False,
        "axes.spines.right": False, "savefig.bbox": "tight", "pdf.fonttype": 42,
    })


def figure_size(width: str | float = "single", aspect: float = 0.65) -> tuple[float, float]:
    """(width, height) in inches: width "single" (one paper column, COLUMN_IN) or "double" (the full page width,
    DOUBLE_COLUMN_IN) or a number of inches; height = width * aspect."""
    if isinstance(width, str):
        sizes = {"single": COLUMN_IN, "double": DOUBLE_COLUMN_IN}
        if width not in sizes:
            raise ValueError(f"figure_size: width {width!r}: expected 'single', 'double' or inches")
        width = sizes[width]
    if not (width > 0 and aspect > 0):
        raise ValueError(f"figure_size: width {width} and aspect {aspect} must be positive")
    return float(width), float(width) * float(aspect)


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str,
                data: pd.DataFrame | None = None) -> list[Path]:
    """Write name.pdf and name.png into out_dir, and name.csv (the tidy data the figure was drawn from) when `data`
    is given: results are saved beside the figure made from them. Each file is whole or absent (rendered in memory,
    written to a temp file and renamed). The figure stays open (`plt.close(fig)` when done with it). Returns the
    paths written, in that order."""
    # imported here, not at the top, so that importing this module stays light (`import probes` loads transformers)

    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"save_figure: name {name!r}: expected a file name without a folder or suffix")
    if data is not None and not isinstance(data, pd.DataFrame):
        raise ValueError(f"save_figure: data of type {type(data).__name__}: expected a pandas DataFrame or None")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    for path, dpi in ((paths[0], "figure"), (paths[1], 200)):
        buf = io.BytesIO()
        fig.savefig(buf, format=path.suffix[1:], dpi=dpi)
        atomic_write_bytes(path, buf.getvalue())
    if data is not None:
        paths.append(out_dir / f"{name}.csv")
        atomic_write_bytes(paths[-1], data.to_csv(index=False).encode())
    return paths


def _one_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes, bool]:
    """(figure, axes, made): the given `ax` and its figure, or a new figure of `figsize` with one axes."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax, True
    if not isinstance(ax, Axes):
        raise ValueError(f"ax of type {type(ax).__name__}: expected a matplotlib Axes or None")
    return ax.figure, ax, False


def _panel_axes(axes, n_panels: int, nrows: int, ncols: int, figsize: tuple[float, float], fn: str,
                **subplots) -> tuple[Figure, object, bool]:
    """(figure, [row, col] array of axes, made): a new nrows x ncols grid, or the `n_panels` axes given (one Axes
    or a sequence or array of them, all of one figure), laid out as nrows x ncols when that is their number, else as
    one row. `subplots` (sharex, sharey ...) apply to a new grid only."""
    import numpy as np

    if axes is None:
        fig, grid = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **subplots)
        return fig, grid, True
    flat = np.ravel(np.asarray(axes, dtype=object))
    if not all(isinstance(a, Axes) for a in flat):
        raise ValueError(f"{fn}: axes must be matplotlib Axes (got {sorted({type(a).__name__ for a in flat})})")
    if len(flat) != n_panels:
        raise ValueError(f"{fn}: {len(flat)} axes given; this figure has {n_panels} panel(s) ({nrows} x {ncols})")
    if len({id(a.figure) for a in flat}) > 1:
        raise ValueError(f"{fn}: the axes given belong to different figures")
    shape = (nrows, ncols) if nrows * ncols == n_panels else (1, n_panels)
    return flat[0].figure, flat.reshape(shape), False


def _finish(fig: Figure, made: bool, out_dir: str | os.PathLike | None, name: str,
            data: pd.DataFrame | None) -> Figure:
    """Save `fig` (with the data it shows) when an output folder is given, then close it if this module made it:
    pipelines draw hundreds of figures. Returns the figure either way (a closed figure still displays)."""
    if out_dir is not None:
        try:
            save_figure(fig, out_dir, name, data)
        finally:
            if made:
                plt.close(fig)
    return fig


def plot_layer_profile(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "layer_profile",
                       value: str = "value", hue: str = "position_group", ylabel: str | None = None,
                       x: str = "layer", *, ax: Axes | None = None) -> Figure:
    """A line per `hue` group: `value` (mean with its ci_low/ci_high band if present) against `x` (default the
    layer; e.g. turn_distance for ASR by turn distance). The CSV is `df`."""
    for col in (x, value, hue):
        if col not in df.columns:
            raise ValueError(f"plot_layer_profile: the DataFrame lacks column {col!r}")
    paper_style()
    fig, ax, made = _one_axes(ax, (COLUMN_IN, 2.2))
    for key, g in df.groupby(hue):
        g = g.sort_values(x)
        ax.plot(g[x], g[value], marker="o", ms=3, label=str(key))
        if {"ci_low", "ci_high"} <= set(g.columns):
            ax.fill_between(g[x], g["ci_low"], g["ci_high"], alpha=0.2)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel or (df["metric"].iloc[0] if "metric" in df.columns else value))
    ax.legend(frameon=False, loc="best")
    return _finish(fig, made, out_dir, name, df)


def plot_leakage(long_df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "leakage",
                 metrics: tuple[str, ...] = ("ASR", "RR"), *, axes=None) -> Figure:
    """Grouped bars of each metric (a panel each, ASR above RR) per framing, one bar per PII type, with the long
    form's interval (its ci_method; exact by default) as error bars; one column of panels per model. Takes
    `analysis.tables.leakage_long` output. `axes`: len(metrics) x n_models axes to draw into (rows are metrics);
    the PII legend then sits above the first panel instead of above the figure."""
    import numpy as np

    need = {"model", "framing", "pii_type", "metric", "value"}
    if not need <= set(long_df.columns):
        raise ValueError(f"plot_leakage: the DataFrame lacks column(s) {sorted(need - set(long_df.columns))}")
    data = long_df[long_df["metric"].isin(metrics)].copy()
    for col in ("framing", "pii_type"):
        data[col] = data[col].astype(object).where(data[col].notna(), MISSING)
    data = sort_rows(data)
    models = list(dict.fromkeys(data["model"]))
    framings = [f for f in FRAMING_ORDER if f in set(data["framing"])] + sorted(
        set(data["framing"]) - set(FRAMING_ORDER))
    piis = [p for p in PII_ORDER if p in set(data["pii_type"])] + sorted(set(data["pii_type"]) - set(PII_ORDER))
    paper_style()
    width = COLUMN_IN if len(models) == 1 else min(DOUBLE_COLUMN_IN, COLUMN_IN * len(models) * 0.7)
    fig, axes, made = _panel_axes(axes, len(metrics) * max(1, len(models)), len(metrics), max(1, len(models)),
                                  (width, 1.5 * len(metrics) + 0.4), "plot_leakage", sharex=True, sharey="row")
    x = np.arange(len(framings))
    bar = 0.8 / max(1, len(piis))
    for j, model in enumerate(models):
        for i, metric in enumerate(metrics):
            ax = axes[i, j]
            cell = data[(data["model"] == model) & (data["metric"] == metric)].set_index(["framing", "pii_type"])
            for k, pii in enumerate(piis):
                rows = [cell.loc[(f, pii)] if (f, pii) in cell.index else None for f in framings]
                vals = np.array([r["value"] if r is not None else np.nan for r in rows], dtype=float)
                err = None
                if {"ci_low", "ci_high"} <= set(cell.columns):
                    lo = np.array([r["ci_low"] if r is not None else np.nan for r in rows], dtype=float)
                    hi = np.array([r["ci_high"] if r is not None else np.nan for r in rows], dtype=float)
                    err = np.nan_to_num(np.vstack([vals - lo, hi - vals]).clip(min=0))
                ax.bar(x + (k - (len(piis) - 1) / 2) * bar, np.nan_to_num(vals), bar, yerr=err, capsize=1.5,
                       error_kw={"elinewidth": 0.6, "capthick": 0.6}, label=pii, color=OKABE_ITO[k % len(OKABE_ITO)])
            ax.set_ylim(0, 1.05)
            if j == 0:
                ax.set_ylabel(metric)
            if i == 0 and len(models) > 1:
                ax.set_title(str(model))
            ax.set_xticks(x)
            ax.set_xticklabels(framings, rotation=30, ha="right")
    handles, labels = axes[0, 0].get_legend_handles_labels()  # above the panels: bars may reach 1
    if made:
        fig.legend(handles, labels, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncols=min(3, len(piis)))
        fig.tight_layout()
    else:  # someone else's figure: the legend belongs to the panels drawn here
        axes[0, 0].legend(handles, labels, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0),
                          ncols=min(3, len(piis)))
    return _finish(fig, made, out_dir, name, data)


SIGNIFICANCE_LABEL = "significant after BH correction"


def _has_significance(df: pd.DataFrame, fn: str) -> bool:
    """True when `df` carries a `significant` column (from `probes.stats.mark_significant`) to mark cells by."""
    if "significant" not in df.columns:
        return False
    bad = df["significant"].dropna()
    bad = bad[~bad.isin([True, False])]
    if len(bad):
        raise ValueError(f"{fn}: column 'significant' must hold booleans (got {bad.iloc[0]!r})")
    return True


def _mark_cells(ax, significant):
    """A small star in the top-right corner of every cell of the boolean grid [row, col] that survives correction
    (an empty scatter when none does, so the marks are always one findable artist)."""
    import numpy as np

    rows, cols = np.nonzero(np.asarray(significant, dtype=bool))
    return ax.scatter(cols + 0.32, rows - 0.28, marker="*", s=16, c="white", edgecolors="black", linewidths=0.35,
                      zorder=3, gid="significance")


def _significance_legend(ax, marks, label: str) -> None:
    """Say below the axes (under its xlabel) what the star means."""
    import matplotlib.transforms as mtransforms

    below = mtransforms.offset_copy(ax.transAxes, fig=ax.figure, y=-30, units="points")
    ax.legend([marks], [label], loc="upper left", bbox_to_anchor=(0, 0), bbox_transform=below, frameon=False,
              handletextpad=0.2, borderaxespad=0, fontsize=6)


def _cell_label(group: str, turn: int) -> str:
    return group if turn < 0 else f"{group} @ turn {turn}"


def plot_probe_heatmap(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "probe_heatmap",
                       metric: str = "char_accuracy", control: str = "none", title: str | None = None,
                       significance_label: str = SIGNIFICANCE_LABEL, *, ax: Axes | None = None) -> Figure:
    """Layer (x) by position group and turn (y): the probe `metric` per cell, annotated; the best cell boxed.
    Takes `probes.probing.sweep.probe_sweep` output (rows of other metrics and controls are ignored). With a boolean
    `significant` column (`probes.stats.mark_significant`) the cells that survive correction get a star, explained
    below the axes; averaged over several targets, a cell is starred only when it is significant for all of them.
    The CSV holds the cells drawn."""
    import numpy as np

    need = {"layer", "position_group", "turn", "metric", "value"}
    if not need <= set(df.columns):
        raise ValueError(f"plot_probe_heatmap: the DataFrame lacks column(s) {sorted(need - set(df.columns))}")
    marked = _has_significance(df, "plot_probe_heatmap")
    data = df[(df["metric"] == metric) & (df.get("control", "none") == control)]
    if marked:
        data = data.assign(significant=data["significant"].eq(True))
    if "target" in data.columns and data["target"].nunique() > 1:
        agg = {"value": "mean", **({"significant": "all"} if marked else {})}
        data = data.groupby(["layer", "position_group", "turn"], as_index=False).agg(agg)
    if not len(data):
        raise ValueError(f"plot_probe_heatmap: no rows with metric {metric!r} (control {control!r})")
    data = data.assign(cell=[_cell_label(g, int(t)) for g, t in zip(data["position_group"], data["turn"])])
    order = data.drop_duplicates("cell").sort_values(["turn", "position_group"])["cell"].tolist()
    grid = data.pivot_table(index="cell", columns="layer", values="value").reindex(order)
    paper_style()
    fig, ax, made = _one_axes(ax, (COLUMN_IN, 0.6 + 0.22 * len(grid)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("layer")
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5, color="white" if v < 0.6 else "black")
    i, j = np.unravel_index(np.nanargmax(grid.to_numpy()), grid.shape)
    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=OKABE_ITO[3], lw=1.2))
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=metric.replace("_", " "))
    if marked:
        sig = data.groupby(["cell", "layer"])["significant"].all().unstack()
        marks = _mark_cells(ax, sig.reindex(index=grid.index, columns=grid.columns).fillna(False)
                            .to_numpy(dtype=bool))
        if len(marks.get_offsets()):
            _significance_legend(ax, marks, significance_label)
    if title:
        ax.set_title(title)
    return _finish(fig, made, out_dir, name, data)


def plot_retention_curves(df: pd.DataFrame, out_dir: str | os.PathLike | None = None,
                          name: str = "retention_curves", metric: str = "char_accuracy", position_group: str = "last",
                          control: str = "none", chance: float | None = None, *, ax: Axes | None = None) -> Figure:
    """Probe `metric` against turn distance since the image was shown, one line per layer with its bootstrap CI
    band (from `probe_sweep` output, cells of `position_group`)."""
    data = df[(df["metric"] == metric) & (df["position_group"] == position_group)
              & (df.get("control", "none") == control) & df["turn_distance"].notna()]
    if not len(data):
        raise ValueError(f"plot_retention_curves: no {metric!r} rows of position group {position_group!r} with a "
                         f"turn distance")
    data = data.groupby(["layer", "turn_distance"], as_index=False)[["value", "ci_low", "ci_high"]].mean()
    paper_style()
    fig, ax, made = _one_axes(ax, (COLUMN_IN, 2.2))
    for k, (layer, g) in enumerate(data.groupby("layer")):
        g = g.sort_values("turn_distance")
        c = OKABE_ITO[k % len(OKABE_ITO)]
        ax.plot(g["turn_distance"], g["value"], marker="o", ms=3, color=c, label=f"layer {layer}")
        ax.fill_between(g["turn_distance"], g["ci_low"], g["ci_high"], color=c, alpha=0.15, lw=0)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=0.8, label="chance")
    ax.set_xlabel("user turns since the image")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False, fontsize=6, ncols=2)
    return _finish(fig, made, out_dir, name, data)


def plot_transfer_matrix(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "transfer_matrix",
                         layers: list[int] | None = None, *, axes=None) -> Figure:
    """Train turn (y) x test turn (x) accuracy, one panel per layer (from `probes.probing.sweep.transfer_matrix`);
    `axes`: one axes per layer to draw into."""
    import numpy as np

    layers = sorted(df["layer"].unique()) if layers is None else layers
    paper_style()
    ncols = min(4, len(layers))
    nrows = -(-len(layers) // ncols)
    width = COLUMN_IN if ncols <= 2 else DOUBLE_COLUMN_IN
    fig, axes, made = _panel_axes(axes, len(layers), nrows, ncols, (width, 0.3 + width / ncols * nrows),
                                  "plot_transfer_matrix")
    for ax, layer in zip(axes.flat, layers):
        g = df[df["layer"] == layer].pivot_table(index="turn_train", columns="turn_test", values="value")
        ax.imshow(g.to_numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(g.shape[1]), [str(c) for c in g.columns])
        ax.set_yticks(range(g.shape[0]), [str(c) for c in g.index])
        for (i, j), v in np.ndenumerate(g.to_numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if v < 0.6 else "black")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("test turn")
        ax.set_ylabel("train turn")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if made:
        fig.tight_layout()
    return _finish(fig, made, out_dir, name, df[df["layer"].isin(layers)])


# ---- patching figures
def _group_order(groups) -> list[str]:
    """PII patches, other patches, turns in order, the final token last (as `probes.patching.sweep.default_groups`)."""
    def key(g: str):
        if g == "pii_patches":
            return (0, 0, g)
        if g == "other_image":
            return (1, 0, g)
        if g.startswith("turn") and g[4:].isdigit():
            return (2, int(g[4:]), g)
        return (4, 0, g) if g == "final" else (3, 0, g)
    return sorted(set(groups), key=key)


def plot_patching_heatmaps(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "patching",
                           metric: str = "score_logit_diff", direction: str = "denoise", method: str = "exact",
                           annotate: bool | None = None, significance_label: str = SIGNIFICANCE_LABEL, *,
                           axes=None) -> Figure:
    """Layer (x) by position group (y), one panel per component: the mean `metric` over pairs of each cell
    (`probes.patching.sweep.summarize` output, or per-pair rows, averaged here), diverging around 0; a score's 1 is
    the clean behaviour restored. An `effect_*` metric (`analysis.patching_stats`) is 0 for "no change" in both
    directions and 1 for the whole clean-corrupt gap moved. Rows of other metrics, directions and methods are
    ignored. With a boolean `significant` column (`probes.stats.mark_significant`) the cells that survive
    correction get a star (a cell averaged from several rows only when all of them are significant), explained
    below the first panel. With a boolean `null_by_construction` column those cells (the patch wrote what the
    base run already held) are left blank: they cannot have changed, and were not tested. `axes`: one axes per
    component to draw into. The CSV holds the cells drawn."""
    import numpy as np

    need = {"layer", "component", "position_group", "metric", "value", "direction", "method"}
    if not need <= set(df.columns):
        raise ValueError(f"plot_patching_heatmaps: the DataFrame lacks column(s) {sorted(need - set(df.columns))}")
    data = df[(df["metric"] == metric) & (df["direction"] == direction) & (df["method"] == method)]
    if not len(data):
        raise ValueError(f"plot_patching_heatmaps: no rows with metric {metric!r}, direction {direction!r}, "
                         f"method {method!r}")
    marked = _has_significance(data, "plot_patching_heatmaps")
    blanked = "null_by_construction" in data.columns and bool(data["null_by_construction"].eq(True).any())
    if blanked:
        data = data.assign(value=data["value"].where(~data["null_by_construction"].eq(True)))
    agg = {"value": "mean", **({"significant": "all"} if marked else {})}
    if marked:
        data = data.assign(significant=data["significant"].eq(True))
    data = data.groupby(["component", "position_group", "layer"], as_index=False).agg(agg)
    comps = [c for c in ("resid_pre", "resid_post", "attn_out", "mlp_out") if c in set(data["component"])]
    comps += sorted(set(data["component"]) - set(comps))
    groups = _group_order(data["position_group"])
    layers = sorted(data["layer"].unique())
    grids = [data[data["component"] == c].pivot_table(index="position_group", columns="layer", values="value")
             .reindex(index=groups, columns=layers).to_numpy() for c in comps]
    lim = max(1e-9, float(np.nanmax([np.nanmax(np.abs(g)) for g in grids])))
    if metric.startswith(("score_", "effect_")):
        lim = max(lim, 1.0)
    annotate = (len(layers) * len(groups) <= 120) if annotate is None else annotate
    paper_style()
    width = COLUMN_IN if len(comps) == 1 else DOUBLE_COLUMN_IN
    fig, axes, made = _panel_axes(axes, len(comps), 1, len(comps), (width, 0.7 + 0.22 * len(groups)),
                                  "plot_patching_heatmaps", sharey=True)
    im, n_marked = None, 0
    for ax, comp, grid in zip(axes[0], comps, grids):
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xlabel("layer")
        ax.set_title(comp)
        if annotate:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=4.5,
                            color="white" if abs(v) > 0.6 * lim else "black")
        if marked:
            sig = (data[data["component"] == comp].pivot_table(index="position_group", columns="layer",
                                                                values="significant", aggfunc="all")
                   .reindex(index=groups, columns=layers).fillna(False).to_numpy(dtype=bool))
            n_marked += len(_mark_cells(ax, sig).get_offsets())
    label = (f"effect ({direction}; 0 = no change)" if metric.startswith("effect_")
             else f"{metric.replace('_', ' ')} ({direction})")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, pad=0.02, label=label)
    if n_marked:
        _significance_legend(axes[0, 0], next(c for c in axes[0, 0].collections if c.get_gid() == "significance"),
                             significance_label)
    if blanked:
        axes[0, -1].text(1.0, -0.32, "blank: null by construction (not tested)", transform=axes[0, -1].transAxes,
                         ha="right", va="top", fontsize=6)
    return _finish(fig, made, out_dir, name, data.assign(metric=metric, direction=direction, method=method))


def plot_knockout_curves(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "knockout",
                         metric: str = "logit_diff", *, axes=None) -> Figure:
    """Change of `metric` when the probe turn may not attend to a source set, against the first layer of the
    knocked-out window: a line per source, a panel per window size (with its CI band when given); `axes`: one axes
    per window size to draw into."""
    need = {"layer", "window", "position_group", "metric", "value", "clean"}
    if not need <= set(df.columns):
        raise ValueError(f"plot_knockout_curves: the DataFrame lacks column(s) {sorted(need - set(df.columns))}")
    data = df[(df["metric"] == metric) & df["window"].notna()].copy()
    if "method" in data.columns:
        data = data[data["method"] == "knockout"]
    if not len(data):
        raise ValueError(f"plot_knockout_curves: no knockout rows with metric {metric!r}")
    cols = [c for c in ("value", "clean", "ci_low", "ci_high") if c in data.columns]
    data = data.groupby(["window", "position_group", "layer"], as_index=False)[cols].mean()
    data["effect"] = data["value"] - data["clean"]
    windows = sorted(data["window"].unique())
    paper_style()
    width = COLUMN_IN if len(windows) == 1 else DOUBLE_COLUMN_IN
    fig, axes, made = _panel_axes(axes, len(windows), 1, len(windows), (width, 2.2), "plot_knockout_curves",
                                  sharey=True)
    for ax, w in zip(axes[0], windows):
        for k, g in enumerate(_group_order(data.loc[data["window"] == w, "position_group"])):
            d = data[(data["window"] == w) & (data["position_group"] == g)].sort_values("layer")
            c = OKABE_ITO[k % len(OKABE_ITO)]
            ax.plot(d["layer"], d["effect"], marker="o", ms=3, color=c, label=g)
            if {"ci_low", "ci_high"} <= set(d.columns):
                ax.fill_between(d["layer"], d["ci_low"] - d["clean"], d["ci_high"] - d["clean"], color=c,
                                alpha=0.15, lw=0)
        ax.axhline(0, color="grey", lw=0.6, ls=":")
        ax.set_xticks(sorted(data.loc[data["window"] == w, "layer"].unique()))
        ax.set_title(f"window of {int(w)} layer{'s' if w > 1 else ''}")
        ax.set_xlabel("first knocked-out layer")
    axes[0, 0].set_ylabel(f"\u0394 {metric.replace('_', ' ')}")
    axes[0, 0].legend(frameon=False, fontsize=6)
    if made:
        fig.tight_layout()
    return _finish(fig, made, out_dir, name, data.assign(metric=metric))


def plot_atp_agreement(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "atp_agreement",
                       metric: str = "logit_diff", *, axes=None) -> Figure:
    """AtP's estimated change of `metric` (y) against exact patching's (x), a dot per pair and cell, a panel per
    direction, with the Spearman correlation (per-pair rows of `probes.patching`, methods atp and exact);
    `axes`: one axes per direction to draw into."""
    from scipy.stats import spearmanr

    keys = ["session_id", "direction", "layer", "component", "position_group"]
    d = df[df["metric"] == metric]
    both = d[d["method"] == "exact"].merge(d[d["method"] == "atp"], on=keys, suffixes=("_exact", "_atp"))
    if not len(both):
        raise ValueError(f"plot_atp_agreement: no cells with both an exact and an AtP row of {metric!r}")
    base = both["corrupt_exact"].where(both["direction"] == "denoise", both["clean_exact"])
    both = both.assign(exact=both["value_exact"] - base, atp=both["value_atp"] - base)
    directions = list(dict.fromkeys(both["direction"]))
    paper_style()
    fig, axes, made = _panel_axes(axes, len(directions), 1, len(directions),
                                  (COLUMN_IN * (1 if len(directions) == 1 else 1.6), 2.0), "plot_atp_agreement")
    for ax, direction in zip(axes[0], directions):
        g = both[both["direction"] == direction]
        for k, comp in enumerate(sorted(g["component"].unique())):
            c = g[g["component"] == comp]
            ax.scatter(c["exact"], c["atp"], s=5, color=OKABE_ITO[k % len(OKABE_ITO)], label=comp)
        lo, hi = float(min(g["exact"].min(), g["atp"].min())), float(max(g["exact"].max(), g["atp"].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.6, ls=":")
        rho = spearmanr(g["exact"], g["atp"]).statistic if len(g) > 2 else float("nan")
        ax.set_title(f"{direction}: Spearman {rho:.2f}")
        ax.set_xlabel(f"exact \u0394 {metric.replace('_', ' ')}")
        ax.set_ylabel(f"AtP \u0394 {metric.replace('_', ' ')}")
    axes[0, 0].legend(frameon=False, fontsize=6)
    if made:
        fig.tight_layout()
    return _finish(fig, made, out_dir, name, both[[*keys, "exact", "atp"]])


# ---- where in the document and the transcript
def _metric_label(df: pd.DataFrame, value: str) -> str:
    """The colourbar's label: the single metric the rows hold, else the value column's name."""
    if "metric" in df.columns and df["metric"].nunique() == 1:
        return str(df["metric"].iloc[0]).replace("_", " ")
    return value.replace("_", " ")


def _image_array(image):
    """A PIL image or an HxW / HxWx3 / HxWx4 array as an array imshow takes."""
    import numpy as np

    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"plot_patch_overlay: image of shape {arr.shape}: expected a PIL image or an HxW, HxWx3 "
                         f"or HxWx4 array")
    return arr


def patch_grid(df: pd.DataFrame, value: str = "value", grid: tuple[int, int] | None = None):
    """[rows, cols] array of the mean `value` per (patch_row, patch_col), nan where a patch has no row. Rows with a
    negative or missing patch index are not patches (newline or tag tokens: the token map's -1) and are left out."""
    import numpy as np

    for col in ("patch_row", "patch_col", value):
        if col not in df.columns:
            raise ValueError(f"patch_grid: column {col!r} not in the DataFrame (columns: {list(df.columns)})")
    rc = df[["patch_row", "patch_col"]].apply(pd.to_numeric, errors="coerce")
    data = df.assign(_r=rc["patch_row"], _c=rc["patch_col"], _v=pd.to_numeric(df[value], errors="coerce"))
    data = data[(data["_r"] >= 0) & (data["_c"] >= 0)]
    if grid is None:
        if not len(data):
            raise ValueError("patch_grid: no rows with a patch index >= 0 (and no grid=(rows, cols) given)")
        grid = (int(data["_r"].max()) + 1, int(data["_c"].max()) + 1)
    rows, cols = int(grid[0]), int(grid[1])
    if len(data) and (data["_r"].max() >= rows or data["_c"].max() >= cols):
        raise ValueError(f"patch_grid: patch ({int(data['_r'].max())}, {int(data['_c'].max())}) lies outside the "
                         f"grid of {rows} x {cols} patches")
    means = data.groupby(["_r", "_c"])["_v"].mean()
    out = np.full((rows, cols), np.nan)
    out[means.index.get_level_values(0).astype(int), means.index.get_level_values(1).astype(int)] = means.to_numpy()
    return out


def plot_patch_overlay(df: pd.DataFrame, image, out_dir: str | os.PathLike | None = None,
                       name: str = "patch_overlay", value: str = "value", title: str | None = None,
                       cmap: str = "viridis", alpha: float = 0.6, width: str | float = "single",
                       grid: tuple[int, int] | None = None, vmin: float | None = None, vmax: float | None = None, *,
                       axes=None, marks=None, marks_size: tuple[int, int] | None = None) -> Figure:
    """Per-patch values drawn over the document image itself: a translucent heat layer, one cell per vision patch,
    stretched over the whole image with imshow(extent=...) so patch (r, c) covers exactly its pixels.

    `df`: tidy rows with patch_row, patch_col and `value` (several rows per patch are averaged); a `panel` column
    gives one panel per panel value (e.g. per layer), all on one colour scale. The grid is max row/col + 1 unless
    `grid=(rows, cols)` is given. Pass the image as the model saw it (after the processor's resize or crop), and the
    rows of one image tile (multi-tile families: filter on `tile` first). `axes`: one axes per panel to draw into
    (the title then goes on the first panel, not above the figure). `marks`: label -> pixel boxes (x0, y0, x1, y1)
    to outline on every panel, e.g. a real form's `SessionImage.marks` (the PII found by OCR), in the coordinates of
    an image of `marks_size` (w, h; default: the image's own), scaled onto the image drawn. The CSV is `df`."""
    import numpy as np

    fn = "plot_patch_overlay"
    for col in ("patch_row", "patch_col", value):
        if col not in df.columns:
            raise ValueError(f"{fn}: column {col!r} not in the DataFrame (columns: {list(df.columns)})")
    if "tile" in df.columns and df["tile"].nunique() > 1:
        raise ValueError(f"{fn}: rows from {df['tile'].nunique()} image tiles (column 'tile'); pass one tile's rows")
    pixels = _image_array(image)
    h, w = pixels.shape[:2]
    if grid is None:
        grid = patch_grid(df, value).shape  # one grid for every panel
    panels = sorted(df["panel"].dropna().unique().tolist()) if "panel" in df.columns else [None]
    heats = [patch_grid(df if p is None else df[df["panel"] == p], value, grid) for p in panels]
    finite = np.concatenate([x[np.isfinite(x)] for x in heats])
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    ncols = min(len(panels), 2 if width == "single" else 4)
    nrows = -(-len(panels) // ncols)
    fig_w, _ = figure_size(width)
    panel_w = (fig_w - 0.5) / ncols  # room for the colourbar
    paper_style()
    panel_h = panel_w * h / w + (0.2 if panels[0] is not None or title else 0.05)
    fig, axes, made = _panel_axes(axes, len(panels), nrows, ncols, (fig_w, nrows * panel_h), fn)
    im = None
    for ax, panel, heat in zip(axes.flat, panels, heats):
        ax.imshow(pixels, extent=(0, w, h, 0), interpolation="bilinear", cmap="gray" if pixels.ndim == 2 else None)
        im = ax.imshow(heat, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                       interpolation="nearest", gid="heat")  # nan patches stay transparent
        _outline_marks(ax, marks, marks_size or (w, h), (w, h))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        if panel is not None:
            ax.set_title(f"{panel}")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes.flat), fraction=0.05, pad=0.02, label=_metric_label(df, value))
    if title and made:
        fig.suptitle(title)
    elif title:
        first = axes.flat[0]
        first.set_title(title if panels[0] is None else f"{title}\n{panels[0]}")
    return _finish(fig, made, out_dir, name, df)


def _outline_marks(ax: Axes, marks, size: tuple[int, int], shown: tuple[int, int]) -> None:
    """Outline each labelled box (scaled from an image of `size` onto one of `shown`) with its label above it."""
    from matplotlib.patches import Rectangle

    sx, sy = shown[0] / size[0], shown[1] / size[1]
    for k, (label, boxes) in enumerate(sorted((marks or {}).items())):
        colour = OKABE_ITO[(k + 3) % len(OKABE_ITO)]
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, lw=0.8,
                                   edgecolor=colour, gid=f"mark:{label}"))
            ax.text(x0 * sx, y0 * sy, label, color=colour, fontsize="xx-small", va="bottom")


IMAGE_TOKEN = "<image>"


def _token_text(token, max_chars: int) -> str:
    """What a token box shows: line breaks and tabs as visible marks, surrounding spaces trimmed (a space-only token
    becomes a visible blank), long tokens cut with an ellipsis."""
    text = "" if token is None or (isinstance(token, float) and token != token) else str(token)
    text = text.replace("\r", "").replace("\n", "\u21b5").replace("\t", "\u2192")
    text = text.strip(" ") or ("\u2423" if text else "\u2205")
    return text if len(text) <= max_chars else text[:max_chars - 1] + "\u2026"


def token_boxes(df: pd.DataFrame, value: str = "value", max_tokens_per_line: int = 40, chars_per_line: int = 140,
                max_token_chars: int = 12) -> pd.DataFrame:
    """The boxes a token strip draws, one row per box in reading order: turn, role, line (0.. over the whole strip),
    label, value, n_tokens, position_start, position_end, is_image.

    Tokens are sorted by position and grouped turn by turn; a run of consecutive image tokens (token "<image>", or
    segment "image" when that column exists) becomes one box "[image ×N]" holding the mean value of the run (nan
    when it has none). A turn starts a new line, and a line wraps after `max_tokens_per_line` boxes or when its
    labels would pass `chars_per_line` characters."""
    import numpy as np

    fn = "token_boxes"
    for col in ("position", "turn", "role", "token", value):
        if col not in df.columns:
            raise ValueError(f"{fn}: column {col!r} not in the DataFrame (columns: {list(df.columns)})")
    data = df.sort_values("position", kind="stable").reset_index(drop=True)
    vals = pd.to_numeric(data[value], errors="coerce").to_numpy(dtype=float)
    is_image = data["token"].astype(str) == IMAGE_TOKEN
    if "segment" in data.columns:
        is_image |= data["segment"] == "image"
    is_image = is_image.to_numpy()
    turns, pos = data["turn"].to_numpy(), data["position"].to_numpy()
    boxes, i = [], 0
    while i < len(data):
        j = i + 1
        if is_image[i]:  # extend the run while the next token is an image token of the same turn
            while j < len(data) and is_image[j] and turns[j] == turns[i]:
                j += 1
            run = vals[i:j][np.isfinite(vals[i:j])]
            label, v = f"[image \u00d7{j - i}]", float(run.mean()) if run.size else float("nan")
        else:
            label, v = _token_text(data["token"].iloc[i], max_token_chars), vals[i]
        boxes.append({"turn": turns[i], "role": data["role"].iloc[i], "label": label, "value": v, "n_tokens": j - i,
                      "position_start": pos[i], "position_end": pos[j - 1], "is_image": bool(is_image[i])})
        i = j
    line, used, count, prev_turn = -1, 0, 0, object()
    for box in boxes:
        chars = len(box["label"]) + 1
        if box["turn"] != prev_turn or count >= max_tokens_per_line or (count and used + chars > chars_per_line):
            line, used, count, prev_turn = line + 1, 0, 0, box["turn"]
        box["line"], used, count = line, used + chars, count + 1
    cols = ["turn", "role", "line", "label", "value", "n_tokens", "position_start", "position_end", "is_image"]
    return pd.DataFrame(boxes, columns=cols)


def plot_token_strip(df: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "token_strip",
                     value: str = "value", title: str | None = None, width: str | float = "double",
                     max_tokens_per_line: int = 40, cmap: str | None = None, vmin: float | None = None,
                     vmax: float | None = None, fontsize: float = 5.0) -> Figure:
    """The chat transcript as wrapped lines of token boxes, turn by turn, each box coloured by a per-position value
    (e.g. a probe's accuracy or a patching effect at that position); "turn k (role)" at the left of each turn's
    first line, runs of image tokens collapsed into one "[image ×N]" box (see `token_boxes`), boxes without a value
    grey. The colour map is diverging around 0 when the values take both signs, else sequential. `df`: position,
    turn, role, token (the decoded text), `value`, optionally segment. The CSV holds the boxes drawn.

    It always makes its own figure (no `ax`): the boxes are laid out in inches, sized to their text at `fontsize`
    points, and the figure's height follows from the number of wrapped lines, so it cannot fit an axes of a size
    chosen beforehand."""
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fig_w, _ = figure_size(width)
    char_w = 0.6 * fontsize / 72  # DejaVu Sans Mono advances 0.6 em per character
    line_h, label_w, gap = 2.0 * fontsize / 72, 0.85, 0.4 * char_w
    chars_per_line = int((fig_w - label_w - 0.05) / char_w)
    boxes = token_boxes(df, value, max_tokens_per_line, chars_per_line)
    finite = boxes["value"].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    diverging = lo < 0 < hi
    if diverging and vmin is None and vmax is None:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    cmap = plt.get_cmap(cmap or ("RdBu_r" if diverging else "viridis"))
    norm = Normalize(lo, hi if hi > lo else lo + 1e-9)

    n_lines = int(boxes["line"].max()) + 1 if len(boxes) else 0
    n_turns = boxes["turn"].nunique()
    top = 0.22 if title else 0.05
    body = n_lines * line_h + max(0, n_turns - 1) * 0.35 * line_h
    fig_h = top + body + 0.45
    paper_style()
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, 0, 1, 1))  # data coordinates are inches from the top-left corner
    ax.set_xlim(0, fig_w)
    ax.set_ylim(fig_h, 0)
    ax.axis("off")
    y, x, line, turn = top - line_h, label_w, -1, object()
    for box in boxes.itertuples(index=False):
        if box.line != line:
            y += line_h + (0.35 * line_h if box.turn != turn and line >= 0 else 0)
            x = label_w
            if box.turn != turn:
                ax.text(label_w - 0.05, y + line_h / 2, f"turn {box.turn} ({box.role})", ha="right", va="center",
                        fontsize=fontsize + 0.5, gid="turn_label")
            line, turn = box.line, box.turn
        w = (len(box.label) + 0.6) * char_w  # with the gap, one character per box beyond its label (token_boxes)
        if np.isfinite(box.value):
            colour = cmap(norm(box.value))
            text_colour = "white" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 0.5 else "black"
        else:  # no value: an empty grey outline, not a pale colour that reads as a small value
            colour, text_colour = "none", "0.45"
        ax.add_patch(Rectangle((x, y + 0.1 * line_h), w, 0.8 * line_h, facecolor=colour, lw=0.3,
                               edgecolor="black" if box.is_image else ("0.6" if colour == "none" else "none")))
        ax.text(x + w / 2, y + line_h / 2, box.label.replace("$", r"\$"), ha="center", va="center",
                fontsize=fontsize, family="monospace", color=text_colour, gid="token")
        x += w + gap
    if title:
        ax.text(label_w, 0.04, title, ha="left", va="top", fontsize=8)
    cax = fig.add_axes((label_w / fig_w, 0.12 / fig_h, min(2.2, fig_w - label_w - 0.1) / fig_w, 0.07 / fig_h))
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, cax=cax, orientation="horizontal")
    cax.tick_params(labelsize=fontsize + 1, length=2, pad=1)
    note = "  (grey outline: no value)" if boxes["value"].isna().any() else ""
    cax.set_title(_metric_label(df, value) + note, fontsize=fontsize + 1.5, loc="left", pad=2)
    return _finish(fig, True, out_dir, name, boxes)


def plot_fronts(points: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "fronts",
                method: str = "method", *, ax: Axes | None = None) -> Figure:
    """Every method's privacy-utility front on one plot: privacy loss L (worst-framing ASR, x, lower is better)
    against utility U (y, higher is better). Each method's settings are drawn faint and its non-dominated ones
    joined as a staircase (what it dominates). `points`: one row per setting with columns `method`, L and U (as
    `probes.mitigation.measures.loss_utility` returns them). The CSV is `points` with a `on_front` column."""
    for col in (method, "L", "U"):
        if col not in points.columns:
            raise ValueError(f"plot_fronts: the DataFrame lacks column {col!r}")
    paper_style()
    fig, ax, made = _one_axes(ax, (COLUMN_IN, 2.6))
    data = points.copy()
    data["on_front"] = False
    for k, (key, g) in enumerate(data.groupby(method, sort=True)):
        # Past eight methods the colours repeat: line style and marker tell the repeats apart.
        colour, cycle = OKABE_ITO[k % len(OKABE_ITO)], k // len(OKABE_ITO)
        keep = non_dominated(g["L"].to_numpy(float), g["U"].to_numpy(float))
        data.loc[g.index[keep], "on_front"] = True
        ax.scatter(g["L"], g["U"], s=8, color=colour, alpha=0.35, linewidths=0)
        front = g[keep].sort_values("L")
        ax.step(front["L"], front["U"], where="post", color=colour, marker="os^D"[cycle % 4], ms=3,
                linestyle=("-", "--", ":", "-.")[cycle % 4], label=str(key))
    ax.set_xlabel("privacy loss L (worst-framing ASR)")
    ax.set_ylabel("utility U")
    ax.set_xlim(-0.02, 1.02)
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="x-small")
    return _finish(fig, made, out_dir, name, data)


def plot_framing_shift(points: pd.DataFrame, out_dir: str | os.PathLike | None = None, name: str = "framing_shift",
                       method: str = "method", *, ax: Axes | None = None) -> Figure:
    """ASR per framing before (the `none` setting, or each method's weakest) and at each method's chosen point: is
    the task inconsistency closed, or moved to another framing? A grid, one column per framing and one row per
    method after, under the row(s) before (methods that share their "before" share one row), each cell's ASR
    written in it: readable with many methods at a column's width. `points`: rows with `method`, `label` ("before"
    or "after") and `asr_<framing>` columns. The CSV is the long form drawn, with the row each value is in."""
    framing_cols = [c for c in points.columns if c.startswith("asr_")]
    for col in (method, "label"):
        if col not in points.columns:
            raise ValueError(f"plot_framing_shift: the DataFrame lacks column {col!r}")
    if not framing_cols:
        raise ValueError("plot_framing_shift: no asr_<framing> columns")
    framings = [f for f in FRAMING_ORDER if f"asr_{f}" in framing_cols] + sorted(
        {c.removeprefix("asr_") for c in framing_cols} - set(FRAMING_ORDER))
    cols = [f"asr_{f}" for f in framings]
    before = points[points["label"] == "before"]
    shared = len(before[cols].drop_duplicates()) <= 1
    rows = ([("before", before.iloc[0])] if shared and len(before) else
            [(f"{r[method]} (before)", r) for _, r in before.iterrows()])
    rows += [(str(r[method]), r) for _, r in points[points["label"] == "after"].sort_values(method).iterrows()]
    grid = np.array([[float(r[c]) for c in cols] for _, r in rows]).reshape(len(rows), len(cols))
    paper_style()
    fig, ax, made = _one_axes(ax, (COLUMN_IN, 0.9 + 0.17 * len(rows)))
    ax.imshow(grid, cmap="Greys", vmin=0, vmax=1.6, aspect="auto")  # vmax > 1: the darkest cell keeps black text
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize="xx-small")
    if len(rows) > 1 and rows[0][0] == "before":
        ax.axhline(0.5, color="black", lw=0.8)
    ax.set_xticks(range(len(framings)), framings, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize="x-small")
    ax.tick_params(length=0)
    ax.set_title("ASR per framing, before and at each method's chosen point", fontsize="small")
    long = pd.DataFrame([{"row": label, method: r[method], "label": r["label"], "framing": f, "ASR": float(r[c])}
                         for label, r in rows for f, c in zip(framings, cols)])
    return _finish(fig, made, out_dir, name, long)
