"""Family adapters, one module each (`probes.families.<family>` defines `Adapter` and `build_tiny`).

The table below is the registry: which HF architectures each family adapter serves. Modules are imported only
when a family is used, so an error message can list every family without importing them all.
"""

from __future__ import annotations

import importlib

from probes.families.base import FamilyAdapter, ImageExpansion, RenderError

FAMILIES: dict[str, tuple[str, ...]] = {
    "llava": ("LlavaForConditionalGeneration",),
    "llava_next": ("LlavaNextForConditionalGeneration",),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration",),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration",),
    "idefics3": ("Idefics3ForConditionalGeneration",),
    "gemma3": ("Gemma3ForConditionalGeneration",),
    "text": ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM"),
}


class UnsupportedModelError(ValueError):
    pass


def get_family(name: str) -> type[FamilyAdapter]:
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown family {name!r}; supported families: {', '.join(FAMILIES)}")
    return importlib.import_module(f"probes.families.{name}").Adapter


def family_for_architecture(architecture: str | None, where: str = "model") -> type[FamilyAdapter]:
    for name, archs in FAMILIES.items():
        if architecture in archs:
            return get_family(name)
    listing = "; ".join(f"{f} ({', '.join(a)})" for f, a in FAMILIES.items())
    raise UnsupportedModelError(f"{where}: architecture {architecture!r} is not supported. Supported families: {listing}")


__all__ = [
    "FAMILIES", "FamilyAdapter", "ImageExpansion", "RenderError", "UnsupportedModelError",
    "family_for_architecture", "get_family",
]
