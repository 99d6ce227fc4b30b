"""Sign-flip permutation tests (clustered by identity), Benjamini-Hochberg, per-cell tests of a probe against its
control task, intervals for rates (plain and clustered) with their coverage, the pooled ratio, and what a number
of clusters lets a test reach."""

import itertools

import numpy as np
import pandas as pd
import pytest

from probes.stats import (
    MIN_BOOTSTRAP_CLUSTERS,
    CellTestOptions,
    IntervalOptions,
    StatsError,
    benjamini_hochberg,
    bh_reachable,
    bootstrap_ci,
    cell_tests,
    cluster_bootstrap,
    clustered_rate_interval,
    effective_sample_size,
    mark_significant,
    min_clusters_for_bh,
    min_sign_flip_p,
    pooled_ratio_ci,
    rate_interval,
    reset_few_cluster_warnings,
    sign_flip_test,
)


# ---- sign-flip test -----------------------------------------------------------------------------------------------
def test_exact_enumeration_matches_a_hand_count():
    # sum 5; of the 16 sign vectors of (1, 2, 3, 1): 7 (all +) and 5 (either 1 flipped) reach 5, only 7 exceeds it
    assert sign_flip_test([1, 2, 3, -1]) == pytest.approx(3 / 16)
    assert sign_flip_test([1, 2, 3, -1], alternative="less") == pytest.approx(15 / 16)
    assert sign_flip_test([1, 2, 3, -1], alternative="two-sided") == pytest.approx(6 / 16)
    # clustered: a's rows sum to 2, so the flipped values are (2, 2, 3, 1), sum 6: reached by 8 and 6 only
    assert sign_flip_test([1, 1, 2, 3, -1], clusters=["a", "a", "b", "c", "d"]) == pytest.approx(2 / 16)


def test_exact_enumeration_agrees_with_itertools():
    rng = np.random.default_rng(5)
    diffs = rng.normal(0.3, 1, 9)
    null = [np.dot(s, diffs) for s in itertools.product([-1, 1], repeat=9)]
    expected = np.mean(np.array(null) >= diffs.sum() - 1e-12)
    assert sign_flip_test(diffs, n_perm=512) == pytest.approx(expected)  # 2^9 = 512: enumerated


def test_monte_carlo_p_has_the_plus_one_correction():
    diffs = np.full(40, 1.0)  # no flip of 40 clusters reaches the observed sum in 999 draws (all + has 2^-40)
    assert sign_flip_test(diffs, n_perm=999) == pytest.approx(1 / 1000)
    assert sign_flip_test(-diffs, n_perm=999) == pytest.approx(1.0)


def test_null_p_values_are_roughly_uniform():
    rng = np.random.default_rng(0)
    p = np.array([sign_flip_test(rng.normal(size=20), n_perm=499, seed=s) for s in range(300)])
    assert 0.02 <= (p < 0.05).mean() <= 0.09
    assert 0.40 <= (p < 0.5).mean() <= 0.60
    # discrete differences (1/0 correct minus 1/0 correct), clustered by identity: still valid under the null
    p = []
    for s in range(200):
        real, ctrl = rng.uniform(size=(2, 60)) < 0.6
        p.append(sign_flip_test(real.astype(float) - ctrl, clusters=np.repeat(np.arange(15), 4), n_perm=499,
                                seed=s))
    assert (np.array(p) < 0.05).mean() <= 0.09


def test_a_real_effect_is_detected():
    rng = np.random.default_rng(1)
    assert sign_flip_test(rng.normal(0.8, 1, 30), n_perm=2000) < 0.01
    assert sign_flip_test(rng.normal(-0.8, 1, 30), n_perm=2000, alternative="less") < 0.01
    assert sign_flip_test(rng.normal(-0.8, 1, 30), n_perm=2000, alternative="two-sided") < 0.01
    assert sign_flip_test(rng.normal(-0.8, 1, 30), n_perm=2000) > 0.5  # the wrong direction


