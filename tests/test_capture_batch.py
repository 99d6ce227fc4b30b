"""Batched capture (one forward per turn step for several sessions) equals capturing each session alone."""

import importlib

import pytest
import torch

from probes import FAMILIES, Session, Turn, build_tiny_model, capture, capture_session, load_model, render
from probes.activations.capture import CaptureError, _stack_image_inputs, capture_batch, resolve_hooks
from probes.models.families.base import _pixel_inputs
from tests.conftest import document_image

ATOL = 1e-4
capture_mod = importlib.import_module("probes.activations.capture")  # `probes.activations.capture` is also the function


@pytest.fixture
def loaded(family_model):
    return family_model


def three_sessions(family, generate=False):
    """Different lengths, turn counts and images: 5 turns with an image, 3 turns without, 4 turns with two images
    of different sizes ending on an assistant turn (no generation prompt). Roles alternate (Gemma 3 insists)."""
    def img(w, h, text):
        return [] if family == "text" else [document_image(w, h, text)]

    a = Session("a", [Turn("user", "Form: SSN 123-45-6789. Remember it.", images=img(64, 48, "SSN 1")
                           ).mark("ssn", "123-45-6789"),
                      Turn("assistant", None if generate else "I will."), Turn("user", "And the date?"),
                      Turn("assistant", "It is 1990-01-31, as written."), Turn("user", "What is the SSN?")],
                labels={"identity_id": 0})
    b = Session("b", [Turn("user", "Hello there, what is the weather like today?"), Turn("assistant", "Sunny."),
                      Turn("user", "Thanks!")], labels={"identity_id": 1})
    c = Session("c", [Turn("user", "Two forms.", images=img(48, 64, "SSN 2")), Turn("assistant", "Got it."),
                      Turn("user", "One more, please keep it too.", images=img(64, 32, "x")),
                      Turn("assistant", "Kept both forms.")], labels={"identity_id": 2})
    return [a, b, c]


def assert_same(got, want):
    assert got.session.session_id == want.session.session_id
    assert [t.text for t in got.session.turns] == [t.text for t in want.session.turns]
    assert got.kinds.keys() == want.kinds.keys()
    for kind in want.kinds:
        assert got.rows[kind].equals(want.rows[kind]), kind
        assert got.kinds[kind].shape == want.kinds[kind].shape, kind
        torch.testing.assert_close(got.kinds[kind], want.kinds[kind], atol=ATOL, rtol=0)


def no_single_captures(monkeypatch):
    """Make any one-session capture inside capture_batch fail: the batched path must carry every session."""
    def fail(*args, **kwargs):
        raise AssertionError("capture_batch fell back to capture_session")
    monkeypatch.setattr(capture_mod, "capture_session", fail)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_equals_one_session_at_a_time(family, loaded, monkeypatch):
    lm = loaded(family)
    sessions = three_sessions(family)
    hooks = resolve_hooks(lm, "resid_post") + resolve_hooks(lm, "resid_pre,attn_out,mlp_out", layers=[0])
    want = {(m, p): [capture_session(lm, s, hooks, p, mode=m) for s in sessions]
            for m, p in (("turns", "all"), ("single", "last:*+mark:ssn"))}
    assert sum(len(render(lm.adapter, s).images) for s in sessions) == (0 if family == "text" else 3)
    for (m, p), ref in want.items():
        with monkeypatch.context() as patch:
            # The tiny Gemma 3's 32-token window is shorter than these sessions: turn by turn, one at a time.
            if family != "gemma3" or m == "single":
                no_single_captures(patch)
            got = capture_batch(lm, sessions, hooks, p, mode=m)
        assert len(got) == 3
        for g, w in zip(got, ref):
            assert_same(g, w)


def test_gemma3_batches_within_its_window(tmp_path, monkeypatch):
    """With a window longer than the batch's padded layout, Gemma 3 (sliding layers, bidirectional image tokens,
    token types laid out with holes) is batched, and exact."""
    lm = load_model(build_tiny_model("gemma3", tmp_path / "g", sliding_window=512))
    sessions = three_sessions("gemma3")
    hooks = resolve_hooks(lm, "resid_post")
    want = [capture_session(lm, s, hooks, "all", mode="turns") for s in sessions]
    no_single_captures(monkeypatch)
    for g, w in zip(capture_batch(lm, sessions, hooks, "all", mode="turns"), want):
        assert_same(g, w)


