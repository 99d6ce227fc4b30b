"""Coverage of the intervals the tables use, and the false-positive rate of the sign-flip test, measured on
simulated data where the truth is known; prints `name: value`.

    rate_ci_coverage_n12              share of nominal 95% intervals that contain the true rate: 12 identities,
                                      one response each, true rates 0.5, 0.55, ..., 0.95, the interval
                                      `analysis.tables` uses (exact Clopper-Pearson); mean over the rates
                                      (target >= 0.93)
    rate_ci_coverage_n12_min          the same, the lowest over the rates
    rate_ci_coverage_n12_wilson       the Wilson interval, mean over the rates (and _min)
    rate_ci_coverage_n12_clustered    12 identities x 3 responses whose responses are correlated (intra-identity
                                      correlation 0.5), `clustered_rate_interval` (exact); mean over the rates
                                      (and _min)
    percentile_bootstrap_coverage_n12 the old interval (percentile bootstrap over identities) on the one-response
                                      data, for contrast (and _min)
    percentile_bootstrap_coverage_normal_n{10,20,30}, percentile_bootstrap_coverage_exponential_n{10,20,30}
                                      coverage of the percentile cluster bootstrap of a mean by number of
                                      clusters (normal and skewed data): the basis of MIN_BOOTSTRAP_CLUSTERS
    sign_flip_false_positive_rate     share of null data sets (12 identities, symmetric heavy-tailed differences,
                                      one and three correlated rows per identity) that the two-sided sign-flip
                                      test rejects at alpha 0.05 (target about 0.05)

With one response per identity an interval depends only on the count k of 12, so each k's interval is computed
once and the simulation draws counts; the bootstrap uses 2000 resamples per k.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from probes.stats import cluster_bootstrap, clustered_rate_interval, rate_interval, sign_flip_test  # noqa: E402

RATES = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))
N_IDS = 12
LEVEL = 0.95


def _coverage_by_count(intervals: list[tuple[float, float]], n_sims: int, rng: np.random.Generator) -> list[float]:
    """Coverage per true rate of an interval given as a function of the count k (a list indexed by k)."""
    lows, highs = np.array(intervals).T
    out = []
    for p in RATES:
        k = rng.binomial(N_IDS, p, size=n_sims)
        out.append(float(np.mean((lows[k] <= p) & (p <= highs[k]))))
    return out


def _correlated_rows(rng: np.random.Generator, p: float, per_id: int, icc: float) -> np.ndarray:
    """0/1 rows of N_IDS identities; an identity's rows share a rate drawn from a beta of mean p and correlation icc."""
    rates = rng.beta(p * (1 - icc) / icc, (1 - p) * (1 - icc) / icc, N_IDS)
    return (rng.uniform(size=(N_IDS, per_id)) < rates[:, None]).astype(float).ravel()


def clustered_coverage(n_sims: int, rng: np.random.Generator, per_id: int = 3, icc: float = 0.5) -> list[float]:
    ids = np.repeat(np.arange(N_IDS), per_id)
    out = []
    for p in RATES:
        hits = 0
        for _ in range(n_sims):
            _, low, high, _ = clustered_rate_interval(_correlated_rows(rng, p, per_id, icc), ids, LEVEL, "exact")
            hits += low <= p <= high
        out.append(hits / n_sims)
    return out


def sign_flip_false_positive_rate(n_sims: int, rng: np.random.Generator, alpha: float = 0.05) -> float:
    """Null: every identity's difference is symmetric about 0 (Laplace; with three rows an identity effect is
    shared by its rows). Exact enumeration: 2^12 = 4096 sign vectors."""
    ids3 = np.repeat(np.arange(N_IDS), 3)
    p = []
    for _ in range(n_sims):
        p.append(sign_flip_test(rng.laplace(size=N_IDS), n_perm=4096, alternative="two-sided"))
        rows = np.repeat(rng.laplace(size=N_IDS), 3) + rng.laplace(size=3 * N_IDS)
        p.append(sign_flip_test(rows, ids3, n_perm=4096, alternative="two-sided"))
    return float(np.mean(np.array(p) <= alpha))


def bootstrap_mean_coverage(n_clusters: int, skewed: bool, n_sims: int, rng: np.random.Generator,
                            n_boot: int = 999) -> float:
    """Coverage of the nominal 95% percentile bootstrap of a mean of n_clusters cluster means (normal, or
    exponential when `skewed`), vectorised over data sets: what `cluster_bootstrap` computes on one row per
    cluster."""
    truth = 1.0 if skewed else 0.0
    hits = 0
    for a in range(0, n_sims, 100):
        m = min(100, n_sims - a)
        x = rng.exponential(size=(m, n_clusters)) if skewed else rng.normal(size=(m, n_clusters))
        draws = rng.integers(0, n_clusters, size=(m, n_boot, n_clusters))
        means = np.take_along_axis(np.broadcast_to(x[:, None, :], draws.shape), draws, 2).mean(2)
        low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=1)
        hits += int(((low <= truth) & (truth <= high)).sum())
    return hits / n_sims


def measure(n_sims: int = 20000, n_clustered: int = 1000, n_null: int = 5000, n_boot_sims: int = 2000,
            seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    exact = [rate_interval(k, N_IDS, LEVEL, "exact")[1:] for k in range(N_IDS + 1)]
    wilson = [rate_interval(k, N_IDS, LEVEL, "wilson")[1:] for k in range(N_IDS + 1)]
    previous = logging.getLogger("probes.stats").level
    logging.getLogger("probes.stats").setLevel(logging.ERROR)  # the few-clusters warning is the point here
    try:
        boot = [cluster_bootstrap(np.r_[np.ones(k), np.zeros(N_IDS - k)], np.arange(N_IDS), 2000, LEVEL,
                                  np.random.default_rng(seed + k), warn=False)[1:] for k in range(N_IDS + 1)]
    finally:
        logging.getLogger("probes.stats").setLevel(previous)
    out = {}
    for name, cover in (("rate_ci_coverage_n12", _coverage_by_count(exact, n_sims, rng)),
                        ("rate_ci_coverage_n12_wilson", _coverage_by_count(wilson, n_sims, rng)),
                        ("rate_ci_coverage_n12_clustered", clustered_coverage(n_clustered, rng)),
                        ("percentile_bootstrap_coverage_n12", _coverage_by_count(boot, n_sims, rng))):
        out[name] = float(np.mean(cover))
        out[f"{name}_min"] = float(np.min(cover))
    for k in (10, 20, 30):
        out[f"percentile_bootstrap_coverage_normal_n{k}"] = bootstrap_mean_coverage(k, False, n_boot_sims, rng)
        out[f"percentile_bootstrap_coverage_exponential_n{k}"] = bootstrap_mean_coverage(k, True, n_boot_sims, rng)
    out["sign_flip_false_positive_rate"] = sign_flip_false_positive_rate(n_null, rng)
    return out


def main() -> None:
    for name, value in measure().items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    main()