def test_clustering_matters():
    rng = np.random.default_rng(2)
    diffs, ids = rng.normal(0.25, 1, 25), np.arange(25)
    once = sign_flip_test(diffs, ids, n_perm=2000, seed=3)
    five = sign_flip_test(np.tile(diffs, 5), np.tile(ids, 5), n_perm=2000, seed=3)
    rows = sign_flip_test(np.tile(diffs, 5), n_perm=2000, seed=3)  # each row its own cluster
    assert five == pytest.approx(once)  # duplicates of an identity add no information
    assert rows < once / 3  # a row test would wrongly call them evidence
    # one identity's 40 rows of +1 among 10 identities of either sign: one cluster, whose sign is a coin flip
    diffs = np.r_[np.ones(40), np.array([1, -1] * 5, dtype=float)]
    ids = np.r_[np.zeros(40), np.arange(1, 11)]
    assert sign_flip_test(diffs, ids) > 0.25  # exactly 0.5 * P(ten +-1 sum to >= 0) = 0.31
    assert sign_flip_test(diffs) < 0.001


def test_sign_flip_edge_cases():
    assert sign_flip_test([0.5, np.nan, 1.0, 2.0]) == pytest.approx(1 / 8)  # the nan is dropped: 3 clusters left
    assert np.isnan(sign_flip_test([np.nan, np.nan]))
    assert sign_flip_test([0.0, 0.0, 0.0]) == 1.0
    with pytest.raises(StatsError, match="alternative"):
        sign_flip_test([1.0], alternative="bigger")
    with pytest.raises(StatsError, match="cluster"):
        sign_flip_test([1.0, 2.0], clusters=[0])
    with pytest.raises(StatsError, match="n_perm 0: expected at least 1"):
        sign_flip_test([1.0, 2.0], n_perm=0)


# ---- Benjamini-Hochberg -------------------------------------------------------------------------------------------
def test_bh_hand_worked_examples():
    # sorted 0.005, 0.01, 0.03, 0.04 -> m p / k = 0.02, 0.02, 0.04, 0.04
    reject, q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005], alpha=0.03)
    assert q == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert reject.tolist() == [True, False, False, True]
    # step-up: at 0.03 neither 0.02 > 0.01 nor 0.025 > 0.02 passes alone, but 0.03 <= 0.03 carries both with it
    reject, q = benjamini_hochberg([0.02, 0.025, 0.03], alpha=0.03)
    assert q == pytest.approx([0.03, 0.03, 0.03])
    assert reject.all()
    reject, q = benjamini_hochberg([0.01, np.nan, 0.04, 0.9])  # nan passes through and does not count in m
    assert q[[0, 2, 3]] == pytest.approx([0.03, 0.06, 0.9])
    assert np.isnan(q[1]) and reject.tolist() == [True, False, False, False]


def _bh_reference(p, alpha):
    """The textbook definition: reject the k smallest, k the largest i with p_(i) <= i alpha / m."""
    p = np.asarray(p)
    m = len(p)
    order = np.sort(p)
    passing = [i for i in range(1, m + 1) if order[i - 1] <= i * alpha / m]
    return p <= order[max(passing) - 1] if passing else np.zeros(m, dtype=bool)


def test_bh_agrees_with_the_textbook_definition():
    rng = np.random.default_rng(4)
    for trial in range(200):
        m = int(rng.integers(1, 30))
        p = np.where(rng.uniform(size=m) < 0.4, rng.uniform(0, 0.01, m), rng.uniform(size=m))
        if trial % 5 == 0:
            p = np.round(p, 2)  # ties
        for alpha in (0.01, 0.05, 0.2):
            reject, q = benjamini_hochberg(p, alpha)
            assert (reject == _bh_reference(p, alpha)).all()
        order = np.argsort(p)
        assert (np.diff(q[order]) >= -1e-15).all()  # monotone in p
        assert (q >= p - 1e-15).all() and (q <= 1).all()


