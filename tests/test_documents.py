"""Documents and image tokens: exact ink boxes, byte-identical renders, pair renders that differ only in the
value boxes, and token boxes checked against where each family's processor actually puts the pixels."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig

from probes.data.documents import (
    SCENARIOS,
    Document,
    DocumentError,
    FieldBox,
    font,
    font_dir,
    patches_for_field,
    render_document,
    render_pair,
)
from probes.data.identities import PII_TYPES, ChoiceError, make_identities
from probes.models.families import get_family
from probes.models.families.base import BOX_COLUMNS
from probes.models.processors import load_processor, without_video

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "idefics3", "gemma3")


@pytest.fixture(scope="module")
def people():
    return make_identities(4, seed=0)


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    """adapter(family) -> the tiny checkpoint's adapter (processor + config, no weights needed)."""
    made = {}

    def get(family):
        if family not in made:
            path = tiny_dir(family)
            made[family] = get_family(family)(load_processor(str(path)), AutoConfig.from_pretrained(path))
        return made[family]

    return get


def _pixels(img):
    return np.asarray(img, dtype=np.int16)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


# ---- documents -------------------------------------------------------------------------------------------------
def test_deterministic_png(people, tmp_path):
    for scenario in SCENARIOS:
        for layout in ("fixed", "random"):
            a = render_document(people[0], scenario, 128, seed=3, layout=layout)
            b = render_document(people[0], scenario, 128, seed=3, layout=layout)
            assert a.png() == b.png() and a.fields == b.fields
            assert a.save(tmp_path / f"{scenario}.png").read_bytes() == a.png()
    seeds = {render_document(people[0], "hiring", 128, seed=s, layout="random").png() for s in range(4)}
    assert len(seeds) > 1  # the random layout does depend on the seed


def test_fonts_are_matplotlibs_dejavu():
    import matplotlib

    assert font_dir().is_relative_to(matplotlib.get_data_path())
    assert font("sans", 12).path.endswith("DejaVuSans.ttf")


@pytest.mark.parametrize("size", [64, 128, (200, 120), 336])
def test_value_boxes_are_exactly_the_ink(people, size):
    """Blanking a field changes exactly the pixels inside its box, and its box is the tight box of that change."""
    for scenario in SCENARIOS:
        for layout in (("fixed", "random") if size == 128 else ("fixed",)):
            doc = render_document(people[1], scenario, size, seed=1, layout=layout)
            full = _pixels(doc.image)
            for name, fb in doc.fields.items():
                blank = render_document(people[1], scenario, size, seed=1, layout=layout, values={name: ""})
                assert blank.fields[name].box is None
                changed = (full != _pixels(blank.image)).any(-1)
                assert _bbox(changed) == fb.box, (scenario, size, layout, name)
            boxes = [fb.box for fb in doc.fields.values()] + [fb.label_box for fb in doc.fields.values()
                                                               if fb.label_box]
            for i, a in enumerate(boxes):  # no value overlaps another value or a label
                for b in boxes[i + 1:]:
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (scenario, size, a, b)


@pytest.mark.parametrize("size", [64, 96, 128, (256, 128), (128, 300), 672, 1000])
def test_every_size_shows_the_pii(people, size):
    for scenario in SCENARIOS:
        doc = render_document(people[2], scenario, size)
        assert doc.size == ((size, size) if isinstance(size, int) else size)
        for pii in PII_TYPES:
            assert doc.fields[pii].value == people[2].value(pii) and doc.fields[pii].box is not None
        if size == 672:
            assert {"Name", "Date of Birth", "Address"} <= set(doc.fields)


@pytest.mark.parametrize("layout", ["fixed", "random", "grid"])
def test_pair_identical_outside_value_boxes(people, layout):
    for scenario in SCENARIOS:
        for size in (96, 336):
            a, b = render_pair(people[0], people[3], scenario, size, seed=5, layout=layout)
            inside = np.zeros(a.image.size[::-1], bool)
            for f in PII_TYPES:
                assert b.fields[f].value == people[3].value(f) != a.fields[f].value
                for box in (a.fields[f].box, b.fields[f].box):
                    inside[box[1]:box[3], box[0]:box[2]] = True
            differ = (_pixels(a.image) != _pixels(b.image)).any(-1)
            assert not differ[~inside].any() and differ[inside].any()
            assert b.overridden == tuple(sorted(PII_TYPES))
            assert all(a.fields[f] == b.fields[f] for f in a.fields if f not in PII_TYPES)


