"""Statistics for result tables: intervals for rates, clustered bootstrap confidence intervals, sign-flip tests,
Benjamini-Hochberg, and what a number of clusters allows a test to reach. Methods that report their own intervals
(probe sweeps, patching summaries, the organism's card) and `analysis` (the study's tests and tables) share them;
numpy and pandas only, so every layer may import this module.

Rows of a result table are not independent: the same identity appears under several framings, scenarios and turn
distances, and its document is equally easy or hard to read in all of them. So every interval here treats whole
identities (clusters) as the unit: the bootstrap resamples whole identities with replacement, never single rows
(duplicating an identity's rows leaves the interval as it was, where a row bootstrap would shrink it), and the
interval of a clustered rate shrinks its sample size by the design effect of the clustering.

Which interval for what:
- a rate (a mean of 0/1 rows, or of shares in 0..1): `rate_interval` (exact Clopper-Pearson or Wilson) when each
  identity has one row, `clustered_rate_interval` when identities repeat (it equals `rate_interval` when they do
  not). Both keep their coverage with few identities: for 12 of 12 the exact 95% interval is [0.74, 1.00], where
  the percentile bootstrap says [1.00, 1.00].
- any other mean: `cluster_bootstrap` (percentile). With fewer than `MIN_BOOTSTRAP_CLUSTERS` clusters its
  coverage falls short of the nominal level (see that constant), so it logs a warning and `bootstrap_ci` marks
  such cells `few_clusters`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class StatsError(ValueError):
    """A column the statistic needs is missing or not numeric; the message names it."""


# What the functions below read as a column: a numpy array, a pandas Series, or a list/tuple of numbers (missing
# ones as None or nan) or of cluster ids (anything hashable: identity ids are strings, row numbers ints).
Numbers = np.ndarray | pd.Series | Sequence[float | int | np.number | np.bool_ | None]
ClusterIds = np.ndarray | pd.Series | pd.Index | Sequence[Hashable]
# A count or a number, as Python or numpy gives it (a column's sum is a numpy integer).
Real = float | int | np.integer | np.floating


# Coverage of the nominal 95% percentile cluster bootstrap of a mean, by number of clusters (seeded simulations,
# Monte Carlo error about +-0.006; benchmarks/validity_intervals.py prints the figures at 10, 20 and 30): normal
# data 0.84 (5 clusters), 0.89 (10), 0.91 (12), 0.92 (15), 0.93 (20), 0.93-0.94 (30 to 50); exponential data
# 0.85 (10), 0.89 (12), 0.90-0.91 (20), 0.91-0.93 (30), 0.92 (50); a 0/1 rate with p = 0.8: 0.88 (10), 0.91
# (12), 0.93 (20); with p = 0.95 and 12 clusters 0.46 (12 of 12 gives [1, 1] half the time). From 20 clusters
# on, symmetric data reach 0.93 and more clusters buy little, so 20 is the least number at which the interval is
# trusted; below it the interval is reported but marked. Skewed data undercover even at 50, and a rate should use
# `rate_interval` / `clustered_rate_interval` whatever the number of clusters.
MIN_BOOTSTRAP_CLUSTERS = 20
RATE_METHODS = ("exact", "wilson")
_warned_cluster_counts: set[int] = set()  # warn once per number of clusters and process, not once per cell


def _check_level(level: float | int, fn: str) -> None:
    if not 0.0 < level < 1.0:
        raise StatsError(f"{fn}: level {level}: expected a number between 0 and 1")


def reset_few_cluster_warnings() -> None:
    """Forget which cluster counts were warned about, so the next undercovering bootstrap warns again (a notebook
    or a long session that wants the warning per analysis)."""
    _warned_cluster_counts.clear()


def _warn_few_clusters(n_clusters: int, what: str) -> None:
    if n_clusters < MIN_BOOTSTRAP_CLUSTERS and n_clusters not in _warned_cluster_counts:
        _warned_cluster_counts.add(n_clusters)
        log.warning("%s: percentile bootstrap over %d clusters (fewer than %d) undercovers; read its interval as "
                    "too narrow (rates: use the exact/Wilson interval)", what, n_clusters, MIN_BOOTSTRAP_CLUSTERS)


# ---- intervals for rates ------------------------------------------------------------------------------------------
def rate_interval(k: Real, n: Real, level: float | int = 0.95, method: str = "wilson"
                  ) -> tuple[float, float, float]:
    """(rate, low, high): k successes of n trials and a two-sided interval at `level` for the success probability.

    method "exact" (Clopper-Pearson): inverts two one-sided binomial tests, so its coverage is at least `level` for
    every true rate and n (conservative; 12 of 12 gives [0.735, 1] at 95%). "wilson": inverts the score test; its
    coverage is close to `level` on average but dips below it at some rates (12 of 12 gives [0.758, 1]).
    k and n may be fractional (an effective count, `clustered_rate_interval`): both formulas extend to real
    counts (the beta quantiles of Clopper-Pearson take real parameters). n = 0 gives nan."""
    if method not in RATE_METHODS:
        raise StatsError(f"rate_interval: method {method!r}: expected one of {RATE_METHODS}")
    _check_level(level, "rate_interval")
    k, n = float(k), float(n)
    if not (np.isfinite(k) and np.isfinite(n)) or n < 0 or not -1e-9 <= k <= n + 1e-9:
        raise StatsError(f"rate_interval: {k} successes of {n} trials: expected 0 <= k <= n")
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    k = min(max(k, 0.0), n)
    p = k / n
    alpha = 1.0 - level
    if method == "exact":
        from scipy.stats import beta

        low = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
        high = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    else:
        from scipy.stats import norm

        z = float(norm.ppf(1 - alpha / 2))
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        low, high = (0.0 if k <= 0 else centre - half), (1.0 if k >= n else centre + half)
    return p, float(min(max(low, 0.0), p)), float(max(min(high, 1.0), p))


def _cluster_sums(values: np.ndarray, clusters: ClusterIds) -> tuple[np.ndarray, np.ndarray]:
    """(sums, sizes) per cluster."""
    _, inverse = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
    return np.bincount(inverse, weights=values), np.bincount(inverse).astype(float)


def effective_sample_size(values: Numbers, clusters: ClusterIds) -> float:
    """n / design effect of the rate mean(values) under the clustering (Kish; Korn & Graubard 1998).

    design effect = (variance of the ratio estimator sum(y_c) / sum(m_c) over clusters c, by linearisation:
    sum_c (y_c - r m_c)^2 / n^2) / (the binomial variance r (1 - r) / n), truncated below at 1 so clustering
    never makes a rate look more certain than independent rows. With one row per cluster it is exactly 1 (binary
    values), so n_eff = n. When every row is 0 or every row is 1 (r(1 - r) = 0) the rows carry no information on
    how alike an identity's rows are: n_eff is then the number of clusters (as if each identity's rows were
    copies), the conservative choice."""
    values = np.asarray(values, dtype=float).ravel()
    sums, sizes = _cluster_sums(values, np.asarray(clusters).ravel())
    n, r = float(sizes.sum()), float(values.mean())
    if (sizes == 1).all():
        return n
    if r * (1 - r) <= 1e-12:
        return float(len(sizes))
    deff = float(((sums - r * sizes) ** 2).sum() / (n * r * (1 - r)))
    return n / max(1.0, deff)


def clustered_rate_interval(values: Numbers, clusters: ClusterIds, level: float | int = 0.95,
                            method: str = "exact") -> tuple[float, float, float, float]:
    """(rate, low, high, n_eff): the mean of `values` (0/1, or shares in 0..1) and the `rate_interval` of `method`
    for rate * n_eff successes of n_eff trials, n_eff the `effective_sample_size` under `clusters`.

    Why this one: with one row per identity it is the exact / Wilson interval itself (n_eff = n), so the common
    case keeps that interval's coverage at any number of identities; with several rows per identity it widens by
    the design effect measured from the data (Korn & Graubard 1998, the interval NCHS uses for clustered survey
    proportions), instead of resampling only a dozen identities as a bootstrap would. For shares in 0..1 the
    binomial variance r (1 - r) bounds the true one from above (and the design effect is truncated at 1), so the
    interval is conservative. Non-finite values are dropped with their cluster id; no rows give nan."""
    values = np.asarray(values, dtype=float).ravel()
    clusters = np.asarray(clusters).ravel()
    if len(clusters) != len(values):
        raise StatsError(f"clustered_rate_interval: {len(values)} values but {len(clusters)} cluster ids")
    keep = np.isfinite(values)
    values, clusters = values[keep], clusters[keep]
    if not len(values):
        return float("nan"), float("nan"), float("nan"), 0.0
    if values.min() < 0 or values.max() > 1:
        raise StatsError(f"clustered_rate_interval: values range over [{values.min()}, {values.max()}]; a rate "
                         f"needs 0/1 values or shares in [0, 1]")
    n_eff = effective_sample_size(values, clusters)
    rate = float(values.mean())
    _, low, high = rate_interval(rate * n_eff, n_eff, level, method)
    return rate, low, high, n_eff


# ---- bootstrap ----------------------------------------------------------------------------------------------------
def _boot_draws(n_clusters: int, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yields [draws, n_clusters] cluster indices in chunks, bounding the index matrix to ~32 MB."""
    step = max(1, 4_000_000 // n_clusters)
    for a in range(0, n_boot, step):
        yield rng.integers(0, n_clusters, size=(min(step, n_boot - a), n_clusters))


def cluster_bootstrap(values: Numbers, clusters: ClusterIds, n_boot: int = 1000, level: float | int = 0.95,
                      rng: np.random.Generator | None = None, warn: bool = True) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile interval of its bootstrap distribution when the
    clusters are drawn with replacement (each draw keeps all rows of a drawn cluster; the mean is over rows).

    With fewer than `MIN_BOOTSTRAP_CLUSTERS` clusters the interval undercovers; `warn` logs that (once per number
    of clusters per process; no values are logged). One cluster gives the point interval (mean, mean, mean)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    values = np.asarray(values, dtype=float)
    sums, counts = _cluster_sums(values, clusters)
    mean = float(sums.sum() / counts.sum())
    if warn:
        _warn_few_clusters(len(sums), "cluster_bootstrap")
    if len(sums) < 2 or n_boot < 1:
        return mean, mean, mean
    boot = np.concatenate([sums[d].sum(axis=1) / counts[d].sum(axis=1) for d in _boot_draws(len(sums), n_boot, rng)])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def _is_rate_column(vals: pd.Series) -> bool:
    return bool(len(vals)) and bool(vals.isin([0.0, 1.0]).all())


@dataclass(frozen=True)
class IntervalOptions:
    """How `bootstrap_ci` makes each cell's interval (see there); checked once, here.

    group: the column of cluster ids (identities); n_boot, seed: the bootstrap's draws and generator; level: the
    interval's coverage; rate: False, True or "auto"; rate_method: "exact" or "wilson"."""

    group: str = "identity_id"
    n_boot: int = 1000
    seed: int = 0
    level: float | int = 0.95
    rate: bool | str = False
    rate_method: str = "exact"

    def __post_init__(self) -> None:
        if not 0.0 < self.level < 1.0:
            raise StatsError(f"level {self.level}: expected a number between 0 and 1")
        if self.rate not in (True, False, "auto"):
            raise StatsError(f"rate {self.rate!r}: expected True, False or 'auto'")
        if self.rate_method not in RATE_METHODS:
            raise StatsError(f"rate_method {self.rate_method!r}: expected one of {RATE_METHODS}")


@dataclass(frozen=True)
class CellTestOptions:
    """How `cell_tests` tests each cell (see there); checked once, here.

    group: the column of cluster ids; n_perm, seed: the sign-flip test's draws and generator; alpha: the false
    discovery rate of Benjamini-Hochberg; alternative: "greater", "less" or "two-sided"."""

    group: str = "identity_id"
    n_perm: int = 10000
    alpha: float | int = 0.05
    seed: int = 0
    alternative: str = "greater"

    def __post_init__(self) -> None:
        if self.alternative not in ALTERNATIVES:
            raise StatsError(f"alternative {self.alternative!r}: expected one of {ALTERNATIVES}")
        if self.n_perm < 1:
            raise StatsError(f"n_perm {self.n_perm}: expected at least 1")
        if not 0.0 < self.alpha < 1.0:
            raise StatsError(f"alpha {self.alpha}: expected a number between 0 and 1")


def _options(cls: type, fn: str, config: Any, options: dict[str, Any]) -> Any:
    """`config` (an instance of `cls`, or None for the defaults) with `options` (keywords) replacing its fields;
    a bad value raises StatsError, an unknown keyword TypeError, both naming `fn`."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{fn}: options must be a {cls.__name__}, got {type(config).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {unknown}; options: {known}")
    try:
        return replace(config, **options) if config is not None else cls(**options)
    except StatsError as err:
        raise StatsError(f"{fn}: {err}") from None


def _check_columns(df: pd.DataFrame, columns: Sequence[str], fn: str) -> None:
    for col in columns:
        if col not in df.columns:
            raise StatsError(f"{fn}: column {col!r} not in the DataFrame (columns: {list(df.columns)})")


def _numeric(df: pd.DataFrame, col: str, fn: str) -> pd.Series:
    """Column `col` as float64 (booleans as 0/1, missing values as nan), or StatsError naming it."""
    try:
        return pd.to_numeric(df[col].astype("float64"), errors="raise")
    except (TypeError, ValueError) as err:
        raise StatsError(f"{fn}: column {col!r} is not numeric ({err})") from err


def _cells(data: pd.DataFrame, by: list[str]) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """(key tuple, rows) of each cell of `by`, sorted, missing keys kept as cells; no `by`: one cell of all rows."""
    if not by:
        yield (), data
        return
    for key, cell in data.groupby(by, dropna=False, sort=True):
        yield (key if isinstance(key, tuple) else (key,)), cell


def _cell_interval(v: np.ndarray, groups: np.ndarray, use_rate: bool, opts: IntervalOptions,
                   rng: np.random.Generator) -> tuple[float, float, float, str]:
    if use_rate:
        clustered = pd.Series(groups).duplicated().any()
        mean, low, high, _ = clustered_rate_interval(v, groups, opts.level, opts.rate_method)
        return mean, low, high, f"{opts.rate_method} (clustered)" if clustered else opts.rate_method
    mean, low, high = cluster_bootstrap(v, groups, opts.n_boot, opts.level, rng, warn=False)
    return mean, low, high, "percentile bootstrap"


def bootstrap_ci(df: pd.DataFrame, value: str, by: str | Sequence[str], options: IntervalOptions | None = None,
                 **kw: Any) -> pd.DataFrame:
    """Mean of `value` per cell of `by`, with an interval at `level` that treats whole `group`s (identities) as
    the unit: a percentile bootstrap resampling groups with replacement within the cell, or, for a rate, the
    `clustered_rate_interval` of `rate_method` (exact Clopper-Pearson or Wilson; it is the plain exact / Wilson
    interval when every identity has one row in the cell).

    Options (keywords, or an `IntervalOptions`, which keywords override): group="identity_id", n_boot=1000,
    seed=0, level=0.95, rate=False, rate_method="exact".
    rate: False (default) always bootstraps; True treats `value` as a rate (its values must lie in [0, 1]);
    "auto" treats it as a rate when every non-missing value of the column is 0 or 1 (booleans included) and
    bootstraps otherwise (shares in 0..1, e.g. `partial`, are not auto-detected: pass rate=True).

    Returns one row per cell: the `by` columns, value (the mean), ci_low, ci_high, n (rows), n_groups,
    ci_method ("percentile bootstrap", "exact", "wilson", "exact (clustered)", "wilson (clustered)") and
    few_clusters (True where a percentile bootstrap had fewer than `MIN_BOOTSTRAP_CLUSTERS` groups, so its interval
    is too narrow; one warning per call counts such cells). Rows whose value is missing are left out; booleans
    count as 0/1. Cells keep missing keys (a session without a framing)."""
    opts = _options(IntervalOptions, "bootstrap_ci", options, kw)
    by = [by] if isinstance(by, str) else list(by)
    _check_columns(df, [value, opts.group, *by], "bootstrap_ci")
    vals = _numeric(df, value, "bootstrap_ci")
    use_rate = _is_rate_column(vals.dropna()) if opts.rate == "auto" else bool(opts.rate)
    if use_rate and ((vals < 0) | (vals > 1)).any():
        raise StatsError(f"bootstrap_ci: column {value!r} is treated as a rate but has values outside [0, 1]")
    rng = np.random.default_rng(opts.seed)
    rows = []
    for key, cell in _cells(df.assign(_v=vals).dropna(subset=["_v"]), by):
        groups = cell[opts.group].astype(str).to_numpy()  # missing ids become one 'nan' cluster
        mean, low, high, method = _cell_interval(cell["_v"].to_numpy(), groups, use_rate, opts, rng)
        n_groups = int(pd.unique(groups).size)
        rows.append({**dict(zip(by, key)), "value": mean, "ci_low": low, "ci_high": high, "n": len(cell),
                     "n_groups": n_groups, "ci_method": method,
                     "few_clusters": method == "percentile bootstrap" and n_groups < MIN_BOOTSTRAP_CLUSTERS})
    out = pd.DataFrame(rows, columns=[*by, "value", "ci_low", "ci_high", "n", "n_groups", "ci_method",
                                      "few_clusters"])
    out["few_clusters"] = out["few_clusters"].astype(bool)
    if out["few_clusters"].any():
        log.warning("bootstrap_ci(%s): %d of %d cells have fewer than %d identities (as few as %d); their percentile "
                    "bootstrap intervals are too narrow (marked few_clusters)", value, int(out["few_clusters"].sum()),
                    len(out), MIN_BOOTSTRAP_CLUSTERS, int(out.loc[out["few_clusters"], "n_groups"].min()))
    return out


def pooled_ratio_ci(num: Numbers, den: Numbers, clusters: ClusterIds, n_boot: int = 1000, level: float | int = 0.95,
                    seed: int = 0) -> tuple[float, float, float, int]:
    """(ratio, low, high, n_clusters): the pooled ratio sum(num) / sum(den) over rows (pairs) and the percentile
    interval at `level` of its cluster bootstrap (clusters drawn with replacement, each with all its rows, numerator
    and denominator resampled together), and the number of clusters.

    An interval, not a test: it has no null (the sign-flip test of the rows' ratios tests "no effect"). The ratio is
    nan when sum(den) is 0; the interval is nan with fewer than 2 clusters or when some resample's denominator sums
    to 0 (a resample without any gap: the ratio is undefined there, so no percentile is trustworthy). Rows with a
    non-finite num or den are dropped. Fewer than `MIN_BOOTSTRAP_CLUSTERS` clusters log the undercoverage warning."""
    _check_level(level, "pooled_ratio_ci")
    num, den = np.asarray(num, dtype=float).ravel(), np.asarray(den, dtype=float).ravel()
    clusters = np.asarray(clusters).ravel()
    if not len(num) == len(den) == len(clusters):
        raise StatsError(f"pooled_ratio_ci: {len(num)} numerators, {len(den)} denominators, {len(clusters)} "
                         f"cluster ids: expected one of each per row")
    keep = np.isfinite(num) & np.isfinite(den)
    if not keep.any():
        return float("nan"), float("nan"), float("nan"), 0
    num_sums, _ = _cluster_sums(num[keep], clusters[keep])
    den_sums, _ = _cluster_sums(den[keep], clusters[keep])
    k = len(num_sums)
    total = den_sums.sum()
    ratio = float(num_sums.sum() / total) if total != 0 else float("nan")
    nan = float("nan")
    if k < 2 or n_boot < 1 or not np.isfinite(ratio):
        return ratio, nan, nan, k
    _warn_few_clusters(k, "pooled_ratio_ci")
    rng = np.random.default_rng(seed)
    boot_num, boot_den = [], []
    for d in _boot_draws(k, n_boot, rng):
        boot_num.append(num_sums[d].sum(axis=1))
        boot_den.append(den_sums[d].sum(axis=1))
    boot_den = np.concatenate(boot_den)
    if (boot_den == 0).any():
        return ratio, nan, nan, k
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(np.concatenate(boot_num) / boot_den, [alpha, 1.0 - alpha])
    return ratio, float(low), float(high), k


# ---- permutation tests and false discovery rate ------------------------------------------------------------------
ALTERNATIVES = ("greater", "less", "two-sided")


def _sign_matrix(n: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """([draws, n] of +-1, exact): every one of the 2^n sign vectors when that is no more than n_perm, else n_perm
    random ones."""
    if n < 63 and 2 ** n <= n_perm:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n)  # bit i of code = sign of cluster i
        return (codes & 1) * 2 - 1, True
    return rng.integers(0, 2, size=(n_perm, n), dtype=np.int8) * 2 - 1, False


def sign_flip_test(diffs: Numbers, clusters: ClusterIds | None = None, n_perm: int = 10000, seed: int = 0,
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


def benjamini_hochberg(p_values: Numbers, alpha: float | int = 0.05) -> tuple[np.ndarray, np.ndarray]:
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


# ---- what a number of clusters can reach --------------------------------------------------------------------------
def min_sign_flip_p(n_clusters: Real, alternative: str = "two-sided", n_perm: int = 10000) -> float:
    """The smallest p-value `sign_flip_test` can return with `n_clusters` clusters and `n_perm`.

    When 2^n_clusters <= n_perm the test enumerates all sign vectors and is exact: the observed sign vector and (for
    "two-sided") its mirror image are always at least as extreme, so p >= 1 / 2^n one-sided and 2 / 2^n
    two-sided (capped at 1). Otherwise it draws n_perm random sign vectors and p >= 1 / (1 + n_perm). Not a test:
    it says which p-values the test's support allows, whatever the data (see `bh_reachable`)."""
    if alternative not in ALTERNATIVES:
        raise StatsError(f"min_sign_flip_p: alternative {alternative!r}: expected one of {ALTERNATIVES}")
    if int(n_clusters) != n_clusters or n_clusters < 0:
        raise StatsError(f"min_sign_flip_p: n_clusters {n_clusters}: expected a whole number >= 0")
    if n_perm < 1:
        raise StatsError(f"min_sign_flip_p: n_perm {n_perm}: expected at least 1")
    n = int(n_clusters)
    if n < 63 and 2 ** n <= n_perm:  # the same rule as `_sign_matrix`
        return min(1.0, (2.0 if alternative == "two-sided" else 1.0) / 2.0 ** n)
    return 1.0 / (1 + n_perm)


def bh_reachable(n_clusters: Real, n_tests: Real, alpha: float | int = 0.05,
                 alternative: str = "two-sided", n_perm: int = 10000, n_effects: Real = 1) -> bool:
    """Whether `n_effects` cells at the smallest attainable p-value (`min_sign_flip_p` of `n_clusters`) are
    rejected by Benjamini-Hochberg at `alpha` in a family of `n_tests` cells, all other cells having larger p.

    BH rejects the k smallest p-values when p_(k) <= k alpha / m. With n_effects = 1 (the default, the worst case:
    one real effect among m cells) that needs p_min <= alpha / n_tests, the bound to warn with ("n pairs cannot
    reach significance after correction"). With n_effects = n_tests (the best case: every cell as extreme as the
    test allows) it needs p_min <= alpha; if even that fails no cell of the family can ever be significant. The
    comparison is the one `benjamini_hochberg` makes (p m / k <= alpha). Not a test: arithmetic on the support."""
    if int(n_tests) != n_tests or n_tests < 1:
        raise StatsError(f"bh_reachable: n_tests {n_tests}: expected a whole number >= 1")
    if int(n_effects) != n_effects or not 1 <= n_effects <= n_tests:
        raise StatsError(f"bh_reachable: n_effects {n_effects}: expected a whole number in 1..n_tests ({n_tests})")
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"bh_reachable: alpha {alpha}: expected a number between 0 and 1")
    return bool(min_sign_flip_p(n_clusters, alternative, n_perm) * n_tests / n_effects <= alpha)


def min_clusters_for_bh(n_tests: Real, alpha: float | int = 0.05, alternative: str = "two-sided",
                        n_perm: int = 10000, n_effects: Real = 1) -> int | None:
    """The fewest clusters (pairs' identities) for which `bh_reachable` holds, or None when no number of clusters
    reaches it at this n_perm (the Monte Carlo floor 1 / (1 + n_perm) is too high: raise n_perm). E.g. 180 cells,
    alpha 0.05, two-sided, n_perm 10000: 13 (2 / 2^13 = 0.00024 <= 0.05 / 180 = 0.00028)."""
    for n in range(64):
        if bh_reachable(n, n_tests, alpha, alternative, n_perm, n_effects):
            return n
    return None


def cell_tests(df: pd.DataFrame, value: str, control: str, by: str | Sequence[str],
               options: CellTestOptions | None = None, **kw: Any) -> pd.DataFrame:
    """Does `value` beat `control` in each cell of `by`? A clustered sign-flip test per cell, then BH across cells.

    `df` has one row per held-out sample per cell, e.g. value = 1/0 correct of the real probe and control = the same
    sample under the control task. Per cell: the differences value - control, clustered by `group` (an identity's
    rows are not independent), tested with `sign_flip_test` (the same seed in every cell, so a cell's p does not
    depend on which other cells are present); then `benjamini_hochberg` over all cells at `alpha`.
    Options (keywords, or a `CellTestOptions`, which keywords override): group="identity_id", n_perm=10000,
    alpha=0.05, seed=0, alternative="greater".

    Returns one row per cell: the `by` columns, effect (mean difference), p_value, q_value, significant, n (rows
    with both numbers), n_groups. Booleans count as 0/1; rows missing either number are left out."""
    opts = _options(CellTestOptions, "cell_tests", options, kw)
    by = [by] if isinstance(by, str) else list(by)
    _check_columns(df, [value, control, opts.group, *by], "cell_tests")
    diffs = _numeric(df, value, "cell_tests") - _numeric(df, control, "cell_tests")
    rows = []
    for key, cell in _cells(df.assign(_d=diffs).dropna(subset=["_d"]), by):
        groups = cell[opts.group].astype(str).to_numpy()
        p = sign_flip_test(cell["_d"].to_numpy(), groups, n_perm=opts.n_perm, seed=opts.seed,
                           alternative=opts.alternative)
        rows.append({**dict(zip(by, key)), "effect": float(cell["_d"].mean()), "p_value": p, "n": len(cell),
                     "n_groups": int(pd.unique(groups).size)})
    out = pd.DataFrame(rows, columns=[*by, "effect", "p_value", "n", "n_groups"])
    reject, q = benjamini_hochberg(out["p_value"].to_numpy(), opts.alpha)
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
