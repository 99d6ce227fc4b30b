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
