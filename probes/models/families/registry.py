"""The family registry: which HF architectures each family adapter serves, and the adapter class for a name or an
architecture. Adapter modules are imported only when a family is used, so an error can list every family without
importing them all."""

from __future__ import annotations

import importlib

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


def get_family(name: str) -> type:
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown family {name!r}; supported families: {', '.join(FAMILIES)}")
    return importlib.import_module(f"probes.models.families.{name}").Adapter


def family_for_architecture(architecture: str | None, where: str = "model") -> type:
    for name, archs in FAMILIES.items():
        if architecture in archs:
            return get_family(name)
    listing = "; ".join(f"{f} ({', '.join(a)})" for f, a in FAMILIES.items())
    raise UnsupportedModelError(f"{where}: architecture {architecture!r} is not supported. "
                                f"Supported families: {listing}")
