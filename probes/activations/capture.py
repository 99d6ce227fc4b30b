"""Capture hidden states of sessions turn by turn through the KV cache, into an ActivationStore.

A T-turn session costs one pass over its tokens: each turn's tokens are fed once, on top of the KV cache of the
turns before. An assistant turn with `text=None` is written by the model (greedy) when its turn comes; the
session is then re-rendered with that text and capture continues from the first position that changed. Hooks
keep only the selected positions of each chunk, so memory grows with what is kept, not with the sequence.

`mode`: "turns" feeds one chunk per turn (what a chat does); "single" feeds everything available in one pass per
rendering; "auto" (default) is "single", which gives the same numbers, cheaper, since a chunked pass through the
KV cache equals the full pass (the tests check this for every family).

Batches (`capture_batch`, `capture(batch_size=...)`). A forward has a fixed cost whatever its length, paid once
per turn when a session goes turn by turn; B sessions captured together pay it once per turn step instead. At
step t every session feeds its turn-t chunk, right-padded to the longest chunk of the step, so the KV cache holds
pad columns ("holes") between a session's turns. The forward gets a 2-D attention mask over [cache + chunk] that
is 0 at every hole, and explicit position ids that continue each session's own positions across its holes (the
family's M-RoPE ids for Qwen2.5-VL; Gemma 3's image token types laid out the same way), so each row sees exactly
what it would alone. Column 0 is a real token in every row, so no query row is fully masked. Images go in with
the step whose chunk holds their tokens, stacked in row order as the processor batches them. Mode "single"
batches the same way: one padded pass.

Batched, each session's activations equal its one-session capture (within float rounding; tests: every family).
One session at a time instead, inside the same call:
- a session with a turn to generate (assistant `text=None`), which needs its own greedy loop;
- vision and projector hooks (their tensors hold the images of several sessions, with no row to split them by);
- the transformer-lens bridge backend (no attention mask through the bridge);
- sliding-window attention (Gemma 3), turn by turn, when the batch's padded length exceeds the window: the
  window is counted in cache columns, holes included, so it would cut keys a session alone still sees (measured:
  errors of order 1). Within the window a batch is exact (the tiny Gemma 3 has a 32-token window: its sessions go
  one at a time turn by turn; a real 4b-it has 1024); one padded pass ("single") has no holes and always batches.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from probes.activations.folder import check_store_folder, clear_store, compare_spec, write_private_labels
from probes.activations.lock import StoreLock
from probes.activations.shards import parse_shard, shard_batches
from probes.activations.store import ActivationStore, SessionActivations
from probes.data.session import Session, SessionError, Turn, check_images, read_sessions
from probes.models.families.base import RenderError
from probes.models.hooks import PROJECTOR_HOOK, HookNameError, lm_hook, split_hook, vision_hook
from probes.models.loading import LoadedModel, ModelInfo, fingerprint_digest, inspect_model, model_fingerprint
from probes.models.render import RenderedSession, render
from probes.models.tokenmap import COLUMNS, SelectorError, TokenMap

log = logging.getLogger(__name__)

MODES = ("auto", "turns", "single")
HOOK_SHORTHANDS = ("resid_post", "resid_pre", "attn_out", "mlp_out", "vision", "projector")


class CaptureError(ValueError):
    pass


def resolve_hooks(loaded: LoadedModel | ModelInfo, hooks: str | Iterable[str] | None = None,
                  layers: Iterable[int] | None = None) -> list[str]:
    """TL hook names from shorthands ("resid_post", "attn_out", "mlp_out", "resid_pre", "vision", "projector")
    or full names; `layers` restricts the LM layers of shorthands. Default: resid_post of every LM layer.
    `loaded` may be a `ModelInfo` (`probes.models.loading.inspect_model`: no weights loaded)."""
    if hooks is None:
        hooks = ["resid_post"]
    elif isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    hooks = list(hooks)
    if not hooks:
        raise CaptureError(f"no hook given; use one of {HOOK_SHORTHANDS} or a transformer-lens hook name")
    n_layers, n_vision = _layer_counts(loaded)
    try:
        lm_layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    except (TypeError, ValueError):
        raise CaptureError(f"layers {layers!r}: expected integers") from None
    bad = [i for i in lm_layers if not 0 <= i < n_layers]
    if bad:
        raise CaptureError(f"layers {bad} out of range: the model has {n_layers} layers (0 to {n_layers - 1})")
    if not lm_layers:
        raise CaptureError("layers: none given; expected at least one layer index")
    out: list[str] = []
    for h in hooks:
        if h in ("resid_post", "resid_pre", "attn_out", "mlp_out"):
            out += [lm_hook(i, f"hook_{h}") for i in lm_layers]
        elif h == "vision":
            if n_vision is None:
                raise CaptureError(f"{loaded.family}: no vision tower to hook")
            out += [vision_hook(i) for i in range(n_vision)]
        elif h == "projector":
            out.append(PROJECTOR_HOOK)
        elif "." in h:
            out.append(h)
        else:
            raise CaptureError(f"unknown hook {h!r}: use one of {HOOK_SHORTHANDS} or a transformer-lens hook name")
    return list(dict.fromkeys(out))


def _layer_counts(model: LoadedModel | ModelInfo) -> tuple[int, int | None]:
    """(LM layers, vision tower layers or None)."""
    if isinstance(model, ModelInfo):
        return model.n_layers, model.n_vision_layers
    vl = model.adapter.vision_layers(model.hf_model) if model.adapter.is_multimodal else None
    return model.n_layers, None if vl is None else len(vl)


class _Kept:
    """What the hooks kept of one session: per LM hook, (absolute positions, [pos, d]) parts in the order run; per
    vision hook, (image index or -1 when a pass held several images, [patches, d]) parts."""

    def __init__(self, names: list[str]) -> None:
        self.lm: dict[str, list[tuple[np.ndarray, Tensor]]] = {n: [] for n in names if not _is_vision(n)}
        self.vision: dict[str, list[tuple[int, Tensor]]] = {n: [] for n in names if _is_vision(n)}

    def crop(self, p: int) -> None:
        """Forget everything at positions >= p (they will be recomputed)."""
        for name, parts in self.lm.items():
            self.lm[name] = [(pos[pos < p], t[torch.as_tensor(pos < p)]) for pos, t in parts if (pos < p).any()]


@dataclass
class _Chunk:
    """Positions [start, end) of one session, fed in batch row `row` from column 0 of the pass."""

    start: int
    end: int
    keep: np.ndarray  # absolute positions kept in [start, end)
    images: list[int]
    kept: _Kept
    row: int = 0


def _is_vision(name: str) -> bool:
    return name.startswith("vision_")


class _Recorder:
    """Hook functions that keep the selected positions of the chunks being run, one chunk per batch row."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.chunks: list[_Chunk] = []
        self.width = 0  # columns of the pass: the longest chunk (the others are right-padded)
        self.on = True

    def run(self, chunks: list[_Chunk]) -> None:
        self.chunks = chunks
        self.width = max((c.end - c.start for c in chunks), default=0)

    def fn(self, x: Tensor, name: str) -> None:
        if not self.on or not self.chunks:
            return None
        if _is_vision(name):
            if len(self.chunks) != 1:
                raise CaptureError(f"internal: vision hook {name} in a batched pass")
            c = self.chunks[0]
            image = c.images[0] if len(c.images) == 1 else -1
            c.kept.vision[name].append((image, x.detach().reshape(-1, x.shape[-1]).to("cpu", self.dtype, copy=True)))
            return None
        if x.dim() < 3 or x.shape[1] != self.width:
            raise CaptureError(f"hook {name} gives shape {tuple(x.shape)}; capture stores per-position "
                               f"activations shaped [batch, pos ({self.width}), ...]")
        for c in self.chunks:
            if not len(c.keep):
                continue
            lo, hi = int(c.keep[0]) - c.start, int(c.keep[-1]) + 1 - c.start
            if hi - lo == len(c.keep):  # a contiguous run: slice and copy once
                part = x.detach()[c.row, lo:hi].to("cpu", self.dtype, copy=True)
            else:  # fancy indexing already makes the copy
                part = x.detach()[c.row, torch.as_tensor(c.keep - c.start, device=x.device)].to("cpu", self.dtype)
            c.kept.lm[name].append((c.keep, part.reshape(len(c.keep), -1)))  # [pos, heads, d] -> [pos, heads*d]
        return None


