"""Qwen2.5-VL family: loading, rendering vs the processor, token map, M-RoPE chunked forward, hooks, bridge."""

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from probes.data.session import Session, Turn
from probes.models.loading import ModelLoadError, load_model
from probes.models.render import chat_messages, render
from probes.models.tiny import build_tiny_model
from tests.family_checks import assert_chunked_matches_full, layer_outputs

W, H = 112, 84  # -> 8x6 patches of 14 px -> 4x3 merge blocks -> 12 image tokens, 3 rows x 4 cols
ROWS, COLS = 3, 4
SSN = "123-45-6789"


def _image(seed: int = 0, w: int = W, h: int = H) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = build_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"))
    return load_model(path)


@pytest.fixture(scope="module")
def session():
    user = Turn("user", f"Name: Jane Doe. SSN: {SSN}. Please describe the image.", images=[_image()])
    user.mark("ssn", SSN)
    return Session("s0", [user, Turn("assistant", "Sure, here it is: the caption."),
                          Turn("user", "What is the name on the form?")])


@pytest.fixture(scope="module")
def rendered(loaded, session):
    return render(loaded.adapter, session)


def _tok(loaded, t):
    return loaded.tokenizer.convert_tokens_to_ids(t)


def test_loads(loaded):
    assert loaded.family == "qwen2_5_vl"
    assert loaded.tokenizer.bos_token is None
    assert loaded.tokenizer("a")["input_ids"] == loaded.tokenizer("a", add_special_tokens=False)["input_ids"]