def test_bh_rejects_bad_input():
    with pytest.raises(StatsError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.1, 1.5])
    with pytest.raises(StatsError, match="alpha"):
        benjamini_hochberg([0.1], alpha=0)


# ---- cell tests ---------------------------------------------------------------------------------------------------
def per_sample(seed=0, n_ids=30, per_id=4):
    """Held-out correctness of a probe and its control task per sample: layers 2 and 3 read the target (0.9 vs the
    control's 0.5), layers 0 and 1 do not (0.5 vs 0.5)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(4):
        for i in range(n_ids):
            for k in range(per_id):
                p_real = 0.9 if layer >= 2 else 0.5
                rows.append({"layer": layer, "position_group": "last", "identity_id": f"id{i}",
                             "correct": bool(rng.uniform() < p_real), "control_correct": int(rng.uniform() < 0.5)})
    return pd.DataFrame(rows)


def test_cell_tests_end_to_end():
    df = per_sample()
    out = cell_tests(df, "correct", "control_correct", ["layer", "position_group"], n_perm=2000)
    assert list(out.columns) == ["layer", "position_group", "effect", "p_value", "q_value", "significant", "n",
                                 "n_groups"]
    assert out["layer"].tolist() == [0, 1, 2, 3]
    assert out["significant"].tolist() == [False, False, True, True]
    for _, r in out.iterrows():
        cell = df[df["layer"] == r["layer"]]
        assert r["effect"] == pytest.approx((cell["correct"].astype(float) - cell["control_correct"]).mean())
        assert r["n"] == 120 and r["n_groups"] == 30
    assert (out["q_value"] >= out["p_value"]).all()
    _, q = benjamini_hochberg(out["p_value"])
    assert out["q_value"].to_numpy() == pytest.approx(q)
    # a cell's p does not depend on which other cells are tested alongside it
    alone = cell_tests(df[df["layer"] == 1], "correct", "control_correct", "layer", n_perm=2000)
    assert alone["p_value"].iloc[0] == pytest.approx(out["p_value"].iloc[1])


def test_cell_tests_errors_name_the_column():
    df = per_sample(n_ids=3)
    with pytest.raises(StatsError, match="'control_acc'"):
        cell_tests(df, "correct", "control_acc", "layer")
    with pytest.raises(StatsError, match="'identity'"):
        cell_tests(df, "correct", "control_correct", "layer", group="identity")
    with pytest.raises(StatsError, match="'position_group' is not numeric"):
        cell_tests(df, "position_group", "control_correct", "layer")


def test_mark_significant_joins_onto_a_results_table():
    df = per_sample()
    results = bootstrap_ci(df, "correct", ["layer", "position_group"], n_boot=50)
    tests = cell_tests(df[df["layer"] != 0], "correct", "control_correct", ["layer", "position_group"], n_perm=500)
    marked = mark_significant(results, tests, ["layer", "position_group"])
    assert len(marked) == len(results) and marked["significant"].dtype == bool
    assert marked["significant"].tolist() == [False, False, True, True]  # layer 0 untested: not significant
    assert np.isnan(marked["q_value"].iloc[0])
    again = mark_significant(marked, tests, ["layer", "position_group"])  # existing columns are replaced
    assert list(again.columns) == list(marked.columns)
    with pytest.raises(StatsError, match="'turn'"):
        mark_significant(results, tests, ["layer", "turn"])
    with pytest.raises(StatsError, match="several rows"):
        mark_significant(results, pd.concat([tests, tests]), ["layer", "position_group"])


def test_sign_flip_rejects_about_five_percent_under_the_null():
    """Null: every cluster's summed difference is symmetric about 0. Rows: heavy-tailed (Laplace) differences,
    12 clusters of one row (exact enumeration, 4096 sign vectors) and 12 clusters of 3 rows sharing an identity
    effect (correlated rows); 800 data sets each. A shift of 0.8 sd must be rejected far more often."""
    rng = np.random.default_rng(11)
    ids3 = np.repeat(np.arange(12), 3)
    for alternative in ("two-sided", "greater"):
        single = [sign_flip_test(rng.laplace(size=12), n_perm=4096, alternative=alternative) for _ in range(800)]
        corr = [sign_flip_test(np.repeat(rng.laplace(size=12), 3) + rng.laplace(size=36), ids3, n_perm=4096,
                               alternative=alternative) for _ in range(800)]
        assert 0.02 <= np.mean(np.array(single) <= 0.05) <= 0.08
        assert 0.02 <= np.mean(np.array(corr) <= 0.05) <= 0.08
    shifted = [sign_flip_test(rng.laplace(0.8, 1, size=12), n_perm=4096, alternative="two-sided") for _ in range(200)]
    assert np.mean(np.array(shifted) <= 0.05) > 0.4


# ---- intervals for rates ------------------------------------------------------------------------------------------
def test_rate_interval_matches_scipy_and_hand_values():
    from scipy.stats import binomtest

    assert rate_interval(12, 12, method="exact") == pytest.approx((1.0, 0.025 ** (1 / 12), 1.0))  # [0.735, 1]
    z2 = 1.959963984540054 ** 2
    assert rate_interval(12, 12, method="wilson") == pytest.approx((1.0, 1 / (1 + z2 / 12), 1.0))  # [0.758, 1]
    for n in (1, 7, 12, 25):
        for k in range(n + 1):
            for method in ("exact", "wilson"):
                ref = binomtest(k, n).proportion_ci(0.9, method=method)
                rate, low, high = rate_interval(k, n, level=0.9, method=method)
                assert rate == pytest.approx(k / n)
                assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    exact, wilson = rate_interval(6, 12, method="exact"), rate_interval(6, 12, method="wilson")
    assert exact[1] < wilson[1] < 0.5 < wilson[2] < exact[2]  # exact is the more conservative
    for method in ("exact", "wilson"):  # a fractional (effective) count lies between its integer neighbours
        assert rate_interval(3, 7, method=method)[1] < rate_interval(3.5, 7, method=method)[1] < rate_interval(
            4, 7, method=method)[1]
    assert np.isnan(rate_interval(0, 0)).all()
    with pytest.raises(StatsError, match="method 'normal'"):
        rate_interval(1, 2, method="normal")
    with pytest.raises(StatsError, match="0 <= k <= n"):
        rate_interval(3, 2)
    with pytest.raises(StatsError, match="level"):
        rate_interval(1, 2, level=95)


def test_clustered_rate_interval_counts_identities_not_rows():
    rng = np.random.default_rng(3)
    y = (rng.uniform(size=12) < 0.6).astype(float)
    ids = np.arange(12)
    plain = rate_interval(y.sum(), 12, method="exact")
    # one row per identity: exactly the plain interval
    assert clustered_rate_interval(y, ids)[:3] == pytest.approx(plain)
    assert clustered_rate_interval(y, ids, method="wilson")[:3] == pytest.approx(rate_interval(y.sum(), 12))
    # every identity's row copied three times: still 12 identities' worth of information
    rate, low, high, n_eff = clustered_rate_interval(np.repeat(y, 3), np.repeat(ids, 3))
    assert n_eff == pytest.approx(12) and (rate, low, high) == pytest.approx(plain)
    # all 36 rows leak: no information on how alike an identity's rows are, so identities count (12 of 12)
    assert clustered_rate_interval(np.ones(36), np.repeat(ids, 3)) == pytest.approx((1.0, 0.025 ** (1 / 12), 1.0, 12))
    # three independent rows per identity: close to 36 independent rows, never more
    many = rng.uniform(size=(200, 36)) < 0.6
    n_effs = [effective_sample_size(row.astype(float), np.repeat(ids, 3)) for row in many]
    assert 28 < np.mean(n_effs) <= 36 and max(n_effs) <= 36
    # missing values are dropped with their cluster; shares in [0, 1] are accepted, others refused
    assert clustered_rate_interval([1, np.nan, 0], [0, 1, 2])[:3] == pytest.approx(rate_interval(1, 2, method="exact"))
    assert clustered_rate_interval([0.5, 0.25], [0, 1])[0] == pytest.approx(0.375)
    with pytest.raises(StatsError, match=r"\[0, 1\]"):
        clustered_rate_interval([0.5, 2.0], [0, 1])
    with pytest.raises(StatsError, match="cluster ids"):
        clustered_rate_interval([0.5, 1.0], [0])


def _rows(rng, p, n_ids, per_id, icc):
    """0/1 rows of n_ids identities, per_id each; an identity's rows share a rate drawn from a beta with mean p and
    intra-identity correlation icc (0: independent rows)."""
    if icc > 0:
        rates = rng.beta(p * (1 - icc) / icc, (1 - p) * (1 - icc) / icc, n_ids)
    else:
        rates = np.full(n_ids, p)
    return (rng.uniform(size=(n_ids, per_id)) < rates[:, None]).astype(float).ravel()


RATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def test_rate_intervals_cover_with_twelve_identities_and_the_bootstrap_does_not():
    """Truth known: 12 identities at true rates 0.5 .. 0.95. With one row per identity the interval depends only on
    the count k, so each k's interval is computed once; 2000 data sets per rate. Nominal 95%."""
    rng = np.random.default_rng(7)
    by_k = {m: [rate_interval(k, 12, method=m)[1:] for k in range(13)] for m in ("exact", "wilson")}
    boot = [cluster_bootstrap(np.r_[np.ones(k), np.zeros(12 - k)], np.arange(12), 2000,
                              rng=np.random.default_rng(k), warn=False)[1:] for k in range(13)]
    cover = {"exact": [], "wilson": [], "bootstrap": []}
    for p in RATES:
        ks = rng.binomial(12, p, size=2000)
        for name, table in (("exact", by_k["exact"]), ("wilson", by_k["wilson"]), ("bootstrap", boot)):
            cover[name].append(np.mean([table[k][0] <= p <= table[k][1] for k in ks]))
    assert np.mean(cover["exact"]) >= 0.95 and min(cover["exact"]) >= 0.94  # exact: never below nominal
    assert np.mean(cover["wilson"]) >= 0.93
    assert np.mean(cover["bootstrap"]) < 0.88 and cover["bootstrap"][-1] < 0.6  # 12 of 12 -> [1, 1]