@torch.no_grad()
def capture_session(loaded: LoadedModel, session: Session, hooks: list[str], positions: str = "all",
                    mode: str = "auto", max_new_tokens: int = 32, dtype: torch.dtype = torch.float32,
                    rendered: RenderedSession | None = None) -> SessionActivations:
    """Capture `hooks` at `positions` (a TokenMap selector) for one session; see the module docstring.

    `rendered` may carry `render(loaded.adapter, session)` done beforehand (it is reused for the first pass)."""
    if mode not in MODES:
        raise CaptureError(f"mode {mode!r}: expected one of {MODES}")
    if rendered is not None and rendered.session is not session:
        raise CaptureError("`rendered` must be the rendering of `session`")
    session = _copy_turns(session)
    if rendered is not None:
        rendered = copy.copy(rendered)
        rendered.session = session
    rec, kept = _Recorder(dtype), _Kept(hooks)
    state = _PassState(_new_cache(loaded))
    with loaded.hooks([(name, rec.fn) for name in hooks]):
        while True:
            if rendered is None:
                rendered = render(loaded.adapter, session)
            selected, pos = _feed(loaded, rendered, state, (rec, kept), positions, mode)
            t = rendered.generation_turn
            if t is None or t >= len(session.turns) or session.turns[t].text is not None:
                break
            # Greedy generation of turn t, hooks off; then roll the cache back and re-render with the text.
            rec.on = False
            new = _greedy(loaded, state, rendered.input_ids, pos, max_new_tokens)
            _crop_to(state.cache, state.done)
            rec.on = True
            session.turns[t].text = loaded.adapter.tokenizer.decode(new, skip_special_tokens=True).strip()
            rendered = None  # render again, with the new text
    lm_names = [n for n in hooks if not _is_vision(n)]
    if lm_names:
        got = np.concatenate([p for p, _ in kept.lm[lm_names[0]]] or [np.zeros(0, int)])
        if not np.isin(selected, got).all():
            # A selector such as "final" or "turn:-1" now picks positions that an earlier rendering (before a
            # generated turn existed) did not: capture the completed session once more, with nothing to generate.
            return capture_session(loaded, session, hooks, positions, mode, max_new_tokens, dtype)
    return _assemble(session, rendered, kept, positions, hooks, selected)


