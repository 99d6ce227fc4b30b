"""Clustered bootstrap CIs, the benchmark-layout leakage table (CSV, LaTeX) with exact intervals for its rates, and
the leakage figure."""


import numpy as np
import pandas as pd
import pytest

from analysis.figures import plot_leakage
from analysis.tables import (
    TableError,
    interval_caption,
    leakage_latex,
    leakage_long,
    leakage_table,
    write_leakage_table,
)
from probes.stats import StatsError, bootstrap_ci, clustered_rate_interval, rate_interval

FRAMINGS = ["caption", "direct", "classification"]  # deliberately not in the benchmark's order
PII = ["SSN", "Email", "Phone Numbers"]


def fake_results(n_ids=40, models=("tiny_llava", "model-b"), seed=0) -> pd.DataFrame:
    """One row per (model, framing, pii_type, identity): leak/refused drawn with a per-identity ease."""
    rng = np.random.default_rng(seed)
    ease = rng.uniform(0, 1, n_ids)
    rows = []
    for m in models:
        for f in FRAMINGS:
            for p in PII:
                for i in range(n_ids):
                    leak = rng.uniform() < ease[i] * (0.8 if f == "direct" else 0.3)
                    rows.append({"model": m, "family": "llava", "session_id": f"{m}-{f}-{p}-{i}",
                                 "identity_id": f"id{i}", "kind": "mmprivacy", "framing": f, "scenario": "open",
                                 "pii_type": p, "turn_distance": 0, "leak": leak, "partial": float(leak) * 0.5 + 0.1,
                                 "refused": (not leak) and rng.uniform() < 0.5, "response_chars": 10})
    return pd.DataFrame(rows)


# ---- bootstrap ----------------------------------------------------------------------------------------------------
def test_bootstrap_ci_covers_the_mean_with_a_sensible_width():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"identity_id": np.arange(400), "cell": np.repeat(["a", "b"], 200),
                       "x": rng.uniform(size=400) < np.repeat([0.3, 0.7], 200)})
    ci = bootstrap_ci(df, "x", "cell", n_boot=2000).set_index("cell")
    for cell, p in (("a", 0.3), ("b", 0.7)):
        r = ci.loc[cell]
        assert r["value"] == pytest.approx(df.loc[df["cell"] == cell, "x"].mean())
        assert r["ci_low"] < r["value"] < r["ci_high"]
        width = r["ci_high"] - r["ci_low"]
        expected = 2 * 1.96 * np.sqrt(p * (1 - p) / 200)  # the normal-approximation width
        assert 0.8 * expected < width < 1.2 * expected
        assert r["n"] == 200 and r["n_groups"] == 200
    half = bootstrap_ci(df, "x", "cell", n_boot=2000, level=0.5).set_index("cell")  # +-0.674 sd, not +-1.96
    ratio = (half["ci_high"] - half["ci_low"]) / (ci["ci_high"] - ci["ci_low"])
    assert ratio.between(0.674 / 1.96 * 0.8, 0.674 / 1.96 * 1.2).all()


def test_bootstrap_is_clustered_by_identity():
    rng = np.random.default_rng(2)
    base = pd.DataFrame({"identity_id": [f"p{i}" for i in range(60)], "x": rng.normal(size=60), "cell": "c"})
    dup = pd.concat([base] * 10, ignore_index=True)  # every identity's row ten times
    one = bootstrap_ci(base, "x", "cell", n_boot=500, seed=3).iloc[0]
    ten = bootstrap_ci(dup, "x", "cell", n_boot=500, seed=3).iloc[0]
    # resampling identities: the duplicates add no information, the interval stays exactly the same
    assert (ten["ci_low"], ten["ci_high"]) == pytest.approx((one["ci_low"], one["ci_high"]))
    assert ten["n"] == 600 and ten["n_groups"] == 60
    # a row bootstrap (each row its own group) would wrongly shrink it about sqrt(10)-fold
    rows = bootstrap_ci(dup.assign(row=np.arange(600)), "x", "cell", group="row", n_boot=500, seed=3).iloc[0]
    assert (rows["ci_high"] - rows["ci_low"]) < 0.5 * (ten["ci_high"] - ten["ci_low"])