def test_grid_layout_puts_one_character_per_cell(people):
    """At 96 px the grid's 8 px cells are the 8 px patches of the organism: each printed character has its own
    cell, every field keeps its rows whatever the values, and a cell's ink stays (almost) inside it."""
    docs = [render_document(p, s, 96, layout="grid") for p, s in zip(people, SCENARIOS)]
    for doc, person in zip(docs, people):
        assert set(doc.cells) == set(doc.fields) == {"Name", "Date of Birth", "SSN", "Phone Numbers", "Email"}
        for f, boxes in doc.cells.items():
            assert doc.fields[f].value == person.value(f)[:len(boxes)] and len(boxes) == len(doc.fields[f].value)
            assert all(b[2] - b[0] == 8 and b[3] - b[1] == 8 and b[0] % 8 == 0 and b[1] % 8 == 0 for b in boxes)
            assert len(set(boxes)) == len(boxes)
    assert docs[0].cells["SSN"][0] == docs[1].cells["SSN"][0]  # fixed rows: the SSN starts in the same cell
    ink = _pixels(docs[0].image).min(-1) < 128
    box = docs[0].cells["SSN"][4]  # a digit (NNN-N...)
    inside = ink[box[1]:box[3], box[0]:box[2]].sum()
    assert inside > 0.7 * ink[box[1] - 2:box[3] + 2, box[0] - 2:box[2] + 2].sum()
    with pytest.raises(DocumentError, match="too small for the 'grid' layout"):
        render_document(people[0], "open", 64, layout="grid")


def test_bad_arguments(people):
    with pytest.raises(ChoiceError, match="unknown scenario 'bank'; allowed: open, hiring, verification, finance"):
        render_document(people[0], "bank")
    with pytest.raises(ChoiceError, match="unknown layout 'table'; allowed: fixed, random, grid"):
        render_document(people[0], "open", layout="table")
    with pytest.raises(DocumentError, match="too small"):
        render_document(people[0], "open", 32)
    with pytest.raises(DocumentError, match="'Passport'"):
        render_document(people[0], "open", values={"Passport": "X"})
    with pytest.raises(DocumentError, match="swap field"):
        render_pair(people[0], people[1], "verification", 64, swap=("Gender",))


# ---- token boxes: values painted into known cells ------------------------------------------------------------------
def _painted(size, box):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill="black")
    return Document(img, {"SSN": FieldBox("SSN", "x", box, None)}, "open", "x", "fixed", 0)