def test_clustered_rate_interval_covers_with_correlated_rows():
    """12 identities x 3 rows, rows of an identity correlated (icc 0.3 and 0.8); 300 data sets per rate."""
    rng = np.random.default_rng(8)
    ids = np.repeat(np.arange(12), 3)
    for icc in (0.3, 0.8):
        cover, naive = [], []
        for p in RATES:
            hits = naive_hits = 0
            for _ in range(300):
                y = _rows(rng, p, 12, 3, icc)
                _, low, high, _ = clustered_rate_interval(y, ids)
                hits += low <= p <= high
                _, low, high = rate_interval(y.sum(), 36, method="exact")  # rows taken as independent
                naive_hits += low <= p <= high
            cover.append(hits / 300)
            naive.append(naive_hits / 300)
        assert np.mean(cover) >= 0.93
        if icc == 0.8:
            assert np.mean(naive) < 0.88  # ignoring the clustering undercovers, so the check can fail


def test_bootstrap_ci_rate_mode_and_few_clusters(caplog):
    df = pd.DataFrame({"identity_id": np.arange(12), "cell": "a", "leak": True, "share": 0.5})
    exact = bootstrap_ci(df, "leak", "cell", rate=True).iloc[0]
    assert exact["ci_method"] == "exact" and not exact["few_clusters"]
    assert (exact["value"], exact["ci_low"], exact["ci_high"]) == pytest.approx((1.0, 0.7354, 1.0), abs=1e-4)
    assert bootstrap_ci(df, "leak", "cell", rate="auto").iloc[0]["ci_method"] == "exact"  # 0/1: detected
    assert bootstrap_ci(df, "leak", "cell", rate=True, rate_method="wilson").iloc[0]["ci_low"] == pytest.approx(
        0.7575, abs=1e-4)
    rep = pd.concat([df, df], ignore_index=True)
    assert bootstrap_ci(rep, "leak", "cell", rate=True).iloc[0]["ci_method"] == "exact (clustered)"
    with caplog.at_level("WARNING", logger="probes.stats"):
        boot = bootstrap_ci(df, "share", "cell", rate="auto").iloc[0]  # 0.5 is no 0/1 value: bootstrapped
    assert boot["ci_method"] == "percentile bootstrap" and boot["few_clusters"]
    assert "1 of 1 cells have fewer than 20 identities" in caplog.text and "0.5" not in caplog.text
    big = pd.DataFrame({"identity_id": np.arange(MIN_BOOTSTRAP_CLUSTERS), "cell": "a", "x": np.arange(20.0)})
    assert not bootstrap_ci(big, "x", "cell").iloc[0]["few_clusters"]
    with pytest.raises(StatsError, match="outside"):
        bootstrap_ci(df.assign(share=2.0), "share", "cell", rate=True)
    with pytest.raises(StatsError, match="rate 'yes'"):
        bootstrap_ci(df, "leak", "cell", rate="yes")