def test_bootstrap_groups_and_missing_keys():
    df = pd.DataFrame({"identity_id": [1, 1, 2, 2, 3], "a": ["x", "x", "x", "y", None], "b": [0, 1, 0, 0, 0],
                       "v": [1.0, 0.0, np.nan, 1.0, 0.5]})
    ci = bootstrap_ci(df, "v", ["a", "b"], n_boot=50)
    assert list(ci.columns) == ["a", "b", "value", "ci_low", "ci_high", "n", "n_groups", "ci_method", "few_clusters"]
    assert (ci["ci_method"] == "percentile bootstrap").all() and ci["few_clusters"].all()  # 1 or 2 identities
    assert len(ci) == 4  # (x,0) (x,1) (y,0) (None,0); the NaN value is dropped from (x,0)
    x0 = ci[(ci["a"] == "x") & (ci["b"] == 0)].iloc[0]
    assert x0["n"] == 1 and x0["value"] == 1.0 and x0["ci_low"] == x0["ci_high"] == 1.0  # one identity
    assert ci["a"].isna().sum() == 1
    assert bootstrap_ci(df, "v", [], n_boot=50).iloc[0]["n"] == 4


def test_bootstrap_bad_input():
    df = pd.DataFrame({"identity_id": [1], "v": ["high"], "c": [0]})
    with pytest.raises(StatsError, match="'w'"):
        bootstrap_ci(df, "w", "c")
    with pytest.raises(StatsError, match="not numeric"):
        bootstrap_ci(df, "v", "c")
    with pytest.raises(StatsError, match="level"):
        bootstrap_ci(df.assign(v=1.0), "v", "c", level=95)


def test_bootstrap_is_reproducible():
    rng = np.random.default_rng(0)
    n = 600 * 30
    df = pd.DataFrame({"identity_id": np.tile(np.arange(600), 30), "cell": np.repeat(np.arange(30), 600),
                       "x": rng.uniform(size=n) < 0.4})
    a = bootstrap_ci(df, "x", "cell", n_boot=1000, seed=5)  # 30 cells x 1000 draws x 600 identities
    pd.testing.assert_frame_equal(a, bootstrap_ci(df, "x", "cell", n_boot=1000, seed=5))
    assert not a.equals(bootstrap_ci(df, "x", "cell", n_boot=1000, seed=6))  # the seed is what fixes it


# ---- tables -------------------------------------------------------------------------------------------------------
def test_leakage_long_shape_and_values():
    res = fake_results()
    long = leakage_long(res, n_boot=200)
    assert list(long.columns) == ["model", "framing", "pii_type", "metric", "value", "ci_low", "ci_high", "n",
                                  "n_groups", "ci_method", "few_clusters"]
    assert (long["ci_method"] == "exact").all() and not long["few_clusters"].any()  # one row per identity
    assert len(long) == 2 * 3 * 3 * 3 and set(long["metric"]) == {"ASR", "RR", "partial"}
    assert list(dict.fromkeys(long["framing"])) == ["direct", "caption", "classification"]  # benchmark order
    assert list(dict.fromkeys(long["pii_type"])) == ["Email", "Phone Numbers", "SSN"]
    got = long.set_index(["model", "framing", "pii_type", "metric"])
    sub = res[(res["model"] == "model-b") & (res["framing"] == "direct") & (res["pii_type"] == "SSN")]
    assert got.loc[("model-b", "direct", "SSN", "ASR"), "value"] == pytest.approx(sub["leak"].mean())
    assert got.loc[("model-b", "direct", "SSN", "RR"), "value"] == pytest.approx(sub["refused"].mean())
    assert (got["n"] == 40).all() and (got["ci_low"] <= got["value"]).all() and (got["value"] <= got["ci_high"]).all()
    # a rate's interval is the exact one of its count; partial (shares) the exact one of its summed share
    k = int(sub["leak"].sum())
    assert got.loc[("model-b", "direct", "SSN", "ASR"), ["ci_low", "ci_high"]].tolist() == pytest.approx(
        rate_interval(k, 40, method="exact")[1:])
    assert got.loc[("model-b", "direct", "SSN", "partial"), "ci_low"] == pytest.approx(
        rate_interval(sub["partial"].sum(), 40, method="exact")[1])


