"""Is the paired hypervolume-gain interval (`probes.mitigation.measures.hypervolume_gain`) a test with its stated
size? Simulated fronts where the truth is known (issue 19's `located_vs_random_layer_hv_gain`).

    python benchmarks/validity_mitigation.py [--sims 1000] [--identities 12]

Null: two methods with the same true front (three strengths, leak rates 0.6/0.3/0.1 under one framing, 0 under
another, utilities 0.95/0.85/0.70), answered independently per identity; a "rejection" is a 95% paired identity
bootstrap interval of HV(a) - HV(b) that excludes 0. Effect: method b leaks 0.3 more at every strength.

    hv_gain_null_rejection_rate   share of null simulations whose interval excludes 0 (stated size 0.05)
    hv_gain_power                 share of effect simulations whose interval lies above 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.mitigation.measures import hypervolume_gain, loss_utility  # noqa: E402

FRONT = ((0.5, 0.6, 0.95), (1.0, 0.3, 0.85), (2.0, 0.1, 0.70))  # strength, caption leak rate, utility


def rows(rng: np.random.Generator, n_ids: int, extra_leak_b: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    priv, util = [], []
    for m in ("a", "b"):
        for s, p, u in FRONT:
            p = min(1.0, p + extra_leak_b) if m == "b" else p
            for i in range(n_ids):
                base = {"method": m, "strength": s, "identity_id": f"i{i}"}
                priv += [{**base, "framing": "caption", "leaked": rng.random() < p},
                         {**base, "framing": "direct", "leaked": False}]
                util.append({**base, "task": "read_name", "score": float(rng.random() < u)})
    return pd.DataFrame(priv), pd.DataFrame(util)


def rejects(rng: np.random.Generator, n_ids: int, extra: float, seed: int) -> tuple[bool, bool]:
    points, draws = loss_utility(*rows(rng, n_ids, extra), by=["method", "strength"], n_boot=300, seed=seed)
    g = hypervolume_gain(points, draws, "a", "b")
    return g["ci_low"] > 0 or g["ci_high"] < 0, g["ci_low"] > 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--identities", type=int, default=12)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    null = [rejects(rng, a.identities, 0.0, k)[0] for k in range(a.sims)]
    power = [rejects(rng, a.identities, 0.3, k)[1] for k in range(a.sims // 4)]
    print(f"hv_gain_null_rejection_rate: {np.mean(null):.4f}")
    print(f"hv_gain_power: {np.mean(power):.4f}")
    print(f"n_null_sims: {len(null)}")


if __name__ == "__main__":
    main()
