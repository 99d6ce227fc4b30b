"""Capture through the KV cache equals one full forward; generation; hook backends; the store round trip."""

import pytest
import torch

from probes import Session, Turn, capture, capture_session, render, resolve_hooks
from probes.activations.capture import CaptureConfig, CaptureError, store_spec
from probes.models.hooks import HookNameError
from probes.models.tokenmap import SelectorError
from tests.conftest import document_image
from tests.family_checks import layer_outputs


def chat(n_pairs=3, generate=False):
    turns = [Turn("user", "Here is my form. SSN 123-45-6789.", images=[document_image()]).mark("ssn", "123-45-6789")]
    for i in range(n_pairs):
        turns += [Turn("assistant", None if generate else f"Answer number {i}."), Turn("user", f"Question {i}?")]
    return Session("c0", turns, labels={"identity_id": 1, "pii_type": "SSN", "_target": "123-45-6789"})


def full_forward_hidden(loaded, rendered):
    ad = loaded.adapter
    images = ad.image_inputs(rendered.images)
    pos = ad.position_ids(loaded.hf_model, rendered.input_ids, images)
    # the output of each decoder layer, the last one included (HF's last hidden state is after the final norm)
    return layer_outputs(loaded, lambda: loaded.hf_model(
        input_ids=rendered.input_ids, position_ids=pos, **images,
        **ad.forward_extras(rendered.input_ids, 0, rendered.n_positions)))


def test_turn_by_turn_capture_matches_one_full_forward(llava):
    s = chat()
    hooks = resolve_hooks(llava, "resid_post")
    got = capture_session(llava, s, hooks, "all", mode="turns")
    rendered = render(llava.adapter, s)
    assert len(rendered.turn_chunks()) == 8  # 7 turns + the generation prompt: 8 chunks through the cache
    ref = full_forward_hidden(llava, rendered)
    x = got.kinds["hook_resid_post"]
    assert x.shape == (rendered.n_positions, llava.n_layers, llava.d_model)
    for layer in range(llava.n_layers):
        assert torch.allclose(x[:, layer], ref[layer][0], atol=1e-4)
    assert got.rows["hook_resid_post"]["position"].tolist() == list(range(rendered.n_positions))


