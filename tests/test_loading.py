"""Loading offline: a local directory never touches the network, whatever HF_HUB_OFFLINE says."""

import socket

import pytest
import torch

from probes import ModelLoadError, load_model
from probes.models.loading import LoadOptions


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

    from probes.models.tiny import build_tiny_model

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


# ---- issue 21: wrong weights, corrupt files and bad configs are named errors ------------------------------------
def _copy(tiny_dir, tmp_path, name="m"):
    import shutil

    return shutil.copytree(tiny_dir("llava"), tmp_path / name)


def test_weights_that_do_not_match_the_architecture_are_refused_unless_allowed(tiny_dir, tmp_path, caplog):
    """Null: the untouched copy loads with no warning; renamed keys (missing + unexpected) and a tensor of another
    shape are refused with their counts, and allow_partial loads them with a warning."""
    import logging

    import torch
    from safetensors.torch import load_file, save_file

    good = _copy(tiny_dir, tmp_path, "good")
    with caplog.at_level(logging.WARNING, logger="probes.models.loading"):
        load_model(good)
    assert not caplog.records
    bad = _copy(tiny_dir, tmp_path, "bad")
    weights = load_file(str(bad / "model.safetensors"))
    renamed = sorted(weights)[:3]
    shaped = next(k for k in sorted(weights) if k.endswith("q_proj.weight"))
    weights = {("other." + k if k in renamed else k): v for k, v in weights.items()}
    weights[shaped] = torch.zeros(3, 3)
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"bad \(model.safetensors\): weights do not match "
                                             r"LlavaForConditionalGeneration: 3 missing, 3 unexpected, 1 of another"):
        load_model(bad)
    with caplog.at_level(logging.WARNING, logger="probes.models.loading"):
        loaded = load_model(bad, allow_partial=True)
    assert loaded.family == "llava" and "loaded anyway (allow_partial)" in caplog.text


def test_corrupt_weights_bad_configs_and_pickles_are_named(tiny_dir, tmp_path):
    import json
    import pickle

    m = _copy(tiny_dir, tmp_path)
    weights = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(m)
    (m / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(ModelLoadError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(m)
    (m / "model.safetensors").write_bytes(weights)
    config = json.loads((m / "config.json").read_text())
    for text, expected in [("[1, 2]", "expected a JSON object of model settings, got list"),
                           (json.dumps({**config, "architectures": "LlavaForConditionalGeneration"}),
                            "field 'architectures' must be a list of class names"),
                           (json.dumps({**config, "text_config": {**config["text_config"], "num_hidden_layers": "2"}}),
                            "field 'text_config.num_hidden_layers' must be a non-negative integer, got '2'")]:
        (m / "config.json").write_text(text)
        with pytest.raises(ModelLoadError, match="config.json: " + expected):
            load_model(m)
    (m / "config.json").write_text(json.dumps(config))
    # a pickle that would write a file when unpickled: torch refuses it, and nothing ran
    marker = tmp_path / "ran"
    (m / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (m / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ModelLoadError,
                       match=r"torch refused to unpickle pytorch_model.bin .*expected model.safetensors"):
        load_model(m)
    assert not marker.exists()


def test_default_is_the_embedded_model_and_inspect_reads_no_weights(tiny_dir, monkeypatch):
    """inspect_model gives the loaded model's layer count and hook names without reading a weight (a loader that
    fails proves it)."""
    import transformers

    from probes.models.loading import inspect_model, resolve_model
    from probes.organism import DEFAULT_MODEL

    assert resolve_model("default") == str(DEFAULT_MODEL)
    loaded = load_model(tiny_dir("llava"))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    info = inspect_model(tiny_dir("llava"))
    assert (info.n_layers, info.family) == (loaded.n_layers, "llava")
    assert info.hook_names() == loaded.hook_names()
    assert info.max_positions == loaded.text_config.max_position_embeddings
    default = inspect_model("default")
    assert default.source == str(DEFAULT_MODEL) and default.n_layers == 4
    with pytest.raises(ModelLoadError, match="model path /nowhere is not a directory"):
        inspect_model("/nowhere")


def test_load_options_are_checked_before_any_file_is_read(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TypeError, match="devcie"):
        load_model(missing, devcie="cpu")
    with pytest.raises(ModelLoadError, match="dtype 'float31'"):
        load_model(missing, dtype="float31")
    with pytest.raises(ModelLoadError, match="backend 'tl'"):
        load_model(missing, LoadOptions(), backend="tl")
    assert LoadOptions(dtype="bfloat16").dtype is torch.bfloat16


def test_load_options_object_loads_as_its_keywords(tiny_dir):
    loaded = load_model(tiny_dir("llava"), LoadOptions(dtype="float64"), device="cpu")
    assert loaded.dtype == torch.float64 and loaded.device.type == "cpu"