def test_cluster_bootstrap_warns_once_per_cluster_count(caplog):
    reset_few_cluster_warnings()  # earlier tests in the session may have warned about 7 clusters
    with caplog.at_level("WARNING", logger="probes.stats"):
        cluster_bootstrap(np.arange(7.0), np.arange(7))
        cluster_bootstrap(np.arange(7.0) * 2, np.arange(7))
        cluster_bootstrap(np.arange(30.0), np.arange(30))
    assert caplog.text.count("over 7 clusters") == 1 and "over 30 clusters" not in caplog.text


# ---- pooled ratio -------------------------------------------------------------------------------------------------
def test_pooled_ratio_ci_values_clustering_and_nan():
    num, den = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0, 2.0])
    ratio, low, high, k = pooled_ratio_ci(num, den, ["a", "b", "c", "d"], n_boot=500)
    assert ratio == pytest.approx(10 / 8) and k == 4 and 0.5 <= low <= ratio <= high <= 2.0
    # an identity's pairs are resampled together: copies of every pair change nothing
    again = pooled_ratio_ci(np.tile(num, 3), np.tile(den, 3), np.tile(["a", "b", "c", "d"], 3), n_boot=500)
    assert again == pytest.approx((ratio, low, high, 4))
    assert np.isnan(pooled_ratio_ci(num, den, ["a"] * 4)[1:3]).all()  # one cluster
    assert pooled_ratio_ci(num, den, ["a"] * 4)[0] == pytest.approx(1.25)
    assert np.isnan(pooled_ratio_ci([1.0, 1.0], [0.0, 0.0], [0, 1])[0])  # no gap at all
    assert np.isnan(pooled_ratio_ci([1.0, 1.0], [1.0, -1.0], [0, 1])[1])  # some resample sums to 0
    with pytest.raises(StatsError, match="one of each per row"):
        pooled_ratio_ci([1.0], [1.0, 2.0], [0, 1])


