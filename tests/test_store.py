"""The store is resumable: a capture killed with SIGKILL resumes and ends as an uninterrupted run would."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from probes import ActivationStore, Session, StoreError, Turn, capture, write_sessions
from probes.data.session import SessionImage
from tests.conftest import document_image

ROOT = Path(__file__).resolve().parents[1]


def make_sessions(tmp_path, n):
    img = tmp_path / "doc.png"
    document_image().save(img)
    return [Session(f"s{i:02d}", [Turn("user", f"Form {i}: SSN 123-45-{i:04d}.", images=[SessionImage.from_path(img)])
                                  .mark("ssn", f"123-45-{i:04d}"), Turn("assistant", "Ok."), Turn("user", "SSN?")],
                    labels={"identity_id": i}) for i in range(n)]


def compare_stores(a: ActivationStore, b: ActivationStore):
    cols = ["session_id", "scope", "row"]
    ma = a.manifest.astype(str).sort_values(cols).reset_index(drop=True)
    mb = b.manifest.astype(str).sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(ma, mb)
    xa, meta_a = a.query()
    xb, meta_b = b.query()
    order_a = meta_a.sort_values(["session_id", "row"]).index
    order_b = meta_b.sort_values(["session_id", "row"]).index
    # allclose, not equal: the killed run computed some sessions in another process, whose thread scheduling may
    # sum in another order
    assert torch.allclose(xa[torch.tensor(order_a)], xb[torch.tensor(order_b)], atol=1e-5)


def test_rerun_skips_finished_sessions_and_refuses_other_settings(llava, tmp_path):
    sessions = make_sessions(tmp_path, 3)
    store = capture(llava, sessions[:2], tmp_path / "st", positions="last:*", progress=False)
    mtime = (store.shards / "s00.parquet").stat().st_mtime_ns
    store = capture(llava, sessions, tmp_path / "st", positions="last:*", progress=False)
    assert (store.shards / "s00.parquet").stat().st_mtime_ns == mtime  # not redone
    assert store.finished_ids() == {"s00", "s01", "s02"}
    with pytest.raises(StoreError, match="captured with other settings \\(positions differ\\)"):
        capture(llava, sessions, tmp_path / "st", positions="final", progress=False)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)
    # queries name what they could not find and what there is
    with pytest.raises(StoreError, match=r"unknown column 'trun'; columns: .*turn"):
        store.query(trun=0)
    with pytest.raises(StoreError, match=r"layers \[7\] not stored for 'hook_resid_post' \(stored: \[0, 1\]\)"):
        store.query(layers=[0, 7])
    with pytest.raises(StoreError, match=r"no hook kind 'hook_mlp_out'; stored kinds: \['hook_resid_post'\]"):
        store.query("hook_mlp_out")
    with pytest.raises(StoreError, match="no session 's99'"):
        store.session("s99")


def test_a_session_without_its_manifest_is_not_finished(llava, tmp_path):
    sessions = make_sessions(tmp_path, 2)
    store = capture(llava, sessions, tmp_path / "st", positions="last:*", progress=False)
    (store.shards / "s01.parquet").unlink()  # as if killed between the tensor and the manifest write
    (store.shards / ".s01.parquet.abc.tmp").write_bytes(b"half")
    reopened = ActivationStore(tmp_path / "st")
    assert reopened.finished_ids() == {"s00"}
    assert list(reopened.shards.glob(".*.tmp"))  # a reader leaves temp files alone: a live writer may own them
    resumed = capture(llava, sessions, tmp_path / "st", positions="last:*", progress=False)
    assert resumed.finished_ids() == {"s00", "s01"} and not list(resumed.shards.glob(".*.tmp"))
    (tmp_path / "st" / "store.json").write_text("{")
    with pytest.raises(StoreError, match=r"store\.json: not valid JSON .*expected the store's settings"):
        ActivationStore(tmp_path / "st")


def test_consolidated_manifest_stays_current_with_a_session_that_kept_no_position(llava, tmp_path):
    """A session whose selectors pick nothing has a shard but no manifest rows: the consolidated manifest records
    its shards, so reopening reads it instead of every shard again."""
    sessions = make_sessions(tmp_path, 2)
    sessions[1].turns[0].marks.clear()  # mark:ssn picks nothing in s01
    store = capture(llava, sessions, tmp_path / "st", positions="mark:ssn", progress=False)
    assert store.done("s01") and set(store.manifest["session_id"]) == {"s00"}
    (cons,) = (tmp_path / "st" / "manifest").glob("part-*.parquet")
    first = cons.stat().st_mtime_ns
    assert len(ActivationStore(tmp_path / "st").manifest) == len(store.manifest)
    assert cons.stat().st_mtime_ns == first  # read, not rebuilt
    assert ActivationStore(tmp_path / "st").finished_ids() == {"s00", "s01"}


SCRIPT = textwrap.dedent("""
    import os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    import probes.activations.store
    from probes import load_model, capture, read_sessions
    real = probes.activations.store.atomic_write_bytes
    def slow(path, data):  # widen the window in which the kill lands, between and inside writes
        time.sleep(0.15)
        real(path, data)
    probes.activations.store.atomic_write_bytes = slow
    model = load_model(sys.argv[1])
    capture(model, list(read_sessions(sys.argv[2])), sys.argv[3], positions="last:*+mark:ssn", progress=False)
