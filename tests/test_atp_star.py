"""AtP* attention-saturation (QK) correction for residual-stream cells (probes/patching/atp_star.py): what it says is
exact is exact (checked against full patched forwards), it reduces to AtP where no attention reads the cell and to
first order everywhere, null cells stay null, its rows are attribution_patching's, and bad input is named."""

import numpy as np
import pytest
import torch

from probes import load_model, make_identities
from probes.data.builders import mmprivacy_sessions
from probes.patching import (
    Cell,
    PatchingError,
    attribution_patching,
    build_pair,
    default_groups,
    exact_patching,
    patch_values,
    patched_metrics,
    prepare_pair,
    sweep_cells,
)
from probes.patching.atp_star import (
    atp_star_patching,
    first_attention,
    pattern_changes,
    prepare_qk,
    qk_estimates,
    qk_patching,
    qk_rows,
    residual_changes,
)

pytestmark = pytest.mark.usefixtures("one_thread")
COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@pytest.fixture(scope="module")
def people():
    return make_identities(3, seed=0)


@pytest.fixture(scope="module")
def sessions(people, tmp_path_factory):
    d = tmp_path_factory.mktemp("atp_star_img")
    return mmprivacy_sessions(people, d, framings=("caption",), pii_types=("SSN",), scenarios=("open",), size=64)


@pytest.fixture(scope="module")
def image_pair(llava, sessions, people):
    pair = build_pair(llava, sessions[0], "image", other=people[1])
    cells = sweep_cells(llava.n_layers, COMPONENTS, default_groups([pair]))
    prepare_pair(llava, pair, sorted({c.hook for c in cells}), grad={"clean", "corrupt"})
    return pair, cells, prepare_qk(llava, pair.corrupt, pair.answer, graddrop=True)


def _values(rows, metric="logit_diff"):
    return np.array([r["value"] for r in rows if r["metric"] == metric])


def test_rows_are_attribution_patchings_and_null_cells_stay_put(llava, image_pair):
    pair, cells, prep = image_pair
    atp = attribution_patching(pair, cells)
    for method, rows in (("atp_qk", qk_patching(llava, prep, pair, cells)),
                         ("atp_star", atp_star_patching(llava, prep, pair, cells))):
        assert [set(r) for r in rows] == [set(r) for r in atp]
        key = ("layer", "component", "position_group", "metric", "alignment", "n_positions", "null_by_construction")
        assert [tuple(r[k] for k in key) for r in rows] == [tuple(r[k] for k in key) for r in atp]
        assert {r["method"] for r in rows} == {method}
        base = pair.corrupt.metrics["logit_diff"]
        got = [r for r in rows if r["metric"] == "logit_diff"]
        nulls = [r["value"] for r in got if r["null_by_construction"]]
        assert 0 < len(nulls) < len(got)  # the text's layer-0 input is null, the PII patches are not
        assert nulls == [base] * len(nulls)  # a patch that writes what is there changes nothing, exactly
        assert any(abs(r["value"] - base) > 1e-6 for r in got if not r["null_by_construction"])


def _full_forward_pattern(model, pair, cell, m):
    """Layer m's attention pattern and input in a full forward of the corrupt run with `cell` patched from clean."""
    dst, vals, _ = patch_values(pair.corrupt, pair.clean, cell)
    got = {}

    def keep_pattern(mod, args, out):
        got["pattern"] = out[1][0].detach().float()

    def keep_resid(x, name):
        got["resid"] = x[0].detach().float()

    layer = model.adapter.lm_layers(model.hf_model)[m]
    handle = getattr(layer, model.adapter.attn_name).register_forward_hook(keep_pattern)
    try:
        with model.hooks([(f"blocks.{m}.hook_resid_pre", keep_resid)]):
            patched_metrics(model, pair.corrupt, pair.answer, [[(cell.hook, dst, vals)]], prefix=False)
    finally:
        handle.remove()
    return got


