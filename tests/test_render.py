"""Rendering through the checkpoint's own chat template, and the token map (LLaVA; other families in
test_family_*.py)."""

import numpy as np
import pytest
import torch

from probes import RenderError, Session, Turn, UnsupportedModelError, load_model, render
from probes.models.tokenmap import SelectorError
from tests.conftest import document_image


def session(image):
    return Session("s0", [
        Turn("user", "My SSN is 123-45-6789. Keep it.", images=[image]).mark("ssn", "123-45-6789"),
        Turn("assistant", "Noted, 123-45-6789."),
        Turn("user", "What was it?"),
    ])


def messages(s):
    out = []
    for t in s.turns:
        content = [{"type": "image"} for _ in t.images] + [{"type": "text", "text": t.text}]
        out.append({"role": t.role, "content": content})
    return out


def test_render_matches_the_processor(llava):
    img = document_image()
    s = session(img)
    r = render(llava.adapter, s)
    text = llava.processor.apply_chat_template(messages(s), tokenize=False, add_generation_prompt=True)
    ref = llava.processor(text=[text], images=[img], return_tensors="pt")["input_ids"]
    assert torch.equal(r.input_ids, ref)


def test_token_map_places_llava_patches_row_major(llava):
    r = render(llava.adapter, session(document_image()))
    df = r.token_map.df
    img = df[df.segment == "image"]
    rows, cols = 8, 8  # 64 px / patch 8
    assert len(img) == rows * cols
    assert (img.image_index == 0).all() and (img.tile == 0).all()
    assert list(zip(img.patch_row, img.patch_col)) == [(i, j) for i in range(rows) for j in range(cols)]
    assert (img.token_id == llava.config.image_token_id).all()
    assert img.position.is_monotonic_increasing and img.position.diff().dropna().eq(1).all()
    assert r.image_spans == [(int(img.position.iloc[0]), int(img.position.iloc[-1]) + 1)]


def test_a_patch_token_the_rendered_ids_lost_is_an_error(llava, monkeypatch):
    """If the tokenizer merged or split an image token, the token map would silently miss a patch: refuse."""
    import importlib

    module = importlib.import_module("probes.models.render")  # (`probes.models.render` is the function, re-exported)
    real = module._align
    monkeypatch.setattr(module, "_align", lambda got, want: real(got, want)[1:])
    with pytest.raises(RenderError, match=r"session 's0', image 0: 63 of its 64 patch tokens were found"):
        render(llava.adapter, session(document_image()))


def test_token_map_turns_roles_segments_and_marks(llava):
    r = render(llava.adapter, session(document_image()))
    df, tok = r.token_map.df, llava.tokenizer
    assert list(df.turn.unique()) == [0, 1, 2, 3]  # turn 3 = the generation prompt of the next assistant turn
    assert list(df.groupby("turn").role.first()) == ["user", "assistant", "user", "assistant"]
    assert set(df.segment) == {"template", "image", "user", "assistant"}
    ssn = df[df.mark == "ssn"]
    assert tok.decode(ssn.token_id).strip() == "123-45-6789"
    assert set(ssn.turn) == {0}
    assert tok.decode(df[df.segment == "assistant"].token_id) == "Noted, 123-45-6789."
    assert tok.decode(df[(df.turn == 3)].token_id) == " ASSISTANT:"  # the space is glued to the word (BPE)
    assert r.turn_chunks()[0][0] == 0 and r.turn_chunks()[-1][1] == len(df)


def test_selectors(llava):
    r = render(llava.adapter, session(document_image()))
    tm, df = r.token_map, r.token_map.df
    assert list(tm.select("last:*")) == [df[df.turn == t].position.max() for t in range(4)]
    assert list(tm.select("last:1")) == [df[df.turn == 1].position.max()]
    assert list(tm.select("last:-1")) == [len(df) - 1] == list(tm.select("final"))
    assert len(tm.select("image:0")) == 64 and len(tm.select("image:1")) == 0
    assert np.array_equal(tm.select("mark:ssn+final"), np.r_[df[df.mark == "ssn"].position, len(df) - 1])
    assert len(tm.select("turn:2")) == (df.turn == 2).sum()
    assert len(tm.select("segment:user")) == (df.segment == "user").sum()
    with pytest.raises(SelectorError, match="unknown position selector 'patch:3'"):
        tm.select("patch:3")


def test_literal_placeholder_in_text_is_an_image_count_mismatch(llava):
    s = Session("bad", [Turn("user", "look <image> here", images=[document_image()])])
    with pytest.raises(RenderError, match="image-token count mismatch: .* 2 image placeholder"):
        render(llava.adapter, s)