@dataclass
class _PassState:
    """One session's forward state across its renderings: the KV cache, how many positions it holds (`done`),
    the ids it was built from and the last forward's logits."""

    cache: Any
    done: int = 0
    prev_ids: Tensor | None = None
    logits: Tensor | None = None


def _feed(loaded: LoadedModel, rendered: RenderedSession, state: _PassState, recording: tuple, positions: str,
          mode: str) -> tuple[np.ndarray, Tensor | None]:
    """Feed a rendering's positions not yet in the cache (keeping the cached prefix it shares with the previous
    rendering), chunk by chunk, with the hooks keeping the selected positions. Returns (selected positions, the
    rendering's position ids or None)."""
    rec, kept = recording
    adapter, ids = loaded.adapter, rendered.input_ids
    if state.prev_ids is not None:  # keep the cached prefix that the new rendering shares
        p = _common_prefix(state.prev_ids[0, :state.done], ids[0])
        p = _not_inside_image(p, rendered)
        if p < state.done:
            _crop_to(state.cache, p)
            kept.crop(p)
            state.done = p
    selected = rendered.token_map.select(positions)
    everything = range(len(rendered.images)) if adapter.positions_need_images else ()
    pos = adapter.position_ids(loaded.hf_model, ids, rendered.image_inputs(adapter, everything))
    spans = rendered.turn_chunks() if mode == "turns" else [(0, rendered.n_positions)]
    for a, b in spans:
        if b <= state.done:
            continue
        a = max(a, state.done)
        ks = rendered.images_in(a, b)
        rec.run([_Chunk(a, b, selected[(selected >= a) & (selected < b)], ks, kept)])
        out = _forward(loaded, state.cache, ids, (a, b), pos, rendered.image_inputs(adapter, ks))
        state.cache, state.logits, state.done = out.past_key_values, out.logits, b
    rec.run([])
    state.prev_ids = ids
    return selected, pos


def _forward(loaded: LoadedModel, cache: Any, ids: Tensor, span: tuple[int, int], pos: Tensor | None,
             images: dict[str, Any]) -> Any:
    """One forward of ids[:, a:b] on top of `cache`: the model's output (logits, past_key_values)."""
    a, b = span
    device = loaded.device
    kw: dict[str, Any] = {"input_ids": ids[:, a:b].to(device), "past_key_values": cache, "use_cache": True}
    if pos is not None:
        kw["position_ids"] = pos[..., a:b].to(device)
    if "logits_to_keep" in loaded.forward_params:
        kw["logits_to_keep"] = 1
    kw.update({k: v.to(device) for k, v in loaded.adapter.forward_extras(ids, a, b).items()})
    kw.update({k: v.to(device) if isinstance(v, Tensor) else v for k, v in images.items()})
    if loaded.backend == "bridge":  # through the bridge, so that every TL hook point fires
        kw.pop("use_cache")
        logits, new_cache = loaded.bridge(kw.pop("input_ids"), return_type="logits_and_cache", **kw)
        return SimpleNamespace(logits=logits, past_key_values=new_cache)
    return loaded.hf_model(**kw)


