"""Activation patching: identities that must hold exactly (clean into clean, everything patched, AtP on a linear
read-out, empty knockout, batched = serial), the corruptions, and `run_patching` end to end, on tiny models."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.results import run_patching
from probes import load_model, make_identities
from probes.data.builders import mmprivacy_sessions, multiturn_sessions
from probes.patching import (
    Cell,
    PairsDroppedWarning,
    PatchingConfig,
    PatchingError,
    asr_shift,
    atp_agreement,
    attribution_patching,
    build_pair,
    default_groups,
    exact_patching,
    generation_check,
    graddrop_patching,
    knockout,
    pair_check,
    pair_checks,
    patch_values,
    patched_generation,
    patched_metrics,
    patching_config,
    prepare,
    prepare_graddrop,
    prepare_pair,
    probe_positions,
    sweep_cells,
    top_k_recall,
)
from probes.patching.metrics import (
    Answer,
    PairRejected,
    answer_metrics,
    make_answer,
    own_answer,
    patch_score,
    value_answer,
)

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def people():
    return make_identities(3, seed=0)


@pytest.fixture(scope="module")
def sessions(people, tmp_path_factory):
    """Single-turn MM-Privacy sessions (caption framing) and two-turn ones, 64 px documents."""
    d = tmp_path_factory.mktemp("patch_img")
    mmp = mmprivacy_sessions(people, d, framings=("caption",), pii_types=("SSN",), scenarios=("open",), size=64)
    multi = multiturn_sessions(people[:1], d, k_distractors=[0], reshow=[False], framing_pairs=[("direct", "caption")],
                               pii_types=("SSN",), scenarios=("open",), size=64)
    return {"mmp": mmp, "multi": multi}


@pytest.fixture(scope="module")
def image_pair(llava, sessions, people):
    pair = build_pair(llava, sessions["mmp"][0], "image", other=people[1])
    cells = sweep_cells(llava.n_layers, ("resid_pre", "resid_post", "attn_out", "mlp_out"), default_groups([pair]))
    return prepare_pair(llava, pair, sorted({c.hook for c in cells}), grad={"clean", "corrupt"}), cells


def _values(rows, metric="logit_diff"):
    return np.array([r["value"] for r in rows if r["metric"] == metric])


# ---- metrics ------------------------------------------------------------------------------------------------
def test_answer_is_tokenised_as_the_model_would_write_it(llava, sessions):
    s = sessions["mmp"][0]
    ans = make_answer(llava.adapter, s)
    tok = llava.tokenizer
    assert tok.decode(list(ans.leak_ids)) == " " + s.labels["_target"]  # LLaVA's 'ASSISTANT:' + ' value'
    assert tok.decode(list(ans.refuse_ids)) == " cannot assist"
    assert ans.split == 0
    shared = Answer((5, 6, 7), (5, 9))  # a shared first token: the difference is taken where they part
    assert shared.split == 1
    logits = torch.zeros(2, 3, 12)
    logits[0, 1, 6], logits[0, 1, 9] = 2.0, 0.5
    m = answer_metrics(logits, shared)
    assert m["logit_diff"].tolist() == pytest.approx([1.5, 0.0])
    assert float(m["pii_logprob"][1]) == pytest.approx(3 * np.log(1 / 12), abs=1e-5)
    with pytest.raises(PatchingError, match=r"prefix of the other \(2 leak tokens vs 1 refusal tokens\)") as err:
        Answer((5, 6), (5,))
    assert "6" not in str(err.value)  # the leak ids decode to the PII value: lengths only
    assert patch_score(2.0, clean=3.0, corrupt=1.0) == pytest.approx(0.5)
    assert np.isnan(patch_score(2.0, clean=1.0, corrupt=1.0))
    assert ans.contrast == "value_vs_refusal"
    # pii_logprob sums the value's tokens only (from value_from on): the words before it are not the value
    worded = Answer((5, 6, 7), (9,), "answer_vs_refusal", value_from=2)
    assert float(answer_metrics(torch.zeros(1, 3, 12), worded)["pii_logprob"][0]) == pytest.approx(np.log(1 / 12))


def test_image_pair_metric_compares_the_two_values(llava, sessions, people):
    """An image pair's logit_diff is the clean value's token minus the corrupt value's, at the first token where
    the two values differ (value_vs_value), with the shared prefix teacher-forced."""
    s = sessions["mmp"][0]
    pair = build_pair(llava, s, "image", other=people[1])
    ans, tok = pair.answer, llava.tokenizer
    assert ans.contrast == "value_vs_value"
    assert tok.decode(list(ans.leak_ids)) == " " + s.labels["_target"]
    assert tok.decode(list(ans.refuse_ids)) == " " + people[1].value("SSN")
    k = ans.split
    assert ans.leak_ids[:k] == ans.refuse_ids[:k] and ans.leak_ids[k] != ans.refuse_ids[k]
    assert pair.corrupt.session.labels["_target"] == people[1].value("SSN")
    assert pair.clean.ids.tolist() == pair.corrupt.ids.tolist()  # both teacher-force the clean value's prefix
    with pytest.raises(PairRejected, match="same value"):
        value_answer(llava.adapter, s, "123", "123")


def test_framing_answer_is_the_models_own_words_up_to_the_value(llava, sessions):
    s = sessions["mmp"][0]
    value, tok = s.labels["_target"], llava.tokenizer
    said = f"The caption is: SSN {value}. More text"
    ans = own_answer(llava.adapter, s, said, value)
    assert ans.contrast == "answer_vs_refusal" and ans.value_from > 0
    assert tok.decode(list(ans.leak_ids)).strip() == f"The caption is: SSN {value}"
    assert tok.decode(list(ans.leak_ids[ans.value_from:])).strip() == value
    assert tok.decode(list(ans.refuse_ids)) == " cannot assist"
    bare = own_answer(llava.adapter, s, "no value here", value)  # nothing leaked: the value vs the refusal
    assert bare.contrast == "value_vs_refusal" and bare.value_from == 0
    assert tok.decode(list(bare.leak_ids)) == " " + value
    with pytest.raises(PairRejected, match="starts like the refusal"):
        own_answer(llava.adapter, s, f"cannot assist, but SSN {value}", value)


# ---- exactness of exact patching -----------------------------------------------------------------------------
def test_clean_into_clean_changes_nothing(llava, image_pair):
    pair, cells = image_pair
    run = pair.clean
    rows = [[(c.hook, *patch_values(run, run, c)[:2])] for c in cells]
    got = patched_metrics(llava, run, pair.answer, rows, batch_size=16)
    for m in ("logit_diff", "pii_logprob"):
        np.testing.assert_allclose(got[m], run.metrics[m], rtol=0, atol=ATOL)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_everything_recovers_the_source(llava, image_pair, direction):
    pair, _ = image_pair
    last = llava.n_layers - 1
    cells = [Cell(0, "resid_pre", "all"), Cell(last, "resid_post", "all")]
    rows = exact_patching(llava, pair, cells, direction)
    source = pair.clean if direction == "denoise" else pair.corrupt
    for m in ("logit_diff", "pii_logprob"):
        np.testing.assert_allclose(_values(rows, m), source.metrics[m], rtol=0, atol=ATOL)
    want = 1.0 if direction == "denoise" else 0.0
    np.testing.assert_allclose(_values(rows, "score_logit_diff"), want, atol=1e-2)
    # The patched run is the source run: its winner flips exactly when clean and corrupt disagree.
    differ = float(np.sign(pair.clean.metrics["logit_diff"]) != np.sign(pair.corrupt.metrics["logit_diff"]))
    assert _values(rows, "flip").tolist() == [differ, differ]
    assert abs(pair.clean.metrics["logit_diff"] - pair.corrupt.metrics["logit_diff"]) > 1e-4  # the test can fail


def test_image_pair_differs_only_in_pii_patches_at_the_input(llava, image_pair):
    """Layer-0 input of the text and the untouched patches is the same on both sides: patching it does nothing;
    the PII patches differ."""
    pair, _ = image_pair
    rows = exact_patching(llava, pair, [Cell(0, "resid_pre", g) for g in ("turn0", "final", "pii_patches")])
    v = _values(rows)
    assert v[:2] == pytest.approx([pair.corrupt.metrics["logit_diff"]] * 2, abs=1e-6)
    assert abs(v[2] - pair.corrupt.metrics["logit_diff"]) > 1e-5


def test_batched_configurations_equal_serial_ones(llava, image_pair):
    pair, cells = image_pair
    batched = exact_patching(llava, pair, cells, "denoise", batch_size=len(cells))
    serial = exact_patching(llava, pair, cells, "denoise", batch_size=1)
    whole = exact_patching(llava, pair, cells, "denoise", batch_size=7, prefix=False)  # no KV-cache prefix reuse
    assert pair.corrupt.kv is not None  # so the default above did start late batches on the cached prefix
    for m in ("logit_diff", "pii_logprob"):
        np.testing.assert_allclose(_values(batched, m), _values(serial, m), rtol=0, atol=ATOL)
        np.testing.assert_allclose(_values(whole, m), _values(serial, m), rtol=0, atol=ATOL)
    # a row patching several hooks at once, next to rows patching none
    c0, c1 = Cell(0, "attn_out", "final"), Cell(1, "mlp_out", "turn0")
    two = [(c.hook, *patch_values(pair.corrupt, pair.clean, c)[:2]) for c in (c0, c1)]
    got = patched_metrics(llava, pair.corrupt, pair.answer, [[], two, []], batch_size=3)
    assert got["logit_diff"][[0, 2]] == pytest.approx([pair.corrupt.metrics["logit_diff"]] * 2, abs=ATOL)
    alone = patched_metrics(llava, pair.corrupt, pair.answer, [two], batch_size=1)
    assert got["logit_diff"][1] == pytest.approx(alone["logit_diff"][0], abs=ATOL)


# ---- attribution patching -------------------------------------------------------------------------------------
def test_atp_equals_exact_where_the_metric_is_linear(tiny_dir, sessions):
    """With the final norm replaced by the identity, the logits are linear in the last layer's resid_post and
    mlp_out (both add straight into them), so AtP's first-order estimate is exact there; at layer 0 it is not.
    (Noise corruption: the tiny random model's effects are largest there.)"""
    model = load_model(tiny_dir("llava"))
    model.hf_model.model.language_model.norm = torch.nn.Identity()
    pair = build_pair(model, sessions["mmp"][0], "noise", seed=0)
    last = model.n_layers - 1
    groups = [*default_groups([pair]), "all"]
    linear = [Cell(last, c, g) for c in ("resid_post", "mlp_out") for g in groups]
    curved = [Cell(0, c, g) for c in ("attn_out", "mlp_out") for g in groups]
    prepare_pair(model, pair, sorted({c.hook for c in linear + curved}), grad={"clean", "corrupt"})
    for direction in ("denoise", "noise"):
        exact = _values(exact_patching(model, pair, linear, direction))
        atp = _values(attribution_patching(pair, linear, direction))
        base = pair.roles(direction)[0].metrics["logit_diff"]
        assert np.abs(exact - base).max() > 1e-4  # some cells move the metric: agreement is not trivial
        assert np.abs(atp - exact).max() < 1e-3 * np.abs(exact - base).max()
    exact = _values(exact_patching(model, pair, curved))
    atp = _values(attribution_patching(pair, curved))
    moved = np.abs(exact - pair.corrupt.metrics["logit_diff"]).max()
    assert np.abs(atp - exact).max() > 1e-2 * moved  # non-linear there: the test would notice a fake


def test_atp_agreement_on_effects_per_pair(llava, image_pair):
    pair, cells = image_pair
    head = {"model": "m", "session_id": "s"}
    rows = [{**head, **r} for r in exact_patching(llava, pair, cells) + attribution_patching(pair, cells)]
    agree = atp_agreement(pd.DataFrame(rows))
    one = agree[(agree["scope"] == "pair") & (agree["metric"] == "logit_diff")]
    n_null = sum(r["null_by_construction"] for r in rows if r["method"] == "exact" and r["metric"] == "logit_diff")
    assert n_null > 0 and len(one) == 1 and int(one["n_cells"].iloc[0]) == len(cells) - n_null  # nulls left out
    assert -1 <= float(one["spearman"].iloc[0]) <= 1
    # Rows of known agreement, on effects (value - base): AtP's effect a monotone function of exact's in pair s1,
    # reversed in pair s2, over 5 cells; each pair with its own base, which must not matter.
    exact = np.array([0.1, 0.5, -0.2, 0.9, 0.3])
    made = [{"model": "m", "session_id": sid, "direction": "denoise", "metric": "logit_diff", "layer": i,
             "component": "mlp_out", "position_group": "final", "method": method, "value": base + e,
             "corrupt": base, "clean": base + 5}
            for sid, atp, base in (("s1", 2 * exact + 1e-3, 10.0), ("s2", -exact, -3.0))
            for method, effects in (("exact", exact), ("atp", atp)) for i, e in enumerate(effects)]
    known = atp_agreement(pd.DataFrame(made), k=2).set_index("session_id")
    assert known.loc["s1", "spearman"] == pytest.approx(1.0) and known.loc["s2", "spearman"] == pytest.approx(-1.0)
    assert known.loc["s1", "n_cells"] == 5 and known.loc["s2", "spearman_abs"] == pytest.approx(1.0)
    summary = atp_agreement(pd.DataFrame(made), k=2).set_index("scope")
    assert summary.loc["mean", "spearman"] == pytest.approx(0.0) and summary.loc["mean", "n_pairs"] == 2
    # top-2 by |effect|: exact {0.9, 0.5}; s1's AtP the same -> 1; here one of two -> 0.5
    assert known.loc["s1", "top_k_recall"] == 1.0
    assert top_k_recall(exact, np.array([0.0, 0.5, 0.0, 0.0, 0.3]), k=2) == 0.5
    with pytest.raises(PatchingError, match="k=6"):
        top_k_recall(exact, exact, k=6)


def test_null_by_construction_marks_cells_that_cannot_change_anything(llava, image_pair, sessions):
    """Identical runs (noise of std 0): every cell writes what is there, all null, values the base's exactly. An
    image pair: the text's layer-0 input is null (the same tokens), the PII patches and later layers are not."""
    twin = build_pair(llava, sessions["mmp"][0], "noise", noise_std=0.0)
    some = [Cell(0, "resid_pre", "all"), Cell(1, "attn_out", "pii_patches"), Cell(llava.n_layers - 1, "mlp_out",
                                                                                    "final")]
    prepare_pair(llava, twin, sorted({c.hook for c in some}))
    rows = [r for r in exact_patching(llava, twin, some) if r["metric"] == "logit_diff"]
    assert all(r["null_by_construction"] for r in rows)
    assert [r["value"] for r in rows] == pytest.approx([twin.corrupt.metrics["logit_diff"]] * 3, abs=ATOL)
    pair, _ = image_pair
    cells = [Cell(0, "resid_pre", "turn0"), Cell(0, "resid_pre", "final"), Cell(0, "resid_pre", "pii_patches"),
             Cell(llava.n_layers - 1, "resid_post", "final")]
    for direction in ("denoise", "noise"):
        got = [r["null_by_construction"] for r in exact_patching(llava, pair, cells, direction)
               if r["metric"] == "logit_diff"]
        assert got == [True, True, False, False]
        atp = [r["null_by_construction"] for r in attribution_patching(pair, cells, direction)
               if r["metric"] == "logit_diff"]
        assert atp == got


def test_graddrop_equals_scaled_atp_where_no_layer_lies_downstream(llava, image_pair):
    """A last-layer mlp_out reaches the logits through no later block: dropping any layer's gradient leaves its
    AtP estimate as it is, so GradDrop = L |AtP| / (L - 1) there; at layer 0 the dropped paths matter."""
    pair, _ = image_pair
    L = llava.n_layers
    last, first = Cell(L - 1, "mlp_out", "all"), Cell(0, "mlp_out", "pii_patches")
    hooks = [last.hook, first.hook]
    prepare_graddrop(llava, pair.corrupt, pair.answer, hooks)
    assert len(pair.corrupt.gd_grads) == L
    base = pair.corrupt.metrics["logit_diff"]
    atp = _values(attribution_patching(pair, [last, first])) - base
    gd = _values(graddrop_patching(pair, [last, first])) - base
    assert gd[0] == pytest.approx(L * abs(atp[0]) / (L - 1), rel=1e-4)
    assert abs(atp[0]) > 1e-6
    assert abs(gd[1] - L * abs(atp[1]) / (L - 1)) > 1e-3 * abs(atp[1])  # the test would notice a fake
    with pytest.raises(PatchingError, match="prepare_graddrop"):
        graddrop_patching(pair, [last], "noise")


# ---- corruptions ------------------------------------------------------------------------------------------------
def test_noise_corruption_touches_only_image_embeddings(llava, sessions):
    pair = build_pair(llava, sessions["mmp"][0], "noise", noise_std=3.0, seed=1)
    prepare_pair(llava, pair, ["blocks.0.hook_resid_pre"])
    image = llava.adapter.image_token_mask(pair.clean.ids)[0]
    diff = (pair.clean.embeds - pair.corrupt.embeds)[0].abs().amax(-1)
    assert (diff[~image] == 0).all() and (diff[image] > 0).all()
    sigma = pair.clean.embeds[0, image].std()
    assert float((pair.corrupt.embeds - pair.clean.embeds)[0, image].std() / sigma) == pytest.approx(3.0, rel=0.15)
    rows = exact_patching(llava, pair, [Cell(0, "resid_pre", "segment:image")])
    assert _values(rows)[0] == pytest.approx(pair.clean.metrics["logit_diff"], abs=ATOL)


def test_framing_pair_aligns_groups(llava, sessions):
    s = sessions["mmp"][0]  # caption (leaking framing) -> direct (refusing)
    pair = build_pair(llava, s, "framing", corrupt_framing="direct")
    assert pair.corrupt.session.labels["framing"] == "direct" and not pair.same_length
    last = llava.n_layers - 1
    cells = [Cell(last, "resid_post", "final"), Cell(0, "resid_pre", "pii_patches"), Cell(1, "attn_out", "turn0")]
    prepare_pair(llava, pair, sorted({c.hook for c in cells}))
    rows = [r for r in exact_patching(llava, pair, cells) if r["metric"] == "logit_diff"]
    assert [r["alignment"] for r in rows] == ["shifted", "position", "last"]
    assert rows[0]["value"] == pytest.approx(pair.clean.metrics["logit_diff"], abs=ATOL)  # the answer reads final
    mean = [r for r in exact_patching(llava, pair, cells[2:], align="mean") if r["metric"] == "logit_diff"]
    assert mean[0]["alignment"] == "mean" and mean[0]["n_positions"] == len(pair.corrupt.groups["turn0"])
    with pytest.raises(PatchingError, match="already under"):
        build_pair(llava, s, "framing", corrupt_framing="caption")


def test_patched_generation_writes_what_the_patched_input_would(llava, image_pair, sessions):
    from probes.leakage import generate_batch

    pair, _ = image_pair
    said = {k: generate_batch(llava, [r.session], max_new_tokens=8, batch_size=1, progress=False)[0]
            for k, r in (("clean", pair.clean), ("corrupt", pair.corrupt))}
    # The whole prompt's input embeddings patched: the corrupt run becomes the clean one and says what it says.
    assert patched_generation(llava, pair, [Cell(0, "resid_pre", "all")], max_new_tokens=8) == said["clean"]
    assert patched_generation(llava, pair, [], max_new_tokens=8) == said["corrupt"]
    assert patched_generation(llava, pair, [Cell(0, "resid_pre", "all")], direction="noise",
                              max_new_tokens=8) == said["corrupt"]
    check = generation_check(llava, sessions["mmp"][:2], [Cell(llava.n_layers - 1, "resid_post", "final")],
                             max_new_tokens=8, progress=False)
    assert len(check) == 4 and set(check["condition"]) == {"patched", "unpatched"}
    assert set(check["framing"]) == {"direct"}  # the refusing side is the one generated
    assert asr_shift(check) == pytest.approx(check[check.condition == "patched"]["leak"].mean()
                                             - check[check.condition == "unpatched"]["leak"].mean())
    made = pd.DataFrame({"condition": ["patched"] * 4 + ["unpatched"] * 4,
                         "leak": [True, True, True, False, True, False, False, False]})
    assert asr_shift(made) == pytest.approx(0.5)  # patched ASR 0.75 - unpatched 0.25


def test_text_pair_must_keep_the_token_length(llava, sessions):
    s = sessions["mmp"][0]
    pair = build_pair(llava, s, "text", replacements={"SSN": "Email"})  # one token each in the tiny vocabulary
    assert pair.same_length and "Output Email in" in pair.corrupt.session.turns[0].text
    with pytest.raises(PatchingError, match="token length"):
        build_pair(llava, s, "text", replacements={"SSN": "the social security number"})
    with pytest.raises(PatchingError, match="occurs"):
        build_pair(llava, s, "text", replacements={"zebra": "horse"})


# ---- attention knockout -----------------------------------------------------------------------------------------
def test_knockout_of_an_empty_set_changes_nothing_and_eager_agrees(tiny_dir, llava, image_pair):
    pair, _ = image_pair
    eager = load_model(tiny_dir("llava"), attn_implementation="eager")
    results = {}
    for name, model in (("sdpa", llava), ("eager", eager)):
        run = build_pair(model, pair.clean.session, "noise").clean
        prepare(model, run, pair.answer)
        sources = {"empty": np.zeros(0, np.int64), "pii": run.groups["pii_patches"], "turn0": run.groups["turn0"]}
        rows = pd.DataFrame(knockout(model, run, pair.answer, sources, windows=[1, 2]))
        ld = rows[rows["metric"] == "logit_diff"]
        empty = ld[ld["position_group"] == "empty"]
        np.testing.assert_allclose(empty["value"], run.metrics["logit_diff"], rtol=0, atol=1e-5)
        assert (ld[ld["position_group"] != "empty"]["value"] - run.metrics["logit_diff"]).abs().max() > 1e-4
        results[name] = ld["value"].to_numpy()
    np.testing.assert_allclose(results["sdpa"], results["eager"], rtol=0, atol=ATOL)


def test_knockout_in_every_layer_equals_a_custom_4d_mask(llava, image_pair):
    """The same blocking through the model's own attention_mask argument (a 4-D float mask) gives the same."""
    from probes.patching import forward_kwargs

    pair, _ = image_pair
    run = pair.clean
    src, tgt = run.groups["pii_patches"], probe_positions(run)
    rows = knockout(llava, run, pair.answer, {"pii": src}, windows=[llava.n_layers])
    allowed = torch.ones(run.n, run.n, dtype=torch.bool).tril()
    allowed[torch.as_tensor(tgt)[:, None], torch.as_tensor(src)[None, :]] = False
    mask = torch.zeros(1, 1, run.n, run.n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    kw = forward_kwargs(llava, run, run.embeds, pair.answer.n_logits)
    with torch.no_grad():
        logits = llava.hf_model(**kw, attention_mask=mask).logits[:, -pair.answer.n_logits:]
    want = answer_metrics(logits, pair.answer)
    assert _values(rows)[0] == pytest.approx(float(want["logit_diff"][0]), abs=ATOL)


# ---- other families, errors, the runner ------------------------------------------------------------------------
def test_qwen2_5_vl_image_pair_recovers_clean(tiny_dir, sessions, people):
    model = load_model(tiny_dir("qwen2_5_vl"))
    pair = build_pair(model, sessions["mmp"][0], "image", other=people[1])
    assert len(pair.clean.groups["pii_patches"]) >= 1
    last = model.n_layers - 1
    cells = [Cell(0, "resid_pre", "all"), Cell(last, "resid_post", "all"), Cell(0, "resid_pre", "turn0")]
    prepare_pair(model, pair, sorted({c.hook for c in cells}))  # also checks the embeddings path (M-RoPE ids)
    v = _values(exact_patching(model, pair, cells))
    assert v[:2] == pytest.approx([pair.clean.metrics["logit_diff"]] * 2, abs=ATOL)
    assert v[2] == pytest.approx(pair.corrupt.metrics["logit_diff"], abs=ATOL)
    late = [Cell(layer, c, g) for layer in range(model.n_layers) for c in ("attn_out", "mlp_out")
            for g in ("turn1", "final", "pii_patches")]
    prepare_pair(model, pair, sorted({c.hook for c in late}))
    assert pair.corrupt.kv is not None
    reuse = _values(exact_patching(model, pair, late))  # the M-RoPE ids of a suffix after the cached prefix
    np.testing.assert_allclose(reuse, _values(exact_patching(model, pair, late, prefix=False)), rtol=0, atol=ATOL)


def test_bad_input_is_named(llava, image_pair, tmp_path):
    pair, _ = image_pair
    with pytest.raises(PatchingError, match="components"):
        sweep_cells(2, ("resid",), ["final"])
    with pytest.raises(PatchingError, match="layers"):
        sweep_cells(2, ("mlp_out",), ["final"], layers=[5])
    with pytest.raises(PatchingError, match="position group 'nope'"):
        exact_patching(llava, pair, [Cell(0, "mlp_out", "nope")])
    with pytest.raises(PatchingError, match="align"):
        exact_patching(llava, pair, [Cell(0, "mlp_out", "final")], align="first")
    with pytest.raises(PatchingError, match="experiment 'ablate'"):
        run_patching(llava, [pair.clean.session], "ablate", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("experiment", ["denoise", "atp", "taskswap", "knockout"])
def test_run_patching_writes_rows_summary_and_figures(llava, sessions, tmp_path, experiment):
    chosen = sessions["mmp"][:2] if experiment != "knockout" else sessions["multi"]
    # min_separation=None: the tiny random model's metric separates nothing (the check has its own test)
    df = run_patching(llava, chosen, experiment, tmp_path, n_boot=20, progress=False, min_separation=None,
                      components=("resid_pre", "mlp_out"), windows=[1] if experiment == "knockout" else None)
    assert {"model", "experiment", "direction", "layer", "component", "position_group", "metric", "value", "clean",
            "corrupt", "n", "session_id", "identity_id"} <= set(df.columns)
    assert not any(s.labels["_target"] in df.to_csv() for s in chosen)  # no PII in the results
    assert (tmp_path / f"patching_{experiment}.csv").exists()
    assert {"contrast", "null_by_construction"} <= set(df.columns) and df["null_by_construction"].notna().all()
    if experiment != "knockout":
        pairs = pd.read_csv(tmp_path / f"patching_{experiment}_pairs.csv")
        assert len(pairs) == len(chosen) and pairs["kept"].all()
        assert not any(s.labels["_target"] in pairs.to_csv() for s in chosen)
        want = {"denoise": "value_vs_value", "atp": "value_vs_value"}.get(experiment)
        if want:
            assert set(df["contrast"]) == {want}
    summary = pd.read_csv(tmp_path / f"patching_{experiment}_summary.csv")
    assert {"value", "ci_low", "ci_high", "n"} <= set(summary.columns)
    if experiment != "knockout":  # each summary value is the mean over pairs of that cell's rows
        keys = ["direction", "method", "layer", "component", "position_group", "metric"]
        rows = df.assign(layer=df["layer"].astype(float)).groupby(keys, as_index=False)["value"].mean()
        both = summary.assign(layer=summary["layer"].astype(float)).merge(rows, on=keys, suffixes=("", "_rows"))
        assert len(both) == len(summary) == len(rows)
        np.testing.assert_allclose(both["value"], both["value_rows"], atol=1e-9)
        assert (summary["n"] == len(chosen)).all()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    if experiment == "knockout":
        assert pngs == ["knockout.png"]
        assert set(df["position_group"]) == {"pii_patches", "other_image", "turn0", "turn1"}
    else:
        assert any(p.startswith(f"patching_{experiment}_denoise") for p in pngs)
        assert set(df["metric"]) >= {"logit_diff", "pii_logprob", "score_logit_diff", "score_pii_logprob", "flip"}
    if experiment == "atp":
        assert "atp_agreement.png" in pngs
        assert set(pd.read_csv(tmp_path / "atp_agreement.csv")["direction"]) == {"denoise", "noise"}
    if experiment == "taskswap":
        assert set(df["direction"]) == {"denoise", "noise"} and set(df["corrupt_framing"]) == {"direct"}


def test_killed_patching_run_resumes_where_it_stopped(llava, sessions, tmp_path, monkeypatch):
    """Each session's rows are kept as it finishes: a run killed in its second session, started again, patches only
    the sessions left and returns the rows of an uninterrupted run; the kept parts are gone at the end."""
    from probes.patching import sweep as patching  # where patch_sessions looks build_pair up

    chosen = sessions["mmp"][:3]
    kw = dict(n_boot=20, progress=False, components=("resid_pre",), figures=False, min_separation=None)
    full = run_patching(llava, chosen, "denoise", tmp_path / "a", **kw)
    real, calls, kill = patching.build_pair, [], [True]

    def killable(loaded, session, *args, **kwargs):
        calls.append(session.session_id)
        if kill and len(calls) == 2:
            raise KeyboardInterrupt
        return real(loaded, session, *args, **kwargs)

    monkeypatch.setattr(patching, "build_pair", killable)
    with pytest.raises(KeyboardInterrupt):
        run_patching(llava, chosen, "denoise", tmp_path / "b", **kw)
    assert sorted(p.name for p in (tmp_path / "b").glob(".patching-parts-denoise-*/*")) == [
        "000000.pair.parquet", "000000.parquet"]
    calls.clear(), kill.clear()
    # the same settings as a PatchingConfig: the same parts key (its fields), so the run resumes
    config = PatchingConfig("denoise", n_boot=20, components=["resid_pre"], min_separation=None)
    resumed = run_patching(llava, chosen, "denoise", tmp_path / "b", config, progress=False, figures=False)
    assert calls == [s.session_id for s in chosen[1:]]
    pd.testing.assert_frame_equal(resumed, full)
    pd.testing.assert_frame_equal(pair_checks(resumed), pair_checks(full))
    assert not list((tmp_path / "b").glob(".patching-parts-*"))


def test_pairs_that_do_not_separate_are_dropped_and_listed(llava, sessions, tmp_path):
    """A margin between the pairs' separations drops exactly the pairs below it: their rows are gone, the pairs
    table lists every pair with its separation and reason, and a warning gives the count."""
    chosen = sessions["mmp"][:3]
    kw = dict(n_boot=20, progress=False, components=("mlp_out",), figures=False, layers=[0])
    every = run_patching(llava, chosen, "denoise", tmp_path / "all", min_separation=None, **kw)
    seps = pair_checks(every).set_index("session_id")["separation"]
    assert seps.nunique() == 3
    margin = float(np.sort(seps.to_numpy())[1])  # the middle one: one pair below, two at or above
    with pytest.warns(PairsDroppedWarning, match=r"1 of 3 pairs dropped: 1 whose logit_diff"):
        kept = run_patching(llava, chosen, "denoise", tmp_path / "cut", min_separation=margin, **kw)
    pairs = pd.read_csv(tmp_path / "cut" / "patching_denoise_pairs.csv").set_index("session_id")
    low = seps.idxmin()
    assert not pairs.loc[low, "kept"] and pairs.loc[low, "reason"].startswith("separation")
    assert pairs.drop(index=low)["kept"].all()
    assert set(kept["session_id"]) == set(seps.index) - {low}
    np.testing.assert_allclose(pairs.loc[seps.index, "separation"], seps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pairs["separation"], pairs["clean"] - pairs["corrupt"], rtol=0, atol=1e-9)
    with pytest.raises(PatchingError, match=r"3 of 3 pairs dropped"):
        with pytest.warns(PairsDroppedWarning):
            run_patching(llava, chosen, "denoise", tmp_path / "none", min_separation=float(seps.max()) + 1, **kw)
    assert not list((tmp_path / "none").glob("patching_*.csv"))  # nothing half-written
    pair = build_pair(llava, chosen[0], "image", other=make_identities(3, seed=0)[1])
    prepare_pair(llava, pair)
    check = pair_check(pair, min_separation=-np.inf)
    assert check["kept"] and check["contrast"] == "value_vs_value"


def test_null_by_construction_allows_rounding_but_not_a_real_difference():
    """Positions computed inside sequences of other lengths may differ in the last bits on a GPU: still null by
    construction. A difference far above the dtype's rounding is not."""
    from types import SimpleNamespace

    from probes.patching import null_by_construction

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        have = torch.randn(6, 16).to(dtype)
        base = SimpleNamespace(cache={"blocks.0.hook_resid_pre": have})
        cell, dst = Cell(0, "resid_pre", "g"), torch.arange(2, 5)
        eps = torch.finfo(dtype).eps
        assert null_by_construction(base, cell, dst, have[dst].clone())
        assert null_by_construction(base, cell, dst, (have[dst].float() * (1 + 2 * eps)).to(dtype))
        assert not null_by_construction(base, cell, dst, have[dst] + 0.5)


def test_patching_config_resolves_defaults_and_names_a_bad_field():
    swap = PatchingConfig("taskswap")
    assert (swap.corruption, swap.directions, swap.method) == ("framing", ("denoise", "noise"), "exact")
    assert PatchingConfig("knockout").corruption is None and PatchingConfig("atp").method == "atp"
    assert PatchingConfig("denoise", layers=iter([0, 2])).layers == (0, 2)  # an iterator, read once
    assert PatchingConfig("denoise", components=["mlp_out"]) == PatchingConfig("denoise", components=("mlp_out",))
    bad = [({"experiment": "ablate"}, "experiment 'ablate'"),
           ({"components": ("resid",)}, r"components \['resid'\]: expected some of"),
           ({"components": "mlp_out"}, "components 'mlp_out': expected a list of names, not one string"),
           ({"directions": ["sideways"]}, r"directions \['sideways'\]"), ({"align": "first"}, "align 'first'"),
           ({"batch_size": 0}, "batch_size 0: expected an integer >= 1"), ({"layers": [-1]}, r"layers \[-1\]"),
           ({"corrupt_framing": "shout"}, "corrupt_framing 'shout'"), ({"corruption": "blur"}, "corruption 'blur'"),
           ({"corruption": "text"}, "replacements: the text corruption needs"),
           ({"noise_std": -1.0}, "noise_std -1.0"), ({"min_separation": float("nan")}, "min_separation nan"),
           ({"atp_method": "atp_magic"}, "atp_method 'atp_magic'")]
    for fields, match in bad:
        with pytest.raises(PatchingError, match=match):
            PatchingConfig(**{"experiment": "denoise", **fields})
    with pytest.raises(PatchingError, match="windows"):
        PatchingConfig("knockout", windows=[0])
    with pytest.raises(PatchingError, match=r"patching options \['bogus'\]"):
        patching_config("denoise", {"bogus": 1})
    assert patching_config(swap, {"batch_size": 4}).batch_size == 4
    with pytest.raises(PatchingError, match="batch_size 0"):  # an override is checked like a field
        patching_config(swap, {"batch_size": 0})
    with pytest.raises(PatchingError, match="experiment: give a new PatchingConfig"):
        patching_config(swap, {"experiment": "denoise"})
