"""Gemma 3 family: loading, rendering vs the processor (BOS, newline fusion), pooled-grid token layout, system
prompt merged into the first user turn, chunked KV forward with bidirectional image attention, hooks, bridge."""

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

SIDE = 4  # 64 px image, 8 px patches: 8x8 SigLIP patches avg-pooled to 4x4 = 16 soft tokens
SSN = "123-45-6789"


def _image(h=48, w=80, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model("gemma3", tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load_model(tiny_path)


def _session() -> Session:
    user = Turn("user", f"Name: Jane Doe. SSN: {SSN}. Please describe the image.", images=[_image()])
    user.mark("ssn", SSN)
    return Session("s0", [user, Turn("assistant", "Sure, here it is: the caption."),
                          Turn("user", "What is the name on the form?")])


def _system_session() -> Session:
    """A system prompt (merged into the first user turn by the template) and two images side by side."""
    user = Turn("user", f"SSN: {SSN}", images=[_image(seed=1), _image(64, 40, seed=2)]).mark("ssn", SSN)
    return Session("s1", [Turn("system", "You are terse."), user, Turn("assistant", "I cannot assist with that."),
                          Turn("user", "Why?", images=[_image(seed=3)])])


def _reference(loaded, session):
    proc = loaded.processor
    text = proc.apply_chat_template(chat_messages(session, len(session.turns), False), tokenize=False,
                                    add_generation_prompt=True)
    images = [im.load() for im in session.images]
    # The template writes <bos> itself; with the default add_special_tokens=True the tokenizer adds another one
    # (as google/gemma-3-4b-it's does): the model's input is the add_special_tokens=False one.
    doubled = proc(text=text, images=images)["input_ids"][0]
    bos = loaded.tokenizer.bos_token_id
    assert list(doubled[:3]) == [bos, bos, loaded.tokenizer.convert_tokens_to_ids("<start_of_turn>")]
    return text, proc(text=text, images=images, add_special_tokens=False, return_tensors="pt")


def test_loads(loaded):
    assert loaded.family == "gemma3"
    assert type(loaded.hf_model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Gemma3Processor"
    assert loaded.adapter.placeholder == loaded.processor.boi_token == "<start_of_image>"
    assert loaded.adapter.stop_token_ids() >= {loaded.tokenizer.convert_tokens_to_ids("<end_of_turn>"),
                                              loaded.tokenizer.eos_token_id}


@pytest.mark.parametrize("make", [_session, _system_session])
def test_render_matches_processor(loaded, make):
    session = make()
    text, ref = _reference(loaded, session)
    assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    rendered = render(loaded.adapter, session)
    got, want = rendered.input_ids[0].tolist(), ref["input_ids"][0].tolist()
    torch.testing.assert_close(loaded.adapter.image_inputs(rendered.images)["pixel_values"], ref["pixel_values"])
    assert got == want
    # The processor expands "<start_of_image>" to "\n\n<start_of_image>...<end_of_image>\n\n" *before*
    # tokenizing, so Gemma's newline-run tokens fuse across the edge: "user\n" + "\n\n" -> "\n\n\n" (and
    # "\n\n" + "\n\n" -> "\n\n\n\n" after a system prompt or between two images).
    tok = loaded.tokenizer
    boi = [j for j, t in enumerate(want) if t == tok.convert_tokens_to_ids("<start_of_image>")]
    assert tok.decode([want[boi[0] - 1]]) == ("\n\n\n\n" if session.turns[0].role == "system" else "\n\n\n")
    assert ref["token_type_ids"][0].tolist() == [int(t == loaded.adapter.image_token_id) for t in want]
    assert loaded.adapter.forward_extras(rendered.input_ids, 0, len(got))["token_type_ids"].tolist() == \
        ref["token_type_ids"].tolist()


def _check_images(loaded, rendered):
    """Every image: one boi, 4x4 soft tokens row-major on tile 0, one eoi; wrappers and newlines are -1."""
    tok, df = loaded.tokenizer, rendered.token_map.df
    boi, eoi = (tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>"))
    assert (df.token_id[df.segment != "image"] != loaded.adapter.image_token_id).all()
    for k, (a, b) in enumerate(rendered.image_spans):
        img = df.iloc[a:b]
        assert (img.segment == "image").all() and (img.image_index == k).all()
        assert (df.image_index[df.image_index == k].index == img.index).all()
        patches = img[img.tile >= 0]
        assert (patches.token_id == loaded.adapter.image_token_id).all() and (patches.tile == 0).all()
        assert list(zip(patches.patch_row, patches.patch_col)) == [(r, c) for r in range(SIDE) for c in range(SIDE)]
        p0, p1 = patches.position.iloc[0], patches.position.iloc[-1]
        assert p1 - p0 + 1 == SIDE * SIDE and df.token_id[p0 - 1] == boi and df.token_id[p1 + 1] == eoi
        wrap = img[img.tile < 0]
        assert (wrap.patch_row == -1).all() and (wrap.patch_col == -1).all()
        assert set(tok.decode([t]) for t in wrap.token_id if t not in (boi, eoi)) <= {"\n" * n for n in range(2, 5)}
        assert list(rendered.token_map.select(f"image:{k}")) == list(patches.position)


def test_token_map(loaded):
    tok = loaded.tokenizer
    rendered = render(loaded.adapter, _session())
    df = rendered.token_map.df
    _check_images(loaded, rendered)
    (a, b), = rendered.image_spans
    assert df.token_id[0] == tok.bos_token_id and (df.turn[:b] == 0).all()
    assert tok.decode(df.token_id[rendered.token_map.select("mark:ssn")].tolist()).strip() == SSN
    # turns: user (with image), model, user, and the generation prompt opening turn 3
    assert rendered.turn_chunks()[0][1] > b and rendered.generation_turn == 3
    assert [df.role[df.turn == t].iloc[0] for t in range(4)] == ["user", "assistant", "user", "assistant"]
    for t, turn in enumerate(_session().turns):
        seg = df[(df.turn == t) & (df.segment == turn.role)]
        assert tok.decode(seg.token_id.tolist()) == turn.text
    last = rendered.token_map.select("last:*")
    assert [tok.decode([df.token_id[p]]) for p in last] == ["\n", "\n", "\n", "\n"]  # <end_of_turn>\n, "model\n"
    assert tok.decode(df.token_id[df.turn == 3].tolist()) == "<start_of_turn>model\n"


def test_system_prompt_merged_into_first_user_turn(loaded):
    """The template renders [system] alone as just "<bos>" (so rendering is prefix-stable and no fallback is
    needed): turn 0 is the BOS, and the system text sits inside turn 1 ("<start_of_turn>user\\n" + system +
    "\\n\\n" + images + text), with segment "system" and role "user"."""
    tok = loaded.tokenizer
    session = _system_session()
    rendered = render(loaded.adapter, session)
    df = rendered.token_map.df
    _check_images(loaded, rendered)
    assert df.turn[0] == 0 and (df.turn[1:] > 0).all() and df.role[0] == "system"
    sys_rows = df[df.segment == "system"]
    assert tok.decode(sys_rows.token_id.tolist()) == "You are terse." and (sys_rows.turn == 1).all()
    assert (sys_rows.role == "user").all()
    assert tok.decode(df.token_id[df.turn == 1].tolist()).startswith("<start_of_turn>user\nYou are terse.")
    assert [rendered.images_in(a, b) for a, b in rendered.turn_chunks()] == [[], [0, 1], [], [2], []]
    assert tok.decode(df.token_id[rendered.token_map.select("mark:ssn")].tolist()).strip() == SSN


def _layer_outputs(model, layers, fn):
    out, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda mod, args, o, i=i: out.setdefault(i, []).append((o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v, dim=1) for i, v in out.items()}


@pytest.mark.parametrize("make", [_session, _system_session])
def test_chunked_kv_forward_matches_full(loaded, make):
    """Turn by turn through the KV cache (window 32 < session, so the sliding layer's cache is cropped) equals one
    full forward, because forward_extras gives each chunk the image token types from position 0."""
    ad, model = loaded.adapter, loaded.hf_model
    rendered = render(ad, make())
    ids = rendered.input_ids
    assert ids.shape[1] > model.config.text_config.sliding_window
    layers = ad.lm_layers(model)
    full_kw = ad.image_inputs(rendered.images)
    extras = ad.forward_extras(ids, 0, ids.shape[1])
    ref = _layer_outputs(model, layers, lambda: model(input_ids=ids, **full_kw, **extras))

    def chunked(extras):
        cache = None
        for a, b in rendered.turn_chunks():
            ks = rendered.images_in(a, b)
            inputs = ad.image_inputs([rendered.images[k] for k in ks]) if ks else {}
            cache = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True, **inputs,
                          **extras(a, b)).past_key_values

    got = _layer_outputs(model, layers, lambda: chunked(lambda a, b: ad.forward_extras(ids, a, b)))
    for i in ref:
        torch.testing.assert_close(got[i], ref[i], atol=1e-4, rtol=0)
    # the image attention really is bidirectional: without token types (causal images) the states differ
    causal = _layer_outputs(model, layers, lambda: model(input_ids=ids, **full_kw))
    assert (causal[len(layers) - 1] - ref[len(layers) - 1]).abs().max() > 1e-2
    # ... and a chunk after position 0 given only its own token types gets the mask wrong
    if make is _system_session:  # images in chunks that start at 1 and later
        local = _layer_outputs(model, layers, lambda: chunked(
            lambda a, b: {"token_type_ids": (ids[:, a:b] == ad.image_token_id).long()}))
        assert (local[len(layers) - 1] - ref[len(layers) - 1]).abs().max() > 1e-2


def test_capture_with_generated_turn(loaded):
    """capture_session generates the assistant turn, rolls the KV cache back and goes on: the session is longer
    than the sliding window (32), so this needs a cache whose sliding layers record the past, and the captured
    states equal one full forward of the completed session."""
    from probes.activations.capture import capture_session

    session = Session("g", [Turn("user", f"SSN: {SSN}. Read it.", images=[_image()]), Turn("assistant", None),
                            Turn("user", "Why?")])
    acts = capture_session(loaded, session, ["blocks.1.hook_resid_post"], positions="all", mode="turns",
                           max_new_tokens=6)
    rendered = render(loaded.adapter, acts.session)
    ids = rendered.input_ids
    assert ids.shape[1] > loaded.hf_model.config.text_config.sliding_window
    ref = {}
    with torch.no_grad(), loaded.hooks([("blocks.1.hook_resid_post", lambda x, n: ref.__setitem__(n, x[0].clone()))]):
        loaded.hf_model(input_ids=ids, **loaded.adapter.image_inputs(rendered.images),
                        **loaded.adapter.forward_extras(ids, 0, ids.shape[1]))
    torch.testing.assert_close(acts.kinds["hook_resid_post"][:, 0], ref["blocks.1.hook_resid_post"], atol=1e-4, rtol=0)


def test_pan_and_scan_layout(loaded):
    """With pan-and-scan (off by default, as in the released config) the original image is tile 0, crops 1..n."""
    ad, proc = loaded.adapter, loaded.processor
    out = proc(text=ad.placeholder, images=[_image(32, 128)], do_pan_and_scan=True, pan_and_scan_min_crop_size=16,
               add_special_tokens=False, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    tile, row, col, grid = ad.patch_layout(ids, out)
    n = len(out["pixel_values"])
    assert n == 5 and grid == {t: (SIDE, SIDE) for t in range(n)}
    assert list(tile[tile >= 0]) == [t for t in range(n) for _ in range(SIDE * SIDE)]
    assert list(zip(row[tile == 3], col[tile == 3])) == [(r, c) for r in range(SIDE) for c in range(SIDE)]
    assert ((tile >= 0) == (np.array(ids) == ad.image_token_id)).all()


def test_torch_hooks(loaded):
    names = loaded.hook_names()
    assert {"blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "vision_encoder.encoder_layers.1.hook_out",
            "vision_projector.hook_out"} <= set(names)
    rendered = render(loaded.adapter, _system_session())
    ids = rendered.input_ids
    seen = {}
    hooks = [(n, lambda x, n: seen.__setitem__(n, tuple(x.shape)))
             for n in ("vision_encoder.encoder_layers.0.hook_out", "vision_projector.hook_out",
                       "blocks.1.hook_resid_post")]
    with torch.no_grad(), loaded.hooks(hooks):
        loaded.hf_model(input_ids=ids, **loaded.adapter.image_inputs(rendered.images),
                        **loaded.adapter.forward_extras(ids, 0, ids.shape[1]))
    assert seen == {"vision_encoder.encoder_layers.0.hook_out": (3, 64, 32),  # 3 images x 8x8 patches
                    "vision_projector.hook_out": (3, SIDE * SIDE, 64),  # pooled to 4x4, projected to d_model
                    "blocks.1.hook_resid_post": (1, ids.shape[1], 64)}


def test_bridge_matches_torch_hooks(tiny_path):
    """transformer-lens' TransformerBridge wraps Gemma3ForConditionalGeneration (its gemma3_multimodal adapter);
    its resid_post equals the torch backend's on the same forward (token types and pixels passed through)."""
    loaded = load_model(tiny_path)  # its own copy: the bridge rewraps the HF model in place
    rendered = render(loaded.adapter, _session())
    ids = rendered.input_ids
    kw = {**loaded.adapter.image_inputs(rendered.images), **loaded.adapter.forward_extras(ids, 0, ids.shape[1])}
    torch_out = {}
    keep = [(f"blocks.{i}.hook_resid_post", lambda x, n: torch_out.__setitem__(n, x.clone()))
            for i in range(loaded.n_layers)]
    with torch.no_grad(), loaded.hooks(keep):
        loaded.hf_model(input_ids=ids, **kw)
    bridge = loaded.bridge
    bridge_out = {}
    with torch.no_grad(), bridge.hooks(fwd_hooks=[
            (name, lambda x, hook, name=name: bridge_out.__setitem__(name, x.clone())) for name in torch_out]):
        bridge(ids, **kw)
    assert set(bridge_out) == set(torch_out)
    for name in torch_out:
        torch.testing.assert_close(bridge_out[name], torch_out[name], atol=1e-4, rtol=0)
    assert "vision_encoder.encoder_layers.0.hook_out" in bridge.hook_dict


def test_tiny_config_is_checked_before_anything_is_written(tmp_path):
    from probes.models.families.gemma3 import TinyConfig

    with pytest.raises(ValueError, match="mm_tokens_per_image 15"):
        TinyConfig(mm_tokens_per_image=15)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        TinyConfig(d_model=30)
    with pytest.raises(TypeError, match="window"):
        build_tiny_model("gemma3", tmp_path / "g", window=8)
    assert not (tmp_path / "g").exists()
    assert TinyConfig(sliding_window=8) == TinyConfig.of(TinyConfig(), {"sliding_window": 8})
