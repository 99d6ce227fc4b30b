"""probes.mitigation: fronts and hypervolume against hand-computed cases, L and U with paired identity bootstraps,
image protections (strength 0 changes nothing, a whole-image mask gives L = 0 on the embedded model), the query
counter, and white-box steering (strength 0 changes nothing; each kind does what its formula says)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from probes.data.builders import mmprivacy_sessions
from probes.data.identities import make_identities
from probes.data.session import Session, SessionImage, Turn
from probes.mitigation.blackbox import BlackBox, model_blackbox, protected
from probes.mitigation.fronts import FrontError, hypervolume, loss_at, non_dominated, pareto_front, utility_at
from probes.mitigation.image import KINDS, ImageProtection, ProtectionError
from probes.mitigation.measures import hypervolume_gain, hypervolume_table, loss_utility
from probes.mitigation.steer import ProbeGate, Steer, SteerError, intervening, leak_direction, random_direction_like
from probes.mitigation.utility import privacy_rows, utility_rows, utility_sessions

# ---- fronts ------------------------------------------------------------------------------------------------------


def test_front_keeps_the_non_dominated_points_once():
    pts = pd.DataFrame({"L": [0.2, 0.5, 0.6, 0.2, 0.9], "U": [0.8, 0.9, 0.7, 0.8, 0.9], "k": range(5)})
    front = pareto_front(pts)
    assert front["k"].tolist() == [0, 1]  # (0.6, 0.7) is dominated by (0.2, 0.8); (0.9, 0.9) by (0.5, 0.9)
    assert non_dominated([0.1, 0.1], [0.5, 0.5]).tolist() == [True, False]


def test_hypervolume_matches_hand_computed_areas():
    # strips: L 0.2-0.5 at U 0.8 (0.24) and L 0.5-1.0 at U 0.9 (0.45)
    assert hypervolume([0.2, 0.5, 0.6], [0.8, 0.9, 0.7]) == pytest.approx(0.69)
    assert hypervolume([0.0], [1.0]) == pytest.approx(1.0)  # the perfect point fills the box
    assert hypervolume([], []) == 0.0
    assert hypervolume([1.2, 0.5], [0.9, -0.1]) == 0.0  # beyond the reference: nothing
    assert hypervolume([0.5], [0.5], reference=(0.8, 0.2)) == pytest.approx(0.3 * 0.3)
    # adding a dominated point changes nothing; a new non-dominated one adds its own rectangle only
    assert hypervolume([0.2, 0.5, 0.3], [0.8, 0.9, 0.5]) == pytest.approx(0.69)
    assert hypervolume([0.2, 0.5, 0.1], [0.8, 0.9, 0.3]) == pytest.approx(0.69 + 0.1 * 0.3)


def test_front_queries_and_errors():
    front = pareto_front(pd.DataFrame({"L": [0.02, 0.3], "U": [0.5, 0.9]}))
    assert utility_at(front, 0.05) == 0.5 and np.isnan(utility_at(front, 0.01))
    assert loss_at(front, 0.8) == 0.3 and np.isnan(loss_at(front, 0.95))
    with pytest.raises(FrontError, match="finite"):
        hypervolume([np.nan], [0.5])
    with pytest.raises(FrontError, match="column 'U'"):
        pareto_front(pd.DataFrame({"L": [0.1]}))


# ---- L, U and their intervals --------------------------------------------------------------------------------------


def _rows(methods: dict[str, tuple[float, float]], n_ids: int = 20, seed: int = 0):
    """Privacy and utility rows where each method leaks under 'caption' at rate p and keeps utility u."""
    rng = np.random.default_rng(seed)
    priv, util = [], []
    for m, (p, u) in methods.items():
        for i in range(n_ids):
            priv.append({"method": m, "identity_id": f"i{i}", "framing": "caption", "leaked": rng.random() < p})
            priv.append({"method": m, "identity_id": f"i{i}", "framing": "direct", "leaked": False})
            util.append({"method": m, "identity_id": f"i{i}", "task": "read_name", "score": float(rng.random() < u)})
    return pd.DataFrame(priv), pd.DataFrame(util)


def test_loss_is_the_worst_framing_and_utility_the_task_mean():
    priv = pd.DataFrame({"method": "m", "identity_id": ["a", "b", "a", "b"],
                         "framing": ["caption"] * 2 + ["direct"] * 2, "leaked": [True, False, False, False]})
    util = pd.DataFrame({"method": "m", "identity_id": ["a", "a", "b"],
                         "task": ["read_name", "distractor", "distractor"], "score": [1.0, 0.0, 1.0]})
    points, draws = loss_utility(priv, util, by=["method"])
    assert points.loc[0, "L"] == 0.5 and points.loc[0, "asr_direct"] == 0.0
    assert points.loc[0, "U"] == pytest.approx((1.0 + 0.5) / 2)  # each task weighs the same
    assert draws is None


def test_paired_bootstrap_gain_is_zero_for_identical_methods_and_positive_for_a_better_one():
    priv, util = _rows({"a": (0.5, 0.9), "b": (0.5, 0.9)})
    priv.loc[priv["method"] == "b", "leaked"] = priv.loc[priv["method"] == "a", "leaked"].to_numpy()
    util.loc[util["method"] == "b", "score"] = util.loc[util["method"] == "a", "score"].to_numpy()
    points, draws = loss_utility(priv, util, by=["method"], n_boot=200)
    same = hypervolume_gain(points, draws, "a", "b")
    assert same == {"gain": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    priv, util = _rows({"good": (0.1, 0.9), "bad": (0.8, 0.9)})
    points, draws = loss_utility(priv, util, by=["method"], n_boot=200)
    gain = hypervolume_gain(points, draws, "good", "bad")
    assert gain["gain"] > 0 and gain["ci_low"] > 0
    table = hypervolume_table(points, draws)
    assert set(table["method"]) == {"good", "bad"} and (table["ci_low"] <= table["hypervolume"]).all()


def test_settings_must_match_between_privacy_and_utility():
    priv, util = _rows({"a": (0.5, 0.9)})
    with pytest.raises(FrontError, match="different settings"):
        loss_utility(priv, util.assign(method="b"), by=["method"])


# ---- image protection ------------------------------------------------------------------------------------------------


def _form() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_every_protection_at_strength_zero_changes_nothing(kind):
    img = _form()
    out = ImageProtection(kind, 0.0, dilation=4).apply(img, boxes=[(5, 5, 20, 20)])
    assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize("kind", KINDS)
def test_every_protection_changes_the_image_at_full_strength(kind):
    img = _form()
    out = ImageProtection(kind, 1.0).apply(img, boxes=[(5, 5, 40, 30)])
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_regional_protection_touches_only_the_dilated_boxes():
    img = _form()
    out = np.asarray(ImageProtection("mask", 1.0, dilation=2).apply(img, boxes=[(10, 10, 20, 20)]))
    assert (out[8:22, 8:22] == 255).all()
    outside = np.ones(out.shape[:2], dtype=bool)
    outside[8:22, 8:22] = False
    assert np.array_equal(out[outside], np.asarray(img)[outside])
    assert np.array_equal(np.asarray(ImageProtection("mask", 1.0).apply(img)), np.asarray(img))  # no boxes


def test_bad_protections_are_refused():
    with pytest.raises(ProtectionError, match="kind 'smudge'"):
        ImageProtection("smudge", 0.5)
    with pytest.raises(ProtectionError, match="strength 1.5"):
        ImageProtection("blur", 1.5)
    with pytest.raises(ProtectionError, match="x1 < x0"):
        ImageProtection("mask", 1.0).apply(_form(), boxes=[(20, 5, 10, 9)])


# ---- the black box -------------------------------------------------------------------------------------------------


def test_query_counter_counts_every_answer():
    box = BlackBox(lambda s: ["x"] * len(s))
    sess = [Session(f"s{i}", [Turn("user", "hi")]) for i in range(3)]
    box(sess), box(sess[:1])
    assert box.queries == 4
    broken = BlackBox(lambda s: ["x"])
    with pytest.raises(ValueError, match="3 sessions in, 1 answers out"):
        broken(sess)
    assert broken.queries == 0


def test_protected_session_masks_the_marked_boxes_and_keeps_the_marks():
    img = _form()
    s = Session("s", [Turn("user", "read", images=[SessionImage.from_pil(img, marks={"ssn": [(0, 0, 64, 48)]})])])
    out = protected(s, ImageProtection("mask", 1.0), labels=["ssn"])
    assert (np.asarray(out.images[0].load()) == 255).all()
    assert out.images[0].marks == s.images[0].marks and s.images[0].pil is img  # the input is left as it was
    untouched = protected(s, ImageProtection("mask", 1.0), labels=["email"])
    assert np.array_equal(np.asarray(untouched.images[0].load()), np.asarray(img))


# ---- steering --------------------------------------------------------------------------------------------------------


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.hf_model(input_ids=ids).logits


def test_strength_zero_steers_change_nothing_and_each_kind_follows_its_formula(llava):
    d = llava.d_model
    hook = "blocks.0.hook_resid_post"
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    base = _logits(llava, ids)
    r = torch.randn(d, dtype=torch.float64)
    zero = [Steer("add", hook, 0.0, vector=r), Steer("ablate", hook, 0.0, vector=r),
            Steer("mean", hook, 0.0, vector=r), Steer("erase", hook, 0.0, eraser=lambda x: x * 0)]
    with intervening(llava, zero):
        assert torch.equal(_logits(llava, ids), base)
    seen = {}
    with intervening(llava, [Steer("ablate", hook, 1.0, vector=r)]), llava.hooks(
            [(hook, lambda x, name: seen.setdefault("x", x.detach().clone()))]):
        _logits(llava, ids)
    u = (r / r.norm()).float()
    assert torch.allclose(seen["x"] @ u, torch.zeros(1), atol=1e-4)  # no component left along r
    x = torch.randn(2, 3, d)
    assert torch.allclose(Steer("add", hook, 0.5, vector=r).apply(x), x + 0.5 * r.float())
    assert torch.allclose(Steer("mean", hook, 1.0, vector=r).apply(x), r.float().expand_as(x))
    last = Steer("add", hook, 1.0, vector=r, last=1).apply(x)
    assert torch.equal(last[:, :2], x[:, :2]) and not torch.equal(last[:, 2], x[:, 2])


def test_a_gate_that_never_fires_leaves_the_model_alone(llava):
    d = llava.d_model
    ids = torch.tensor([[1, 5, 7]])
    base = _logits(llava, ids)
    gate = ProbeGate(torch.zeros(d), bias=-10.0)  # sigmoid(-10) < 0.5 everywhere
    with intervening(llava, [Steer("add", "blocks.0.hook_resid_post", 5.0, vector=torch.ones(d), gate=gate)]):
        assert torch.equal(_logits(llava, ids), base)


def test_leak_direction_and_its_random_control():
    refusing, leaking = torch.ones(4, 3), torch.zeros(5, 3)
    r = leak_direction(refusing, leaking)
    assert torch.equal(r, torch.ones(3, dtype=torch.float64))
    ctrl = random_direction_like(r, seed=1)
    assert ctrl.norm() == pytest.approx(float(r.norm())) and not torch.allclose(ctrl, r)
    with pytest.raises((SteerError, TypeError)):  # TypeError: the shape check under runtime type checking
        leak_direction(torch.ones(3), leaking)
    with pytest.raises(SteerError, match="give a vector"):
        Steer("add", "blocks.0.hook_resid_post", 1.0)


# ---- utility and the embedded model -------------------------------------------------------------------------------


def test_utility_sessions_ask_benign_questions_and_keep_the_answer_private(tmp_path):
    ids = make_identities(2, seed=7)
    sess = mmprivacy_sessions(ids, tmp_path, framings=["caption", "direct"], pii_types=["SSN"], size=96,
                              layout="grid", design="cycle")
    us = utility_sessions(sess)
    assert sorted(s.labels["task"] for s in us) == ["distractor", "distractor", "read_dob", "read_dob",
                                                     "read_name", "read_name"]  # one document per identity
    name = [s for s in us if s.labels["task"] == "read_name"][0]
    assert name.labels["_expected"] == ids[0].name and ids[0].name not in str(name.public().labels)
    rows = utility_rows(us, [s.labels["_expected"] for s in us])
    assert rows.query("task != 'no_refusal'")["score"].eq(1.0).all()
    rows = utility_rows(us, ["cannot assist"] * len(us))
    assert rows["score"].eq(0.0).all()


def test_whole_image_mask_gives_no_leak_on_the_embedded_model(tmp_path):
    """The oracle bound: with nothing to read, the caption framing that leaks every SSN leaks none."""
    from probes import load_model

    loaded = load_model("default")
    ids = make_identities(3, seed=11)
    sess = mmprivacy_sessions(ids, tmp_path, framings=["caption"], pii_types=["SSN"], size=96, layout="grid",
                              design="cycle")
    box = model_blackbox(loaded, max_new_tokens=24)
    before = privacy_rows(sess, box(sess))
    whole = [protected(s, ImageProtection("mask", 1.0, dilation=1000)) for s in sess]
    after = privacy_rows(whole, box(whole))
    assert before["leaked"].all() and not after["leaked"].any()
    assert box.queries == 2 * len(sess)


# ---- evaluating settings ---------------------------------------------------------------------------------------------


def test_settings_are_measured_resumably_and_every_query_is_counted(llava, tmp_path, monkeypatch):
    from probes.mitigation import evaluate as ev

    ids = make_identities(2, seed=3)
    sess = mmprivacy_sessions(ids, tmp_path / "img", framings=["caption", "direct"], pii_types=["SSN"], size=64,
                              design="cycle")
    util = utility_sessions(sess)
    d = llava.d_model
    settings = [ev.Setting("none", 0.0), ev.Setting("mask", 1.0, protection=ImageProtection("mask", 1.0)),
                ev.Setting("add", 2.0, steers=(Steer("add", "blocks.0.hook_resid_post", 2.0, vector=torch.ones(d)),))]
    kw = dict(max_new_tokens=3, progress=False)
    priv, ut, queries = ev.evaluate_settings(llava, settings, sess, util, out_dir=tmp_path / "a", **kw)
    assert queries == len(settings) * (len(sess) + len(util))
    assert set(priv["method"]) == {"none", "mask", "add"} and len(priv) == len(settings) * len(sess)
    assert len(ut) == 2 * len(settings) * len(util)  # each benign answer: its task and no_refusal
    calls = []
    real = ev.evaluate_setting

    def killed_after_first(*args, **kwargs):
        calls.append(args[2].method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_setting", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_settings(llava, settings, sess, util, out_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(ev, "evaluate_setting", real)
    again, again_u, queries = ev.evaluate_settings(llava, settings, sess, util, out_dir=tmp_path / "b", **kw)
    assert queries == 2 * (len(sess) + len(util))  # the first setting was kept, only two ran
    pd.testing.assert_frame_equal(again, priv)
    pd.testing.assert_frame_equal(again_u, ut)


def test_benign_kl_is_zero_at_strength_zero_and_grows_with_strength(llava, tmp_path):
    from probes.mitigation.evaluate import benign_kl

    sess = [Session(f"b{i}", [Turn("user", q)]) for i, q in enumerate(["hello there", "what is this"])]
    r = torch.randn(llava.d_model)
    kls = [benign_kl(llava, sess, [Steer("add", "blocks.0.hook_resid_post", s, vector=r)]) for s in (0.0, 1.0, 4.0)]
    assert kls[0] == 0.0 and 0 < kls[1] < kls[2]


# ---- the learned protector -------------------------------------------------------------------------------------------


def test_cell_masker_paints_the_cells_its_score_selects():
    from probes.mitigation.learned import N_FEATURES, CellMasker, features

    img = _form()
    everything = CellMasker((1.0,) + (0.0,) * (N_FEATURES - 1))
    assert (np.asarray(everything.apply(img)) == 255).all()
    nothing = CellMasker((-1.0,) + (0.0,) * (N_FEATURES - 1))
    assert np.array_equal(np.asarray(nothing.apply(img)), np.asarray(img))
    top = CellMasker((0.5, 0, 0, 0, 0, -1.0, 0, 0))  # y < 0.5: the upper half of the cells
    out = np.asarray(top.apply(img))
    assert (out[:24] == 255).all() and np.array_equal(out[24:], np.asarray(img)[24:])
    assert features(img).shape == (6, 8, N_FEATURES)
    with pytest.raises(ValueError, match="8 finite numbers"):
        CellMasker((1.0,))


def _toy_docs(n: int = 6):
    from probes.mitigation.learned import Document

    s = Session("x", [Turn("user", "q")])
    return [Document(f"d{i}", (s, s), (s,)) for i in range(n)]


def _toy_evaluate(calls: list):
    """Leak when theta[0] < 1 (the bias: mask nothing), utility falls as the bias grows (masking more)."""

    def evaluate(docs, theta):
        calls.append(len(docs))
        leak = float(theta[0] < 1.0)
        return ({d.key: {"caption": leak, "direct": 0.0} for d in docs},
                {d.key: float(np.exp(-max(theta[0], 0) / 4)) for d in docs})
    return evaluate


def test_optimiser_counts_queries_finds_the_trade_off_and_resumes_to_the_same_run(tmp_path):
    from probes.mitigation.learned import optimise

    docs = _toy_docs()
    calls = []
    full = optimise(docs, _toy_evaluate(calls), weights=(0.5,), budget=120, batch=2, popsize=4, seed=3,
                    cache_path=tmp_path / "full.json")
    assert full.queries == sum(calls) * 3 and 120 - 4 * 2 * 3 < full.queries <= 120  # never over the budget
    assert min(e["L"] for e in full.evaluations) == 0.0  # it finds settings that stop the leak
    killed = []

    def dies(docs_, theta):
        if len(killed) == 5:
            raise KeyboardInterrupt
        return _toy_evaluate(killed)(docs_, theta)

    with pytest.raises(KeyboardInterrupt):
        optimise(docs, dies, weights=(0.5,), budget=120, batch=2, popsize=4, seed=3, cache_path=tmp_path / "r.json")
    resumed = optimise(docs, _toy_evaluate([]), weights=(0.5,), budget=120, batch=2, popsize=4, seed=3,
                       cache_path=tmp_path / "r.json")
    assert resumed.evaluations == full.evaluations and resumed.front == full.front
    assert resumed.queries == full.queries and 0 < resumed.new_queries < full.queries


def test_optimiser_runs_without_the_archive():
    from probes.mitigation.learned import optimise

    run = optimise(_toy_docs(), _toy_evaluate([]), weights=(0.25, 0.75), budget=96, batch=2, popsize=4,
                   archive=False)
    assert {e["weight"] for e in run.evaluations} == {0.25, 0.75} and run.front


# ---- sites ---------------------------------------------------------------------------------------------------------


def test_located_hooks_take_the_strongest_cells_and_random_hooks_avoid_them():
    from probes.mitigation.sites import located_hooks, random_hooks

    summary = pd.DataFrame({"layer": [0, 1, 1, 2, 3], "component": ["attn_out", "mlp_out", "mlp_out", "resid_pre",
                                                                     "attn_out"],
                            "value": [0.1, 0.9, 0.7, 0.5, np.nan]})
    assert located_hooks(summary, k=2) == ["blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre"]
    probes_ = pd.DataFrame({"layer": [0, 2], "accuracy": [0.3, 0.8]})
    assert located_hooks(probes_, score="accuracy", component="resid_post") == ["blocks.2.hook_resid_post"]
    ctrl = random_hooks(["blocks.1.hook_mlp_out"], n_layers=4, seed=0)
    assert len(ctrl) == 1 and ctrl[0].endswith("hook_mlp_out") and not ctrl[0].startswith("blocks.1.")
    with pytest.raises(ValueError, match="components \\['head'\\]"):
        located_hooks(summary.assign(component="head"))


def test_select_steer_picks_the_lowest_loss_within_the_kl_budget(llava, tmp_path):
    from probes.mitigation.sites import select_steer

    ids = make_identities(2, seed=4)
    sess = mmprivacy_sessions(ids, tmp_path, framings=["caption"], pii_types=["SSN"], size=64, design="cycle")
    benign = [Session("b", [Turn("user", "hello there")])]
    r = torch.randn(llava.d_model)
    cands = [Steer("add", "blocks.0.hook_resid_post", s, vector=r) for s in (0.0, 3.0)]
    table = select_steer(llava, cands, sess, benign, kl_budget=0.0, max_new_tokens=3)
    assert table["kl"].iloc[0] == 0.0 and table["kl"].iloc[1] > 0
    assert table["chosen"].tolist() == [True, False]  # only strength 0 fits a zero budget
    none = select_steer(llava, cands[1:], sess, benign, kl_budget=0.0, max_new_tokens=3)
    assert not none["chosen"].any()


# ---- the results folder and the command ---------------------------------------------------------------------------


def test_mmret_mitigate_writes_points_fronts_and_figures(tiny_dir, tmp_path):
    from analysis.cli import main
    from probes.data.session import write_sessions

    people = make_identities(4, seed=21)
    sess = mmprivacy_sessions(people[:2], tmp_path / "img", framings=["caption", "direct"], pii_types=["SSN"],
                              size=64, design="cycle")
    fit = mmprivacy_sessions(people[2:], tmp_path / "img", framings=["caption", "direct"], pii_types=["SSN"],
                             size=64, design="cycle")
    write_sessions(sess, tmp_path / "s.jsonl")
    write_sessions(fit, tmp_path / "fit.jsonl")
    out = tmp_path / "out"
    args = ["mitigate", "--model", str(tiny_dir("llava")), "--sessions", str(tmp_path / "s.jsonl"), "--out", str(out),
            "--protect", "mask,blur", "--strengths", "0.5,1", "--steer-hooks", "blocks.0.hook_resid_post",
            "--steer-fit", str(tmp_path / "fit.jsonl"), "--max-new-tokens", "3", "--n-boot", "20", "--no-progress"]
    assert main(args) == 0
    points = pd.read_csv(out / "mitigation_points.csv")
    methods = {"mask", "blur", "add@blocks.0.hook_resid_post"}
    assert set(points["method"]) == methods | {"none"}
    none = points[points["method"] == "none"].iloc[0]
    starts = points[points["strength"] == 0.0]
    assert set(starts["method"]) == methods | {"none"}  # every front starts at the unmitigated point
    assert (starts["L"] == none["L"]).all() and (starts["U"] == none["U"]).all()
    hv = pd.read_csv(out / "mitigation_hypervolume.csv")
    assert set(hv["method"]) == methods and (hv["ci_low"] <= hv["hypervolume"] + 1e-12).all()
    assert (out / "fronts.pdf").exists() and (out / "fronts.csv").exists()
    assert not list(out.glob(".mitigation-parts-*"))  # this run's parts are removed once the folder is written
    private = {p.name for p in people} | {p.ssn for p in people}
    for f in out.glob("*.csv"):
        assert not any(v in f.read_text() for v in private), f"PII in {f.name}"
    assert main(args[:-12] + ["--protect", "smudge", "--no-progress"]) != 0


def test_settings_cover_each_kind_and_strength_and_the_best_point_keeps_utility():
    from probes.mitigation.settings import NONE, SENSITIVE, best_point, blackbox_settings

    made = blackbox_settings(["mask", "blur"], [0.0, 0.5, 1.0])
    assert [(s.method, s.strength) for s in made] == [("mask", 0.5), ("mask", 1.0), ("blur", 0.5), ("blur", 1.0)]
    assert made[0].labels == SENSITIVE and "name" not in SENSITIVE  # the name stays readable
    pts = pd.DataFrame({"method": ["none", "mask", "mask", "mask"], "strength": [0, 0.5, 1, 2],
                        "L": [1.0, 0.4, 0.0, 0.0], "U": [1.0, 0.99, 0.9, 0.96]})
    assert best_point(pts, "mask")["strength"] == 2  # L 0 with U >= 0.95; the 0.9 point keeps too little
    assert best_point(pts.assign(U=[1.0, 0.5, 0.5, 0.5]), "mask") is None
    assert NONE.method == "none" and NONE.protection is None and not NONE.steers


def test_leak_directions_need_both_kinds_of_framing(llava, tmp_path):
    from probes.mitigation.settings import leak_directions

    sess = mmprivacy_sessions(make_identities(2, seed=5), tmp_path, framings=["caption", "direct"],
                              pii_types=["SSN"], size=64, design="cycle")
    dirs = leak_directions(llava, sess, ["blocks.0.hook_resid_post"])
    assert dirs["blocks.0.hook_resid_post"].shape == (llava.d_model,)
    with pytest.raises(ValueError, match="refusing"):
        leak_directions(llava, [s for s in sess if s.labels["framing"] == "caption"], ["blocks.0.hook_resid_post"])


# ---- the other white-box interventions: LEACE with a rank knob, component mean-ablation, the gate --------------------


def _leace(d: int, n: int = 400, seed: int = 0):
    """A LEACE fitted on data where a 3-way concept shifts the first coordinates (known to be erasable)."""
    from probes.probing.erasure import fit_leace

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, :3] += 4.0 * torch.nn.functional.one_hot(y, 3).double()
    return fit_leace(X, y.numpy()[:, None], 3), X, y


def test_leace_at_rank_zero_or_strength_zero_changes_nothing_and_its_full_rank_is_leace(llava):
    from probes.mitigation.whitebox import leace_settings, truncated_eraser

    leace, X, _ = _leace(llava.d_model)
    hook = "blocks.0.hook_resid_post"
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    base = _logits(llava, ids)
    for steer in (Steer("erase", hook, 1.0, eraser=truncated_eraser(leace, 0), last=1),
                  Steer("erase", hook, 0.0, eraser=truncated_eraser(leace, leace.rank), last=1)):
        with intervening(llava, [steer]):
            assert torch.equal(_logits(llava, ids), base)
    full = truncated_eraser(leace, leace.rank)
    assert torch.allclose(full(X[None]), leace(X[None]), atol=1e-9)  # the full rank is LEACE itself
    one = truncated_eraser(leace, 1)(X[None])[0]
    assert not torch.allclose(one, X) and not torch.allclose(one, leace(X))  # rank 1 removes part of it
    made = leace_settings({hook: leace}, [0, 1, 1000])
    assert [(s.method, s.strength) for s in made] == [(f"leace@{hook}", 1.0), (f"leace@{hook}", float(leace.rank))]
    with intervening(llava, made[0].steers):
        assert not torch.equal(_logits(llava, ids), base)


def test_component_mean_ablation_at_strength_zero_changes_nothing(llava):
    from probes.mitigation.settings import steer_settings

    hook = "blocks.0.hook_mlp_out"
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    base = _logits(llava, ids)
    m = torch.randn(llava.d_model, dtype=torch.float64)
    with intervening(llava, [Steer("mean", hook, 0.0, vector=m, last=1)]):
        assert torch.equal(_logits(llava, ids), base)
    (full,) = steer_settings({hook: m}, [0.0, 1.0], kind="mean")
    assert full.method == f"mean@{hook}"
    seen = {}
    with intervening(llava, full.steers), llava.hooks([(hook, lambda x, name: seen.setdefault("x", x.clone()))]):
        assert not torch.equal(_logits(llava, ids), base)
    assert torch.allclose(seen["x"][0, -1].double(), m, atol=1e-5)  # strength 1: the last position is the mean


def test_gated_steer_at_strength_zero_changes_nothing_and_acts_only_where_the_gate_fires(llava):
    from probes.mitigation.settings import steer_settings

    d, hook = llava.d_model, "blocks.0.hook_resid_post"
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    base = _logits(llava, ids)
    always = ProbeGate(torch.zeros(d, dtype=torch.float64), bias=10.0)
    r = torch.randn(d, dtype=torch.float64)
    with intervening(llava, [Steer("add", hook, 0.0, vector=r, gate=always)]):
        assert torch.equal(_logits(llava, ids), base)
    (gated,) = steer_settings({hook: r}, [0.0, 3.0], gates={hook: always})
    assert gated.method == f"gated_add@{hook}" and gated.steers[0].gate is always
    with intervening(llava, gated.steers):
        assert not torch.equal(_logits(llava, ids), base)
    x = torch.randn(1, 4, d)
    on_first = ProbeGate(torch.tensor([1.0] + [0.0] * (d - 1), dtype=torch.float64), threshold=0.5)
    x[0, :, 0] = torch.tensor([5.0, -5.0, -5.0, -5.0])  # the gate fires at position 0 only
    edited = Steer("add", hook, 1.0, vector=r, gate=on_first).apply(x)
    assert not torch.equal(edited[0, 0], x[0, 0]) and torch.equal(edited[0, 1:], x[0, 1:])
    with pytest.raises(ValueError, match="gates"):
        steer_settings({hook: r}, [1.0], gates={"blocks.1.hook_resid_post": always})


def test_best_point_within_an_absolute_utility_drop_and_an_over_refusal_budget():
    from probes.mitigation.settings import best_point

    pts = pd.DataFrame({"method": ["none", "m", "m", "m"], "strength": [0, 1, 2, 3], "L": [1.0, 0.5, 0.1, 0.0],
                        "U": [0.98, 0.97, 0.96, 0.90], "u_no_refusal": [1.0, 1.0, 0.9, 1.0]})
    assert best_point(pts, "m")["strength"] == 2  # U >= 0.95 x 0.98 = 0.931
    assert best_point(pts, "m", max_drop=0.03)["strength"] == 2
    assert best_point(pts, "m", max_drop=0.03, max_over_refusal=0.05)["strength"] == 1  # 2 refuses 10% of asks
    assert best_point(pts, "m", max_drop=0.1)["strength"] == 3
    assert best_point(pts, "m", max_drop=0.001) is None


# ---- memory and context retention ------------------------------------------------------------------------------------


def test_risk_table_reads_memory_and_the_turn_ratio():
    from probes.mitigation.risks import risk_table, turn_ratio

    rows = pd.DataFrame({"method": "m", "strength": 1.0,
                         "kind": ["memory"] * 4 + ["memory_unseen"] * 2 + ["multiturn"] * 8,
                         "turn_distance": [None] * 6 + [1, 1, 1, 1, 3, 3, 3, 3],
                         "leaked": [1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0]}).astype({"leaked": bool})
    t = risk_table(rows).iloc[0]
    assert t["memory_asr"] == 0.75 and t["memory_unseen_asr"] == 0.0
    assert (t["asr_turn1"], t["asr_turn3"], t["turn_ratio"]) == (0.5, 0.25, 0.5)
    assert t["n_memory"] == 4 and t["n_multiturn"] == 8
    none_near = rows.assign(leaked=rows["turn_distance"].eq(3))
    assert np.isnan(turn_ratio(none_near)["turn_ratio"])  # nothing leaks at turn 1: no ratio


def test_memory_and_context_retention_known_truth_on_the_embedded_model(tmp_path):
    """Unmitigated: memory-set identities are recalled from their name, never-planted ones are not; an oracle mask
    of every mark reaches the image shown turns before (no multi-turn leak) and cannot touch memory."""
    from probes import load_model
    from probes.data.builders import memory_probe_sessions, multiturn_sessions
    from probes.mitigation.evaluate import Setting
    from probes.mitigation.risks import risk_rows, risk_table
    from probes.mitigation.settings import NONE
    from probes.organism import DEFAULT_MODEL
    from probes.organism.evaluate import training_meta

    loaded = load_model("default")
    meta = training_meta(DEFAULT_MODEL)  # the memory set the shipped model was trained to recall
    planted = make_identities(int(meta["n_memory"]), seed=2000 + int(meta["seed"]))[:6]
    fresh = make_identities(6, seed=12_345)
    multi = multiturn_sessions(fresh[:4], tmp_path, k_distractors=[0, 2], reshow=[False],
                               framing_pairs=[("direct", "caption")], pii_types=["SSN"], size=96, layout="grid")
    sessions = [*memory_probe_sessions(planted, pii_types=["SSN"]),
                *memory_probe_sessions(fresh, unseen=True, pii_types=["SSN"]), *multi]
    oracle = Setting("oracle", 1.0, protection=ImageProtection("mask", 1.0, dilation=4.0))
    rows, queries = risk_rows(loaded, [NONE, oracle], sessions, max_new_tokens=24)
    assert queries == 2 * len(sessions)
    t = risk_table(rows).set_index("method")
    assert t.loc["none", "memory_asr"] >= 0.5 and t.loc["none", "memory_unseen_asr"] <= 0.05
    assert t.loc["none", "asr_turn1"] >= 0.5 and t.loc["none", "asr_turn3"] >= 0.5
    assert t.loc["oracle", "asr_turn1"] == 0.0 and t.loc["oracle", "asr_turn3"] == 0.0
    assert t.loc["oracle", "memory_asr"] == t.loc["none", "memory_asr"]  # no image in a name-only prompt


def test_run_mitigation_measures_memory_and_context_retention_at_each_chosen_point(llava, tmp_path):
    from analysis.mitigation import run_mitigation
    from probes.data.builders import memory_probe_sessions, multiturn_sessions
    from probes.mitigation.evaluate import Setting

    ids = make_identities(2, seed=3)
    sess = mmprivacy_sessions(ids, tmp_path / "img", framings=["caption", "direct"], pii_types=["SSN"], size=64,
                              design="cycle")
    risk = [*memory_probe_sessions(ids[:1], pii_types=["SSN"], framings=["caption"]),
            *multiturn_sessions(ids, tmp_path / "img", k_distractors=[0, 2], reshow=[False],
                                framing_pairs=[("direct", "caption")], pii_types=["SSN"], size=64)]
    settings = [Setting("mask", 1.0, protection=ImageProtection("mask", 1.0))]
    done = run_mitigation(llava, sess, settings, tmp_path / "out", n_boot=0, max_new_tokens=3, progress=False,
                          risk_sessions=risk)
    on_disk = pd.read_csv(tmp_path / "out" / "mitigation_risks.csv")
    assert set(on_disk["method"]) <= {"none", "mask"} and "none" in set(on_disk["method"])
    assert (on_disk["n_memory"] == 1).all() and (on_disk["n_multiturn"] == 4).all()
    assert done.risks is not None and len(done.risks) == len(on_disk)
    with pytest.raises(ValueError, match="session kinds"):
        from probes.mitigation.risks import risk_rows
        risk_rows(llava, settings, sess)


def test_disclosure_rates_and_operating_points_by_hand():
    """Hand-computed: RR, partial disclosure and the leak rate among non-refusals per setting; U at L <= 0.05 and
    L at U >= 0.95 x clean U read off each method's points (NaN where a front never gets there)."""
    from analysis.mitigation import disclosure_rates, operating_points

    priv = pd.DataFrame({"method": ["none"] * 4 + ["mask"] * 4, "strength": [0.0] * 4 + [1.0] * 4,
                         "leaked": [1, 1, 0, 0, 0, 0, 1, 0], "refused": [0, 0, 1, 1, 1, 0, 0, 0],
                         "partial_disclosure": [0, 1, 0, 0, 0, 0, 1, 1]})
    got = disclosure_rates(priv).set_index("method")
    assert got.loc["none", "refusal_rate"] == 0.5 and got.loc["none", "leak_among_answered"] == 1.0
    assert got.loc["mask", "refusal_rate"] == 0.25 and got.loc["mask", "leak_among_answered"] == 1 / 3
    assert got.loc["mask", "partial_rate"] == 0.5
    points = pd.DataFrame({"method": ["none", "a", "a", "a", "b", "b"], "strength": [0, 0, 1, 2, 0, 1],
                           "L": [1.0, 1.0, 0.5, 0.0, 1.0, 0.2], "U": [0.8, 0.8, 0.79, 0.4, 0.8, 0.7]})
    hv = operating_points(points, pd.DataFrame({"method": ["a", "b"], "hypervolume": [0.5, 0.3]}))
    assert hv["U_at_L_le_0.05"].iloc[0] == 0.4 and np.isnan(hv["U_at_L_le_0.05"].iloc[1])
    assert hv["L_at_U_ge_0.95_clean"].tolist() == [0.5, 1.0]  # 0.95 x 0.8 = 0.76: a keeps it at L 0.5, b never


