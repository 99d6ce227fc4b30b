"""Figures: one function per figure type, each taking the tidy DataFrame it plots, saved as PDF + PNG + CSV.

Style: colour-blind-safe palette (Okabe-Ito), sized for a single paper column (3.4 in) unless asked otherwise.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
COLUMN_IN = 3.4
DOUBLE_COLUMN_IN = 7.0


def paper_style() -> None:
    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
        "ytick.labelsize": 7, "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO), "axes.spines.top": False,
        "axes.spines.right": False, "savefig.bbox": "tight", "pdf.fonttype": 42,
    })


def save_figure(fig: plt.Figure, data: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """Write name.pdf, name.png and name.csv (the data the figure shows) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png", out_dir / f"{name}.csv"]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=200)
    data.to_csv(paths[2], index=False)
    plt.close(fig)
    return paths


def plot_layer_profile(df: pd.DataFrame, out_dir: str | Path, name: str = "layer_profile",
                       value: str = "value", hue: str = "position_group", ylabel: str | None = None) -> list[Path]:
    """A line per `hue` group: `value` (mean with its ci_low/ci_high band if present) against `layer`."""
    paper_style()
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.2))
    for key, g in df.groupby(hue):
        g = g.sort_values("layer")
        ax.plot(g["layer"], g[value], marker="o", ms=3, label=str(key))
        if {"ci_low", "ci_high"} <= set(g.columns):
            ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], alpha=0.2)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel or (df["metric"].iloc[0] if "metric" in df.columns else value))
    ax.legend(frameon=False, loc="best")
    return save_figure(fig, df, out_dir, name)


def plot_leakage(long_df: pd.DataFrame, out_dir: str | Path, name: str = "leakage",
                 metrics: tuple[str, ...] = ("ASR", "RR")) -> list[Path]:
    """Grouped bars of each metric (a panel each, ASR above RR) per framing, one bar per PII type, with the
    bootstrap CI as error bars; one column of panels per model. Takes `analysis.tables.leakage_long` output."""
    import numpy as np

    from analysis.tables import FRAMING_ORDER, MISSING, PII_ORDER, _sort

    need = {"model", "framing", "pii_type", "metric", "value"}
    if not need <= set(long_df.columns):
        raise ValueError(f"plot_leakage: the DataFrame lacks column(s) {sorted(need - set(long_df.columns))}")
    data = long_df[long_df["metric"].isin(metrics)].copy()
    for col in ("framing", "pii_type"):
        data[col] = data[col].astype(object).where(data[col].notna(), MISSING)
    data = _sort(data)
    models = list(dict.fromkeys(data["model"]))
    framings = [f for f in FRAMING_ORDER if f in set(data["framing"])] + sorted(
        set(data["framing"]) - set(FRAMING_ORDER))
    piis = [p for p in PII_ORDER if p in set(data["pii_type"])] + sorted(set(data["pii_type"]) - set(PII_ORDER))
    paper_style()
    width = COLUMN_IN if len(models) == 1 else min(DOUBLE_COLUMN_IN, COLUMN_IN * len(models) * 0.7)
    fig, axes = plt.subplots(len(metrics), max(1, len(models)), figsize=(width, 1.5 * len(metrics) + 0.4),
                             sharex=True, sharey="row", squeeze=False)
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
    fig.legend(handles, labels, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0),
               ncols=min(3, len(piis)))
    fig.tight_layout()
    return save_figure(fig, data, out_dir, name)


def _cell_label(group: str, turn: int) -> str:
    return group if turn < 0 else f"{group} @ turn {turn}"


def plot_probe_heatmap(df: pd.DataFrame, out_dir: str | Path, name: str = "probe_heatmap",
                       metric: str = "char_accuracy", control: str = "none", title: str | None = None) -> list[Path]:
    """Layer (x) by position group and turn (y): the probe `metric` per cell, annotated; the best cell boxed.
    Takes `probes.probing.probe_sweep` output (rows of other metrics and controls are ignored)."""
    import numpy as np

    need = {"layer", "position_group", "turn", "metric", "value"}
    if not need <= set(df.columns):
        raise ValueError(f"plot_probe_heatmap: the DataFrame lacks column(s) {sorted(need - set(df.columns))}")
    data = df[(df["metric"] == metric) & (df.get("control", "none") == control)]
    if "target" in data.columns and data["target"].nunique() > 1:
        data = data.groupby(["layer", "position_group", "turn"], as_index=False)["value"].mean()
    if not len(data):
        raise ValueError(f"plot_probe_heatmap: no rows with metric {metric!r} (control {control!r})")
    data = data.assign(cell=[_cell_label(g, int(t)) for g, t in zip(data["position_group"], data["turn"])])
    order = data.drop_duplicates("cell").sort_values(["turn", "position_group"])["cell"].tolist()
    grid = data.pivot_table(index="cell", columns="layer", values="value").reindex(order)
    paper_style()
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 0.6 + 0.22 * len(grid)))
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
    if title:
        ax.set_title(title)
    return save_figure(fig, data, out_dir, name)


