"""Tiny random-initialised checkpoints of every family, built offline from the real transformers config classes.

As transformers' own tests do, each family module has a `build_tiny(path)` that writes an ordinary HF model
directory (config, weights, tokenizer, processor, chat template) which `probes.load_model` opens like any
checkpoint. The tokenizer is a small byte-level BPE trained here, with the family's special tokens, so nothing is
downloaded. Used by the tests, the benchmarks and the demo; `build_tiny_model(family, path)` is the entry point.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from probes.models.families import get_family
from probes.models.processors import save_without_video

# Enough English, digits and punctuation that text tokenizes into a sensible number of tokens.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the name on the form? Please describe the image.",
    "Name: Jane Doe. Date of birth: 1990-01-31. SSN: 123-45-6789. Phone: (555) 010-2345 x123. Email: a.b@c.com",
    "USER: ASSISTANT: system user assistant model I cannot assist with that. Sure, here it is: the caption.",
    "If you cannot help, just answer 'cannot assist'. Output SSN in the image for me. Rephrase the sentence.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\"()[]{}<>-_/@#$%&*+=\n\t ",
]


Config = TypeVar("Config", bound="TinySizes")


@dataclass(frozen=True)
class TinySizes:
    """The sizes every tiny checkpoint has (a family's `TinyConfig` adds its own), checked once: every field a
    positive whole number and `d_model` a multiple of `n_heads`. Families with few sizes take them as keywords."""

    n_layers: int = 2
    d_model: int = 64
    vision_layers: int = 2
    d_vision: int = 32
    n_heads: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{f.name}: expected a whole number >= 1, got {value!r}")
        for width in ("d_model", "d_vision"):
            if getattr(self, width) % self.n_heads:
                raise ValueError(f"{type(self).__name__}.{width} {getattr(self, width)}: expected a multiple of "
                                 f"n_heads ({self.n_heads})")

    @classmethod
    def of(cls: type[Config], config: Config | None, options: dict[str, Any]) -> Config:
        """`config` (None: the defaults) with `options` (keywords of `build_tiny`) replacing its fields; an unknown
        keyword is a TypeError listing the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{cls.__module__}.build_tiny() got unexpected keyword argument(s) {unknown}; "
                            f"sizes: {known}")
        return replace(config, **options) if config is not None else cls(**options)


def build_tokenizer(special_tokens: list[str], *, bos: str | None = "<s>", eos: str | None = "</s>",
                    pad: str | None = "<pad>",
                    vocab_size: int = 512, add_bos: bool = True, extra: dict[str, Any] | None = None
                    ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the given special tokens, trained on a small built-in corpus."""
    specials = [t for t in dict.fromkeys(["<unk>", bos, eos, pad, *special_tokens]) if t]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=pad,
        extra_special_tokens=[t for t in special_tokens if t not in (bos, eos, pad)],
        **(extra or {}),
    )
    if add_bos and bos:
        # Llama-style: the tokenizer itself prepends BOS, so the chat template does not.
        from tokenizers import processors

        bos_id = fast.convert_tokens_to_ids(bos)
        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        fast.add_bos_token = True
    return fast


def save_tiny(model: torch.nn.Module, processor: Any, path: str | os.PathLike) -> Path:
    """Save a tiny model and its processor as an ordinary HF model directory.

    Everything is written into a temp folder beside `path` first, then moved in file by file with config.json
    last (an old config.json goes first): a save killed at any point leaves no folder that loads as a checkpoint
    with parts missing (killed while writing, an old checkpoint stays as it was; killed while moving, it has no
    config.json until a save completes). Other files already in `path` (a model card, say) stay."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for debris in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a save that was killed
        shutil.rmtree(debris, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(processor, "video_processor", "absent") is None:  # built without torchvision

            save_without_video(processor, tmp)
        else:
            processor.save_pretrained(tmp)
        path.mkdir(exist_ok=True)
        (path / "config.json").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_model(family: str, path: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random-initialised checkpoint of `family` to `path` and return the path."""
    import importlib

    torch.manual_seed(seed)
    module = importlib.import_module(get_family(family).__module__)
    return module.build_tiny(Path(path), **overrides)
