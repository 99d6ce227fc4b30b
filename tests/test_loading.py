"""Loading offline: a local directory never touches the network, whatever HF_HUB_OFFLINE says."""

import socket

import pytest

from probes import ModelLoadError, load_model


def test_local_directory_loads_without_network(tiny_dir, monkeypatch):
    path = tiny_dir("llava")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = load_model(path, device="cpu")
    assert loaded.family == "llava" and loaded.n_layers == 2 and loaded.device.type == "cpu"
    assert "blocks.1.hook_resid_post" in loaded.hook_names()


def test_bad_model_folders_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config.json: not valid JSON"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="backend 'jax'"):
        load_model(tmp_path, backend="jax")


def test_a_killed_checkpoint_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    """save_tiny writes beside the folder and moves the files in, config.json last: a save that dies while writing
    leaves no new folder, an old checkpoint as it was, and no temp folders; rewriting a checkpoint keeps the files
    it does not write (a model card)."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from probes.tiny import build_tiny_model

    path = build_tiny_model("llava", tmp_path / "m")
    (path / "README.md").write_text("card")
    build_tiny_model("llava", path, seed=1)
    assert (path / "README.md").read_text() == "card"
    weights = load_file(str(path / "model.safetensors"))

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", dies)
    for target in (path, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            build_tiny_model("llava", target, seed=2)
    after = load_file(str(path / "model.safetensors"))
    assert all((after[k] == weights[k]).all() for k in weights)  # the old checkpoint, untouched
    assert load_model(path).family == "llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    monkeypatch.undo()
    (tmp_path / ".m.killed.tmp").mkdir()  # what a SIGKILL mid-save leaves (no finally runs)
    build_tiny_model("llava", path, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_run_key_changes_with_weights_retrained_in_place(tiny_dir, tmp_path):
    """Resumable parts are keyed by run_key: weights rewritten in place (same name, same size) are another model."""
    import shutil

    path = shutil.copytree(tiny_dir("llava"), tmp_path / "m")
    loaded = load_model(path)
    before = loaded.run_key
    assert before["model"] == str(path) and before["dtype"] == "torch.float32" and before["files"]
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert loaded.run_key != before and loaded.run_key["files"] != before["files"]