def _greedy(loaded: LoadedModel, state: _PassState, ids: Tensor, pos: Tensor | None,
            max_new_tokens: int) -> list[int]:
    """Greedy tokens after `ids` (from the state's last logits) up to a stop token or `max_new_tokens`; the cache
    grows with them (the caller rolls it back)."""
    stop_ids = loaded.adapter.stop_token_ids()
    new: list[int] = []
    gen_ids, gen_pos = ids, pos
    for _ in range(max_new_tokens):
        nxt = int(state.logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        new.append(nxt)
        gen_ids = torch.cat([gen_ids, torch.tensor([[nxt]])], dim=1)
        if gen_pos is not None:  # text positions simply continue after the last one
            gen_pos = torch.cat([gen_pos, gen_pos[..., -1:] + 1], dim=-1)
        n = gen_ids.shape[1]
        out = _forward(loaded, state.cache, gen_ids, (n - 1, n), gen_pos, {})
        state.cache, state.logits = out.past_key_values, out.logits
    return new


def _copy_turns(session: Session) -> Session:
    """A copy whose turn texts can be filled in without touching the caller's session (images shared)."""
    turns = [Turn(t.role, t.text, list(t.images), list(t.marks)) for t in session.turns]
    return Session(session.session_id, turns, dict(session.labels))


def _new_cache(loaded: LoadedModel) -> Any:
    """A KV cache that can be rolled back after generation, sliding-window layers included (Gemma 3)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def _crop_to(cache: Any, n: int) -> None:
    """Keep the first n positions of a KV cache (transformers >= 5 takes minus the count to remove)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


def _common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n


def _not_inside_image(p: int, rendered: RenderedSession) -> int:
    for a, b in rendered.image_spans:
        if a < p < b:
            return a
    return p


def _groups(rendered: RenderedSession, positions: str, kept: np.ndarray) -> list[str]:
    """For each kept position, the comma-joined selector parts that picked it."""
    parts = [s.strip() for s in positions.split("+") if s.strip()]
    if len(parts) == 1:
        return [parts[0]] * len(kept)
    hit = np.stack([np.isin(kept, rendered.token_map.select(s)) for s in parts], axis=1)
    return [",".join(p for p, h in zip(parts, row) if h) for row in hit]


def _cat(parts: list[Tensor]) -> Tensor:
    """torch.cat that does not copy a single part (the hooks already made their own copies)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0, 0)


def _assemble(session: Session, rendered: RenderedSession, kept: _Kept, positions: str, hooks: list[str],
              selected: np.ndarray) -> SessionActivations:
    kinds: dict[str, list[Tensor]] = {}
    layers: dict[str, list[int]] = {}
    rows: dict[str, pd.DataFrame] = {}
    tm = rendered.token_map.df
    last = np.r_[tm["turn"].to_numpy()[1:] != tm["turn"].to_numpy()[:-1], True]
    for name in hooks:
        kind, layer = split_hook(name)
        if _is_vision(name):
            parts = kept.vision[name]
            t = _cat([x for _, x in parts])
            if kind not in rows:
                img = np.concatenate([np.full(len(x), k) for k, x in parts]) if parts else np.zeros(0, int)
                vis_pos = np.concatenate([np.arange(len(x)) for _, x in parts]) if parts else np.zeros(0, int)
                turn = [int(tm.loc[rendered.image_spans[k][0], "turn"]) if k >= 0 else -1 for k in img]
                rows[kind] = pd.DataFrame({
                    "turn": turn, "role": "user", "position": vis_pos, "segment": "vision", "image_index": img,
                    "tile": -1, "patch_row": -1, "patch_col": -1, "mark": "", "last_of_turn": False,
                    "groups": "vision",
                })
        else:
            parts = kept.lm[name]
            pos = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, int)
            t = _cat([x for _, x in parts])
            keep = np.isin(pos, selected)  # earlier renderings may have picked positions the final one does not
            if not keep.all():
                pos, t = pos[keep], t[torch.as_tensor(keep)]
            if not np.array_equal(pos, selected):
                raise CaptureError(f"internal: hook {name} kept {len(pos)} positions, expected {len(selected)}")
            if kind not in rows:
                rows[kind] = pd.DataFrame({
                    **{c: tm[c].to_numpy()[pos] for c in tm.columns if c != "token_id"},
                    "last_of_turn": last[pos], "groups": _groups(rendered, positions, pos),
                })
        kinds.setdefault(kind, []).append(t)
        layers.setdefault(kind, []).append(layer)
    stacked = {k: torch.stack(v, dim=1) if v and v[0].numel() else torch.zeros(0, len(v), 0) for k, v in kinds.items()}
    return SessionActivations(session=session, kinds=stacked, layers=layers, rows=rows)


# ---- batches of sessions: one forward per turn step for all of them (see the module docstring) -------------------
@torch.no_grad()
def capture_batch(loaded: LoadedModel, sessions: Iterable[Session], hooks: list[str], positions: str = "all",
                  mode: str = "turns", max_new_tokens: int = 32, dtype: torch.dtype = torch.float32,
                  rendered: list[RenderedSession] | None = None) -> list[SessionActivations]:
    """`capture_session` of each of `sessions`, in order, with one forward per turn step for all of them together.

    Sessions with nothing to generate go through padded batched passes; the others (and every session where
    batching cannot be exact: see the module docstring) are captured one at a time. `rendered`, if given, holds
    `render(loaded.adapter, s)` of each session, in order."""
    sessions = list(sessions)
    if mode not in MODES:
        raise CaptureError(f"mode {mode!r}: expected one of {MODES}")
    if rendered is None:
        rendered = [render(loaded.adapter, s) for s in sessions]
    elif len(rendered) != len(sessions) or any(r.session is not s for r, s in zip(rendered, sessions)):
        raise CaptureError("`rendered` must hold the rendering of each session of `sessions`, in order")
    together = [i for i, r in enumerate(rendered) if not _needs_generation(r)]
    if len(together) < 2 or loaded.backend == "bridge" or any(_is_vision(h) for h in hooks):
        together = []
    window = loaded.sliding_window
    if window is not None and together and mode == "turns" and _padded_length(
            [rendered[i] for i in together], mode) > window:  # one padded pass has no holes: its window is exact
        together = []
    out: list[SessionActivations | None] = [None] * len(sessions)
    if together:
        batch = _capture_padded(loaded, [rendered[i] for i in together], hooks, positions, mode, dtype)
        for i, acts in zip(together, batch):
            out[i] = acts
    for i, (s, r) in enumerate(zip(sessions, rendered)):
        if out[i] is None:
            out[i] = capture_session(loaded, s, hooks, positions, mode, max_new_tokens, dtype, rendered=r)
    return out


def _needs_generation(rendered: RenderedSession) -> bool:
    """Whether capture must write an assistant turn (text=None) of this session itself."""
    t, turns = rendered.generation_turn, rendered.session.turns
    return t is not None and t < len(turns) and turns[t].text is None


def _spans(rendered: RenderedSession, mode: str) -> list[tuple[int, int]]:
    return rendered.turn_chunks() if mode == "turns" else [(0, rendered.n_positions)]


def _padded_length(rendered: list[RenderedSession], mode: str) -> int:
    """Columns of the padded layout: at each step, the longest chunk of the step."""
    spans = [_spans(r, mode) for r in rendered]
    steps = max(len(s) for s in spans)
    return sum(max(s[t][1] - s[t][0] for s in spans if t < len(s)) for t in range(steps))


def _pad_id(loaded: LoadedModel) -> int:
    """A token id for holes: the pad token, else EOS/BOS, never an image token (the model would fill it)."""
    tok = loaded.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, *range(8)):
        if cand is None:
            continue
        if not loaded.adapter.is_multimodal or not loaded.adapter.image_token_mask(torch.tensor([[cand]])).any():
            return int(cand)
    raise CaptureError(f"{loaded.name}: no token id to pad with")


def _stack_image_inputs(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The image inputs of several rows as one batch, as the processors batch them: every tensor zero-padded to
    the largest along each dim but the first (LLaVA-NeXT crops, Idefics3 tiles and their pixel mask), then
    concatenated along the first."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else {}
    if any(p.keys() != parts[0].keys() for p in parts):
        raise CaptureError(f"internal: image inputs with different keys {[sorted(p) for p in parts]}")
    out = {}
    for key in parts[0]:
        ts = [p[key] for p in parts]
        size = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
        # F.pad takes (before, after) pairs from the last dim backwards
        ts = [F.pad(t, [x for d in reversed(range(1, t.dim())) for x in (0, size[d - 1] - t.shape[d])]) for t in ts]
        out[key] = torch.cat(ts)
    return out


def _capture_padded(loaded: LoadedModel, rendered: list[RenderedSession], hooks: list[str], positions: str,
                    mode: str, dtype: torch.dtype) -> list[SessionActivations]:
    """Capture teacher-forced sessions together: at step t every row feeds its chunk t (see the module docstring)."""
    model, adapter, device = loaded.hf_model, loaded.adapter, loaded.device
    spans = [_spans(r, mode) for r in rendered]
    n_rows, n_steps = len(rendered), max(len(s) for s in spans)
    widths = [max(s[t][1] - s[t][0] for s in spans if t < len(s)) for t in range(n_steps)]
    col = np.cumsum([0, *widths])  # the padded layout: step t holds columns [col[t], col[t + 1])
    # Ids, mask and position ids of the padded layout. Holes get the pad id, mask 0 and their column as position:
    # with one step (mode "single") every row is then 0, 1, 2 ... like an unpadded one, and the forward can do
    # without a mask, since right padding only follows a row's tokens (causal attention never reaches it).
    ids: Int[Tensor, "row col"] = torch.full((n_rows, int(col[-1])), _pad_id(loaded), dtype=torch.long)
    mask: Int[Tensor, "row col"] = torch.zeros_like(ids)
    pos: Int[Tensor, "*rope row col"] | None = None
    for i, r in enumerate(rendered):
        everything = range(len(r.images)) if adapter.positions_need_images else ()
        own = adapter.position_ids(model, r.input_ids, r.image_inputs(adapter, everything))  # [*rope, 1, n]
        if own is None:
            own = torch.arange(r.n_positions)[None]
        if pos is None:
            pos = torch.arange(int(col[-1]), dtype=own.dtype).expand(*own.shape[:-2], n_rows, -1).clone()
        for t, (a, b) in enumerate(spans[i]):
            c = int(col[t])
            ids[i, c:c + b - a] = r.input_ids[0, a:b]
            mask[i, c:c + b - a] = 1
            pos[..., i, c:c + b - a] = own[..., 0, a:b]
    selected = [r.token_map.select(positions) for r in rendered]
    kept = [_Kept(hooks) for _ in rendered]
    rec = _Recorder(dtype)
    cache = _new_cache(loaded) if n_steps > 1 else None
    with loaded.hooks([(name, rec.fn) for name in hooks]):
        for t in range(n_steps):
            c0, c1 = int(col[t]), int(col[t + 1])
            chunks, images = [], []
            for i, r in enumerate(rendered):
                if t >= len(spans[i]):
                    continue  # this session has no turn t: its row is all holes
                a, b = spans[i][t]
                ks = r.images_in(a, b)
                sel = selected[i]
                chunks.append(_Chunk(a, b, sel[(sel >= a) & (sel < b)], ks, kept[i], row=i))
                if ks:
                    images.append(r.image_inputs(adapter, ks))
            rec.run(chunks)
            kw: dict[str, Any] = {"input_ids": ids[:, c0:c1], "position_ids": pos[..., c0:c1],
                                  "attention_mask": mask[:, :c1] if n_steps > 1 else None,
                                  "past_key_values": cache, "use_cache": cache is not None}
            if "logits_to_keep" in loaded.forward_params:
                kw["logits_to_keep"] = 1
            kw.update(adapter.forward_extras(ids, c0, c1))
            kw.update(_stack_image_inputs(images))
            out = model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()})
            cache = out.past_key_values if cache is not None else None
    rec.run([])
    results = []
    for r, k, sel in zip(rendered, kept, selected):
        session = _copy_turns(r.session)  # as capture_session returns: a copy the caller's edits do not reach
        results.append(_assemble(session, r, k, positions, hooks, sel))
    return results


@dataclass
class CapturePlan:
    """What `validate_capture` checked and what `capture` will do: nothing of it is on disk yet."""

    sessions: list[Session] = field(repr=False)
    hooks: list[str]
    spec: dict[str, Any]  # the store's settings (store.json), model fingerprint included
    n_done: int  # sessions the store at `out` already holds (0 for a new store or with force_new)
    n_empty: int  # sessions in which the selector keeps no position
    longest: int  # positions of the longest session (rendered, plus max_new_tokens per turn to generate)
    max_positions: int | None  # the model's context (max_position_embeddings); None: the config sets none
    existing: bool  # a store is already at `out`

    @property
    def n_sessions(self) -> int:
        return len(self.sessions)


@dataclass(frozen=True)
class CaptureConfig:
    """The settings of a capture, checked once here (CaptureError, SelectorError for a selector that does not parse):
    which hooks (shorthands or TL names, comma-separated or a list) at which `layers` and `positions` (a TokenMap
    selector), `mode`, `batch_size` sessions at a time, stored as `dtype` ("model", the default: the model's own
    dtype, so a bf16 model stores 2 bytes a value; or float32, float16, bfloat16), turns to generate at most
    `max_new_tokens`; `shard` (i, n) or "i/n": this worker's part of a capture split over n workers (see
    `shard_batches`); `force_new`, `allow_long`, `keep_private_labels` and `progress` as in `capture`; `family`,
    `backend`, `trust_remote_code` for a model given by name or path (`validate_capture`). The store's identity
    (store.json) is `identity()`: the fields a resumed capture must match (not batch_size, progress, ...)."""

    hooks: str | Iterable[str] | None = None  # a list or tuple is kept as a tuple
    positions: str = "all"
    layers: Iterable[int] | None = None  # kept as a tuple
    mode: str = "auto"
    batch_size: int = 8
    dtype: str = "model"
    max_new_tokens: int = 32
    shard: tuple[int, int] | str | None = None
    force_new: bool = False
    allow_long: bool = False
    keep_private_labels: bool = False
    progress: bool = True
    family: str | None = None
    backend: str = "torch"
    trust_remote_code: bool = False

    IDENTITY = ("positions", "mode", "max_new_tokens", "dtype")  # with the model, hooks and backend: store.json

    def __post_init__(self):
        if self.hooks is not None and not isinstance(self.hooks, str):
            object.__setattr__(self, "hooks", tuple(self.hooks))
        if self.layers is not None:
            try:
                object.__setattr__(self, "layers", tuple(self.layers))
            except TypeError:
                raise CaptureError(f"layers {self.layers!r}: expected integers") from None
        if self.shard is not None:
            object.__setattr__(self, "shard", parse_shard(self.shard))
            if self.force_new:
                raise CaptureError("force_new with shard: one worker would remove the others' sessions; clear the "
                                   "store once before starting the workers")
        _check_settings(self.positions, self.mode, self.batch_size, self.dtype, self.max_new_tokens)

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.IDENTITY}


def _capture_config(config: CaptureConfig | None, options: dict[str, Any]) -> CaptureConfig:
    """`config` with `options` (its fields as keywords) replacing its fields; validated."""
    config = config or CaptureConfig()
    return replace(config, **options) if options else config


@dataclass
class _View:
    """What validation needs of a model, loaded or not."""

    name: str
    family: str
    adapter: Any
    info: LoadedModel | ModelInfo
    served: set[str] | None  # hook names the model serves (None: cannot tell before loading, the bridge)
    max_positions: int | None
    fingerprint: dict[str, Any]
    model_dtype: str | None


def _view(model: LoadedModel | ModelInfo | str | os.PathLike, family: str | None, backend: str,
          trust_remote_code: bool) -> _View:

    if isinstance(model, LoadedModel):
        text = model.text_config
        limit = getattr(text, "max_position_embeddings", None)
        return _View(model.name, model.family, model.adapter, model, set(model.hook_names()),
                     int(limit) if isinstance(limit, int) else None, model.fingerprint, str(model.dtype))
    info = model if isinstance(model, ModelInfo) else inspect_model(model, family=family,
                                                                    trust_remote_code=trust_remote_code)
    return _View(info.source, info.family, info.adapter, info, set(info.hook_names()) if backend == "torch" else None,
                 info.max_positions, model_fingerprint(info.source), None)


def store_spec(model: str, family: str, hooks: list[str], config: CaptureConfig, backend: str,
               fingerprint: dict[str, Any]) -> dict[str, Any]:
    """store.json's settings: what a resumed capture must match (the config's `identity()` fields among them)."""
    return {"model": model, "family": family, "hooks": hooks, **config.identity(), "backend": backend,
            "fingerprint": fingerprint_digest(fingerprint), "fingerprint_files": fingerprint["files"]}


def validate_capture(model: LoadedModel | ModelInfo | str | os.PathLike,
                     sessions: Iterable[Session] | str | os.PathLike, out: str | os.PathLike,
                     config: CaptureConfig | None = None, **options) -> CapturePlan:
    """Check everything a capture needs, writing nothing and, for a model given by name or path, loading no weight
    (its config, architecture on the meta device and processor only). `capture` calls it before it writes; call
    it yourself before `load_model` to fail in seconds rather than after the load. Settings: a CaptureConfig, or
    its fields as keywords (as `capture`).

    Raises, in this order: CaptureError for bad settings (mode, batch_size, dtype, max_new_tokens), SelectorError
    for a selector that does not parse, SessionError for no sessions or an image that is missing, changed or does
    not decode (naming the JSONL line and session id), ModelLoadError / UnsupportedModelError for a model that is
    not there or not supported, CaptureError for layers out of range or unknown hook shorthands, HookNameError for
    a hook name the model does not serve, StoreError for an output folder that cannot be written or holds another
    store (other settings, other weights: both fingerprints), RenderError naming a session that does not render,
    CaptureError for sessions longer than the model's context (unless `allow_long`) and for a selector (or a `+`
    part of it) that keeps no position in any session. A selector that keeps nothing in some sessions is logged
    with their count."""
    cfg = _capture_config(config, options)  # bad settings raise here, first
    sessions = _sessions_of(sessions)
    check_images(sessions)
    backend = getattr(model, "backend", cfg.backend)
    view = _view(model, cfg.family, backend, cfg.trust_remote_code)
    names = resolve_hooks(view.info, list(cfg.hooks) if isinstance(cfg.hooks, tuple) else cfg.hooks, cfg.layers)
    _check_hook_names(view, names)
    spec = store_spec(view.name, view.family, names, cfg, backend, view.fingerprint)
    if view.model_dtype is not None:
        spec["model_dtype"] = view.model_dtype
    old = check_store_folder(out)
    if old is not None and not cfg.force_new:
        if view.model_dtype is None:  # known once loaded: compared then, before anything is written
            old = {k: v for k, v in old.items() if k != "model_dtype"}
        compare_spec(Path(out) / "store.json", old, spec)
    longest, n_empty = _check_renderings(view, sessions, cfg.positions, cfg.max_new_tokens, cfg.allow_long)
    n_done = 0 if old is None or cfg.force_new else sum(ActivationStore(out).done(s.session_id) for s in sessions)
    return CapturePlan(sessions, names, spec, n_done, n_empty, longest, view.max_positions, old is not None)


def _check_settings(positions: str, mode: str, batch_size: int, dtype: str, max_new_tokens: int) -> None:
    if mode not in MODES:
        raise CaptureError(f"mode {mode!r}: expected one of {MODES}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise CaptureError(f"batch_size {batch_size!r}: expected an integer >= 1")
    if dtype != "model" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise CaptureError(f"dtype {dtype!r}: expected 'model' (the model's own) or a torch dtype name such as "
                           "float32, float16 or bfloat16")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise CaptureError(f"max_new_tokens {max_new_tokens!r}: expected an integer >= 0")
    if not isinstance(positions, str) or not positions.strip():
        raise SelectorError(f"position selector {positions!r}: expected a selector such as all, last:* or mark:ssn")
    one = pd.DataFrame({"position": [0], "token_id": [0], "turn": [0], "role": ["user"], "segment": ["user"],
                        "image_index": [-1], "tile": [-1], "patch_row": [-1], "patch_col": [-1], "mark": [""]})
    TokenMap(one[COLUMNS]).select(positions)  # a one-token map: raises SelectorError on syntax, picks nothing else


def _sessions_of(sessions: Iterable[Session] | str | os.PathLike) -> list[Session]:
    if isinstance(sessions, (str, os.PathLike)):
        return list(read_sessions(sessions))
    sessions = list(sessions)
    if not sessions:
        raise SessionError("no sessions to capture; expected at least one")
    bad = [type(s).__name__ for s in sessions if not isinstance(s, Session)]
    if bad:
        raise SessionError(f"sessions: expected Session objects, got {bad[0]}")
    seen: set[str] = set()
    for s in sessions:
        if s.session_id in seen:
            raise SessionError(f"{s.where}: duplicate session_id (a store keeps one session per id)")
        seen.add(s.session_id)
    return sessions


def _check_hook_names(view: _View, names: list[str]) -> None:
    if view.served is None:  # the bridge's names are known once it is built: capture checks them then
        return
    unknown = [n for n in names if n not in view.served]
    if unknown:
        raise HookNameError(f"hook {unknown[0]!r}: {view.name} does not serve it (it serves "
                            "blocks.<i>.hook_resid_pre/_post/attn_out/mlp_out, vision_encoder.encoder_layers.<i>."
                            f"hook_out, {PROJECTOR_HOOK}; load with backend='bridge' for every transformer-lens hook)")


def _check_renderings(view: _View, sessions: list[Session], positions: str, max_new_tokens: int,
                      allow_long: bool) -> tuple[int, int]:
    """Render every session (turns to generate as empty text, so that later turns count): its length against the
    model's context, and what the selector keeps. Returns (longest, sessions where the selector keeps nothing)."""
    parts = [p.strip() for p in positions.split("+") if p.strip()]
    hits = {p: 0 for p in parts}
    long: list[tuple[Session, int]] = []
    empty: list[str] = []
    longest = 0
    for s in sessions:
        n_gen = sum(t.text is None for t in s.turns)
        try:
            r = render(view.adapter, _filled(s) if n_gen else s)
            picked = {p: len(r.token_map.select(p)) for p in parts}
        except (RenderError, SelectorError) as err:
            raise type(err)(f"{s.where}: {err}") from None
        n = r.n_positions + max_new_tokens * n_gen
        longest = max(longest, n)
        if view.max_positions is not None and n > view.max_positions:
            long.append((s, n))
        for p, k in picked.items():
            hits[p] += k > 0
        if not any(picked.values()):
            empty.append(s.session_id)
    if long and not allow_long:
        s, n = max(long, key=lambda x: x[1])
        raise CaptureError(f"{len(long)} of {len(sessions)} sessions are longer than the context of {view.name} "
                           f"({view.max_positions} positions, max_position_embeddings); longest: {s.where} with {n} "
                           "positions (generated turns counted at max_new_tokens). Shorten them or pass "
                           "allow_long=True (--allow-long)")
    if long:
        log.warning("%d of %d sessions are longer than the model's context (%d positions); captured anyway "
                    "(allow_long)", len(long), len(sessions), view.max_positions)
    dead = [p for p, k in hits.items() if k == 0]
    if dead:
        what = f"selector {positions!r}" if len(parts) == 1 else f"selector part {dead[0]!r} of {positions!r}"
        raise CaptureError(f"{what} keeps no position in any of the {len(sessions)} sessions; expected a selector "
                           "that picks tokens these sessions have (see probes.models.tokenmap)")
    if empty:
        log.warning("selector %r keeps no position in %d of %d sessions (first: %r); they are stored with no vectors",
                    positions, len(empty), len(sessions), empty[0])
    return longest, len(empty)


