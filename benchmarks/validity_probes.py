"""Probe validity (issue 16): the permutation null, nested CV and chance, measured where the truth is known.

    python benchmarks/validity_probes.py [--store DIR] [--permutations 19] [--null-seeds 5] [--threads 2]

The data is the default study's: its multi-turn sessions (analysis/studies/default.yaml: 60 identities, SSN digits,
3 distractor exchanges) captured from the embedded organism at resid_post, every layer, positions last:*+image:0
(`--store` reuses a capture made that way). To fit in ~10 minutes on 2 threads the benchmark probes 12 of the
study's 44 cells: the last token of the first and of the final (probe) turn and the image mean, at all 4 layers.
Probes are the study's: logreg, 5 folds grouped by identity, C by nested CV (3 inner folds), digits 9 x 10-way,
tested on the main metric (char_accuracy, the mean over the 9 digits).

    permuted_target_significant_share  share of the cells significant after BH (alpha 0.05, across the cells)
                                 when the targets are permuted across identities (the truth: nothing decodes),
                                 averaged over --null-seeds permutations; p from `permutation_p_values` against
                                 --permutations other permutations (all uniform permutations of the identities'
                                 values, so each permuted-target run is exchangeable with the null draws). Target <= 0.05.
    permuted_target_any_significant    share of those runs with at least one significant cell (the family-wise rate)
    planted_signal_detected_share  on the real targets: share of the cells known to carry the value that are
                                 significant. Known: the organism was trained (probes/organism/train.py, PLAN_LAYER 2)
                                 so that a linear head on LM block 2's output at the prompt's last positions names
                                 every digit of the value asked about; the final turn asks about the SSN, so the cell
                                 (layer 2, last token, final turn) carries it by construction.
    real_significant_cells       how many of the 12 cells are significant on the real targets (for the report)
    nested_cv_optimism           mean over cells and null permutations of the null char_accuracy minus chance
                                 (`held_out_chance`), with nested CV: ~0 when the reported accuracy is honest
    flat_cv_optimism             the same with C chosen on the reporting folds (`nested=False`, the old protocol)
    chance                       the cells' chance (held-out majority class, mean over the digits)
    nested_vs_flat_cost_ratio    seconds of a nested fit of the 12 cells / a flat one (the same machine, in turn)
    seconds_nested_fit, seconds_flat_fit, seconds_total
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from probes.organism.train import PLAN_LAYER  # noqa: E402
from probes.probing.sweep import null_p_values, permute_across_identities, probe_sweep  # noqa: E402
from probes.probing.targets import CellBlock, probe_cells, session_targets  # noqa: E402
from probes.stats import benjamini_hochberg  # noqa: E402

ALPHA = 0.05


def build_store(work: Path):
    """The default study's multi-turn sessions captured as its capture stage does (same config, same code)."""
    from analysis.study.config import default_config_path, load_study_config
    from analysis.study.pipeline import build_sessions
    from probes.activations.capture import capture
    from probes.data.session import read_sessions
    from probes.models.loading import load_model
    from probes.organism import DEFAULT_MODEL

    cfg = load_study_config(default_config_path())
    build_sessions(cfg, work)
    c = cfg.section("capture")
    return capture(load_model(str(DEFAULT_MODEL)), list(read_sessions(work / "multiturn.jsonl")), str(work / "store"),
                   hooks=c["hooks"], positions=c["positions"], layers=None, batch_size=c["batch_size"],
                   progress=False)


def benchmark_cells(store, all_cells: bool = False) -> tuple[CellBlock, int]:
    """The 12 cells (last token of the first and final turns, image mean; every layer), or with `all_cells` the
    study's 44, and the final turn."""
    block = max(probe_cells(store, ["last", "image"]), key=lambda b: len(b.meta))
    final = int(block.cells["turn"].max())
    if all_cells:
        return block, final
    cells = block.cells.reset_index(drop=True)
    keep = cells.index[(cells["position_group"] == "image") | cells["turn"].isin([0, final])].to_numpy()
    return CellBlock(X=block.X[torch.as_tensor(keep.copy())], cells=cells.iloc[keep].reset_index(drop=True),
                     meta=block.meta), final