def test_the_exact_parts_equal_a_full_patched_forward(tiny_dir, sessions, people):
    """What the estimator calls exact: the residual stream entering the first attention layer that reads the cell
    (layer c's MLP replayed for an attn_out cell) and that layer's whole pattern. Both must equal what a full
    forward with the cell patched computes (eager attention, so the pattern exists)."""
    model = load_model(tiny_dir("llava"), attn_implementation="eager")
    pair = build_pair(model, sessions[0], "image", other=people[1])
    cells = [Cell(1, "resid_pre", "pii_patches"), Cell(0, "attn_out", "pii_patches"), Cell(0, "mlp_out", "other_image")]
    prepare_pair(model, pair, sorted({c.hook for c in cells}))
    prep = prepare_qk(model, pair.corrupt, pair.answer)
    specs = [patch_values(pair.corrupt, pair.clean, c) for c in cells]
    dsts = [dst for dst, _, _ in specs]
    deltas = [vals.float() - pair.corrupt.cache[c.hook][dst].float() for c, (dst, vals, _) in zip(cells, specs)]
    changes = residual_changes(model, prep, cells, dsts, deltas, batch_size=2)
    for c, dst, delta, ch in zip(cells, dsts, deltas, changes):
        m = first_attention(c)
        full = _full_forward_pattern(model, pair, c, m)
        if c.component == "resid_pre":  # the patch is written at layer m's input itself
            torch.testing.assert_close(ch, delta)
        else:
            want_resid = full["resid"] - prep.resid[m]
            assert want_resid[dst].abs().max() > 1e-4  # the patch moves the residual stream: not a trivial match
            torch.testing.assert_close(ch, want_resid[dst], atol=1e-5, rtol=1e-4)
            outside = torch.ones(pair.corrupt.n, dtype=torch.bool)
            outside[dst] = False
            assert want_resid[outside].abs().max() < 1e-5  # nothing else changes before layer m (position-wise)
        got = pattern_changes(model, prep, m, [dst], [ch])[0][0]
        want = full["pattern"] - prep.pattern[m]
        assert want.abs().max() > 1e-5
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_reduces_to_atp_where_no_attention_reads_the_cell(llava, image_pair):
    """The last layer's mlp_out reaches the logits through no attention: nothing to correct, the estimate is AtP's;
    and no dropped layer changes its gradient, so AtP* = L |AtP| / (L - 1) there (as GradDrop)."""
    pair, _, prep = image_pair
    L = llava.n_layers
    last = [Cell(L - 1, "mlp_out", "all"), Cell(L - 1, "mlp_out", "answer")]
    base = pair.corrupt.metrics["logit_diff"]
    atp = _values(attribution_patching(pair, last)) - base
    qk = _values(qk_patching(llava, prep, pair, last)) - base
    star = _values(atp_star_patching(llava, prep, pair, last)) - base
    assert np.abs(atp).min() > 1e-7
    np.testing.assert_allclose(qk, atp, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(star, L * np.abs(atp) / (L - 1), rtol=1e-4, atol=1e-8)


def test_layer_exact_estimate_is_exact_where_the_rest_is_linear(tiny_dir, sessions):
    """'atp_layer' replays the first layer that mixes positions whole and is linear after it. With the final norm
    removed, the logits are linear in the last layer's output: for cells whose first attention is the last layer
    (its resid_pre; the previous layer's attn_out, its MLP replayed too) the estimate is exact patching; AtP and the
    QK correction are not (the test would notice either passed off as it)."""
    model = load_model(tiny_dir("llava"))
    model.hf_model.model.language_model.norm = torch.nn.Identity()
    pair = build_pair(model, sessions[0], "noise", seed=0)
    L = model.n_layers
    cells = [Cell(L - 1, "resid_pre", g) for g in ("pii_patches", "other_image", "all")]
    cells += [Cell(L - 2, "attn_out", g) for g in ("pii_patches", "all")]
    prepare_pair(model, pair, sorted({c.hook for c in cells}), grad={"corrupt"})
    prep = prepare_qk(model, pair.corrupt, pair.answer, noise_from=pair.clean)
    found = qk_estimates(model, prep, pair, cells)
    base = pair.corrupt.metrics["logit_diff"]
    exact = _values(exact_patching(model, pair, cells)) - base
    layer = _values(qk_rows(found, pair, cells, "denoise", "atp_layer")) - base
    moved = np.abs(exact).max()
    assert moved > 1e-3
    assert np.abs(layer - exact).max() < 1e-3 * moved
    for other in (_values(attribution_patching(pair, cells)) - base, _values(qk_rows(found, pair, cells, "denoise"))
                  - base):
        assert np.abs(other - exact).max() > 1e-2 * moved


def test_equals_atp_to_first_order_and_departs_from_it_beyond(llava, sessions):
    """dM/dr|A fixed . dr + dM/dA . dA: with dA = J_A dr (a small patch) this is AtP's dM/dr . dr. A small noise
    corruption leaves the two within a share of a percent; a large one moves the patterns and the two apart (a
    fake that returned AtP would pass the first check only)."""
    cells = sweep_cells(llava.n_layers, COMPONENTS, ["pii_patches", "other_image", "all"])
    gap = {}
    for std in (0.03, 3.0):
        pair = build_pair(llava, sessions[0], "noise", noise_std=std, seed=0)
        prepare_pair(llava, pair, sorted({c.hook for c in cells}), grad={"corrupt"})
        prep = prepare_qk(llava, pair.corrupt, pair.answer, noise_from=pair.clean)
        base = pair.corrupt.metrics["logit_diff"]
        atp = _values(attribution_patching(pair, cells)) - base
        qk = _values(qk_patching(llava, prep, pair, cells)) - base
        gap[std] = np.abs(qk - atp).max() / np.abs(atp).max()
    assert gap[0.03] < 5e-3
    assert gap[3.0] > 2e-2


def test_bad_input_is_named(llava, image_pair):
    pair, cells, prep = image_pair
    with pytest.raises(PatchingError, match="prepare_qk was run on"):
        qk_patching(llava, prep, pair, cells[:2], "noise")  # prep is the corrupt run's: denoising's base
    plain = prepare_qk(llava, pair.corrupt, pair.answer)
    with pytest.raises(PatchingError, match="graddrop=True"):
        atp_star_patching(llava, plain, pair, cells[:2])
    found = qk_estimates(llava, prep, pair, cells[:2])
    with pytest.raises(PatchingError, match="method 'atp'"):
        qk_rows(found, pair, cells[:2], "denoise", "atp")
    with pytest.raises(PatchingError, match="2 estimates for 1 cells"):
        qk_rows(found, pair, cells[:1], "denoise")
    with pytest.raises(PatchingError, match="the model has"):
        qk_patching(llava, prep, pair, [Cell(llava.n_layers, "mlp_out", "all")])


@pytest.mark.parametrize("atp_method", ["atp_graddrop", "atp_qk"])
def test_the_experiment_runner_uses_the_configured_estimator(llava, sessions, atp_method):
    """`PatchingConfig.atp_method` chooses the estimator of an atp experiment; its rows carry that method name,
    beside the exact rows it is checked against."""
    from probes.patching import patch_sessions

    rows = patch_sessions(llava, sessions[:1], "atp", atp_method=atp_method, components=("resid_pre",),
                          directions=("denoise",), min_separation=None, progress=False)
    assert set(rows["method"]) == {atp_method, "exact"}
    est = rows[rows["method"] == atp_method].sort_values(["layer", "position_group", "metric"])
    exact = rows[rows["method"] == "exact"].sort_values(["layer", "position_group", "metric"])
    assert len(est) == len(exact) > 0