def test_pooled_ratio_ci_covers_a_known_ratio():
    """Truth known: change = 0.5 x gap + noise, gaps of varying size and sign, 30 identities of 2 pairs."""
    rng = np.random.default_rng(9)
    hits = 0
    for s in range(200):
        gap = rng.normal(2.0, 1.5, 60)
        change = 0.5 * gap + rng.normal(0, 0.5, 60)
        _, low, high, _ = pooled_ratio_ci(change, gap, np.repeat(np.arange(30), 2), n_boot=400, seed=s)
        hits += low <= 0.5 <= high
    assert hits / 200 >= 0.88


# ---- what a number of clusters can reach --------------------------------------------------------------------------
def test_min_sign_flip_p_is_what_sign_flip_test_returns_at_its_most_extreme():
    for n in range(1, 14):
        diffs = np.arange(1.0, n + 1)  # every cluster positive: the most extreme data there is
        for alternative in ("greater", "two-sided"):
            assert sign_flip_test(diffs, n_perm=10000, alternative=alternative) == pytest.approx(
                min_sign_flip_p(n, alternative))
    assert min_sign_flip_p(12, "two-sided") == pytest.approx(2 / 4096)
    assert min_sign_flip_p(12, "less") == pytest.approx(1 / 4096)
    # more clusters than n_perm enumerates: random flips, floor 1 / (1 + n_perm)
    assert min_sign_flip_p(20, "two-sided", n_perm=99) == pytest.approx(0.01)
    assert sign_flip_test(np.arange(1.0, 21), n_perm=99, alternative="two-sided") == pytest.approx(0.01)
    assert min_sign_flip_p(0) == 1.0 and min_sign_flip_p(1) == 1.0
    with pytest.raises(StatsError, match="n_clusters -1"):
        min_sign_flip_p(-1)
    with pytest.raises(StatsError, match="alternative"):
        min_sign_flip_p(5, "both")


