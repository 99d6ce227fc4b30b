"""Shared fixtures: tiny random-initialised checkpoints built offline, once per test session."""

import os

# Without this, transformer-lens/transformers boot waits on network timeouts (no hub is reachable here).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> path of a tiny checkpoint of that family (built on first use)."""
    from probes.models.tiny import build_tiny_model

    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def family_model(tiny_dir):
    """family_model(family) -> the loaded tiny model of that family (loaded once per test session)."""
    from probes import load_model

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(tiny_dir(family))
        return cache[family]

    return get


@pytest.fixture
def one_thread():
    """One torch thread for small fits and tiny forwards: on a shared machine two contending threads stall at every
    barrier (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llava(tiny_dir):
    from probes import load_model

    return load_model(tiny_dir("llava"))


def document_image(width: int = 80, height: int = 64, text: str = "SSN 123") -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((4, 4), text, fill="black")
    return img


@pytest.fixture
def doc_image_path(tmp_path):
    path = tmp_path / "doc.png"
    document_image().save(path)
    return path
