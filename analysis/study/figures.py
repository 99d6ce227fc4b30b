"""The figures of a study: every figure the stage outputs allow, per model, into one folder.

Each figure function of `analysis.figures` takes the tidy table it draws; this module only finds the tables a
study wrote, joins the statistics' verdicts onto them (cells that survive Benjamini-Hochberg are marked), and
names the files `<model>_<figure>`. `write_all` returns nothing: the report lists the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from analysis import figures as F
from probes.data.session import read_sessions
from probes.probing.sweep import main_metric
from probes.stats import bootstrap_ci, mark_significant

PROBE_KEYS = ["model", "target", "hook", "layer", "position_group", "turn"]


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def write_all(study: Any, work: Path) -> None:
    stats = study.out / "statistics"
    probe_tests, patch_tests = _read(stats / "probe_tests.csv"), _read(stats / "patching_tests.csv")
    image = first_document(study)  # every model saw the same sessions
    for entry in study.cfg.data["models"]:
        name, base = entry["name"], study.out / entry["name"]
        long = _read(base / "leakage" / "leakage_long.csv")
        if long is not None:
            F.plot_leakage(long, work, f"{name}_leakage")
        multi = _read(base / "leakage" / "multiturn_results.csv")
        if multi is not None and multi["turn_distance"].notna().any():
            F.plot_layer_profile(multiturn_asr(multi), work, f"{name}_multiturn_asr", hue="framing",
                                 ylabel="ASR", x="turn_distance")
        probes = _read(base / "probes" / "probe_results.csv")
        if probes is not None:
            probe_figures(probes.assign(model=name), probe_tests, work, name)
        patch_map = _read(base / "probes" / "patch_map.csv")
        if patch_map is not None and image is not None:
            cells = patch_map["position_group"].str.extract(r"patch:(\d+),(\d+)").astype(int)
            df = patch_map.assign(patch_row=cells[0], patch_col=cells[1])
            F.plot_patch_overlay(df, image, work, f"{name}_probe_patch_overlay",
                                 title=f"{df['target'].iloc[0]} probe accuracy per patch, layer {df['layer'].iloc[0]}")
        readout = _read(base / "probes" / "token_readout.csv")
        if readout is not None:
            F.plot_token_strip(readout, work, f"{name}_token_strip",
                               title=f"{readout['target'].iloc[0]} probe read-out per token, layer "
                                     f"{readout['layer'].iloc[0]}")
        for path in sorted((base / "patching").glob("knockout/patching_knockout_summary.csv")):
            F.plot_knockout_curves(pd.read_csv(path).assign(model=name), work, f"{name}_knockout")
        if patch_tests is not None and len(patch_tests):
            patching_figures(patch_tests[patch_tests["model"] == name], work, name)
        points = _read(base / "mitigation" / "mitigation_points.csv")
        if points is not None:
            mitigation_figures(points, base / "mitigation" / "mitigation_best.csv", work, name)


def multiturn_asr(results: pd.DataFrame) -> pd.DataFrame:
    """ASR by turn distance and probe framing, with exact intervals over identities (`bootstrap_ci(rate=True)`), as
    a layer-profile-shaped table."""

    df = results.assign(leak=results["leak"].astype(float))
    out = bootstrap_ci(df, "leak", ["framing", "turn_distance"], n_boot=500, rate=True)
    return out.assign(metric="ASR")


def probe_figures(probes: pd.DataFrame, tests: pd.DataFrame | None, work: Path, name: str) -> None:
    metric = main_metric(probes)
    base = probes["target"].str.replace(r"\[\d+\]$", "", regex=True)  # digits[3] -> digits
    for target, df in probes.groupby(base):
        if tests is not None:
            df = mark_significant(df, tests[(tests["model"] == name)], PROBE_KEYS)
        F.plot_probe_heatmap(df, work, f"{name}_probe_heatmap_{target}", metric=metric,
                             title=f"{target}: held-out {metric.replace('_', ' ')}")
        if df["turn_distance"].notna().any() and (df["position_group"] == "last").any():
            F.plot_retention_curves(df, work, f"{name}_retention_curves_{target}", metric=metric)


def patching_figures(tests: pd.DataFrame, work: Path, name: str) -> None:
    """Heatmaps of the pooled patching effect per cell (`analysis.patching_stats.patching_tests`), stars where the
    cell survives BH within its family, blanks where it is null by construction."""
    for (exp, direction, method), df in tests.groupby(["experiment", "direction", "method"]):
        F.plot_patching_heatmaps(df, work, f"{name}_patching_{exp}_{direction}_{method}",
                                 metric=df["metric"].iloc[0], direction=direction, method=method)


def mitigation_figures(points: pd.DataFrame, best_csv: Path, work: Path, name: str) -> None:
    """Every method's privacy-utility front on one plot, and the ASR per framing before any mitigation and at each
    method's chosen point (`analysis.mitigation.run_mitigation` wrote both tables; a method that never keeps 95% of
    the utility has no chosen point, and the best table may be empty)."""
    F.plot_fronts(points[points["method"] != "none"], work, f"{name}_mitigation_fronts")
    best = pd.read_csv(best_csv) if best_csv.exists() and best_csv.stat().st_size > 1 else pd.DataFrame()
    if len(best):
        before = points[points["method"] == "none"].assign(label="before")
        shift = pd.concat([before.assign(method=m) for m in best["method"]] + [best.assign(label="after")])
        F.plot_framing_shift(shift, work, f"{name}_mitigation_framing_shift")


def first_document(study: Any):
    """The document image of the first multi-turn session (the probes' sessions), for the per-patch overlay."""

    path = study.out / "sessions" / "multiturn.jsonl"
    if not path.exists():
        return None
    first = next(iter(read_sessions(path)), None)
    for turn in first.turns if first else []:
        if turn.images:
            return turn.images[0].load()
    return None
