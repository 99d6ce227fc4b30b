"""Models split by a device_map (accelerate): capture, leakage, erasure and patching give the unsplit model's results.

With CPUs only, accelerate splits a model between "cpu" (weights in memory) and "disk" (weights offloaded to an
offload folder, the module's parameters on "meta", streamed in by an AlignDevicesHook at each forward): the same
machinery that spreads a big model over GPUs. The split here puts the input embeddings and the vision tower on
"disk", so the first parameter is on "meta" (code that takes `next(model.parameters()).device` as the input device
breaks), and alternates the LM layers between the two. Both an explicit map and device_map="auto" with a small
`max_memory` are checked, in float32 and bfloat16, against the same model loaded whole. On one CPU the two compute
the same floats, so the comparisons are at the dtype's tolerance (they are in fact equal).
"""

import numpy as np
import pytest
import torch

from probes import load_model, make_identities
from probes.activations.capture import capture_batch, capture_session
from probes.data.builders import mmprivacy_sessions
from probes.leakage import generate_batch
from probes.models.loading import LoadOptions, ModelLoadError
from probes.patching import attribution_patching, build_pair, default_groups, exact_patching, prepare_pair, sweep_cells
from probes.patching.atp_star import atp_star_patching, prepare_qk
from probes.probing.erasure import erasing, random_eraser, site_activations

pytestmark = pytest.mark.usefixtures("one_thread")

LM = "model.language_model"
SPLIT = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu", f"{LM}.embed_tokens": "disk",
         f"{LM}.layers.0": "cpu", f"{LM}.layers.1": "disk", f"{LM}.layers.2": "cpu", f"{LM}.layers.3": "disk",
         f"{LM}.norm": "cpu", f"{LM}.rotary_emb": "cpu", "lm_head": "disk"}
# The embedded organism is ~12.9 MB in float32 (~2.4 MB per LM layer): "auto" keeps the vision tower, embeddings
# and LM layer 0 in these bytes of "cpu" memory and offloads the other layers to disk.
AUTO_CPU_BYTES = {"float32": 9_000_000, "bfloat16": 4_500_000}
HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(4)] + [
    "blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.3.hook_mlp_out",
    "vision_encoder.encoder_layers.1.hook_out", "vision_projector.hook_out"]


@pytest.fixture(scope="module")
def people():
    return make_identities(3, seed=0)


@pytest.fixture(scope="module")
def sessions(people, tmp_path_factory):
    d = tmp_path_factory.mktemp("devmap_img")
    return mmprivacy_sessions(people, d, framings=("caption", "direct"), pii_types=("SSN",), scenarios=("open",),
                              size=64)[:3]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def whole(request):
    return load_model("default", dtype=request.param)


@pytest.fixture(scope="module", params=["dict", "auto"])
def split(request, whole, tmp_path_factory):
    dtype = str(whole.dtype).removeprefix("torch.")
    folder = tmp_path_factory.mktemp(f"offload_{request.param}_{dtype}")
    if request.param == "dict":
        return load_model("default", dtype=dtype, device_map=SPLIT, offload_folder=folder)
    return load_model("default", dtype=dtype, device_map="auto", max_memory={"cpu": AUTO_CPU_BYTES[dtype]},
                      offload_folder=folder)


def test_split_model_has_offloaded_layers_and_inputs_go_to_the_execution_device(whole, split):
    params = dict(split.hf_model.named_parameters())
    lm_layers = split.adapter.lm_layers(split.hf_model)
    on_meta = [i for i, layer in enumerate(lm_layers) if next(layer.parameters()).device.type == "meta"]
    assert 0 < len(on_meta) < len(lm_layers)  # some LM layers offloaded, some not: a real split
    assert {"cpu", "disk"} <= set(map(str, split.device_map.values()))
    if split.device_map.get(f"{LM}.embed_tokens") == "disk":  # the first parameter is no input device
        assert next(iter(params.values())).device.type == "meta"
    assert split.device == torch.device("cpu") and split.dtype == whole.dtype
    assert whole.device_map is None and whole.device == torch.device("cpu")


def test_hooks_see_activations_on_the_execution_device(split, sessions):
    seen = {}

    def record(x, name):
        seen[name] = (x.device.type, x.dtype)

    with split.hooks([(h, record) for h in HOOKS]):
        generate_batch(split, sessions[:1], max_new_tokens=2)
    assert set(seen) == set(HOOKS)
    assert set(seen.values()) == {("cpu", split.dtype)}


