"""mm-retention probes: everything that touches a model.

    import probes
    loaded = probes.load_model("llava-hf/llava-1.5-7b-hf")          # or a local directory
    session = probes.Session("s0", [probes.Turn("user", "What is the SSN?", images=[img]).mark("q", "SSN")])
    rendered = probes.render(loaded.adapter, session)               # input ids, pixels, token map
    store = probes.capture(loaded, [session], "store/", hooks="resid_post", positions="last:*+mark:q")
    x, meta = store.query(turn=0, last_of_turn=True)                # [n, layer, d_model] + a DataFrame

The subpackages follow the data path: `data` (identities, documents, sessions; no torch) < `models` (families,
loading, rendering, hooks) < `activations` (capture, store) and `leakage` < `probing` and `patching` < `organism`.
A name below is imported from its module on first use (PEP 562), so `import probes` stays cheap and
`import probes.data` never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module that defines it
    "Document": "probes.data.documents", "patches_for_field": "probes.data.documents",
    "render_document": "probes.data.documents", "render_pair": "probes.data.documents",
    "Identity": "probes.data.identities", "make_identities": "probes.data.identities",
    "split_identities": "probes.data.identities",
    "Mark": "probes.data.session", "Session": "probes.data.session", "SessionError": "probes.data.session",
    "SessionImage": "probes.data.session", "Turn": "probes.data.session", "read_sessions": "probes.data.session",
    "write_sessions": "probes.data.session",
    "FAMILIES": "probes.models.families", "RenderError": "probes.models.families",
    "UnsupportedModelError": "probes.models.families",
    "LoadedModel": "probes.models.loading", "ModelLoadError": "probes.models.loading",
    "load_model": "probes.models.loading",
    "RenderedSession": "probes.models.render", "render": "probes.models.render",
    "SelectorError": "probes.models.tokenmap", "TokenMap": "probes.models.tokenmap",
    "build_tiny_model": "probes.models.tiny",
    "capture": "probes.activations.capture", "capture_session": "probes.activations.capture",
    "resolve_hooks": "probes.activations.capture",
    "ActivationStore": "probes.activations.store", "StoreError": "probes.activations.errors",
    "merge_stores": "probes.activations.shards", "verify_store": "probes.activations.shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
