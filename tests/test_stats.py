"""Sign-flip permutation tests (clustered by identity), Benjamini-Hochberg, and per-cell tests of a probe against
its control task."""

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.stats import StatsError, benjamini_hochberg, bootstrap_ci, cell_tests, mark_significant, sign_flip_test


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
