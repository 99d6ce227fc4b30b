"""LLaVA-NeXT family: loading, rendering vs the processor, AnyRes token layout vs the model's packing, chunked
KV forward, hooks, bridge."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from probes.data.session import Session, Turn
from probes.models.loading import load_model
from probes.models.render import chat_messages, render
from probes.models.tiny import build_tiny_model
from tests.family_checks import assert_chunked_matches_full

N = 4  # tokens per crop side: 32 px crops, 8 px patches
# 16x96 (H x W) picks the 32x96 pinpoint: 3 crops side by side, stitched grid 4x12, unpadded to rows 1..2
# -> 16 base + 2 x 12 + 2 newlines = 42 image tokens
H, W = 16, 96
SSN = "123-45-6789"


def _image(h=H, w=W, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(build_tiny_model("llava_next", tmp_path_factory.mktemp("llava_next")))


@pytest.fixture(scope="module")
def session():
    user = Turn("user", f"Name: Jane Doe. SSN: {SSN}. Please describe the image.", images=[_image()])
    user.mark("ssn", SSN)
    return Session("s0", [user, Turn("assistant", "Sure, here it is: the caption."),
                          Turn("user", "What is the name on the form?")])


@pytest.fixture(scope="module")
def rendered(loaded, session):
    return render(loaded.adapter, session)


def test_loads(loaded):
    assert loaded.family == "llava_next"
    assert type(loaded.hf_model).__name__ == "LlavaNextForConditionalGeneration"
    assert loaded.tokenizer("a")["input_ids"][0] == loaded.tokenizer.bos_token_id  # Mistral: tokenizer adds BOS


def test_render_matches_processor(loaded, session, rendered):
    proc = loaded.processor
    text = proc.apply_chat_template(chat_messages(session, 3, False), tokenize=False, add_generation_prompt=True)
    assert text.startswith("[INST] <image>\nName:")
    assert text.endswith("</s> [INST] What is the name on the form? [/INST]")
    ref = proc(text=text, images=[_image()], return_tensors="pt")
    assert ref["input_ids"].tolist() == rendered.input_ids.tolist()
    assert ref["pixel_values"].shape[:2] == (1, 4)  # base + 3 crops


def test_token_map(loaded, rendered):
    df = rendered.token_map.df
    img = df[df.segment == "image"]
    image_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert len(img) == 42 and (img.token_id == image_id).all()
    assert (df.token_id[df.segment != "image"] != image_id).all()
    (a, b), = rendered.image_spans
    assert (img.position.iloc[0], img.position.iloc[-1] + 1) == (a, b)
    assert df.iloc[0].token_id == loaded.tokenizer.bos_token_id
    # base view first: 4x4 row-major on tile 0
    base = img.iloc[:N * N]
    full = [(r, c) for r in range(N) for c in range(N)]
    assert (base.tile == 0).all() and list(zip(base.patch_row, base.patch_col)) == full
    # high-res: 2 stitched rows (crop rows 1, 2) across crops 1..3, newline (-1) after each
    hi = img.iloc[N * N:]
    expect = [(t, r, c) for r in (1, 2) for t in (1, 2, 3) for c in range(N)]
    expect = expect[:12] + [(-1, -1, -1)] + expect[12:] + [(-1, -1, -1)]
    assert list(zip(hi.tile, hi.patch_row, hi.patch_col)) == expect
    cells = img[img.tile >= 0].groupby("tile").apply(lambda g: sorted(zip(g.patch_row, g.patch_col)))
    for t, got in cells.items():
        assert len(got) == len(set(got))  # each cell at most once; crops lose rows 0 and 3 to unpadding
        assert got == (full if t == 0 else [(r, c) for r in (1, 2) for c in range(N)])
    exp = loaded.adapter.expand_image(_image())
    assert exp.grid == {0: (N, N), 1: (N, N), 2: (N, N), 3: (N, N)}
    assert (df.patch_row[df.segment != "image"] == -1).all() and (df.tile[df.segment != "image"] == -1).all()
    # marked span, turns, roles, segments
    ssn = rendered.token_map.select("mark:ssn")
    assert loaded.tokenizer.decode(rendered.input_ids[0, ssn]).strip() == SSN
    assert (df.turn.iloc[ssn] == 0).all() and (df.segment.iloc[ssn] == "user").all()
    assert list(df.turn.drop_duplicates()) == [0, 1, 2]  # the template has no generation prompt
    assert rendered.turn_chunks() == [rendered.token_map.turn_bounds(t) for t in range(3)]
    assert set(df.role[df.turn == 1]) == {"assistant"} and set(df.role[df.turn == 2]) == {"user"}
    assert "Sure, here it is: the caption.</s>" in loaded.tokenizer.decode(rendered.input_ids[0, df.turn == 1])
    assert (df.image_index[df.segment == "image"] == 0).all() and (df.turn[df.segment == "image"] == 0).all()


def _layout_vs_model(loaded, image):
    """Tag every projector output with (pixel tile, row, col) and read the model's own packed features back."""
    model, adapter = loaded.hf_model, loaded.adapter

    def tag(mod, args, out):
        tiles, k = out.shape[:2]
        new = torch.zeros_like(out)
        new[..., 0] = torch.arange(tiles)[:, None]
        new[..., 1], new[..., 2] = torch.arange(k) // N, torch.arange(k) % N
        return new

    h = adapter.projector(model).register_forward_hook(tag)
    try:
        with torch.no_grad():
            packed = model.model.get_image_features(**adapter.image_inputs([image])).pooler_output[0]
    finally:
        h.remove()
    return adapter.expand_image(image), packed