def test_bh_reachable_agrees_with_benjamini_hochberg():
    for n_clusters in range(4, 16):
        p_min = min_sign_flip_p(n_clusters)
        for n_tests in (1, 10, 60, 180):
            for n_effects in {1, n_tests // 2 or 1, n_tests}:
                p = np.r_[np.full(n_effects, p_min), np.ones(n_tests - n_effects)]
                reject, _ = benjamini_hochberg(p, 0.05)
                assert bh_reachable(n_clusters, n_tests, n_effects=n_effects) == bool(reject[:n_effects].all())
    assert not bh_reachable(12, 180) and bh_reachable(13, 180)  # 2/4096 > 0.05/180 >= 2/8192
    assert bh_reachable(6, 180, n_effects=180)  # every cell at 2/64 = 0.031 <= 0.05
    assert min_clusters_for_bh(180) == 13 and min_clusters_for_bh(180, n_effects=180) == 6
    assert min_clusters_for_bh(1) == 6  # 2/32 = 0.0625 > 0.05 >= 2/64
    assert min_clusters_for_bh(1000, n_perm=999) is None  # the Monte Carlo floor 0.001 > 0.05 / 1000
    with pytest.raises(StatsError, match="n_effects 5"):
        bh_reachable(10, 4, n_effects=5)
    with pytest.raises(StatsError, match="n_tests 0"):
        bh_reachable(10, 0)


def test_options_objects_equal_their_keywords_and_bad_ones_are_named():
    df = per_sample(n_ids=6)
    pd.testing.assert_frame_equal(bootstrap_ci(df, "correct", "layer", IntervalOptions(n_boot=50, seed=2)),
                                  bootstrap_ci(df, "correct", "layer", n_boot=50, seed=2))
    keywords_win = bootstrap_ci(df, "correct", "layer", IntervalOptions(n_boot=50, seed=2), seed=3)
    pd.testing.assert_frame_equal(keywords_win, bootstrap_ci(df, "correct", "layer", n_boot=50, seed=3))
    pd.testing.assert_frame_equal(cell_tests(df, "correct", "control_correct", "layer", CellTestOptions(n_perm=200)),
                                  cell_tests(df, "correct", "control_correct", "layer", n_perm=200))
    with pytest.raises(TypeError, match="n_perms"):
        cell_tests(df, "correct", "control_correct", "layer", n_perms=10)
    with pytest.raises(StatsError, match="cell_tests: alternative 'bigger'"):
        cell_tests(df, "correct", "control_correct", "layer", alternative="bigger")
    with pytest.raises(StatsError, match="bootstrap_ci: rate_method 'exactly'"):
        bootstrap_ci(df, "correct", "layer", rate=True, rate_method="exactly")