@pytest.mark.parametrize("family,size,box,expected", [
    # tiny LLaVA: a 64 px image is not resized; 8 px patches. Box x in [16, 40), y in [8, 16): row 1, cols 2..4
    ("llava", (64, 64), (16, 8, 40, 16), {(0, 1, 2), (0, 1, 3), (0, 1, 4)}),
    # tiny Qwen2.5-VL: 112 x 84 is already a multiple of 28 px (one token = a 2x2 block of 14 px patches)
    ("qwen2_5_vl", (112, 84), (30, 0, 60, 20), {(0, 0, 1), (0, 0, 2)}),
    # tiny Gemma 3: 64 px, 4 x 4 soft tokens of 16 px
    ("gemma3", (64, 64), (0, 40, 20, 50), {(0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 3, 1)}),
])
def test_known_cells(adapter, family, size, box, expected):
    ad = adapter(family)
    doc = _painted(size, box)
    got = patches_for_field(ad, doc, "SSN")
    assert list(got.columns) == ["tile", "patch_row", "patch_col"]
    assert set(map(tuple, got.to_numpy().tolist())) == expected
    # and through the processor: the cells whose pixel values the paint changed
    white, painted = _tiles(ad, Image.new("RGB", size, "white")), _tiles(ad, doc.image)
    cp = _cell_px(ad)
    changed = set()
    for t in white:
        ys, xs = torch.nonzero((white[t] - painted[t]).abs().amax(0) > 0.01, as_tuple=True)
        changed |= {(t, int(y // cp), int(x // cp)) for y, x in zip(ys.tolist(), xs.tolist())}
    assert changed == expected


def test_field_patches_cover_the_pixel_change(adapter, people):
    """Swap the PII on a document; what changes in pixel_values lies in the reported patches."""
    ad = adapter("llava")
    for size, exact in ((64, True), (128, False)):  # 64: no resampling; 128: resized to 64 px (kernels bleed)
        a, b = render_pair(people[0], people[1], "hiring", size)
        union = set()
        for f in PII_TYPES:
            for doc in (a, b):
                union |= set(map(tuple, patches_for_field(ad, doc, f).to_numpy().tolist()))
        diff = (ad.process([a.image])["pixel_values"][0] - ad.process([b.image])["pixel_values"][0]).abs().amax(0)
        p = ad.hf_config.vision_config.patch_size
        cells = diff.reshape(diff.shape[0] // p, p, diff.shape[1] // p, p).sum((1, 3))
        inside = torch.zeros_like(cells, dtype=torch.bool)
        for _, r, c in union:
            inside[r, c] = True
        if exact:
            assert not cells[~inside].any() and (cells[inside] > 0).float().mean() > 0.5
        else:
            assert cells[inside].sum() > 0.9 * cells.sum()


def test_blank_field_has_no_patches(adapter, people):
    doc = render_document(people[0], "open", 64, values={"SSN": ""})
    assert patches_for_field(adapter("llava"), doc, "SSN").empty
    with pytest.raises(DocumentError, match="no field 'Passport'"):
        patches_for_field(adapter("llava"), doc, "Passport")


# ---- token boxes: a dot at a token's box centre lands in that token, for every family -----------------------------
def _tiles(ad, img):
    """A family's processed pixel tiles, keyed by the tile numbers of its patch_layout."""
    out = ad.process([img])
    pv = out["pixel_values"]
    if ad.name == "llava":
        return {0: pv[0]}
    if ad.name in ("llava_next", "llava_onevision"):  # base view first, then crops row-major
        return {t: pv[0, t] for t in range(pv.shape[1])}
    if ad.name == "gemma3":  # the image, then pan-and-scan crops
        return {t: pv[t] for t in range(pv.shape[0])}
    if ad.name == "idefics3":  # crops row-major, global view last (our tile 0)
        n = pv.shape[1]
        return {(0 if k == n - 1 else k + 1): pv[0, k] for k in range(n)}
    # qwen2_5_vl: flattened patches, 2x2 merge blocks consecutive; fold back into an image
    _, gh, gw = out["image_grid_thw"][0].tolist()
    ip = ad.processor.image_processor
    p, m, T = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    x = pv.reshape(gh // m, gw // m, m, m, 3, T, p, p)[:, :, :, :, :, 0]
    return {0: x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)}


def _cell_px(ad):
    """Side in tile pixels of one image token's cell."""
    cfg = ad.hf_config
    if ad.name == "qwen2_5_vl":
        return ad.processor.image_processor.patch_size * ad.processor.image_processor.merge_size
    if ad.name == "idefics3":
        return cfg.vision_config.patch_size * cfg.scale_factor
    if ad.name == "gemma3":
        return ad.processor.image_processor.size.height / math.isqrt(cfg.mm_tokens_per_image)
    return cfg.vision_config.patch_size


def dot_check(ad, size, n=6, seed=0, blended=False, rel=0.0, boxes=None):
    """Paint a small dot at the centre of random token boxes and find, in each processed tile, the token cell under
    the dot's centroid: that set must be the tokens whose boxes contain the dot. Returns how many dots passed."""
    tb = ad.token_boxes(size) if boxes is None else boxes
    arr = tb[["x0", "y0", "x1", "y1"]].to_numpy()
    keys = list(zip(tb.tile, tb.patch_row, tb.patch_col))
    bg = Image.new("RGB", size, (200, 200, 200))
    base, cp = _tiles(ad, bg), _cell_px(ad)
    done = 0
    for i in np.random.default_rng(seed).permutation(len(tb)):
        x0, y0, x1, y1 = arr[i]
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        covers = (arr[:, 0] <= cx) & (cx < arr[:, 2]) & (arr[:, 1] <= cy) & (cy < arr[:, 3])
        d = max(2, int(0.3 * np.minimum(arr[covers, 2] - arr[covers, 0], arr[covers, 3] - arr[covers, 1]).min()))
        ix, iy = int(round(cx - d / 2)), int(round(cy - d / 2))
        px, py = ix + d / 2, iy + d / 2
        covers = (arr[:, 0] <= px) & (px < arr[:, 2]) & (arr[:, 1] <= py) & (py < arr[:, 3])
        b = arr[covers]
        margin = np.minimum.reduce([px - b[:, 0], b[:, 2] - px, py - b[:, 1], b[:, 3] - py])
        if (margin < np.maximum(1.0, 0.1 * np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]))).any():
            continue  # too near a token edge for the resampling kernels to leave it in one token
        img = bg.copy()
        ImageDraw.Draw(img).rectangle((ix, iy, ix + d - 1, iy + d - 1), fill=(0, 0, 0))
        diffs = {t: (x - base[t]).abs().amax(0) for t, x in _tiles(ad, img).items()}
        top = max(float(v.max()) for v in diffs.values())
        observed, touched = set(), set()
        for t, diff in diffs.items():
            if diff.max() <= max(0.02, rel * top):
                continue
            w = torch.where(diff > 0.5 * diff.max(), diff, torch.zeros_like(diff))
            ys, xs = torch.meshgrid(torch.arange(diff.shape[0]) + 0.5, torch.arange(diff.shape[1]) + 0.5,
                                    indexing="ij")
            my, mx = float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())
            observed.add((t, int(my // cp), int(mx // cp)))
            if t > 0:
                yy, xx = torch.nonzero(w, as_tuple=True)
                touched |= {(t, int(y // cp), int(x // cp)) for y, x in zip(yy.tolist(), xx.tolist())}
        expected = {keys[j] for j in np.flatnonzero(covers)}
        if blended:
            # OneVision's downsampled token blends up to 2x2 source tokens and its layout names the one under the
            # box centre, which may sit on a source boundary: the dot must touch that one and nothing farther.
            hi = {e for e in expected if e[0] > 0}
            assert {o for o in observed if o[0] == 0} == expected - hi, (size, (px, py), observed, expected)
            assert hi <= touched and len(touched) <= 4, (size, (px, py), touched, expected)
        else:
            assert observed == expected, (size, (px, py), observed, expected)
        done += 1
        if done >= n:
            break
    assert done >= min(n, 3), f"only {done} usable dots"
    return done


@pytest.mark.parametrize("family", FAMILIES)
def test_token_boxes_tiny(adapter, family):
    ad = adapter(family)
    for size in ((64, 64), (128, 96), (37, 81)):
        tb = ad.token_boxes(size)
        assert list(tb.columns) == BOX_COLUMNS
        assert len(tb) == int((ad.expand_image(Image.new("RGB", size)).tile >= 0).sum())
        dot_check(ad, size, blended=family == "llava_onevision")
    if family == "llava_onevision":  # small enough not to be downsampled: every token exact
        dot_check(ad, (48, 48), n=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_boxes_tile_the_image(adapter, family):
    """Within the whole-image view and within the crops, token boxes tile the image: no gaps, no overlaps
    (LLaVA's centre crop: they tile the cropped-to part)."""
    ad = adapter(family)
    W, H = size = (128, 96)
    tb = ad.token_boxes(size)
    area = (tb.x1 - tb.x0) * (tb.y1 - tb.y0)
    pts = np.random.default_rng(0).uniform([0, 0], [W, H], size=(500, 2))
    for group in (tb.tile == 0, tb.tile > 0):
        if not group.any():
            continue
        g = tb[group]
        hits = ((g.x0.to_numpy() <= pts[:, :1]) & (pts[:, :1] < g.x1.to_numpy())
                & (g.y0.to_numpy() <= pts[:, 1:]) & (pts[:, 1:] < g.y1.to_numpy())).sum(1)
        if family == "llava":  # 128 x 96 -> 85 x 64, centre crop 64: x in [10, 74) of 85, i.e. [15.06, 111.4)
            lo, hi = 10 * W / 85, 74 * W / 85
            assert np.isclose(area[group].sum(), (hi - lo) * H)
            assert (hits[(pts[:, 0] > lo) & (pts[:, 0] < hi)] == 1).all() and (hits <= 1).all()
        else:
            assert np.isclose(area[group].sum(), W * H) and (hits == 1).all()


def test_dot_check_catches_a_one_patch_shift(adapter):
    ad = adapter("llava")
    tb = ad.token_boxes((64, 64))
    tb[["x0", "x1"]] += 8  # every box one patch to the right
    with pytest.raises(AssertionError):
        dot_check(ad, (64, 64), boxes=tb)


def real_geometry(family, tiny_path, variant=""):
    """An adapter with a released checkpoint's image geometry (processor settings and vision config), built on
    the tiny checkpoint's tokenizer: no weights are needed for token boxes."""
    proc, cfg = load_processor(str(tiny_path)), AutoConfig.from_pretrained(tiny_path)
    tok, template = proc.tokenizer, proc.chat_template
    if family == "llava":  # llava-hf/llava-1.5-7b-hf (variant "pad": LlavaImageProcessor(do_pad=True))
        from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

        kw = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        ip = LlavaImageProcessor(do_pad=True, **kw) if variant == "pad" else CLIPImageProcessor(**kw)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=template,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
        cfg.vision_config.patch_size, cfg.vision_config.image_size = 14, 336
    elif family == "qwen2_5_vl":  # Qwen/Qwen2.5-VL-3B-Instruct
        from transformers import Qwen2VLImageProcessor

        proc.image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14,
                                                     merge_size=2, temporal_patch_size=2)
    elif family == "gemma3":  # google/gemma-3-4b-it (variant "pan_and_scan": switched on)
        from transformers import Gemma3ImageProcessor, Gemma3Processor

        ip = Gemma3ImageProcessor(size={"height": 896, "width": 896}, resample=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
        proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=256)
        if variant == "pan_and_scan":
            proc.images_kwargs = dict(Gemma3Processor.images_kwargs, do_pan_and_scan=True)
        cfg.mm_tokens_per_image, cfg.vision_config.image_size, cfg.vision_config.patch_size = 256, 896, 14
    elif family == "llava_next":  # llava-hf/llava-v1.6-mistral-7b-hf
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     image_grid_pinpoints=pins)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=template,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
        cfg.vision_config.patch_size, cfg.vision_config.image_size, cfg.image_grid_pinpoints = 14, 336, pins
    elif family == "llava_onevision":  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor

        ip = LlavaOnevisionImageProcessor(size={"height": 384, "width": 384})
        proc = without_video(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, video_processor=None,
                                       num_image_tokens=729, vision_feature_select_strategy="full",
                                       vision_aspect_ratio="anyres_max_9", chat_template=template)
        cfg.vision_config.patch_size, cfg.vision_config.image_size = 14, 384
        cfg.image_grid_pinpoints = ip.image_grid_pinpoints
    elif family == "idefics3":  # HuggingFaceTB/SmolVLM-256M-Instruct
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        ip = Idefics3ImageProcessor(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
        proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=64, chat_template=template)
        cfg.vision_config.patch_size, cfg.vision_config.image_size, cfg.scale_factor = 16, 512, 4
    return get_family(family)(proc, cfg)


@pytest.mark.parametrize("family,variant,sizes", [
    ("llava", "", [(640, 480)]), ("llava", "pad", [(300, 800)]), ("qwen2_5_vl", "", [(640, 480)]),
    ("gemma3", "", [(640, 480)]), ("gemma3", "pan_and_scan", [(1000, 400)]), ("llava_next", "", [(300, 800)]),
    ("llava_onevision", "", [(640, 480), (300, 200)]), ("idefics3", "", [(300, 120)]),
])
def test_token_boxes_released_geometry(tiny_dir, family, variant, sizes):
    ad = real_geometry(family, tiny_dir(family), variant)
    for size in sizes:
        tb = ad.token_boxes(size)
        if variant == "pan_and_scan":
            assert tb.tile.max() == 3  # 1000 x 400 (2.5:1): three crops besides the whole image
        dot_check(ad, size, n=3, rel=0.3, blended=family == "llava_onevision")