@pytest.mark.parametrize("hw", [(H, W), (96, 16), (64, 64), (20, 30)])
def test_layout_is_the_models_packing(loaded, hw):
    """Each expanded token q is packed feature q: tagged projector outputs show its (tile, row, col); newlines are
    the model's image_newline. Counts agree with the processor's _get_number_of_features."""
    image = _image(*hw)
    exp, packed = _layout_vs_model(loaded, image)
    proc = loaded.processor
    assert len(exp.token_ids) == packed.shape[0] == proc._get_number_of_features(*hw, 32, 32) - 1  # CLS dropped
    is_patch = exp.tile >= 0
    assert (packed[~is_patch] == loaded.hf_model.model.image_newline).all()
    got = packed[is_patch][:, :3].long().numpy()
    assert (got == np.stack([exp.tile, exp.patch_row, exp.patch_col], 1)[is_patch]).all()
    n_tiles = loaded.adapter.image_inputs([image])["pixel_values"].shape[1]
    assert set(exp.grid) == set(range(n_tiles)) and n_tiles >= 3


def test_chunked_kv_forward_matches_full(loaded, rendered):
    assert loaded.adapter.position_ids(loaded.hf_model, rendered.input_ids, {}) is None
    assert len(rendered.turn_chunks()) == 3
    assert_chunked_matches_full(loaded, rendered)


def test_torch_hook_names_and_vision_hook(loaded, rendered):
    names = loaded.hook_names()
    assert {"vision_encoder.encoder_layers.0.hook_out", "vision_encoder.encoder_layers.1.hook_out",
            "vision_projector.hook_out", "blocks.1.hook_resid_post"} <= set(names)
    seen = {}
    hooks = [(n, lambda x, n: seen.__setitem__(n, x.shape)) for n in
             ("vision_encoder.encoder_layers.0.hook_out", "vision_projector.hook_out")]
    with loaded.hooks(hooks), torch.no_grad():
        loaded.hf_model(input_ids=rendered.input_ids, **loaded.adapter.image_inputs(rendered.images))
    assert seen["vision_encoder.encoder_layers.0.hook_out"] == (4, 1 + N * N, 32)  # 4 pixel tiles, CLS + patches
    assert seen["vision_projector.hook_out"] == (4, N * N, loaded.d_model)


def test_bridge_matches_torch_hooks(loaded, rendered):
    """The transformer-lens bridge wraps LLaVA-NeXT; its resid_post equals the torch backend's (on a second copy
    of the model: the bridge rewraps the HF model in place)."""
    other = load_model(loaded.name)
    ids, images = rendered.input_ids, other.adapter.image_inputs(rendered.images)
    got = {}
    with other.hooks([("blocks.0.hook_resid_post", lambda x, n: got.setdefault("torch", x.clone()))]), torch.no_grad():
        other.hf_model(input_ids=ids, **images)
    bridge = other.bridge
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: got.setdefault("bridge", x.clone()))]), \
            torch.no_grad():
        bridge(ids, **images)
    assert got["bridge"].shape == (1, ids.shape[1], loaded.d_model)
    torch.testing.assert_close(got["bridge"], got["torch"], atol=1e-5, rtol=0)