def test_text_only_model_refuses_images_and_renders_text(tiny_dir):
    text = load_model(tiny_dir("text"))
    assert text.family == "text"
    with pytest.raises(RenderError, match="text-only model"):
        render(text.adapter, session(document_image()))
    r = render(text.adapter, Session("t", [Turn("user", "hello"), Turn("assistant", "hi"), Turn("user", "SSN?")]))
    ref = text.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": x}]} if i % 2 == 0 else
         {"role": "assistant", "content": [{"type": "text", "text": x}]}
         for i, x in enumerate(["hello", "hi", "SSN?"])],
        tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert r.input_ids[0].tolist() == list(ref)


def test_llava_refuses_a_pixtral_vision_tower(llava):
    """LlavaForConditionalGeneration also serves Pixtral, whose image tokens the llava adapter cannot lay out."""
    import copy

    from probes.models.families.llava import Adapter

    config = copy.deepcopy(llava.config)
    config.vision_config.model_type = "pixtral"
    with pytest.raises(UnsupportedModelError, match="llava: a 'pixtral' vision tower is not supported"):
        Adapter(llava.processor, config)


def test_unsupported_architecture_lists_families(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "model_type": "bert"}')
    with pytest.raises(UnsupportedModelError, match="'BertForMaskedLM' is not supported. Supported families: llava"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "missing" / "model")


# ---- issue 18: image marks (PII boxes on an image) become marks on the image tokens that cover them ---------------
def drawn_form_session(marks_of=None):
    from probes.data.builders import document_marks
    from probes.data.documents import render_document
    from probes.data.identities import make_identities
    from probes.data.session import SessionImage

    doc = render_document(make_identities(1, seed=3)[0], "hiring", 128, seed=1)
    marks = document_marks(doc) if marks_of is None else marks_of(doc)
    s = Session("form", [Turn("user", "My SSN is 123-45-6789. Keep it.",
                              images=[SessionImage.from_pil(doc.image, marks=marks)]).mark("ssn", "123-45-6789")])
    return doc, s


def image_cells(df, positions):
    rows = df.loc[positions]
    return {(int(t), int(r), int(c)) for t, r, c in zip(rows.tile, rows.patch_row, rows.patch_col)}


def test_mark_selects_exactly_the_drawn_values_image_tokens(llava):
    """On a drawn form, `mark:ssn` picks the SSN's text tokens plus exactly the image tokens `patches_for_field`
    gives for the SSN (no tolerance: both go through the adapter's token_boxes with the same ink box); every field
    likewise. Null: the same session without image marks marks no image token."""
    from probes.data.documents import patches_for_field

    doc, s = drawn_form_session()
    tm = render(llava.adapter, s).token_map
    df = tm.df
    for field, label in (("SSN", "ssn"), ("Phone Numbers", "phone"), ("Email", "email"), ("Name", "name")):
        picked = tm.select(f"mark:{label}")
        on_image = picked[df.loc[picked, "segment"].to_numpy() == "image"]
        want = {tuple(map(int, x)) for x in patches_for_field(llava.adapter, doc, field).to_numpy()}
        assert want and image_cells(df, on_image) == want, field
    text_ssn = df[(df.segment != "image") & (df.mark == "ssn")]
    assert llava.tokenizer.decode(text_ssn.token_id).strip() == "123-45-6789"  # the text mark is unchanged
    # tokens under two values carry both labels, joined with '|' as text marks are
    both = set(tm.select("mark:ssn")) & set(tm.select("mark:email"))  # SSN and email rows share a patch row
    assert both and all(set(df.loc[p, "mark"].split("|")) >= {"ssn", "email"} for p in both)
    _, plain = drawn_form_session(lambda doc: {})
    bare = render(llava.adapter, plain).token_map.df
    assert (bare[bare.segment == "image"].mark == "").all()
    assert bare.drop(columns="mark").equals(df.drop(columns="mark"))  # marks change nothing else


def test_image_mark_outside_the_image_is_an_error(llava):
    _, s = drawn_form_session(lambda doc: {"ssn": [(100, 100, 129, 110)]})
    with pytest.raises(RenderError, match=r"session 'form', image 0: mark 'ssn' box \[100, 100, 129, 110\] lies "
                                          r"outside the 128x128 image"):
        render(llava.adapter, s)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "idefics3", "qwen2_5_vl", "gemma3"])
def test_image_marks_follow_each_familys_token_boxes(family_model, family):
    """Every family's layout (tiles, crops, merged patches): `mark:<label>` on the image is `patches_for_field`."""
    from probes.data.builders import document_marks
    from probes.data.documents import patches_for_field, render_document
    from probes.data.identities import make_identities
    from probes.data.session import SessionImage

    model = family_model(family)
    doc = render_document(make_identities(1, seed=3)[0], "hiring", (200, 120), seed=1)
    s = Session("f", [Turn("user", "Read.", images=[SessionImage.from_pil(doc.image, marks=document_marks(doc))])])
    tm = render(model.adapter, s).token_map
    for field, label in (("SSN", "ssn"), ("Email", "email")):
        want = {tuple(map(int, x)) for x in patches_for_field(model.adapter, doc, field).to_numpy()}
        assert want and image_cells(tm.df, tm.select(f"mark:{label}")) == want, (family, field)
