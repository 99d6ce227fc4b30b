"""Every family through the public path: load offline, capture a 3-turn session turn by turn through the KV cache,
compare with one full forward, generate a turn, and round-trip the store. (Layout details: test_family_*.py.)"""

import pytest
import torch

from probes import FAMILIES, Session, Turn, capture, capture_session, render, resolve_hooks
from tests.conftest import document_image
from tests.test_capture import full_forward_hidden

MULTIMODAL = [f for f in FAMILIES if f != "text"]


@pytest.fixture
def loaded(family_model):
    return family_model


def three_turns(family, generate=False):
    images = [] if family == "text" else [document_image(96, 64)]
    return Session(f"{family}-0", [
        Turn("user", "Form: SSN 123-45-6789. Remember it.", images=images).mark("ssn", "123-45-6789"),
        Turn("assistant", None if generate else "I will."),
        Turn("user", "What is the SSN?"),
    ], labels={"identity_id": 0})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_capture_matches_full_forward(family, loaded):
    lm = loaded(family)
    assert lm.family == family
    s = three_turns(family)
    rendered = render(lm.adapter, s)
    if family != "text":
        assert (rendered.token_map.df.segment == "image").sum() > 0
        assert rendered.token_map.df.loc[rendered.token_map.select("image:0"), "patch_row"].ge(0).all()
    got = capture_session(lm, s, resolve_hooks(lm, "resid_post"), "all", mode="turns")
    ref = full_forward_hidden(lm, rendered)
    x = got.kinds["hook_resid_post"]
    assert x.shape[0] == rendered.n_positions
    assert len(ref) == lm.n_layers
    for layer in range(lm.n_layers):
        assert torch.allclose(x[:, layer], ref[layer][0], atol=1e-4), f"{family} layer {layer}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_then_store_round_trip(family, loaded, tmp_path):
    lm = loaded(family)
    hooks = "resid_post,vision" if family in MULTIMODAL else "resid_post"
    store = capture(lm, [three_turns(family, generate=True)], tmp_path / "st", hooks=hooks,
                    positions="last:*+mark:ssn", max_new_tokens=3, progress=False)
    captured = store.session(f"{family}-0")  # in-memory images come back as a sha256 only
    assert captured.turns[1].text is not None
    done = three_turns(family)
    done.turns[1].text = captured.turns[1].text
    again = capture_session(lm, done, resolve_hooks(lm, "resid_post"), "last:*+mark:ssn", mode="single")
    x, meta = store.query("hook_resid_post")
    assert torch.allclose(x, again.kinds["hook_resid_post"], atol=1e-5)
    assert meta.last_of_turn.sum() in (3, 4) and (meta["mark"] == "ssn").any()  # 4 if a generation prompt
    if family in MULTIMODAL:
        v, vmeta = store.query("vision.hook_out")
        assert v.shape[0] > 0 and (vmeta.image_index == 0).all() and (vmeta.segment == "vision").all()
