"""Processors without a video processor, for machines without torchvision.

Qwen2.5-VL's and LLaVA-OneVision's HF processors insist on a video processor, and in transformers 5 every video
processor needs torchvision, which has no CPU build on these machines. Images need none of it (transformers falls
back to its PIL image processors), so we build the family's own processor class with `video_processor=None`: the
same class name, the same call, the same expansions; only videos are unsupported. `load_processor` tries the normal
AutoProcessor first and falls back to this only when the video part cannot be built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class _WithoutVideo:
    """Mixin: accept video_processor=None (skip the class check that needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument is None and "video" in argument_name:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("video_processor", None)
        return out


def without_video(processor_cls: type) -> type:
    """`processor_cls` (same name) that takes video_processor=None."""
    return type(processor_cls.__name__, (_WithoutVideo, processor_cls), {"__module__": processor_cls.__module__})


def build_without_video(processor_cls: type, image_processor: Any, tokenizer: Any, chat_template: str,
                        **kwargs: Any) -> Any:
    return without_video(processor_cls)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                        chat_template=chat_template, **kwargs)


def save_without_video(processor: Any, path: str | os.PathLike) -> None:
    """Save tokenizer, image processor, chat template and processor config as a real checkpoint has them."""
    path = Path(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)
    cfg = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor", "tokenizer", "chat_template")}
    cfg["processor_class"] = type(processor).__name__
    (path / "processor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _checkpoint_file(source: str, filename: str, kw: dict[str, Any]) -> Path | None:
    """`filename` of a checkpoint folder, or of an HF id (from the local cache when offline); None if it has none."""
    from transformers.utils import cached_file

    if Path(source).is_dir():
        path = Path(source) / filename
        return path if path.exists() else None
    found = cached_file(source, filename, local_files_only=kw.get("local_files_only", False),
                        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def load_processor(source: str, **kw: Any) -> Any:
    """AutoProcessor, or the family's processor without its video part when torchvision is missing."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(source, **kw)
    except (ImportError, AttributeError) as err:
        if "torchvision" not in str(err).lower() and "VIDEO_PROCESSOR" not in str(err):
            raise
    cfg_file = _checkpoint_file(source, "processor_config.json", kw)
    cfg = json.loads(cfg_file.read_text()) if cfg_file else {}
    name = cfg.pop("processor_class", None) or AutoImageProcessor.from_pretrained(source, **kw).to_dict().get(
        "processor_class")
    processor_cls = getattr(transformers, name)
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    # A checkpoint keeps its template as chat_template.jinja (newer) or chat_template.json (llava-hf snapshots).
    jinja, as_json = (_checkpoint_file(source, f, kw) for f in ("chat_template.jinja", "chat_template.json"))
    template = (jinja.read_text() if jinja else json.loads(as_json.read_text())["chat_template"] if as_json
                else tokenizer.chat_template)
    allowed = set(__import__("inspect").signature(processor_cls.__init__).parameters)
    extra = {k: v for k, v in cfg.items() if k in allowed}
    return build_without_video(processor_cls, AutoImageProcessor.from_pretrained(source, **kw), tokenizer, template,
                               **extra)