def test_selected_positions_and_other_hooks(llava):
    s = chat()
    hooks = resolve_hooks(llava, "resid_pre,resid_post,attn_out,mlp_out,vision,projector", layers=[0])
    a = capture_session(llava, s, hooks, "last:*+mark:ssn", mode="turns")
    b = capture_session(llava, s, hooks, "all", mode="single")
    rows = a.rows["hook_resid_post"]
    assert rows.groups.str.contains("mark:ssn").sum() == (rows["mark"] == "ssn").sum() > 0
    assert rows.last_of_turn.sum() == 8
    for kind in ("hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        assert torch.allclose(a.kinds[kind], b.kinds[kind][torch.tensor(rows.position.tolist())], atol=1e-5)
    # the residual stream after a layer is its input plus what attention and the MLP wrote
    k = a.kinds
    assert torch.allclose(k["hook_resid_post"], k["hook_resid_pre"] + k["hook_attn_out"] + k["hook_mlp_out"], atol=1e-5)
    assert a.kinds["vision.hook_out"].shape[:2] == (65, 2)  # 64 patches + CLS, both vision layers
    assert a.kinds["vision_projector.hook_out"].shape == (64, 1, llava.d_model)


def test_generated_turns_are_written_and_recaptured_consistently(llava):
    s = chat(n_pairs=2, generate=True)
    hooks = resolve_hooks(llava, "resid_post")
    got = capture_session(llava, s, hooks, "last:*", mode="turns", max_new_tokens=5)
    assert all(t.text is not None for t in got.session.turns)
    assert s.turns[1].text is None  # the caller's session is not modified
    again = capture_session(llava, got.session, hooks, "last:*", mode="single")
    assert torch.allclose(got.kinds["hook_resid_post"], again.kinds["hook_resid_post"], atol=1e-5)
    assert got.rows["hook_resid_post"].position.tolist() == again.rows["hook_resid_post"].position.tolist()


def test_bad_hooks_and_layers(llava):
    with pytest.raises(CaptureError, match="out of range: the model has 2 layers"):
        resolve_hooks(llava, "resid_post", layers=[5])
    with pytest.raises(CaptureError, match="unknown hook 'resid'"):
        resolve_hooks(llava, "resid")
    with pytest.raises(HookNameError, match="not served by the torch backend"):
        capture_session(llava, chat(1), ["blocks.0.attn.hook_pattern"], "final")


def test_store_round_trip_and_queries(llava, tmp_path):
    sessions = [chat(1), Session("c1", chat(2).turns, labels={"identity_id": 2, "pii_type": "SSN"})]
    hooks = resolve_hooks(llava, "resid_post")
    store = capture(llava, sessions, tmp_path / "store", hooks="resid_post", positions="last:*+mark:ssn",
                    progress=False)
    direct = capture_session(llava, sessions[1], hooks, "last:*+mark:ssn")
    x, meta = store.query(session_id="c1")
    assert torch.equal(x, direct.kinds["hook_resid_post"])
    assert meta.position.tolist() == direct.rows["hook_resid_post"].position.tolist()
    x, meta = store.query(turn=2, last_of_turn=True, layers=[1])
    assert x.shape == (2, 1, llava.d_model) and set(meta.session_id) == {"c0", "c1"}
    x, meta = store.query(position_group="mark:ssn")
    assert (meta["mark"] == "ssn").all() and set(meta.identity_id) == {1, 2}
    assert store.session("c1").to_json()["turns"][1]["text"] == "Answer number 0."
    assert "sessions: 2" in store.summary() and "123-45-6789" not in store.summary()
    assert "_target" not in store.manifest.columns  # private labels stay out of the manifest


def test_bridge_backend_captures_the_same_and_more_hooks(tiny_dir, llava):
    from probes import load_model

    bridged = load_model(tiny_dir("llava"), backend="bridge")  # its own copy: the bridge rewraps in place
    s = chat(n_pairs=1, generate=True)
    hooks = resolve_hooks(llava, "resid_post")
    a = capture_session(llava, s, hooks, "all", mode="turns", max_new_tokens=4)
    b = capture_session(bridged, s, hooks, "all", mode="turns", max_new_tokens=4)
    assert a.session.turns[1].text == b.session.turns[1].text
    assert torch.allclose(a.kinds["hook_resid_post"], b.kinds["hook_resid_post"], atol=1e-5)
    z = capture_session(bridged, s, ["blocks.0.attn.hook_z"], "final", max_new_tokens=4)
    assert z.kinds["attn.hook_z"].shape == (1, 1, llava.d_model)  # [pos, heads * d_head] flattened
    with pytest.raises(CaptureError, match="hook_pattern gives shape .* per-position"):
        capture_session(bridged, s, ["blocks.0.attn.hook_pattern"], "final", max_new_tokens=4)


# ---- issue 21: everything is checked before the model loads and before anything is written -----------------------
def jsonl_sessions(tmp_path, n=3):
    from probes import write_sessions
    from probes.data.session import SessionImage

    img = tmp_path / "doc.png"
    document_image().save(img)
    sessions = []
    for i in range(n):
        s = chat(1)
        s.session_id = f"c{i}"
        s.turns[0].images = [SessionImage.from_path(img)]
        if i == 2:  # one session shows a second image
            s.turns[2].images = [SessionImage.from_path(img)]
        sessions.append(s)
    return write_sessions(sessions, tmp_path / "s.jsonl")


def no_weights(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def test_validate_capture_checks_everything_without_weights_or_writes(tiny_dir, tmp_path, monkeypatch, caplog):
    """Every bad input is its named error, raised before any weight loads; the folder is never made. Null: the
    good settings pass and give the plan (sessions, resolved hooks, positions of the longest session)."""
    import logging

    from probes.activations.capture import validate_capture
    from probes.activations.store import StoreError
    from probes.data.session import SessionError
    from probes.models.tokenmap import SelectorError

    path = jsonl_sessions(tmp_path)
    model, out = tiny_dir("llava"), tmp_path / "out" / "store"
    no_weights(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="probes.activations.capture"):
        plan = validate_capture(model, path, out, hooks="resid_post", positions="image:1", layers=[1])
    assert plan.n_sessions == 3 and plan.hooks == ["blocks.1.hook_resid_post"] and plan.n_done == 0
    assert plan.n_empty == 2 and "keeps no position in 2 of 3 sessions (first: 'c0')" in caplog.text
    assert 0 < plan.longest < plan.max_positions == 4096
    cases = [
        (dict(hooks="blocks.0.hook_foo"), HookNameError, r"hook 'blocks.0.hook_foo': .* does not serve it"),
        (dict(hooks="resid"), CaptureError, "unknown hook 'resid'"),
        (dict(layers=[2]), CaptureError, r"layers \[2\] out of range: the model has 2 layers"),
        (dict(positions="image:x"), SelectorError, "expected an integer after ':'"),
        (dict(positions="bogus:1"), SelectorError, "unknown position selector 'bogus:1'"),
        (dict(positions="image:9"), CaptureError, "selector 'image:9' keeps no position in any of the 3 sessions"),
        (dict(positions="mark:nolabel"), CaptureError, "selector 'mark:nolabel' keeps no position"),
        (dict(positions="turn:99"), CaptureError, "selector 'turn:99' keeps no position"),
        (dict(positions="last:*+image:9"), CaptureError, "selector part 'image:9' of 'last:\\*\\+image:9' keeps no"),
        (dict(batch_size=0), CaptureError, "batch_size 0: expected an integer >= 1"),
        (dict(mode="fast"), CaptureError, "mode 'fast'"),
        (dict(dtype="float33"), CaptureError, "dtype 'float33'"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            validate_capture(model, path, out, **kw)
    from probes import ModelLoadError

    with pytest.raises(ModelLoadError, match="no config.json"):
        validate_capture(tmp_path, path, out)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SessionError, match=r"empty\.jsonl: no sessions"):
        validate_capture(model, tmp_path / "empty.jsonl", out)
    (tmp_path / "doc.png").write_bytes(b"not a png")
    with pytest.raises(SessionError, match=r"s\.jsonl:1: session 'c0': image file .*doc\.png does not match"):
        validate_capture(model, path, out)
    document_image().save(tmp_path / "doc.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"file: is a file; expected a folder"):
        validate_capture(model, path, tmp_path / "file")
    with pytest.raises(StoreError, match=r"file/sub: .*/file is a file"):
        validate_capture(model, path, tmp_path / "file" / "sub")
    with pytest.raises(StoreError, match=r"not an activation store \(no store.json\) and not empty \(holds 'doc.png'"):
        validate_capture(model, path, tmp_path)
    assert not (tmp_path / "out").exists()


def test_sessions_longer_than_the_context_are_refused_unless_allowed(tiny_dir, tmp_path):
    import json
    import shutil

    from probes.activations.capture import validate_capture

    model = shutil.copytree(tiny_dir("llava"), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 64
    (model / "config.json").write_text(json.dumps(config))
    short = Session("short", [Turn("user", "Hi.")])
    long = Session("long", [Turn("user", "The quick brown fox jumps over the lazy dog. " * 20)])
    assert validate_capture(model, [short], tmp_path / "out").longest <= 64  # null: a short session passes
    with pytest.raises(CaptureError, match=r"1 of 2 sessions are longer than the context of .* \(64 positions, "
                                           r"max_position_embeddings\); longest: session 'long' with \d+ positions"):
        validate_capture(model, [short, long], tmp_path / "out")
    assert validate_capture(model, [short, long], tmp_path / "out", allow_long=True).longest > 64
    # a turn to generate counts at max_new_tokens
    gen = Session("gen", [Turn("user", "Hi."), Turn("assistant", None)])
    assert validate_capture(model, [gen], tmp_path / "out", max_new_tokens=10).longest <= 64
    with pytest.raises(CaptureError, match="session 'gen' with"):
        validate_capture(model, [gen], tmp_path / "out", max_new_tokens=100)


def test_a_failed_capture_leaves_nothing_and_the_corrected_rerun_works(llava, tmp_path, monkeypatch):
    """The old failure: a bad hook name failed after store.json was written, so the corrected rerun into the same
    folder was refused as 'other settings'."""
    out = tmp_path / "a" / "st"
    sessions = [chat(1)]
    with pytest.raises(HookNameError):
        capture(llava, sessions, out, hooks="blocks.0.attn.hook_pattern", progress=False)
    with pytest.raises(CaptureError, match="keeps no position"):
        capture(llava, sessions, out, positions="image:3", progress=False)
    assert not (tmp_path / "a").exists()
    store = capture(llava, sessions, out, hooks="resid_post", positions="final", progress=False)
    assert store.finished_ids() == {"c0"}

    def dies(*args, **kwargs):  # a failure inside the first batch, after store.json was written
        raise RuntimeError("out of memory")

    import sys

    monkeypatch.setattr(sys.modules["probes.activations.capture"], "capture_batch", dies)
    with pytest.raises(RuntimeError):
        capture(llava, sessions, tmp_path / "b", positions="final", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()
    assert capture(llava, sessions, tmp_path / "b", positions="last:*", progress=False).finished_ids() == {"c0"}


def test_capture_config_checks_its_settings_once_and_names_the_store_identity():
    """Bad settings are refused when the config is built (no model needed); the store's identity is the same
    fields store.json always held, whatever else the config says (batch size, progress)."""
    with pytest.raises(CaptureError, match=r"batch_size 0: expected an integer >= 1"):
        CaptureConfig(batch_size=0)
    with pytest.raises(CaptureError, match=r"mode 'all'"):
        CaptureConfig(mode="all")
    with pytest.raises(SelectorError, match="position selector"):
        CaptureConfig(positions=" ")
    c = CaptureConfig(hooks=["resid_post"], layers=range(2), batch_size=3, progress=False)
    assert c.hooks == ("resid_post",) and c.layers == (0, 1)
    spec = store_spec("m", "llava", ["blocks.0.hook_resid_post"], c, "torch", {"files": [], "config": "x"})
    assert set(spec) == {"model", "family", "hooks", "positions", "mode", "max_new_tokens", "dtype", "backend",
                         "fingerprint", "fingerprint_files"}
    assert spec == store_spec("m", "llava", ["blocks.0.hook_resid_post"], CaptureConfig(), "torch",
                              {"files": [], "config": "x"})
