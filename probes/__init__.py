"""mm-retention probes: everything that touches a model.

    import probes
    loaded = probes.load_model("llava-hf/llava-1.5-7b-hf")          # or a local directory
    session = probes.Session("s0", [probes.Turn("user", "What is the SSN?", images=[img]).mark("q", "SSN")])
    rendered = probes.render(loaded.adapter, session)               # input ids, pixels, token map
    store = probes.capture(loaded, [session], "store/", hooks="resid_post", positions="last:*+mark:q")
    x, meta = store.query(turn=0, last_of_turn=True)                # [n, layer, d_model] + a DataFrame
"""

from probes.capture import capture, capture_session, resolve_hooks
from probes.documents import Document, patches_for_field, render_document, render_pair
from probes.identities import Identity, make_identities, split_identities
from probes.families import FAMILIES, RenderError, UnsupportedModelError
from probes.loading import LoadedModel, ModelLoadError, load_model
from probes.render import RenderedSession, render
from probes.session import Mark, Session, SessionError, SessionImage, Turn, read_sessions, write_sessions
from probes.store import ActivationStore, StoreError
from probes.tiny import build_tiny_model
from probes.tokenmap import SelectorError, TokenMap

__all__ = [
    "Document", "Identity", "make_identities", "patches_for_field", "render_document", "render_pair",
    "split_identities",
    "FAMILIES", "ActivationStore", "LoadedModel", "Mark", "ModelLoadError", "RenderError", "RenderedSession",
    "SelectorError", "Session", "SessionError", "SessionImage", "StoreError", "TokenMap", "Turn",
    "UnsupportedModelError", "build_tiny_model", "capture", "capture_session", "load_model", "read_sessions",
    "render", "resolve_hooks", "write_sessions",
]
