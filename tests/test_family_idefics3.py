"""Idefics3 / SmolVLM family: loading, rendering vs the real processor, token map, KV-cache chunking, hooks."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from probes.data.session import Session, Turn
from probes.models.families.idefics3 import FAKE, GLOBAL_TAG
from probes.models.loading import load_model
from probes.models.render import render
from probes.models.tiny import build_tiny_model

SSN = "123-45-6789"


def two_colour(size, first, second, vertical=False):
    """An image whose left (top if vertical) half is `first` and right (bottom) half is `second`."""
    w, h = size
    im = Image.new("RGB", size, first)
    half = ((w, h // 2), (0, h // 2)) if vertical else ((w // 2, h), (w // 2, 0))
    im.paste(Image.new("RGB", half[0], second), half[1])
    return im


WIDE = two_colour((64, 32), (255, 0, 0), (0, 0, 255))  # -> 1 row x 2 crops + global
TALL = two_colour((32, 64), (255, 0, 0), (0, 0, 255), vertical=True)  # -> 2 rows x 1 crop + global


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tiny_model("idefics3", tmp_path_factory.mktemp("idefics3") / "tiny")


@pytest.fixture(scope="module")
def loaded(path):
    return load_model(path)


def session(image=WIDE):
    return Session("s0", [
        Turn("user", f"My SSN is {SSN}. What is in the image?", images=[image]).mark("ssn", SSN),
        Turn("assistant", "A red and a blue box."),
        Turn("user", "What was my SSN?"),
    ])


def test_loads(loaded):
    assert loaded.family == "idefics3"
    assert loaded.adapter.nested_images
    assert loaded.tokenizer("a")["input_ids"] == loaded.tokenizer("a", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("image", [WIDE, TALL], ids=["wide", "tall"])
def test_render_matches_processor(loaded, image):
    s = session(image)
    messages = [{"role": t.role, "content": [{"type": "image"} for _ in t.images] + [{"type": "text", "text": t.text}]}
                for t in s.turns]
    text = loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = loaded.processor(text=text, images=[image], return_tensors="pt")
    r = render(loaded.adapter, s)
    assert r.input_ids.tolist() == ref["input_ids"].tolist()
    got = loaded.adapter.image_inputs(r.images)
    assert torch.equal(got["pixel_values"], ref["pixel_values"])
    assert torch.equal(got["pixel_attention_mask"], ref["pixel_attention_mask"])


@pytest.mark.parametrize("image,rows,cols", [(WIDE, 1, 2), (TALL, 2, 1)], ids=["wide", "tall"])
def test_token_map(loaded, image, rows, cols):
    tok = loaded.tokenizer
    r = render(loaded.adapter, session(image))
    df = r.token_map.df
    side = loaded.adapter.tile_side
    assert side == 4  # 64-px tile / 8-px patch / shuffle 2

    # One image: crops + global, each side*side patch tokens, wrapped in fake/tag/newline tokens (-1).
    (a, b), = r.image_spans
    img = df.iloc[a:b]
    assert (img["segment"] == "image").all() and (img["image_index"] == 0).all()
    assert img["token_id"].iloc[0] == img["token_id"].iloc[-1] == tok.convert_tokens_to_ids(FAKE)
    assert tok.convert_ids_to_tokens(int(img["token_id"].iloc[1])) == "<row_1_col_1>"
    patches = img[img["tile"] >= 0]
    n_tiles = rows * cols + 1
    assert len(patches) == n_tiles * side * side
    assert (patches["token_id"] == loaded.config.image_token_id).all()
    assert (img[img["tile"] < 0]["token_id"] != loaded.config.image_token_id).all()
    assert (img[img["tile"] < 0][["patch_row", "patch_col"]] == -1).all().all()
    # Tiles appear crops first (row-major), global last; each covers its grid exactly once, row-major.
    assert list(dict.fromkeys(patches["tile"])) == [*range(1, n_tiles), 0]
    for t in range(n_tiles):
        p = patches[patches["tile"] == t]
        assert list(zip(p["patch_row"], p["patch_col"])) == [divmod(k, side) for k in range(side * side)]
    # The tag before each crop names its row/col: tile 1 + i*cols + j is <row_{i+1}_col_{j+1}>.
    for q in np.flatnonzero(img["tile"].to_numpy()[1:] != img["tile"].to_numpy()[:-1]) + 1:
        t = img["tile"].iloc[q]
        if t > 0 and img["tile"].iloc[q - 1] < 0:
            i, j = divmod(t - 1, cols)
            assert tok.convert_ids_to_tokens(int(img["token_id"].iloc[q - 1])) == f"<row_{i + 1}_col_{j + 1}>"
        elif t == 0:
            assert tok.convert_ids_to_tokens(int(img["token_id"].iloc[q - 1])) == GLOBAL_TAG
    assert tok.decode(img["token_id"].tolist()).count("\n") >= rows + 1  # a newline per row + before global
    # Pixel tiles are in the same order as the token tiles: crop (i, j) at i*cols + j, global last.
    pv = loaded.adapter.image_inputs(r.images)["pixel_values"][0]
    assert pv.shape[0] == n_tiles
    assert pv[0, 0].mean() > 0.9 and pv[n_tiles - 2, 2].mean() > 0.9  # first crop red, last crop blue
    assert pv[-1, 0].max() > 0.9 and pv[-1, 2].max() > 0.9  # the global view holds both halves

    # Turns: 0 user (with BOS and the image), 1 assistant, 2 user, 3 the generation prompt "Assistant:".
    assert df["turn"].tolist() == sorted(df["turn"].tolist()) and set(df["turn"]) == {0, 1, 2, 3}
    assert df["token_id"].iloc[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert list(df.groupby("turn")["role"].first()) == ["user", "assistant", "user", "assistant"]
    assert a > 0 and df["turn"].iloc[a] == 0 and df["turn"].iloc[b - 1] == 0
    assert tok.decode(df[df["turn"] == 3]["token_id"].tolist()) == "Assistant:"
    reply = "A red and a blue box."
    assert tok.decode(df[df["turn"] == 1]["token_id"].tolist()) == f"Assistant: {reply}<end_of_utterance>\n"
    # The template's ": " space merges into the reply's first token (" A"); a token belongs where it ends.
    assert tok.decode(df[df["segment"] == "assistant"]["token_id"].tolist()) == " " + reply
    ssn = r.token_map.select("mark:ssn")
    assert SSN in tok.decode(df["token_id"].iloc[ssn].tolist())
    assert (df["segment"].iloc[ssn] == "user").all() and (df["turn"].iloc[ssn] == 0).all()
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    assert eou in loaded.adapter.stop_token_ids()
    assert [int(df[df["turn"] == t]["token_id"].eq(eou).sum()) for t in range(4)] == [1, 1, 1, 0]


def test_pixel_shuffle_is_row_major(loaded):
    """Token r*side + c of a tile gathers the 2x2 patch block at (2r, 2c): our (row, col) are right."""
    n, s = 8, loaded.config.scale_factor  # 8x8 patches per tile
    x = torch.arange(n * n, dtype=torch.float).view(1, n * n, 1)  # each patch holds its row-major index
    out = loaded.hf_model.model.connector.pixel_shuffle(x, s)[0]  # [tokens, s*s]
    for k in range(out.shape[0]):
        r, c = divmod(k, n // s)
        assert sorted(out[k].tolist()) == sorted((r * s + dr) * n + c * s + dc for dr in range(s) for dc in range(s))


def _chunked_hidden(loaded, r):
    adapter, model, ids = loaded.adapter, loaded.hf_model, r.input_ids
    pos = adapter.position_ids(model, ids, adapter.image_inputs(r.images))
    assert pos is None
    cache, states = None, []
    for a, b in r.turn_chunks():
        ks = r.images_in(a, b)
        inputs = adapter.image_inputs([r.images[k] for k in ks]) if ks else {}
        out = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True, output_hidden_states=True,
                    **inputs, **adapter.forward_extras(ids, a, b))
        cache = out.past_key_values
        states.append(torch.stack(out.hidden_states))
    return torch.cat(states, dim=2)


def test_kv_cache_chunks_match_full_forward(loaded):
    s = session()
    s.turns.append(Turn("assistant", "I cannot assist with that."))
    s.turns.append(Turn("user", "Describe the image.", images=[TALL]))  # a second image in a later turn
    r = render(loaded.adapter, s)
    assert len(r.turn_chunks()) == 6 and len(r.images) == 2
    adapter, ids = loaded.adapter, r.input_ids
    with torch.no_grad():
        full = loaded.hf_model(input_ids=ids, **adapter.image_inputs(r.images),
                               **adapter.forward_extras(ids, 0, ids.shape[1]), output_hidden_states=True)
        chunked = _chunked_hidden(loaded, r)
    full = torch.stack(full.hidden_states)
    assert chunked.shape == full.shape
    assert (chunked - full).abs().max().item() < 1e-4


def test_torch_hooks(loaded):
    names = loaded.hook_names()
    assert "vision_encoder.encoder_layers.0.hook_out" in names and "vision_encoder.encoder_layers.1.hook_out" in names
    assert "vision_projector.hook_out" in names and "blocks.1.hook_resid_post" in names
    r = render(loaded.adapter, session())
    seen = {}
    hooks = [(n, lambda x, name: seen.__setitem__(name, x.shape)) for n in
             ("vision_encoder.encoder_layers.0.hook_out", "vision_projector.hook_out", "blocks.0.hook_resid_post")]
    with torch.no_grad(), loaded.hooks(hooks):
        loaded.hf_model(input_ids=r.input_ids, **loaded.adapter.image_inputs(r.images))
    assert seen["vision_encoder.encoder_layers.0.hook_out"] == (3, 64, 32)  # 3 tiles x 8x8 patches
    assert seen["vision_projector.hook_out"] == (3, 16, loaded.d_model)  # 4x4 tokens per tile
    assert seen["blocks.0.hook_resid_post"] == (1, r.n_positions, loaded.d_model)


def test_bridge_matches_torch_backend(path):
    loaded = load_model(path, attn_implementation="eager")  # its own copy: the bridge rewraps the model in place
    r = render(loaded.adapter, session())
    inputs = loaded.adapter.image_inputs(r.images)
    got = {}
    with torch.no_grad(), loaded.hooks([("blocks.0.hook_resid_post", lambda x, n: got.__setitem__("torch", x))]):
        loaded.hf_model(input_ids=r.input_ids, **inputs)
    bridge = loaded.bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(r.input_ids, pixel_values=inputs["pixel_values"],
                                         pixel_attention_mask=inputs["pixel_attention_mask"],
                                         names_filter=lambda n: n == "blocks.0.hook_resid_post")
    assert (cache["blocks.0.hook_resid_post"] - got["torch"]).abs().max().item() < 1e-4


def test_unsplit_image_is_one_global_tile(loaded):
    import copy

    from probes.models.families.idefics3 import Adapter

    processor = copy.deepcopy(loaded.processor)
    processor.image_processor.do_image_splitting = False
    exp = Adapter(processor, loaded.config).expand_image(WIDE)
    assert loaded.tokenizer.convert_ids_to_tokens(exp.token_ids[:2] + exp.token_ids[-1:]) == [FAKE, GLOBAL_TAG, FAKE]
    assert exp.tile.tolist() == [-1, -1] + [0] * 16 + [-1] and exp.grid == {0: (4, 4)}


def test_patch_boxes_refuse_a_fixed_size_resize(loaded):
    """The boxes follow a longest-edge resize; a {height, width} size would put them in the wrong place: refuse."""
    import copy

    from transformers.image_processing_utils import SizeDict

    from probes.models.families.idefics3 import Adapter

    processor = copy.deepcopy(loaded.processor)
    processor.image_processor.size = SizeDict(height=64, width=64)
    with pytest.raises(ValueError, match="patch boxes need a longest_edge resize"):
        Adapter(processor, loaded.config).token_boxes(WIDE.size)