def _permuted(targets, seed):
    y, names, ids = targets
    return permute_across_identities(y, ids.to_numpy(), seed), names, ids  # one session per identity here


def _significant(results: pd.DataFrame, null: pd.DataFrame) -> pd.DataFrame:
    tests = null_p_values(results, null)
    tests["significant"] = benjamini_hochberg(tests["p_value"].to_numpy(), ALPHA)[0]
    return tests


def measure(store_dir: str | None = None, n_permutations: int = 20, null_seeds: int = 20, method: str = "dim",
            sessions: str | None = None) -> dict[str, float]:
    """`method` "dim" (the default study's probes; nothing to choose, so no nested CV and no cost comparison) probes
    all 44 cells of the study in seconds; "logreg" the 12 benchmark cells with nested and flat CV (slow: the
    nested fit of 12 cells takes minutes per rerun on 2 busy threads). `sessions`: the JSONL `store_dir` was
    captured from (the targets are its private labels)."""
    from probes.activations.store import ActivationStore

    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if store_dir is None:
            store, sessions = build_store(Path(tmp)), Path(tmp) / "multiturn.jsonl"
        else:
            store = ActivationStore(store_dir)
        block, final = benchmark_cells(store, all_cells=method == "dim")
        targets = session_targets(store.sessions(private_from=sessions), "digits")
        if len(set(block.meta["identity_id"])) != len(block.meta):
            raise SystemExit("benchmark expects one session per identity (the default study's design)")
        targets = (targets[0], targets[1], pd.Index(targets[2]))
        kw = dict(model="organism", n_boot=0, seed=0, method=method)
        # The real targets with their permutation null, nested (the study's protocol) and flat (the old one).
        t0 = time.time()
        real, null = probe_sweep([block], targets, n_permutations=n_permutations, return_null=True, **kw)
        seconds_nested = (time.time() - t0) / (n_permutations + 1)
        null_flat, seconds_flat = null, seconds_nested
        if method != "dim":
            t0 = time.time()
            _, null_flat = probe_sweep([block], targets, n_permutations=n_permutations, return_null=True,
                                       nested=False, **kw)
            seconds_flat = (time.time() - t0) / (n_permutations + 1)
        # Permuted targets (the truth: nothing decodes), seeds apart from the null's (seed, p) draws.
        shares, anys = [], []
        for s in range(null_seeds):
            obs = probe_sweep([block], _permuted(targets, (10_000, s)), **kw)
            sig = _significant(obs, null)["significant"]
            shares.append(float(sig.mean()))
            anys.append(float(sig.any()))
    tests = _significant(real, null)
    plan = tests[(tests["layer"] == PLAN_LAYER) & (tests["position_group"] == "last") & (tests["turn"] == final)]
    chance = real[real["metric"] == "char_accuracy_chance"]["value"].mean()
    return {
        "permuted_target_significant_share": float(np.mean(shares)),
        "permuted_target_any_significant": float(np.mean(anys)),
        "planted_signal_detected_share": float(plan["significant"].mean()),
        "real_significant_cells": float(tests["significant"].sum()),
        "nested_cv_optimism": float(null[null["metric"] == "char_accuracy"]["value"].mean() - chance),
        "flat_cv_optimism": float(null_flat[null_flat["metric"] == "char_accuracy"]["value"].mean() - chance),
        "chance": float(chance),
        "nested_vs_flat_cost_ratio": seconds_nested / seconds_flat,
        "seconds_nested_fit": seconds_nested,
        "seconds_flat_fit": seconds_flat,
        "seconds_total": time.time() - t_all,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="a capture of the default study's multi-turn sessions")
    ap.add_argument("--sessions", default=None, help="the sessions JSONL --store was captured from")
    ap.add_argument("--method", default="dim", choices=["dim", "logreg"])
    ap.add_argument("--permutations", type=int, default=20)
    ap.add_argument("--null-seeds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, value in measure(args.store, args.permutations, args.null_seeds, args.method, args.sessions).items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    main()
