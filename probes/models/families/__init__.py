"""Family adapters, one module each (`probes.models.families.<family>` defines `Adapter` and `build_tiny`).

The table below is the registry: which HF architectures each family adapter serves. Modules are imported only
when a family is used, so an error message can list every family without importing them all.
"""

from __future__ import annotations

from probes.models.families.base import FamilyAdapter, ImageExpansion, RenderError
from probes.models.families.registry import FAMILIES, UnsupportedModelError, family_for_architecture, get_family

__all__ = [
    "FAMILIES", "FamilyAdapter", "ImageExpansion", "RenderError", "UnsupportedModelError",
    "family_for_architecture", "get_family",
]
