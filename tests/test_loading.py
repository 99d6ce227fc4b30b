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