def test_capture_equals_the_unsplit_models(whole, split, sessions):
    for got, want in [(capture_session(split, sessions[0], HOOKS, "all", "auto", 4, split.dtype),
                       capture_session(whole, sessions[0], HOOKS, "all", "auto", 4, whole.dtype)),
                      *zip(capture_batch(split, sessions, HOOKS, "all", "turns", 4, split.dtype),
                           capture_batch(whole, sessions, HOOKS, "all", "turns", 4, whole.dtype))]:
        assert set(got.kinds) == set(want.kinds) == {"hook_resid_post", "hook_resid_pre", "hook_attn_out",
                                                     "hook_mlp_out", "vision.hook_out", "vision_projector.hook_out"}
        for kind, t in got.kinds.items():
            assert t.device.type == "cpu" and t.dtype == whole.dtype  # stored in the model's dtype, off the model
            assert t.shape == want.kinds[kind].shape and t.numel() > 0
            torch.testing.assert_close(t, want.kinds[kind])
            assert got.layers[kind] == want.layers[kind]


def test_leakage_answers_equal_the_unsplit_models(whole, split, sessions):
    answers = generate_batch(split, sessions, max_new_tokens=8, batch_size=2)
    assert answers == generate_batch(whole, sessions, max_new_tokens=8, batch_size=2)
    assert all(answers)  # the organism answers: equal non-empty strings, not two empty lists


def test_erasure_edits_and_records_as_on_the_unsplit_model(whole, split, sessions):
    hook = "blocks.1.hook_resid_post"  # an offloaded layer of the explicit map
    got, want = (site_activations(m, sessions[:2], hook, last=2, max_new_tokens=4) for m in (split, whole))
    torch.testing.assert_close(got[0], want[0])
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    eraser = random_eraser(whole.d_model, rank=whole.d_model // 2, seed=1)  # large enough to change the answers
    plain = generate_batch(whole, sessions, max_new_tokens=8)
    erased = {}
    for name, m in (("split", split), ("whole", whole)):
        with erasing(m, hook, eraser):
            erased[name] = generate_batch(m, sessions, max_new_tokens=8)
    assert erased["split"] == erased["whole"]
    assert erased["split"] != plain  # the hook ran on the split model and changed what it wrote


def patching_values(m, sessions, people) -> dict[str, np.ndarray]:
    """Exact patching, AtP and AtP* (which replays single layers, offloaded ones too) of one image pair."""
    pair = build_pair(m, sessions[0], "image", other=people[1])
    cells = sweep_cells(m.n_layers, ("resid_pre", "attn_out", "mlp_out"), default_groups([pair]))
    prepare_pair(m, pair, sorted({c.hook for c in cells}), grad={"clean", "corrupt"})
    prep = prepare_qk(m, pair.corrupt, pair.answer, graddrop=True)
    resid = [c for c in cells if c.component == "resid_pre"]
    return {method: np.array([r["value"] for r in rows]) for method, rows in (
        ("exact", exact_patching(m, pair, cells)), ("atp", attribution_patching(pair, cells)),
        ("atp_star", atp_star_patching(m, prep, pair, resid)))}


@pytest.fixture(scope="module")
def whole_patching(whole, sessions, people):
    return patching_values(whole, sessions, people)


def test_patching_effects_equal_the_unsplit_models(whole, whole_patching, split, sessions, people):
    got = patching_values(split, sessions, people)
    tol = 1e-5 if whole.dtype == torch.float32 else 2e-2
    for method, want in whole_patching.items():
        assert np.isfinite(want).all() and np.ptp(want) > 0  # effects that differ between cells
        np.testing.assert_allclose(got[method], want, rtol=tol, atol=tol * np.abs(want).max())


def test_a_hook_returning_float32_keeps_a_bfloat16_forward_in_bfloat16(split, sessions):
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        want = split.hf_model(input_ids=ids).logits
        with split.hooks([("blocks.1.hook_attn_out", lambda x, name: x.float()),
                          ("blocks.2.hook_resid_pre", lambda x, name: x.double())]):
            got = split.hf_model(input_ids=ids).logits
    assert got.dtype == want.dtype == split.dtype
    torch.testing.assert_close(got, want)


def test_device_map_options_are_checked_before_loading(tmp_path):
    with pytest.raises(ModelLoadError, match="offload_folder"):
        LoadOptions(device_map={"": "disk"})
    with pytest.raises(ModelLoadError, match="device_map"):
        LoadOptions(max_memory={"cpu": "1GiB"})
    with pytest.raises(ModelLoadError, match="bridge"):
        LoadOptions(device_map="auto", backend="bridge")
    kw = LoadOptions(device_map="auto", max_memory={"cpu": 10}, offload_folder=tmp_path).from_pretrained_kw({})
    assert kw["device_map"] == "auto" and kw["max_memory"] == {"cpu": 10} and kw["offload_folder"] == str(tmp_path)
