"""Issue 20: one capture split over workers into one store equals a single-process capture, byte for byte; the
store's format is compact (one manifest row per position, the model's dtype) and an old store is refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from probes import ActivationStore, StoreError, capture, write_sessions
from probes.activations.lock import StoreLock
from probes.activations.shards import merge_stores, parse_shard, shard_batches, verify_store
from tests.test_store import make_sessions

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(positions="last:*+image:0", progress=False, batch_size=2)


def tensors(store: ActivationStore) -> dict[str, dict[str, bytes]]:
    """Every shard's tensors as raw bytes, by session file name."""
    out = {}
    for f in sorted(store.shards.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out[f.stem] = {k: fh.get_tensor(k).view(torch.uint8).numpy().tobytes() for k in fh.keys()}
    return out


def test_the_split_is_deterministic_by_whole_batches():
    items = list(range(11))
    parts = [shard_batches(items, 2, (i, 3)) for i in range(3)]
    assert parts[0] == [[0, 1], [6, 7]] and parts[1] == [[2, 3], [8, 9]] and parts[2] == [[4, 5], [10]]
    assert sorted(x for p in parts for b in p for x in b) == items  # each once
    assert parse_shard("1/4") == (1, 4) and parse_shard((0, 1)) == (0, 1)
    for bad in ("4/4", "1", "-1/2", "a/b", (2, 0)):
        with pytest.raises(StoreError, match="expected"):
            parse_shard(bad)


def test_shards_into_one_store_equal_one_process_byte_for_byte(llava, tmp_path):
    sessions = make_sessions(tmp_path, 7)
    single = capture(llava, sessions, tmp_path / "single", **SETTINGS)
    for i in (2, 0, 3, 1):  # any order
        capture(llava, sessions, tmp_path / "sharded", shard=(i, 4), **SETTINGS)
    sharded = ActivationStore(tmp_path / "sharded")
    assert tensors(sharded) == tensors(single) and len(tensors(single)) == 7
    check = verify_store(sharded.path, sessions)
    assert check.ok and check.sessions == 7, check.report()
    a, meta_a = single.query(layers=[1])
    b, meta_b = sharded.query(layers=[1])
    order = meta_b.set_index(["session_id", "row"]).index.get_indexer(meta_a.set_index(["session_id", "row"]).index)
    assert torch.equal(a, b[torch.as_tensor(order)])


def test_verify_names_what_is_missing_unexpected_or_broken(llava, tmp_path):
    sessions = make_sessions(tmp_path, 4)
    store = capture(llava, sessions[:3], tmp_path / "st", **SETTINGS)
    check = verify_store(store.path, [s.session_id for s in sessions[1:]])
    assert not check.ok and check.missing == ["s03"] and check.unexpected == ["s00"]
    assert verify_store(store.path, sessions[:3]).ok  # null: the same store against what was captured
    # a shard whose tensor lost rows (a copy cut short): caught against its manifest rows
    with safe_open(str(store.shards / "s01.safetensors"), framework="pt") as fh:
        meta, t = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    from safetensors.torch import save_file

    save_file({k: v[:-1] for k, v in t.items()}, str(store.shards / "s01.safetensors"), metadata=meta)
    check = verify_store(store.path, sessions[:3])
    assert not check.ok and check.broken and check.broken[0].startswith("s01: hook_resid_post: tensor")


def test_locks_let_shard_workers_share_a_store_but_not_a_shard(tmp_path):
    out = tmp_path / "st"
    out.mkdir()
    with StoreLock(out, shard=(0, 2)), StoreLock(out, shard=(1, 2)):  # two workers at once
        with pytest.raises(StoreError, match=r"shard 0/2 is already being captured"):
            StoreLock(out, shard=(0, 2)).__enter__()
        with pytest.raises(StoreError, match="a capture split into 2 shards .* a split into 3 would capture"):
            StoreLock(out, shard=(0, 3)).__enter__()
        with pytest.raises(StoreError, match="another capture .* is writing into this store"):
            StoreLock(out).__enter__()
    with StoreLock(out):
        with pytest.raises(StoreError, match="a capture that is not sharded"):
            StoreLock(out, shard=(0, 2)).__enter__()


def test_concurrent_worker_processes_write_one_store(llava, tiny_dir, tmp_path):
    """Four processes at once (submitit's local executor, as on SLURM), then verify: every session once, the
    tensors equal to one process's."""
    from analysis.cluster import capture_array

    sessions = make_sessions(tmp_path, 6)
    path = write_sessions(sessions, tmp_path / "s.jsonl")
    single = capture(llava, sessions, tmp_path / "single", **SETTINGS)
    settings = {k: v for k, v in SETTINGS.items() if k != "progress"}
    check = capture_array(tiny_dir("llava"), path, tmp_path / "sharded", 4, settings, executor_kind="local")
    assert check.ok and check.sessions == 6, check.report()
    assert tensors(ActivationStore(tmp_path / "sharded")) == tensors(single)


def test_merge_joins_stores_captured_apart_and_refuses_a_session_held_differently(llava, tmp_path):
    sessions = make_sessions(tmp_path, 5)
    single = capture(llava, sessions, tmp_path / "single", **SETTINGS)
    for i in range(2):
        capture(llava, sessions, tmp_path / f"part{i}", shard=(i, 2), **SETTINGS)
    check = merge_stores(tmp_path / "merged", [tmp_path / "part0", tmp_path / "part1", tmp_path / "part0"])
    assert check.ok and check.sessions == 5, check.report()
    assert tensors(ActivationStore(tmp_path / "merged")) == tensors(single)
    other = make_sessions(tmp_path, 5)
    other[0].turns[2].text = "Phone?"  # s00 captured from another text: same id, other tensors
    capture(llava, other[:1], tmp_path / "other", **SETTINGS)
    with pytest.raises(StoreError, match="'s00' is in .* with different contents"):
        merge_stores(tmp_path / "merged", [tmp_path / "other"])


def test_manifest_has_one_row_per_position_and_old_stores_are_refused(llava, tmp_path):
    sessions = make_sessions(tmp_path, 2)
    store = capture(llava, sessions, tmp_path / "st", hooks="resid_post,attn_out", **SETTINGS)
    x, meta = store.query("hook_attn_out")
    assert len(store.manifest) == len(meta) == x.shape[0]  # positions, not positions x layers x kinds
    assert x.shape[1] == llava.hf_model.config.text_config.num_hidden_layers
    assert not {"layer", "hook", "slot"} & set(store.manifest.columns)
    spec = json.loads((store.path / "store.json").read_text())
    (store.path / "store.json").write_text(json.dumps({**spec, "format": 1}))
    with pytest.raises(StoreError, match="a store in format 1 .* reads format 2 only"):
        ActivationStore(store.path)
    with pytest.raises(StoreError, match="a store in format 1"):
        capture(llava, sessions, store.path, **SETTINGS)
    capture(llava, sessions, store.path, force_new=True, **SETTINGS)  # the way out the message names
    assert ActivationStore(store.path).spec["format"] == 2


def test_a_bf16_model_is_stored_in_bf16_unless_told(tiny_dir, tmp_path):
    from probes import load_model

    sessions = make_sessions(tmp_path, 1)
    bf16 = load_model(tiny_dir("llava"), dtype="bfloat16")
    store = capture(bf16, sessions, tmp_path / "bf16", **SETTINGS)
    assert store.query()[0].dtype == torch.bfloat16
    wide = capture(bf16, sessions, tmp_path / "f32", dtype="float32", **SETTINGS)
    assert wide.query()[0].dtype == torch.float32
    assert torch.equal(wide.query()[0].to(torch.bfloat16), store.query()[0])  # the same values, half the bytes


def test_a_query_of_some_sessions_and_layers_equals_that_part_of_the_whole(llava, tmp_path):
    sessions = make_sessions(tmp_path, 3)
    store = capture(llava, sessions, tmp_path / "st", **SETTINGS)
    whole, meta = store.query()
    part, pmeta = store.query(layers=[1, 0], session_id=["s02", "s00"], turn=0)
    keys = meta.set_index(["session_id", "row"]).index
    idx = torch.as_tensor(keys.get_indexer(pmeta.set_index(["session_id", "row"]).index))
    assert set(pmeta["session_id"]) == {"s00", "s02"} and (pmeta["turn"] == 0).all() and len(pmeta) > 0
    assert torch.equal(part, whole[idx][:, [1, 0]])


def test_the_cli_captures_a_shard_and_verifies(tiny_dir, tmp_path, capsys):
    from analysis.cli import main

    sessions = make_sessions(tmp_path, 3)
    path = str(write_sessions(sessions, tmp_path / "s.jsonl"))
    common = ["capture", "--model", str(tiny_dir("llava")), "--sessions", path, "--out", str(tmp_path / "st"),
              "--positions", "last:*", "--no-progress", "--batch-size", "1"]
    assert main(common + ["--shard", "0/2"]) == 0
    capsys.readouterr()
    assert main(["store", "verify", str(tmp_path / "st"), "--sessions", path]) == 1
    assert "missing: 1" in capsys.readouterr().out  # shard 1 (session 1 of batches of one) not run yet
    assert main(common + ["--shard", "1/2"]) == 0
    capsys.readouterr()
    assert main(["store", "verify", str(tmp_path / "st"), "--sessions", path]) == 0
    assert "sessions finished: 3" in capsys.readouterr().out
    assert main(common + ["--shard", "2/2"]) == 2
    assert "expected 0 <= i < n" in capsys.readouterr().err


def test_a_label_only_some_sessions_carry_can_be_queried(llava, tmp_path):
    sessions = make_sessions(tmp_path, 3)
    sessions[1].labels["reshow"] = "yes"  # only the middle session's manifest file has this column
    store = capture(llava, sessions, tmp_path / "st", **SETTINGS)
    _, meta = store.query(reshow="yes")
    assert set(meta["session_id"]) == {"s01"} and len(meta) > 0