# ---- internal decodability: a probe retrained after the intervention -------------------------------------------------


@pytest.fixture(scope="module")
def plan_setup(tmp_path_factory):
    """The embedded model and caption/SSN sessions of 40 fit and 20 held-out identities (disjoint), with the hook
    where the organism plants the asked value's digits at the prompt's end (README: LM block PLAN_LAYER)."""
    from probes import load_model
    from probes.organism.train import PLAN_LAYER

    loaded = load_model("default")
    sess = mmprivacy_sessions(make_identities(60, seed=123), tmp_path_factory.mktemp("decodability"),
                              framings=["caption"], pii_types=["SSN"], size=96, layout="grid", design="cycle")
    return loaded, sess[:40], sess[40:], f"blocks.{PLAN_LAYER}.hook_resid_post"


def _binomial_tolerance(result) -> float:
    """4 binomial standard deviations of a per-digit accuracy at chance over the held-out digits."""
    n_digits = result.n_test * len(result.per_position)
    return 4 * (result.chance * (1 - result.chance) / n_digits) ** 0.5


def test_decodability_at_strength_zero_equals_the_plain_probe(plan_setup):
    """(a) A steer at strength 0 changes nothing, so the retrained probe scores exactly what the plain probe does,
    and the plain probe is the ridge probe fitted on the unhooked activations."""
    from probes.mitigation.decodability import decodability
    from probes.mitigation.evaluate import Setting
    from probes.mitigation.settings import last_prompt_activations
    from probes.probing.linear import fit_probes
    from probes.probing.targets import session_targets

    loaded, fit, test, hook = plan_setup
    plain = decodability(loaded, [], fit, test, hook)
    zero = [Steer("add", hook, 0.0, vector=torch.randn(loaded.d_model, dtype=torch.float64)),
            Steer("mean", "blocks.1.hook_resid_post", 0.0, vector=torch.zeros(loaded.d_model))]
    assert decodability(loaded, zero, fit, test, hook) == plain
    assert decodability(loaded, Setting("none", 0.0), fit, test, hook) == plain
    X = {k: last_prompt_activations(loaded, s, [hook])[hook].float() for k, s in (("fit", fit), ("test", test))}
    y = {k: session_targets(s, "digits")[0] for k, s in (("fit", fit), ("test", test))}
    k = y["fit"].shape[1]
    by_hand = fit_probes(X["fit"][None].expand(k, -1, -1), y["fit"].T,
                         np.asarray([s.labels["identity_id"] for s in fit]), method="ridge", n_classes=10)
    correct = by_hand.predict(X["test"][None].expand(k, -1, -1)).numpy() == y["test"].T
    assert plain.accuracy == pytest.approx(correct.mean()) and (plain.n_fit, plain.n_test) == (40, 20)