""")


def test_sigkill_mid_capture_resumes_to_the_same_store(llava, tiny_dir, tmp_path):
    sessions = make_sessions(tmp_path, 12)
    jsonl = write_sessions(sessions, tmp_path / "s.jsonl")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_dir("llava")), str(jsonl), str(out)], env=env)
    deadline = time.time() + 300  # a bound on a hung child, not a speed check
    while len(list((out / "shards").glob("*.parquet"))) < 3:
        time.sleep(0.05)
        assert proc.poll() is None, "capture finished or failed before it could be killed"
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the capture subprocess wrote fewer than 3 sessions in 300 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ActivationStore(out)
    assert 3 <= len(partial.finished_ids()) < 12
    resumed = capture(llava, sessions, out, positions="last:*+mark:ssn", progress=False)
    clean = capture(llava, sessions, tmp_path / "clean", positions="last:*+mark:ssn", progress=False)
    assert resumed.finished_ids() == {s.session_id for s in sessions}
    compare_stores(resumed, clean)


# ---- issue 21: stores tied to their weights, one writer, no PII ----------------------------------------------------
def test_resuming_with_other_weights_is_refused_and_force_new_starts_over(tiny_dir, tmp_path):
    """Weights rewritten in place (one bit) are another model: the resume is refused naming both fingerprints and
    the file; force_new clears the store's files only (a user's note stays) and records the new fingerprint."""
    import json
    import shutil

    from probes import load_model
    from probes.models.loading import fingerprint_digest

    path = shutil.copytree(tiny_dir("llava"), tmp_path / "m")
    sessions = make_sessions(tmp_path, 3)
    before = load_model(path)
    out = tmp_path / "st"
    capture(before, sessions[:2], out, positions="last:*", progress=False)
    (out / "notes.txt").write_text("mine")
    old = json.loads((out / "store.json").read_text())["fingerprint"]
    assert old == fingerprint_digest(before.fingerprint)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    after = load_model(path)
    new = fingerprint_digest(after.fingerprint)
    assert new != old
    with pytest.raises(StoreError, match=rf"other weights \(store fingerprint {old}, this model {new}; files that "
                                         r"differ: model.safetensors\).*force_new=True"):
        capture(after, sessions, out, positions="last:*", progress=False)
    assert ActivationStore(out).finished_ids() == {"s00", "s01"}  # the refused run changed nothing
    store = capture(after, sessions[2:], out, positions="last:*", progress=False, force_new=True)
    assert store.finished_ids() == {"s02"} and store.spec["fingerprint"] == new
    assert (out / "notes.txt").read_text() == "mine"


def test_a_store_without_fingerprint_is_refused_for_resume_but_reads(llava, tmp_path):
    import json

    sessions = make_sessions(tmp_path, 2)
    out = tmp_path / "st"
    capture(llava, sessions[:1], out, positions="last:*", progress=False)
    spec = json.loads((out / "store.json").read_text())
    old = {k: v for k, v in spec.items() if k not in ("fingerprint", "fingerprint_files", "backend", "model_dtype")}
    (out / "store.json").write_text(json.dumps(old))
    assert ActivationStore(out).finished_ids() == {"s00"}  # reading an older store still works
    with pytest.raises(StoreError, match="written by an older version that recorded no model fingerprint"):
        capture(llava, sessions, out, positions="last:*", progress=False)
    assert capture(llava, sessions, out, positions="last:*", progress=False, force_new=True).finished_ids() == \
        {"s00", "s01"}


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(llava, tmp_path, caplog):
    import logging

    from probes.activations.lock import LOCK_FILE

    sessions = make_sessions(tmp_path, 1)
    out = tmp_path / "st"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from probes.activations.lock import StoreLock
        with StoreLock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"another capture \(process {holder.pid}\) is writing into this store"):
            capture(llava, sessions, out, positions="last:*", progress=False)
        assert not (out / "store.json").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # killed: the kernel dropped its lock, its pid is left in the lock file
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)
    with caplog.at_level(logging.WARNING, logger="probes.activations.store"):
        store = capture(llava, sessions, out, positions="last:*", progress=False)
    assert store.finished_ids() == {"s00"} and not (out / LOCK_FILE).exists()
    assert f"took over the lock left by process {holder.pid} (no longer running)" in caplog.text


def pii_sessions(tmp_path, n):
    """Sessions as sessions_build makes them: PII only in private labels (and the document image)."""
    from probes.data.identities import make_identities

    img = tmp_path / "doc.png"
    document_image().save(img)
    out = []
    for i, ident in enumerate(make_identities(n)):
        turns = [Turn("user", "Here is my form.", images=[SessionImage.from_path(img)]), Turn("assistant", "Ok."),
                 Turn("user", "What is the SSN on the form?")]
        out.append(Session(f"p{i}", turns, labels={"identity_id": ident.identity_id, "pii_type": "SSN",
                                                  "_target": ident.value("SSN"), "_identity": ident.to_dict()}))
    return out


def pii_values(sessions):
    return {v for s in sessions for k, v in s.labels["_identity"].items() if k not in ("identity_id", "gender")}


def files_holding(folder, values):
    return sorted(str(f.relative_to(folder)) for f in Path(folder).rglob("*")
                  if f.is_file() and any(v.encode() in f.read_bytes() for v in values))


def test_private_labels_never_reach_a_store_file_unless_asked(llava, tmp_path):
    """Null: the values are in the sessions given (the check would find them); no file of the store holds any of
    them; keep_private_labels puts them in private_labels.jsonl only, and store.sessions() gives them back."""
    from probes.activations.folder import PRIVATE_FILE

    sessions = pii_sessions(tmp_path, 3)
    values = pii_values(sessions)
    assert len(values) >= 15 and all(v in json_of(sessions) for v in values)
    out = tmp_path / "st"
    store = capture(llava, sessions, out, positions="last:*", progress=False)
    store.manifest  # the consolidated manifest too
    assert files_holding(out, values) == []
    assert all(not any(k.startswith("_") for k in s.labels) for s in store.sessions())
    # targets for the probes: from the sessions that were captured, checked to be the same ones
    joined = store.sessions(private_from=sessions)
    assert [s.labels["_target"] for s in joined] == [s.labels["_target"] for s in sessions]
    path = write_sessions(sessions, tmp_path / "s.jsonl")
    assert store.session("p1", private_from=path).labels["_identity"] == sessions[1].labels["_identity"]
    other = pii_sessions(tmp_path, 3)
    other[1].labels["pii_type"] = "Email"
    with pytest.raises(StoreError, match="session 'p1' differs from the one of that id in the sessions given"):
        store.sessions(private_from=other)
    with pytest.raises(StoreError, match=r"1 stored session\(s\) are not in the sessions given \(first: 'p2'\)"):
        store.sessions(private_from=sessions[:2])
    kept = capture(llava, sessions, tmp_path / "kept", positions="last:*", progress=False, keep_private_labels=True)
    assert files_holding(tmp_path / "kept", values) == [PRIVATE_FILE]
    assert [s.labels["_target"] for s in kept.sessions()] == [s.labels["_target"] for s in sessions]


def json_of(sessions):
    import json

    return json.dumps([s.to_json() for s in sessions])


def test_resume_says_how_many_sessions_were_done(llava, tmp_path, caplog):
    import logging

    sessions = make_sessions(tmp_path, 3)
    capture(llava, sessions[:2], tmp_path / "st", positions="last:*", progress=False)
    with caplog.at_level(logging.INFO, logger="probes.activations.capture"):
        capture(llava, sessions, tmp_path / "st", positions="last:*", progress=False)
    assert "resuming: 2 of 3 sessions already done" in caplog.text