def plot_retention_curves(df: pd.DataFrame, out_dir: str | Path, name: str = "retention_curves",
                          metric: str = "char_accuracy", position_group: str = "last", control: str = "none",
                          chance: float | None = None) -> list[Path]:
    """Probe `metric` against turn distance since the image was shown, one line per layer with its bootstrap CI
    band (from `probe_sweep` output, cells of `position_group`)."""
    data = df[(df["metric"] == metric) & (df["position_group"] == position_group)
              & (df.get("control", "none") == control) & df["turn_distance"].notna()]
    if not len(data):
        raise ValueError(f"plot_retention_curves: no {metric!r} rows of position group {position_group!r} with a "
                         f"turn distance")
    data = data.groupby(["layer", "turn_distance"], as_index=False)[["value", "ci_low", "ci_high"]].mean()
    paper_style()
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.2))
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
    return save_figure(fig, data, out_dir, name)


def plot_transfer_matrix(df: pd.DataFrame, out_dir: str | Path, name: str = "transfer_matrix",
                         layers: list[int] | None = None) -> list[Path]:
    """Train turn (y) x test turn (x) accuracy, one panel per layer (from `probes.probing.transfer_matrix`)."""
    import numpy as np

    layers = sorted(df["layer"].unique()) if layers is None else layers
    paper_style()
    ncols = min(4, len(layers))
    nrows = -(-len(layers) // ncols)
    width = COLUMN_IN if ncols <= 2 else DOUBLE_COLUMN_IN
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 0.3 + width / ncols * nrows), squeeze=False)
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
    fig.tight_layout()
    return save_figure(fig, df[df["layer"].isin(layers)], out_dir, name)


# ---- patching figures
def _group_order(groups) -> list[str]:
    """PII patches, other patches, turns in order, the final token last (as `probes.patching.default_groups`)."""
    def key(g: str):
        if g == "pii_patches":
            return (0, 0, g)
        if g == "other_image":
            return (1, 0, g)
        if g.startswith("turn") and g[4:].isdigit():
            return (2, int(g[4:]), g)
        return (4, 0, g) if g == "final" else (3, 0, g)
    return sorted(set(groups), key=key)


def plot_patching_heatmaps(df: pd.DataFrame, out_dir: str | Path, name: str = "patching",
                           metric: str = "score_logit_diff", direction: str = "denoise", method: str = "exact",
                           annotate: bool | None = None) -> list[Path]:
    """Layer (x) by position group (y), one panel per component: the mean `metric` over pairs of each cell
    (`probes.patching.summarize` output, or per-pair rows, averaged here), diverging around 0; a score's 1 is
    the clean behaviour restored. Rows of other metrics, directions and methods are ignored."""
    import numpy as np

    need = {"layer", "component", "position_group", "metric", "value", "direction", "method"}
    if not need <= set(df.columns):
        raise ValueError(f"plot_patching_heatmaps: the DataFrame lacks column(s) {sorted(need - set(df.columns))}")
    data = df[(df["metric"] == metric) & (df["direction"] == direction) & (df["method"] == method)]
    if not len(data):
        raise ValueError(f"plot_patching_heatmaps: no rows with metric {metric!r}, direction {direction!r}, "
                         f"method {method!r}")
    data = data.groupby(["component", "position_group", "layer"], as_index=False)["value"].mean()
    comps = [c for c in ("resid_pre", "resid_post", "attn_out", "mlp_out") if c in set(data["component"])]
    comps += sorted(set(data["component"]) - set(comps))
    groups = _group_order(data["position_group"])
    layers = sorted(data["layer"].unique())
    grids = [data[data["component"] == c].pivot_table(index="position_group", columns="layer", values="value")
             .reindex(index=groups, columns=layers).to_numpy() for c in comps]
    lim = max(1e-9, float(np.nanmax([np.nanmax(np.abs(g)) for g in grids])))
    if metric.startswith("score_"):
        lim = max(lim, 1.0)
    annotate = (len(layers) * len(groups) <= 120) if annotate is None else annotate
    paper_style()
    width = COLUMN_IN if len(comps) == 1 else DOUBLE_COLUMN_IN
    fig, axes = plt.subplots(1, len(comps), figsize=(width, 0.7 + 0.22 * len(groups)), squeeze=False,
                             sharey=True)
    im = None
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
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, pad=0.02, label=f"{metric.replace('_', ' ')} ({direction})")
    return save_figure(fig, data.assign(metric=metric, direction=direction, method=method), out_dir, name)


def plot_knockout_curves(df: pd.DataFrame, out_dir: str | Path, name: str = "knockout",
                         metric: str = "logit_diff") -> list[Path]:
    """Change of `metric` when the probe turn may not attend to a source set, against the first layer of the
    knocked-out window: a line per source, a panel per window size (with its CI band when given)."""
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
    fig, axes = plt.subplots(1, len(windows), figsize=(width, 2.2), squeeze=False, sharey=True)
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
    fig.tight_layout()
    return save_figure(fig, data.assign(metric=metric), out_dir, name)


def plot_atp_agreement(df: pd.DataFrame, out_dir: str | Path, name: str = "atp_agreement",
                       metric: str = "logit_diff") -> list[Path]:
    """AtP's estimated change of `metric` (y) against exact patching's (x), a dot per pair and cell, a panel per
    direction, with the Spearman correlation (per-pair rows of `probes.patching`, methods atp and exact)."""
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
    fig, axes = plt.subplots(1, len(directions), figsize=(COLUMN_IN * (1 if len(directions) == 1 else 1.6), 2.0),
                             squeeze=False)
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
    fig.tight_layout()
    return save_figure(fig, both[[*keys, "exact", "atp"]], out_dir, name)
