"""Patching tests where patching provably changes nothing (issue 16): how many cells get starred? Prints
`name: value`; `measure()` is one part of benchmarks/validity.py.

    python benchmarks/validity_noise_null.py [--pairs 16] [--threads 2]

Two kinds of cell whose truth is known, on the embedded organism with the default study's sessions (caption
framing, as in `validity_patching.study_sessions`), run through the study's own tests
(`analysis.patching_stats.patching_tests`: two-sided sign flip of per-pair effects clustered by identity, BH per
experiment and direction):

- identical runs: each image pair's base run patched with its own activations (source = base), every cell, both
  directions; the rows keep the real pair's clean and corrupt metrics, so effects are normalised as in the study;
- positions shared by both runs: task-swap cells (caption vs direct) whose positions hold identical activations
  in every pair (the image and everything before the framing text), flagged `null_by_construction`.

    noise_null_false_positive_rate          significant cells / known-null cells, as the study runs (target <= 0.05)
    noise_null_false_positive_rate_unflagged  the same with the null_by_construction flag removed, so every cell is
                                            tested: does the test itself, not only the exclusion, stay quiet?
    noise_null_max_abs_effect               the largest |pooled effect| among those cells (float noise of patching)
    noise_null_cells                        how many known-null cells were looked at
    simulated_null_raw_rejection_rate       per-pair effects drawn symmetric about 0 (60 cells x 24 identities,
                                            200 families): share of cells with p <= 0.05 (the test's level)
    simulated_null_family_false_positive_rate  share of those families with any cell significant after BH
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.patching_stats import patching_tests  # noqa: E402

COMPONENTS = ("resid_pre", "attn_out", "mlp_out")  # the default study's


def identical_run_rows(loaded, sessions, seed: int = 0) -> pd.DataFrame:
    """Exact patching of every cell with source = base (nothing can change), both directions, per image pair."""
    from probes.patching import (
        Pair,
        build_pair,
        default_groups,
        exact_patching,
        other_identities,
        pick_other,
        prepare_pair,
        session_identity,
        sweep_cells,
    )

    pool = other_identities(sessions, seed)
    rows = []
    for s in sessions:
        other = pick_other(session_identity(s), pool, (s.labels["pii_type"],))
        pair = build_pair(loaded, s, "image", other=other)
        cells = sweep_cells(loaded.n_layers, COMPONENTS, default_groups([pair]))
        prepare_pair(loaded, pair, sorted({c.hook for c in cells}))
        for direction, run in (("denoise", pair.corrupt), ("noise", pair.clean)):
            same = Pair(run, run, pair.answer, pair.corruption, pair.labels)
            for r in exact_patching(loaded, same, cells, direction):
                m = r["metric"]
                if m in pair.clean.metrics:  # the real pair's gap normalises the (null) change
                    r.update(clean=pair.clean.metrics[m], corrupt=pair.corrupt.metrics[m])
                rows.append({**r, "model": "organism", "experiment": "identical_runs",
                             "identity_id": s.labels.get("identity_id"), "session_id": s.session_id})
    return pd.DataFrame(rows)


def shared_position_rows(loaded, sessions, seed: int = 0) -> pd.DataFrame:
    """Task-swap rows of the cells that are null by construction in every pair."""
    from probes.patching import PatchingConfig, patch_sessions

    config = PatchingConfig("taskswap", components=COMPONENTS, seed=seed, model="organism")
    rows = patch_sessions(loaded, sessions, config)
    keys = ["direction", "component", "layer", "position_group"]
    null_everywhere = rows.groupby(keys)["null_by_construction"].transform("all")
    return rows[null_everywhere.astype(bool)]


def false_positive_rate(rows: pd.DataFrame, flagged: bool) -> tuple[float, int, float]:
    """(share of cells significant, cells, largest |pooled effect|) of the study's tests on `rows`."""
    data = rows if flagged else rows.assign(null_by_construction=False)
    tests = patching_tests(data[data["method"] == "exact"], n_perm=10000, n_boot=200)
    return float(tests["significant"].mean()), len(tests), float(tests["value"].abs().max())


def simulated_null(n_families: int = 200, n_cells: int = 60, n_ids: int = 24, seed: int = 0) -> tuple[float, float]:
    """(raw rejection rate at 0.05, share of families with any BH discovery) under symmetric per-pair effects."""
    rng = np.random.default_rng(seed)
    raw, any_sig = [], []
    for f in range(n_families):
        clean, corrupt = rng.normal(3, 1, n_ids), rng.normal(-3, 1, n_ids)
        change = rng.standard_t(3, size=(n_cells, n_ids)) * 0.2 * (clean - corrupt)
        rows = pd.DataFrame({
            "model": "sim", "experiment": f"f{f}", "direction": "denoise", "method": "exact", "component": "x",
            "layer": np.repeat(np.arange(n_cells), n_ids), "position_group": "g", "metric": "logit_diff",
            "value": (corrupt + change).ravel(), "clean": np.tile(clean, n_cells), "corrupt": np.tile(corrupt, n_cells),
            "identity_id": np.tile(np.arange(n_ids), n_cells)})
        t = patching_tests(rows, n_perm=2000, n_boot=1, seed=f)
        raw.append((t["p_value"] <= 0.05).mean())
        any_sig.append(bool(t["significant"].any()))
    return float(np.mean(raw)), float(np.mean(any_sig))


def measure(n_pairs: int = 16, seed: int = 0) -> dict[str, float]:
    from validity_patching import study_sessions

    from probes.models.loading import load_model

    loaded = load_model("default")
    with tempfile.TemporaryDirectory() as tmp:
        sessions = study_sessions(Path(tmp), n_pairs)
        known_null = pd.concat([identical_run_rows(loaded, sessions, seed),
                                shared_position_rows(loaded, sessions, seed)], ignore_index=True)
    rate, cells, max_effect = false_positive_rate(known_null, flagged=True)
    rate_unflagged, _, _ = false_positive_rate(known_null, flagged=False)
    raw, family = simulated_null(seed=seed)
    return {"noise_null_false_positive_rate": rate, "noise_null_false_positive_rate_unflagged": rate_unflagged,
            "noise_null_max_abs_effect": max_effect, "noise_null_cells": float(cells),
            "simulated_null_raw_rejection_rate": raw, "simulated_null_family_false_positive_rate": family}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    for name, value in measure(args.pairs).items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    main()
