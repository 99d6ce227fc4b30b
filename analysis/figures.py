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