def test_render_matches_processor(loaded, session, rendered):
    proc = loaded.processor
    text = proc.apply_chat_template(chat_messages(session, 3, False), tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>Name:")
    ref = proc(text=text, images=[_image()], return_tensors="pt")
    assert ref["input_ids"].tolist() == rendered.input_ids.tolist()
    assert ref["image_grid_thw"].tolist() == [[1, 2 * ROWS, 2 * COLS]]


def test_token_map(loaded, rendered):
    df = rendered.token_map.df
    img = df[df.segment == "image"]
    assert len(img) == ROWS * COLS and (img.token_id == _tok(loaded, "<|image_pad|>")).all()
    (a, b), = rendered.image_spans
    assert (img.position.iloc[0], img.position.iloc[-1] + 1) == (a, b)
    # the wrappers come from the template: template segment, not patches
    for pos, tok in ((a - 1, "<|vision_start|>"), (b, "<|vision_end|>")):
        row = df.iloc[pos]
        assert row.token_id == _tok(loaded, tok) and row.segment == "template" and row.tile == -1
    assert (img.tile == 0).all()
    cells = sorted(zip(img.patch_row, img.patch_col))
    assert cells == [(r, c) for r in range(ROWS) for c in range(COLS)]  # each merge block exactly once
    assert (img.patch_row.iloc[0], img.patch_col.iloc[0]) == (0, 0)
    assert (img.patch_row.iloc[-1], img.patch_col.iloc[-1]) == (ROWS - 1, COLS - 1)
    assert (img.patch_row.iloc[1], img.patch_col.iloc[1]) == (0, 1)  # row-major
    assert (df.patch_row[df.segment != "image"] == -1).all()
    # marked span, turns, roles, segments
    ssn = rendered.token_map.select("mark:ssn")
    assert loaded.tokenizer.decode(rendered.input_ids[0, ssn]).strip() == SSN
    assert (df.turn.iloc[ssn] == 0).all()
    assert list(df.turn.drop_duplicates()) == [0, 1, 2, 3]
    assert rendered.turn_chunks() == sorted(rendered.turn_chunks())
    assert set(df.role[df.turn == 1]) == {"assistant"} and set(df.role[df.turn == 2]) == {"user"}
    assert loaded.tokenizer.decode(rendered.input_ids[0, df.segment == "assistant"]) == "Sure, here it is: the caption."
    assert df.iloc[0].token_id == _tok(loaded, "<|im_start|>")  # no BOS
    last = rendered.token_map.select("final")[0]  # generation prompt "<|im_start|>assistant\n" opens turn 3
    assert df.iloc[last].turn == 3 and df.iloc[last].role == "assistant"
    assert loaded.tokenizer.decode(rendered.input_ids[0, df.turn == 3]) == "<|im_start|>assistant\n"


def test_mrope_positions_follow_grid(loaded, rendered):
    """The model's own M-RoPE ids of image token (r, c) are (t0, t0 + r, t0 + c): our row/col is its layout."""
    ids = rendered.input_ids
    pos = loaded.adapter.position_ids(loaded.hf_model, ids, loaded.adapter.image_inputs(rendered.images))
    assert pos.shape == (3, 1, ids.shape[1])
    df = rendered.token_map.df
    img = df.segment.to_numpy() == "image"
    a = rendered.image_spans[0][0]
    t0 = a  # text before the image is 1-D: positions 0..a-1
    assert (pos[:, 0, :a] == torch.arange(a)).all()
    assert (pos[0, 0, img] == t0).all()
    assert (pos[1, 0, img].numpy() == t0 + df.patch_row[img].to_numpy()).all()
    assert (pos[2, 0, img].numpy() == t0 + df.patch_col[img].to_numpy()).all()
    assert pos[0, 0, rendered.image_spans[0][1]] == t0 + max(ROWS, COLS)  # text resumes after the image


@torch.no_grad()
def test_image_token_order_end_to_end(loaded, rendered):
    """With the ViT blocks bypassed, LM image token (r, c) depends only on merge block (r, c) of the image: this
    checks the processor's patch flattening, the window permutation and its undoing against our layout."""
    model, adapter = loaded.hf_model, loaded.adapter

    def features(pixels):
        return model.model.get_image_features(**adapter.image_inputs([Image.fromarray(pixels)])).pooler_output[0]

    r, c = 2, 1  # invert merge block (2, 1): 28x28 px
    base = np.asarray(_image())
    other = base.copy()
    other[28 * r:28 * r + 28, 28 * c:28 * c + 28] = 255 - other[28 * r:28 * r + 28, 28 * c:28 * c + 28]
    handles = [blk.register_forward_hook(lambda mod, args, out: args[0]) for blk in adapter.vision_layers(model)]
    try:
        changed = (features(base) - features(other)).abs().amax(-1) > 1e-6
    finally:
        for h in handles:
            h.remove()
    img = rendered.token_map.df.query("segment == 'image'")
    assert changed.tolist() == ((img.patch_row == r) & (img.patch_col == c)).tolist()


def _two_image_session():
    """A system turn, then images in turns 1 and 3 (the second, 56x84 -> 3x2 tokens, after M-RoPE has jumped)."""
    return Session("s1", [Turn("system", "Be brief."), Turn("user", "Describe it.", images=[_image(1)]),
                          Turn("assistant", "A form."), Turn("user", "And this?", images=[_image(2, 56, 84)])])


@pytest.mark.parametrize("which", ["three_turn", "two_images", "text_only"])
def test_chunked_kv_forward_matches_full(loaded, session, which):
    model, adapter = loaded.hf_model, loaded.adapter
    sess = {"three_turn": session, "two_images": _two_image_session(),
            "text_only": Session("s2", [Turn("user", "Hi."), Turn("assistant", "Hello."), Turn("user", "Bye.")])}
    rendered = render(adapter, sess[which])
    ids = rendered.input_ids
    assert len(rendered.turn_chunks()) == len(sess[which].turns) + 1
    ref = assert_chunked_matches_full(loaded, rendered)
    # and the full forward with our ids is the model's own (position_ids=None -> get_rope_index inside)
    model.model.rope_deltas = None
    own = layer_outputs(loaded, lambda: model(input_ids=ids, mm_token_type_ids=adapter.image_token_mask(ids).int(),
                                               **adapter.image_inputs(rendered.images)))
    model.model.rope_deltas = None
    for o, r in zip(own, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)


def test_torch_hook_names_and_vision_hook(loaded, rendered):
    names = loaded.hook_names()
    assert "vision_encoder.encoder_layers.0.hook_out" in names and "vision_encoder.encoder_layers.1.hook_out" in names
    assert "vision_projector.hook_out" in names and "blocks.1.hook_resid_post" in names
    seen = {}
    hooks = [(n, lambda x, n: seen.__setitem__(n, x.shape)) for n in
             ("vision_encoder.encoder_layers.0.hook_out", "vision_projector.hook_out")]
    with loaded.hooks(hooks), torch.no_grad():
        loaded.hf_model(input_ids=rendered.input_ids, **loaded.adapter.image_inputs(rendered.images),
                        mm_token_type_ids=loaded.adapter.image_token_mask(rendered.input_ids).int())
    assert seen["vision_encoder.encoder_layers.0.hook_out"] == (4 * ROWS * COLS, 32)  # patches, before the merge
    assert seen["vision_projector.hook_out"] == (ROWS * COLS, loaded.d_model)


def test_bridge_matches_torch_hooks_or_falls_back(tmp_path_factory, rendered):
    """With torchvision, the transformer-lens bridge wraps Qwen2.5-VL and its resid_post equals the torch backend's
    (fresh model: the bridge rewraps the HF model in place). Without torchvision (these CPU machines), TL's Qwen
    adapter refuses to load: then asking for the bridge gives a clear error and the torch backend is the path."""
    loaded = load_model(build_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl_bridge")))
    model, adapter = loaded.hf_model, loaded.adapter
    ids = rendered.input_ids
    images = adapter.image_inputs(rendered.images)
    pos = adapter.position_ids(model, ids, images)
    got = {}
    with loaded.hooks([("blocks.0.hook_resid_post", lambda x, n: got.setdefault("torch", x.clone()))]), \
            torch.no_grad():
        model(input_ids=ids, position_ids=pos, **images)
    assert got["torch"].shape == (1, ids.shape[1], loaded.d_model)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ModelLoadError, match="torchvision.*backend='torch'"):
            loaded.bridge
        return
    bridge = loaded.bridge
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: got.setdefault("bridge", x.clone()))]), \
            torch.no_grad():
        bridge(ids, position_ids=pos, **images)
    assert got["bridge"].shape == (1, ids.shape[1], loaded.d_model)
    torch.testing.assert_close(got["bridge"], got["torch"], atol=1e-5, rtol=0)
