"""LLaVA-OneVision family: loading, rendering vs the processor, AnyRes (+ anyres_max_9 downsampling) token layout vs
the model's packing, chunked KV forward (one and two images), hooks, bridge."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

from probes.data.session import Session, Turn
from probes.models.loading import load_model
from probes.models.render import chat_messages, render
from probes.models.tiny import build_tiny_model
from tests.family_checks import assert_chunked_matches_full

N = 4  # tokens per crop side: 16 px crops, 4 px patches (SigLIP: no CLS)
# 8x48 (H x W) picks the 16x48 pinpoint: 3 crops side by side, stitched grid 4x12, unpadded to rows 1..2
# -> 16 base + 2 x 12 + 2 newlines = 42 image tokens
H, W = 8, 48
SSN = "123-45-6789"


def _image(h=H, w=W, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(build_tiny_model("llava_onevision", tmp_path_factory.mktemp("llava_onevision")))


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
    assert loaded.family == "llava_onevision"
    assert type(loaded.hf_model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert loaded.tokenizer.bos_token is None  # Qwen2: no BOS
    assert loaded.tokenizer("a")["input_ids"] == loaded.tokenizer("a", add_special_tokens=False)["input_ids"]


def test_render_matches_processor(loaded, session, rendered):
    proc = loaded.processor
    text = proc.apply_chat_template(chat_messages(session, 3, False), tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<image>\nName:")
    assert text.endswith("<|im_start|>user\nWhat is the name on the form?<|im_end|>\n<|im_start|>assistant\n")
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
    assert df.iloc[0].token_id == loaded.tokenizer.convert_tokens_to_ids("<|im_start|>")
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
    assert list(df.turn.drop_duplicates()) == [0, 1, 2, 3]  # 3: the generation prompt
    assert rendered.turn_chunks() == [rendered.token_map.turn_bounds(t) for t in range(4)]
    assert loaded.tokenizer.decode(rendered.input_ids[0, df.turn == 3]) == "<|im_start|>assistant\n"
    assert set(df.role[df.turn == 1]) == {"assistant"} and set(df.role[df.turn == 2]) == {"user"}
    assert loaded.tokenizer.decode(rendered.input_ids[0, df.segment == "assistant"]) == "Sure, here it is: the caption."
    assert (df.image_index[df.segment == "image"] == 0).all() and (df.turn[df.segment == "image"] == 0).all()


def _layout_vs_model(loaded, image):
    """Tag every projector output with its pixel tile, (row, col) and (row, col) on the stitched crop grid, and read
    the model's own packed (and possibly bilinearly downsampled) features back."""
    model, adapter = loaded.hf_model, loaded.adapter
    inputs = adapter.image_inputs([image])
    cfg = model.config
    _, nw = get_anyres_image_grid_shape(inputs["image_sizes"][0], cfg.image_grid_pinpoints,
                                        cfg.vision_config.image_size)

    def tag(mod, args, out):
        tiles, k = out.shape[:2]
        t, j = torch.arange(tiles)[:, None].expand(tiles, k), torch.arange(k)[None].expand(tiles, k)
        crop_r, crop_c = (t - 1).div(nw, rounding_mode="floor"), (t - 1) % nw  # tile 0: unused
        new = torch.zeros_like(out)
        new[..., :5] = torch.stack([t, j // N, j % N, crop_r * N + j // N, crop_c * N + j % N], -1).float()
        return new

    h = adapter.projector(model).register_forward_hook(tag)
    try:
        with torch.no_grad():
            packed = model.model.get_image_features(**inputs).pooler_output[0]
    finally:
        h.remove()
    return adapter.expand_image(image), packed, nw


# (64, 64): 4x4 crops = 16x16 tokens > 1.1^2 x 9 crops -> downsampled by 4/3 to 12x12; (64, 100) also cut
@pytest.mark.parametrize("hw,n_tokens", [((H, W), 42), ((48, 8), 52), ((32, 32), 88), ((64, 64), 172),
                                         ((64, 100), 151)])
def test_layout_is_the_models_packing(loaded, hw, n_tokens):
    """Each expanded token q is packed feature q: tagged projector outputs show its (tile, row, col), or, where the
    model downsamples, the bilinear sample whose nearest source token is our (tile, row, col); newlines are the
    model's image_newline. Counts agree with the processor's _get_number_of_features."""
    image = _image(*hw)
    exp, packed, nw = _layout_vs_model(loaded, image)
    proc = loaded.processor
    assert len(exp.token_ids) == packed.shape[0] == proc._get_number_of_features(*hw, 16, 16) == n_tokens
    is_patch = exp.tile >= 0
    assert (packed[~is_patch] == loaded.hf_model.model.image_newline).all()
    got, want = packed[is_patch][:, :3].numpy(), np.stack([exp.tile, exp.patch_row, exp.patch_col], 1)[is_patch]
    base = exp.tile[is_patch] == 0
    assert base.sum() == N * N and (got[base] == want[base]).all()
    crop_r, crop_c = np.divmod(want[~base, 0] - 1, nw)
    stitched = np.stack([crop_r * N + want[~base, 1], crop_c * N + want[~base, 2]], 1)
    dist = np.abs(packed[is_patch][~base][:, 3:5].numpy() - stitched)
    downsampled = hw in ((64, 64), (64, 100))
    assert dist.max() <= (0.5 + 1e-4 if downsampled else 0)
    if not downsampled:
        assert (got == want).all()


def test_two_images_render_and_chunk(loaded, session):
    """A second image in a later turn: flat image lists keep AnyRes for each image (batch_num_images all 1), so
    the per-image expansions, the processor and the turn-by-turn forward agree."""
    s2 = Session("s1", [*session.turns[:2], Turn("user", "And this one?", images=[_image(32, 32, seed=1)])])
    r2 = render(loaded.adapter, s2)
    text = loaded.processor.apply_chat_template(chat_messages(s2, 3, False), tokenize=False, add_generation_prompt=True)
    ref = loaded.processor(text=text, images=[_image(), _image(32, 32, seed=1)], return_tensors="pt")
    assert ref["input_ids"].tolist() == r2.input_ids.tolist() and ref["batch_num_images"].tolist() == [1, 1]
    assert [b - a for a, b in r2.image_spans] == [42, 88]
    assert_chunked_matches_full(loaded, r2)


def test_chunked_kv_forward_matches_full(loaded, rendered):
    assert len(rendered.turn_chunks()) == 4
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
    assert seen["vision_encoder.encoder_layers.0.hook_out"] == (4, N * N, 32)  # 4 pixel tiles of patches
    assert seen["vision_projector.hook_out"] == (4, N * N, loaded.d_model)


def test_bridge_matches_torch_hooks_and_installs_nothing(loaded, rendered, monkeypatch):
    """The transformer-lens bridge wraps LLaVA-OneVision; its resid_post equals the torch backend's (on a second copy
    of the model: the bridge rewraps the HF model in place). Booting it runs no installer: TL 4.3 would
    `pip install torchvision` here, because OneVision's AutoProcessor needs it (see
    `probes.models.loading.boot_bridge`)."""
    import subprocess

    ran = []
    monkeypatch.setattr(subprocess, "check_call", lambda *args, **kw: ran.append(args[0]) or 0)
    other = load_model(loaded.name)
    ids, images = rendered.input_ids, other.adapter.image_inputs(rendered.images)
    got = {}
    with other.hooks([("blocks.0.hook_resid_post", lambda x, n: got.setdefault("torch", x.clone()))]), torch.no_grad():
        other.hf_model(input_ids=ids, **images)
    bridge = other.bridge
    assert ran == []
    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: got.setdefault("bridge", x.clone()))]), \
            torch.no_grad():
        bridge(ids, **images)
    assert got["bridge"].shape == (1, ids.shape[1], loaded.d_model)
    torch.testing.assert_close(got["bridge"], got["torch"], atol=1e-5, rtol=0)


def test_loads_by_hub_id_from_the_local_cache(loaded, session, rendered, tmp_path, monkeypatch):
    """An HF id loads offline from the hub cache, processor settings included: without torchvision the processor is
    rebuilt without its video part from the cached snapshot's processor_config.json and chat template (read from
    the folder of a local path only, it lost num_image_tokens and failed on the first image)."""
    import json
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--mmret--tiny-onevision"
    shutil.copytree(loaded.name, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = load_model("mmret/tiny-onevision")
    assert by_id.name == "mmret/tiny-onevision" and by_id.family == "llava_onevision"
    again = render(by_id.adapter, session)
    assert again.input_ids.tolist() == rendered.input_ids.tolist()
    assert again.token_map.df.equals(rendered.token_map.df)
    # llava-hf snapshots keep the template as chat_template.json
    snap = repo / "snapshots" / ("0" * 40)
    template = (snap / "chat_template.jinja").read_text() + "{# from chat_template.json #}"
    (snap / "chat_template.jinja").unlink()
    (snap / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_model("mmret/tiny-onevision").processor.chat_template == template
