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
from probes.session import SessionImage
from tests.conftest import document_image

ROOT = Path(__file__).resolve().parents[1]


def make_sessions(tmp_path, n):
    img = tmp_path / "doc.png"
    document_image().save(img)
    return [Session(f"s{i:02d}", [Turn("user", f"Form {i}: SSN 123-45-{i:04d}.", images=[SessionImage.from_path(img)])
                                  .mark("ssn", f"123-45-{i:04d}"), Turn("assistant", "Ok."), Turn("user", "SSN?")],
                    labels={"identity_id": i}) for i in range(n)]


def compare_stores(a: ActivationStore, b: ActivationStore):
    cols = ["session_id", "kind", "layer", "row"]
    ma = a.manifest.sort_values(cols).reset_index(drop=True)
    mb = b.manifest.sort_values(cols).reset_index(drop=True)
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
    cons = tmp_path / "st" / "manifest.parquet"
    first = cons.stat().st_mtime_ns
    assert len(ActivationStore(tmp_path / "st").manifest) == len(store.manifest)
    assert cons.stat().st_mtime_ns == first  # read, not rebuilt


SCRIPT = textwrap.dedent("""
    import os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    import probes.store
    from probes import load_model, capture, read_sessions
    real = probes.store.atomic_write_bytes
    def slow(path, data):  # widen the window in which the kill lands, between and inside writes
        time.sleep(0.15)
        real(path, data)
    probes.store.atomic_write_bytes = slow
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