def test_decodability_reads_the_planted_digits_above_chance(plan_setup):
    """(c) Known truth: the organism was trained to hold the asked SSN's digits at the prompt's end in LM block
    PLAN_LAYER, so the unmitigated probe reads them on held-out identities well above chance (1/10) and above the
    fit part's majority class; at the embedding of the prompt's last token (the same token in every session) it
    reads nothing."""
    from probes.mitigation.decodability import decodability

    loaded, fit, test, hook = plan_setup
    plain = decodability(loaded, [], fit, test, hook)
    assert plain.chance == 0.1 and len(plain.per_position) == 9  # SSN: nine digits
    assert plain.accuracy > plain.chance + _binomial_tolerance(plain), plain  # measured 0.44
    assert plain.accuracy > plain.majority + _binomial_tolerance(plain), plain
    embed = decodability(loaded, [], fit, test, "blocks.0.hook_resid_pre")
    assert abs(embed.accuracy - embed.chance) <= _binomial_tolerance(embed), embed


def test_decodability_after_a_constant_residual_is_chance(plan_setup):
    """(b) Replacing the residual at the read site by a constant (a mean steer at strength 1 towards zero) leaves
    nothing to read: the retrained probe names the fit part's majority digit at every position, exactly the
    `majority` null, which is within binomial noise of 1/10 over the held-out digits."""
    from probes.mitigation.decodability import decodability

    loaded, fit, test, hook = plan_setup
    wiped = decodability(loaded, [Steer("mean", hook, 1.0, vector=torch.zeros(loaded.d_model), last=1)], fit, test,
                         hook)
    assert wiped.accuracy == pytest.approx(wiped.majority)
    assert abs(wiped.accuracy - wiped.chance) <= _binomial_tolerance(wiped), wiped
    plain = decodability(loaded, [], fit, test, hook)
    assert plain.accuracy - wiped.accuracy > _binomial_tolerance(plain)  # the measure moved with the thing


def test_decodability_refuses_a_reading_upstream_of_the_edit_or_shared_identities(plan_setup):
    from probes.mitigation.decodability import DecodabilityError, decodability

    loaded, fit, test, hook = plan_setup
    later = Steer("mean", "blocks.3.hook_resid_post", 1.0, vector=torch.zeros(loaded.d_model))
    with pytest.raises(DecodabilityError, match="read before the steer"):
        decodability(loaded, [later], fit, test, hook)
    with pytest.raises(DecodabilityError, match="identities are in both"):
        decodability(loaded, [], fit, fit[:5], hook)
    with pytest.raises(DecodabilityError, match="target 'identity'"):
        decodability(loaded, [], fit, test, hook, target="identity")
