"""Patching statistics: one effect scale for both directions, a pooled score per cell, and tests whose null is
"the patch changes nothing".

A patching row holds the metric of the patched run (`value`) and of the two unpatched runs (`clean`, `corrupt`).
Denoising patches clean activations into the corrupt run (its base), noising corrupt activations into the clean
run; so the two directions have different no-effect values on the old normalised score (0 and 1). Here both are
put on one scale where 0 means "no change" and 1 means "the whole clean-corrupt gap moved":

    change = s * (patched - base),  s = +1 denoising (base = corrupt), -1 noising (base = clean)
    span   = clean - corrupt
    effect per pair = change / span            (denoising: share restored; noising: share destroyed)
    cell effect     = sum(change) / sum(span)  (the pooled ratio: one ratio of summed changes, the primary score)

The pooled ratio weighs pairs by their gap, so a pair with a tiny gap cannot dominate the cell as it does a mean
of per-pair ratios (reported as `mean_pair_effect`, secondary). Its 95% interval resamples identities.

Test per cell. Null: the patch has no effect on the population of pairs, so each identity's per-pair effects are
symmetric about 0 (`probes.stats.sign_flip_test`, two-sided, clustered by identity, on per-pair effects).
Family: the cells of one (model, experiment, direction, method), corrected by Benjamini-Hochberg. A cell whose
patch writes values identical to the base run's in every pair (`null_by_construction`, set by
`probes.patching`) cannot have changed anything: it is reported with status "null by construction", gets no
p-value and stays out of the family. Before testing, `reachability` says what the smallest p-value n identities
allow and whether it can pass the correction for the family's size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from probes.stats import (
    StatsError,
    benjamini_hochberg,
    min_clusters_for_bh,
    min_sign_flip_p,
    pooled_ratio_ci,
    sign_flip_test,
)

EFFECT_METRIC = "logit_diff"
CELL_KEYS = ["model", "experiment", "direction", "method", "component", "layer", "position_group"]
FAMILY_KEYS = ["model", "experiment", "direction", "method"]
NULL_STATUS = "null by construction"
SIGNS = {"denoise": 1.0, "noise": -1.0}


def pair_effects(rows: pd.DataFrame, metric: str = EFFECT_METRIC) -> pd.DataFrame:
    """The rows of `metric` with base, change, span and per-pair effect added (see the module docstring)."""
    need = {"metric", "value", "clean", "corrupt", "direction", "identity_id"}
    missing = sorted(need - set(rows.columns))
    if missing:
        raise StatsError(f"pair_effects: the patching rows lack column(s) {missing}")
    d = rows[rows["metric"] == metric].copy()
    bad = sorted(set(d["direction"]) - set(SIGNS))
    if bad:
        raise StatsError(f"pair_effects: direction(s) {bad}: expected {sorted(SIGNS)}")
    sign = d["direction"].map(SIGNS).astype(float)
    d["base"] = np.where(sign > 0, d["corrupt"], d["clean"])
    d["change"] = sign * (d["value"].astype(float) - d["base"].astype(float))
    d["span"] = d["clean"].astype(float) - d["corrupt"].astype(float)
    d["effect"] = d["change"] / d["span"].where(d["span"] != 0)
    if "null_by_construction" not in d.columns:
        d["null_by_construction"] = False
    d["null_by_construction"] = d["null_by_construction"].fillna(False).astype(bool)
    return d


def _keys(d: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k in d.columns]


def cell_effects(rows: pd.DataFrame, metric: str = EFFECT_METRIC, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> pd.DataFrame:
    """One row per cell: the pooled effect with its identity-bootstrap interval, the mean of per-pair effects,
    the number of pairs and identities, and whether the cell is null by construction in every pair."""
    d = pair_effects(rows, metric)
    keys = _keys(d, CELL_KEYS)
    out = []
    for key, cell in d.groupby(keys, dropna=False, sort=True):
        clusters = cell["identity_id"].astype(str).to_numpy()
        ratio, low, high, n_groups = pooled_ratio_ci(cell["change"].to_numpy(), cell["span"].to_numpy(), clusters,
                                                     n_boot=n_boot, level=level, seed=seed)
        out.append({**dict(zip(keys, key)), "metric": f"effect_{metric}", "value": ratio, "ci_low": low,
                    "ci_high": high, "mean_pair_effect": float(cell["effect"].mean()), "n": len(cell),
                    "n_groups": n_groups, "null_by_construction": bool(cell["null_by_construction"].all())})
    return pd.DataFrame(out)


def patching_tests(rows: pd.DataFrame, metric: str = EFFECT_METRIC, n_perm: int = 10000, alpha: float = 0.05,
                   seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """`cell_effects` of every cell plus its test: p_value (two-sided sign flip of per-pair effects, clustered by
    identity), q_value and significant (BH within the cell's family), status ("tested" or "null by
    construction"), family_size (tested cells of the family) and min_p (the smallest p its identities allow)."""
    cells = cell_effects(rows, metric, n_boot=n_boot, seed=seed)
    d = pair_effects(rows, metric)
    keys = _keys(d, CELL_KEYS)
    pvals = {}
    for key, cell in d.groupby(keys, dropna=False, sort=True):
        if cell["null_by_construction"].all():
            continue
        pvals[key if isinstance(key, tuple) else (key,)] = sign_flip_test(
            cell["effect"].to_numpy(), cell["identity_id"].astype(str).to_numpy(), n_perm=n_perm, seed=seed,
            alternative="two-sided")
    cells["p_value"] = [pvals.get(tuple(r), np.nan) for r in cells[keys].itertuples(index=False, name=None)]
    cells["status"] = np.where(cells["null_by_construction"], NULL_STATUS, "tested")
    cells["q_value"], cells["significant"] = np.nan, False
    cells["family_size"], cells["min_p"] = 0, np.nan
    for _, fam in cells.groupby(_keys(cells, FAMILY_KEYS), dropna=False, sort=False):
        tested = fam.index[fam["status"] == "tested"]
        reject, q = benjamini_hochberg(cells.loc[tested, "p_value"].to_numpy(), alpha)
        cells.loc[tested, "q_value"] = q
        cells.loc[tested, "significant"] = reject
        cells.loc[fam.index, "family_size"] = len(tested)
        n_groups = int(fam["n_groups"].max()) if len(fam) else 0
        cells.loc[fam.index, "min_p"] = min_sign_flip_p(n_groups, "two-sided", n_perm) if n_groups else np.nan
    cells["significant"] = cells["significant"].astype(bool)
    return cells


def reachability(tests: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per family of `patching_tests`: identities, tested cells, the smallest attainable p-value, and whether it can
    pass BH at `alpha` at all (`any_reachable`: p_min <= alpha, when every cell of the family is that extreme)
    and for a lone effect (`single_reachable`: p_min <= alpha / family size)."""
    keys = _keys(tests, FAMILY_KEYS)
    fam = (tests.groupby(keys, dropna=False, sort=True)
           .agg(n_groups=("n_groups", "max"), family_size=("family_size", "max"), min_p=("min_p", "max"),
                n_null_by_construction=("null_by_construction", "sum"), n_significant=("significant", "sum"))
           .reset_index())
    fam["any_reachable"] = fam["min_p"] <= alpha
    fam["single_reachable"] = fam["min_p"] <= alpha / fam["family_size"].clip(lower=1)
    return fam


def reachability_message(fam: pd.Series, alpha: float, n_perm: int = 10000) -> str:
    """One line on a family whose identities cannot reach significance after correction."""
    name = " / ".join(str(fam[k]) for k in FAMILY_KEYS if k in fam.index)
    size = max(1, int(fam["family_size"]))
    need = min_clusters_for_bh(size, alpha, "two-sided", n_perm)
    return (f"patching {name}: {int(fam['n_groups'])} identities allow p >= {fam['min_p']:.2g}, but a lone effect "
            f"among {size} tested cells needs p <= {alpha / size:.2g} (alpha {alpha} / cells): "
            + (f"use pairs of at least {need} identities" if need is not None else "raise statistics.n_perm"))