def _filled(session: Session) -> Session:
    """A copy with the turns to generate as empty text: rendered so, the turns after them exist too."""
    turns = [Turn(t.role, "" if t.text is None else t.text, list(t.images), list(t.marks)) for t in session.turns]
    return Session(session.session_id, turns, session.labels, session.source)


def capture(loaded: LoadedModel, sessions: Iterable[Session] | str | os.PathLike, out: str | os.PathLike,
            config: CaptureConfig | None = None, **options) -> ActivationStore:
    """Capture every session into the store at `out`; sessions already there are skipped (resume). Settings: a
    CaptureConfig, or its fields as keywords (`capture(loaded, sessions, out, hooks="resid_post",
    positions="last:*")`; with both, the keywords replace the config's fields).

    Sessions go `batch_size` at a time through `capture_batch`, in the order given, and are written in that order
    once their batch is done (so memory holds what a batch keeps); `batch_size=1` captures one session at a time.
    Sessions whose turns have similar lengths batch with fewer pad columns. The batch size is not part of the
    store's identity: a store resumes and reads the same whatever batch size wrote it.

    Everything is checked first (`validate_capture`); nothing is written until that passes. The store records the
    model's fingerprint: resuming with other weights or settings is refused (StoreError naming both fingerprints);
    `force_new=True` removes the old store's files and starts over. `allow_long` captures sessions longer than the
    model's context. One writer at a time: a lock file names the process writing. Private labels ("_" keys) stay
    out of the store unless `keep_private_labels=True`, which writes them to `<out>/private_labels.jsonl`."""
    cfg = _capture_config(config, options)
    plan = validate_capture(loaded, sessions, out, cfg)
    out = Path(out)
    made = [p for p in [out, *out.parents] if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        with StoreLock(out, shard=cfg.shard):
            if cfg.force_new and plan.existing:
                clear_store(out)
                log.info("%s: the old store was removed (force_new)", out)
            fresh = not (out / "store.json").exists()
            try:
                store = _capture_into(loaded, plan, out, cfg)
            except BaseException:
                # Made here and nothing written: a leftover store.json would refuse the corrected rerun as "other
                # settings". Never under a shard: the other workers are writing into it.
                if fresh and not cfg.shard and not any((out / "shards").glob("*.parquet")):
                    clear_store(out)
                raise
    finally:
        for p in made:  # folders this call made, when nothing is left in them
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    return store


def _capture_into(loaded: LoadedModel, plan: CapturePlan, out: Path, cfg: CaptureConfig) -> ActivationStore:
    store = ActivationStore(out, spec=plan.spec)  # compares the settings again, now under the lock
    if cfg.shard is None:  # the only writer (shard workers leave each other's temp files alone)
        store.clear_debris()
    batches = shard_batches(plan.sessions, cfg.batch_size, cfg.shard)
    mine = [s for b in batches for s in b]
    if cfg.keep_private_labels:
        write_private_labels(out, mine)
    # Batches are formed over every session before any is skipped, so a session meets the same batch-mates (and
    # the same padding) whichever worker captures it; a resumed batch lacks its finished sessions (equal within
    # float rounding, as any batch is to one-session capture).
    todo = [[s for s in b if not store.done(s.session_id)] for b in batches]
    n_todo = sum(len(b) for b in todo)
    where = f" of shard {cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else ""
    if n_todo < len(mine):
        _say(f"resuming: {len(mine) - n_todo} of {len(mine)} sessions{where} already done", cfg.progress)
    dtype = loaded.dtype if cfg.dtype == "model" else getattr(torch, cfg.dtype)
    with tqdm(total=n_todo, desc=f"capture{where}", unit="session", disable=not cfg.progress) as bar:
        for group in todo:
            if not group:
                continue
            for acts in capture_batch(loaded, group, plan.hooks, cfg.positions, cfg.mode, cfg.max_new_tokens, dtype):
                store.write(acts)
            bar.update(len(group))
    return store


def _say(message: str, progress: bool) -> None:
    """A status line: above the progress bar when one is shown (stderr), else to the log."""
    if progress:
        tqdm.write(message, file=sys.stderr)
    else:
        log.info(message)
