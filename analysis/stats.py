"""Statistics for result tables: clustered bootstrap confidence intervals.

Rows of a result table are not independent: the same identity appears under several framings, scenarios and turn
distances, and its document is equally easy or hard to read in all of them. So the bootstrap resamples whole
identities (clusters) with replacement, never single rows; duplicating an identity's rows leaves the interval as
it was, where a row bootstrap would shrink it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


class StatsError(ValueError):
    """A column the statistic needs is missing or not numeric; the message names it."""


def cluster_bootstrap(values: np.ndarray, clusters: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                      rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile interval of its bootstrap distribution when the
    clusters are drawn with replacement (each draw keeps all rows of a drawn cluster; the mean is over rows)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    values = np.asarray(values, dtype=float)
    _, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(float)
    mean = float(sums.sum() / counts.sum())
    if len(sums) < 2 or n_boot < 1:
        return mean, mean, mean
    boot = np.empty(n_boot)
    step = max(1, 4_000_000 // len(sums))  # bound the [draws, n_clusters] index matrix to ~32 MB
    for a in range(0, n_boot, step):
        draw = rng.integers(0, len(sums), size=(min(step, n_boot - a), len(sums)))  # cluster indices
        boot[a:a + len(draw)] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def bootstrap_ci(df: pd.DataFrame, value: str, by: str | Sequence[str], group: str = "identity_id",
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Mean of `value` per cell of `by`, with a percentile bootstrap CI at `level` that resamples whole `group`s
    (identities) with replacement within the cell.

    Returns one row per cell: the `by` columns, value (the mean), ci_low, ci_high, n (rows), n_groups. Rows whose
    value is missing are left out; booleans count as 0/1. Cells keep missing keys (a session without a framing).
    """
    by = [by] if isinstance(by, str) else list(by)
    for col in [value, group, *by]:
        if col not in df.columns:
            raise StatsError(f"bootstrap_ci: column {col!r} not in the DataFrame (columns: {list(df.columns)})")
    if not 0.0 < level < 1.0:
        raise StatsError(f"bootstrap_ci: level {level}: expected a number between 0 and 1")
    try:
        vals = pd.to_numeric(df[value].astype("float64"), errors="raise")
    except (TypeError, ValueError) as err:
        raise StatsError(f"bootstrap_ci: column {value!r} is not numeric ({err})") from err
    data = df.assign(_v=vals).dropna(subset=["_v"])
    rng = np.random.default_rng(seed)
    rows = []
    if by:
        cells = data.groupby(by, dropna=False, sort=True)
    else:
        cells = [((), data)]
    for key, cell in cells:
        key = key if isinstance(key, tuple) else (key,)
        groups = cell[group].astype(str).to_numpy()  # missing ids become one 'nan' cluster
        mean, low, high = cluster_bootstrap(cell["_v"].to_numpy(), groups, n_boot, level, rng)
        rows.append({**dict(zip(by, key)), "value": mean, "ci_low": low, "ci_high": high, "n": len(cell),
                     "n_groups": int(pd.unique(groups).size)})
    return pd.DataFrame(rows, columns=[*by, "value", "ci_low", "ci_high", "n", "n_groups"])