def test_leakage_table_layout():
    res = fake_results()
    table = leakage_table(res, n_boot=200)
    assert table.index.names == ["model", "framing"]
    assert list(table.index) == [(m, f) for m in ("model-b", "tiny_llava")
                                 for f in ("direct", "caption", "classification")]
    assert list(table.columns) == [(p, m) for p in ("Email", "Phone Numbers", "SSN") for m in ("ASR", "RR")]
    assert all(pd.Series(table.to_numpy().ravel()).str.fullmatch(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]"))
    numeric = leakage_table(res, formatted=False, n_boot=200)
    assert numeric.columns.nlevels == 3 and numeric.shape == (6, 18)
    v = numeric.loc[("tiny_llava", "direct"), ("SSN", "ASR", "value")]
    assert table.loc[("tiny_llava", "direct"), ("SSN", "ASR")].startswith(f"{v:.2f} [")


def test_missing_cells_and_keys():
    res = fake_results(n_ids=5, models=("m",))
    res = res[~((res["framing"] == "caption") & (res["pii_type"] == "Email"))]
    res.loc[res["framing"] == "classification", "framing"] = None  # e.g. memory probes have no framing
    table = leakage_table(res, n_boot=20)
    assert table.loc[("m", "caption"), ("Email", "ASR")] == "--"
    assert ("m", "(none)") in table.index
    by_scenario = leakage_long(res, by=("model", "framing", "pii_type", "scenario"), n_boot=20)
    assert "scenario" in by_scenario.columns
    with pytest.raises(TableError, match="by"):
        leakage_table(pd.concat([by_scenario, by_scenario.assign(scenario="hiring")]))


def test_latex_is_booktabs_and_escaped():
    table = leakage_table(fake_results(n_ids=5), n_boot=20)
    tex = leakage_latex(table)
    assert tex.startswith(r"\begin{tabular}{ll") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\multicolumn{2}{c}{Phone Numbers}" in tex and r"\cmidrule(lr){3-4}" in tex
    assert "tiny\\_llava" in tex and "tiny_llava" not in tex
    body = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(body) == 2 + 6  # two header lines + model x framing rows
    assert tex.count("tiny\\_llava") == 1  # the model is written once per block
    assert tex.count(r"\midrule") == 2  # under the header, between the models


def test_write_leakage_table_and_figure(tmp_path):
    res = fake_results(n_ids=10)
    paths = write_leakage_table(res, tmp_path, n_boot=100)
    long = pd.read_csv(paths["long"])
    wide = pd.read_csv(paths["table"])
    assert len(long) == 54 and len(wide) == 6
    assert list(wide.columns[:2]) == ["model", "framing"] and "SSN RR" in wide.columns
    tex = paths["latex"].read_text()
    assert r"\begin{table*}" in tex and r"\label{tab:leakage}" in tex and r"\caption{" in tex
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    fig = plot_leakage(long, tmp_path)
    files = [tmp_path / f"leakage.{x}" for x in ("pdf", "png", "csv")]
    assert all(f.stat().st_size > 0 for f in files)
    assert len(fig.axes) == 2 * long["model"].nunique()  # ASR and RR per model
    shown = pd.read_csv(files[2])
    assert set(shown["metric"]) == {"ASR", "RR"} and len(shown) == 36
    plot_leakage(long[long["model"] == "tiny_llava"], tmp_path, name="one")
    assert (tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="metric"):
        plot_leakage(long.drop(columns="metric"), tmp_path)


# ---- intervals of the rates ---------------------------------------------------------------------------------------
def twelve_of_twelve() -> pd.DataFrame:
    """12 identities, each leaking once in one cell: ASR 12 of 12."""
    return pd.DataFrame({"model": "m", "framing": "direct", "pii_type": "SSN", "identity_id": [f"id{i}" for i in
                         range(12)], "leak": True, "refused": False, "partial": 1.0})


def test_twelve_of_twelve_gets_the_exact_interval_not_a_point():
    res = twelve_of_twelve()
    assert leakage_table(res).loc[("m", "direct"), ("SSN", "ASR")] == "1.00 [0.74, 1.00]"
    assert leakage_table(res, interval="wilson").loc[("m", "direct"), ("SSN", "ASR")] == "1.00 [0.76, 1.00]"
    # the percentile bootstrap, kept for comparison, is the interval that hid the uncertainty
    old = leakage_table(res, interval="bootstrap", n_boot=200)
    assert old.loc[("m", "direct"), ("SSN", "ASR")] == "1.00 [1.00, 1.00]"
    assert "Clopper-Pearson" in leakage_table(res).attrs["interval"]
    assert "bootstrap" in old.attrs["interval"] and "too narrow" in old.attrs["interval"]
    with pytest.raises(TableError, match="interval 'normal'"):
        leakage_long(res, interval="normal")


def test_repeated_identities_widen_the_interval():
    # three responses per identity and cell (e.g. three turn distances), the identity's responses alike
    rng = np.random.default_rng(4)
    ease = rng.uniform(size=12) < 0.7
    res = pd.concat([twelve_of_twelve().assign(leak=ease, turn_distance=t) for t in range(3)], ignore_index=True)
    long = leakage_long(res).set_index("metric")
    asr = long.loc["ASR"]
    assert asr["ci_method"] == "exact (clustered)" and asr["n"] == 36 and asr["n_groups"] == 12
    as_rows = rate_interval(res["leak"].sum(), 36, method="exact")  # what 36 independent responses would give
    assert asr["ci_high"] - asr["ci_low"] > 1.5 * (as_rows[2] - as_rows[1])
    assert (asr["ci_low"], asr["ci_high"]) == pytest.approx(rate_interval(ease.sum(), 12, method="exact")[1:])
    assert (asr["ci_low"], asr["ci_high"]) == pytest.approx(
        clustered_rate_interval(res["leak"], res["identity_id"])[1:3])


def test_partial_disclosure_is_a_metric_when_present():
    res = fake_results(n_ids=8)
    assert "PD" not in set(leakage_long(res)["metric"])  # absent column: left out, no error
    with pytest.raises(TableError, match="partial_disclosure"):
        leakage_long(res, metrics=("ASR", "PD"))
    res["partial_disclosure"] = res["leak"] | (res["identity_id"] == "id0")
    long = leakage_long(res)
    assert list(dict.fromkeys(long["metric"])) == ["ASR", "RR", "partial", "PD"]
    pd_rows = long[long["metric"] == "PD"]
    assert (pd_rows["value"] >= long[long["metric"] == "ASR"]["value"].to_numpy()).all()
    table = leakage_table(res, metrics=("ASR", "PD"))
    assert ("SSN", "PD") in table.columns
    with pytest.raises(TableError, match=r"metric\(s\) \['XX'\]"):
        leakage_long(res, metrics=("XX",))
    with pytest.raises(TableError, match="metric PD"):
        leakage_long(res.assign(partial_disclosure=2.0))  # not a rate


def test_caption_names_the_interval(tmp_path):
    paths = write_leakage_table(twelve_of_twelve(), tmp_path)
    tex = paths["latex"].read_text()
    assert "Clopper-Pearson" in tex and "bootstrap" not in tex
    long = pd.read_csv(paths["long"])
    assert set(long["ci_method"]) == {"exact"}
    assert "percentile bootstrap" in interval_caption(long.drop(columns=["ci_method", "few_clusters"]))
