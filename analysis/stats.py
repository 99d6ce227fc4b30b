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


# ---- permutation tests and false discovery rate ------------------------------------------------------------------
ALTERNATIVES = ("greater", "less", "two-sided")


def _sign_matrix(n: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """([draws, n] of +-1, exact): every one of the 2^n sign vectors when that is no more than n_perm, else n_perm
    random ones."""
    if n < 63 and 2 ** n <= n_perm:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n)  # bit i of code = sign of cluster i
        return (codes & 1) * 2 - 1, True
    return rng.integers(0, 2, size=(n_perm, n), dtype=np.int8) * 2 - 1, False


def sign_flip_test(diffs, clusters=None, n_perm: int = 10000, seed: int = 0,
                   alternative: str = "greater") -> float:
    """p-value of a paired sign-flip permutation test that the mean of `diffs` is > 0 ("greater"), < 0 ("less")
    or != 0 ("two-sided").

    Under the null each difference is symmetric about 0, so its sign is a coin flip. With `clusters` (e.g. identity
    ids) the rows of one cluster are not independent: their differences are summed and each cluster's sum is flipped
    as a whole. The statistic is the sum over rows (the mean times a fixed count). When 2^n_clusters <= n_perm every
    sign vector is enumerated and the exact p is returned (the observed one is among them); otherwise n_perm random
    flips give (1 + #{perm at least as extreme}) / (1 + n_perm), which is never 0 and keeps the test valid.
    Missing differences are dropped; no data gives nan."""
    if alternative not in ALTERNATIVES:
        raise StatsError(f"sign_flip_test: alternative {alternative!r}: expected one of {ALTERNATIVES}")
    if n_perm < 1:
        raise StatsError(f"sign_flip_test: n_perm {n_perm}: expected at least 1")
    diffs = np.asarray(diffs, dtype=float).ravel()
    if clusters is None:
        clusters = np.arange(len(diffs))
    clusters = np.asarray(clusters).ravel()
    if len(clusters) != len(diffs):
        raise StatsError(f"sign_flip_test: {len(diffs)} differences but {len(clusters)} cluster ids")
    keep = np.isfinite(diffs)
    if not keep.any():
        return float("nan")
    _, inverse = np.unique(clusters[keep].astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=diffs[keep])  # [n_clusters]
    observed = sums.sum()
    signs, exact = _sign_matrix(len(sums), n_perm, np.random.default_rng(seed))
    tol = 1e-9 * max(1.0, np.abs(sums).sum())  # float sums of the same numbers in another order still tie
    extreme = 0
    for a in range(0, len(signs), 4096):  # bound the [draws, n_clusters] product
        null = signs[a:a + 4096] @ sums
        if alternative == "greater":
            extreme += int((null >= observed - tol).sum())
        elif alternative == "less":
            extreme += int((null <= observed + tol).sum())
        else:
            extreme += int((np.abs(null) >= abs(observed) - tol).sum())
    return extreme / len(signs) if exact else (1 + extreme) / (1 + len(signs))


def benjamini_hochberg(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(reject, q): the Benjamini-Hochberg step-up procedure controlling the false discovery rate at `alpha`.

    q[i] is the smallest FDR level at which hypothesis i would be rejected (m * p_(k) / k, made monotone from the
    largest p down, capped at 1), and reject = q <= alpha. Missing p-values are passed through (q nan, not rejected)
    and do not count towards m."""
    p = np.asarray(p_values, dtype=float).ravel()
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"benjamini_hochberg: alpha {alpha}: expected a number between 0 and 1")
    finite = np.isfinite(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise StatsError(f"benjamini_hochberg: p-values must lie in [0, 1] (got {p[finite].min()} .. "
                         f"{p[finite].max()})")
    q = np.full(p.shape, np.nan)
    idx = np.flatnonzero(finite)
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    if m:
        scaled = p[order] * m / np.arange(1, m + 1)
        q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    reject = np.zeros(p.shape, dtype=bool)
    reject[finite] = q[finite] <= alpha
    return reject, q


def cell_tests(df: pd.DataFrame, value: str, control: str, by: str | Sequence[str], group: str = "identity_id",
               n_perm: int = 10000, alpha: float = 0.05, seed: int = 0,
               alternative: str = "greater") -> pd.DataFrame:
    """Does `value` beat `control` in each cell of `by`? A clustered sign-flip test per cell, then BH across cells.

    `df` has one row per held-out sample per cell, e.g. value = 1/0 correct of the real probe and control = the same
    sample under the control task. Per cell: the differences value - control, clustered by `group` (an identity's
    rows are not independent), tested with `sign_flip_test` (the same seed in every cell, so a cell's p does not
    depend on which other cells are present); then `benjamini_hochberg` over all cells at `alpha`.

    Returns one row per cell: the `by` columns, effect (mean difference), p_value, q_value, significant, n (rows
    with both numbers), n_groups. Booleans count as 0/1; rows missing either number are left out."""
    by = [by] if isinstance(by, str) else list(by)
    for col in [value, control, group, *by]:
        if col not in df.columns:
            raise StatsError(f"cell_tests: column {col!r} not in the DataFrame (columns: {list(df.columns)})")
    nums = {}
    for col in (value, control):
        try:
            nums[col] = pd.to_numeric(df[col].astype("float64"), errors="raise")
        except (TypeError, ValueError) as err:
            raise StatsError(f"cell_tests: column {col!r} is not numeric ({err})") from err
    data = df.assign(_d=nums[value] - nums[control]).dropna(subset=["_d"])
    cells = data.groupby(by, dropna=False, sort=True) if by else [((), data)]
    rows = []
    for key, cell in cells:
        key = key if isinstance(key, tuple) else (key,)
        groups = cell[group].astype(str).to_numpy()
        p = sign_flip_test(cell["_d"].to_numpy(), groups, n_perm=n_perm, seed=seed, alternative=alternative)
        rows.append({**dict(zip(by, key)), "effect": float(cell["_d"].mean()), "p_value": p, "n": len(cell),
                     "n_groups": int(pd.unique(groups).size)})
    out = pd.DataFrame(rows, columns=[*by, "effect", "p_value", "n", "n_groups"])
    reject, q = benjamini_hochberg(out["p_value"].to_numpy(), alpha)
    out.insert(len(by) + 2, "q_value", q)
    out.insert(len(by) + 3, "significant", reject)
    return out


def mark_significant(results: pd.DataFrame, tests: pd.DataFrame, by: str | Sequence[str]) -> pd.DataFrame:
    """`results` with the q_value and significant columns of `tests` (from `cell_tests`) joined on `by` (a left
    join: every result row is kept, one not tested gets q_value nan and significant False), so a figure can mark
    the cells that survive correction. Existing q_value/significant columns of `results` are replaced."""
    by = [by] if isinstance(by, str) else list(by)
    for name, frame, cols in (("results", results, by), ("tests", tests, [*by, "q_value", "significant"])):
        for col in cols:
            if col not in frame.columns:
                raise StatsError(f"mark_significant: column {col!r} not in the {name} DataFrame "
                                 f"(columns: {list(frame.columns)})")
    if tests.duplicated(by).any():
        raise StatsError(f"mark_significant: the tests have several rows for one cell of {by}; test each cell once")
    merged = results.drop(columns=["q_value", "significant"], errors="ignore").merge(
        tests[[*by, "q_value", "significant"]], on=by, how="left")
    merged["significant"] = merged["significant"].eq(True)  # untested cells: not significant
    return merged