def test_mixed_batch_with_a_generated_turn(loaded):
    lm = loaded("llava")
    sessions = three_sessions("llava")
    sessions[0] = three_sessions("llava", generate=True)[0]
    hooks = resolve_hooks(lm, "resid_post")
    got = capture_batch(lm, sessions, hooks, "last:*", mode="turns", max_new_tokens=4)
    want = [capture_session(lm, s, hooks, "last:*", mode="turns", max_new_tokens=4) for s in sessions]
    assert got[0].session.turns[1].text is not None and sessions[0].turns[1].text is None
    for g, w in zip(got, want):
        assert_same(g, w)
    with pytest.raises(CaptureError, match="`rendered` must hold the rendering of each session"):
        capture_batch(lm, sessions, hooks, rendered=[render(lm.adapter, s) for s in sessions[:2]])


def test_vision_hooks_go_one_session_at_a_time(loaded):
    lm = loaded("llava")
    sessions = three_sessions("llava")
    hooks = resolve_hooks(lm, "resid_post,vision,projector", layers=[1])
    for g, w in zip(capture_batch(lm, sessions, hooks, "final+image:0"),
                    [capture_session(lm, s, hooks, "final+image:0", mode="turns") for s in sessions]):
        assert_same(g, w)
        assert g.kinds["vision.hook_out"].shape[1] == 2


@pytest.mark.parametrize("family", ["llava_next", "idefics3", "qwen2_5_vl"])
def test_stacked_image_inputs_are_the_processors_batch(family, loaded):
    """Per-row image inputs, zero-padded and stacked, are what the processor gives for the rows together
    (LLaVA-NeXT pads crops per image, Idefics3 tiles per row, Qwen concatenates patches)."""
    ad = loaded(family).adapter
    rows = [[document_image(96, 64)], [document_image(40, 96), document_image(64, 64)]]
    got = _stack_image_inputs([ad.image_inputs(r) for r in rows])
    if ad.nested_images:  # rows of different tile counts give texts of different lengths: pad them
        want = _pixel_inputs(ad.processor(text=[ad.placeholder * len(r) for r in rows], images=rows, padding=True,
                                          add_special_tokens=False, return_tensors="pt"))
    else:
        want = ad.batch_image_inputs(rows)
    assert got.keys() == want.keys() and "pixel_values" in got
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_store_is_the_same_whatever_the_batch_size(loaded, tmp_path):
    lm = loaded("llava_onevision")
    sessions = three_sessions("llava_onevision") + [Session("d", three_sessions("llava_onevision")[1].turns[:1])]
    sessions[1] = three_sessions("llava_onevision", generate=True)[0]
    sessions[1].session_id = "a-gen"
    kw = dict(hooks="resid_post", positions="last:*+mark:ssn", mode="turns", max_new_tokens=3, progress=False)
    one = capture(lm, sessions, tmp_path / "one", batch_size=1, **kw)
    # resume: a store holding the first session already, the rest in batches of 3
    capture(lm, sessions[:1], tmp_path / "many", batch_size=1, **kw)
    many = capture(lm, sessions, tmp_path / "many", batch_size=3, **kw)
    assert one.spec == many.spec
    assert sorted(one.finished_ids()) == sorted(many.finished_ids()) == sorted(s.session_id for s in sessions)
    for sid in one.finished_ids():
        x1, m1 = one.query(session_id=sid)
        x2, m2 = many.query(session_id=sid)
        assert m1.equals(m2), sid
        torch.testing.assert_close(x2, x1, atol=ATOL, rtol=0)
    assert many.session("a-gen").turns[1].text == one.session("a-gen").turns[1].text
    with pytest.raises(CaptureError, match="batch_size 0: expected an integer >= 1"):
        capture(lm, sessions, tmp_path / "bad", batch_size=0, **kw)
