"""Does every reported number mean what its label says? Each figure is measured on a case where the truth is known
(issue 16); prints `name: value`, then each target with its verdict. One part per module, runnable alone:

    validity_noise_null   patching tests on cells that provably change nothing   noise_null_false_positive_rate <= 0.05
    validity_probes       probe sweep on targets permuted across identities      permuted_target_significant_share <= 0.05
    validity_intervals    simulated 95% rate intervals, 12 identities            rate_ci_coverage_n12 >= 0.93
    validity_patching     the organism's image pairs and AtP on effects          image_pair_metric_separation >= 0.95,
                                                                                 organism_atp_effect_spearman >= 0.8,
                                                                                 organism_atp_top10_recall >= 0.7
    validity_scorer       the leak scorer on a labelled set of responses         scorer_precision, scorer_recall >= 0.97

    python benchmarks/validity.py [--only intervals,scorer] [--threads 2]

A missed target is reported as missed, with its figure: the measures are never tuned to meet one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("intervals", "scorer", "noise_null", "patching", "probes")
TARGETS = {  # name -> (comparison, bound)
    "noise_null_false_positive_rate": ("<=", 0.05),
    "permuted_target_significant_share": ("<=", 0.05),
    "rate_ci_coverage_n12": (">=", 0.93),
    "image_pair_metric_separation": (">=", 0.95),
    "organism_atp_effect_spearman": (">=", 0.8),
    "organism_atp_top10_recall": (">=", 0.7),
    "scorer_precision": (">=", 0.97),
    "scorer_recall": (">=", 0.97),
}


def verdict(name: str, value: float) -> str:
    op, bound = TARGETS[name]
    met = value <= bound if op == "<=" else value >= bound
    return f"{'met' if met else 'MISSED'} ({name} {value:.4g} {op} {bound})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--only {bad}: expected some of {PARTS}")
    figures: dict[str, float] = {}
    for part in parts:
        t0 = time.perf_counter()
        got = importlib.import_module(f"validity_{part}").measure()
        for name, value in got.items():
            print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}", flush=True)
        print(f"seconds_{part}: {time.perf_counter() - t0:.1f}", flush=True)
        figures.update(got)
    print()
    for name in TARGETS:
        if name in figures:
            print(f"target: {verdict(name, float(figures[name]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
