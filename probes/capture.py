"""Capture hidden states of sessions turn by turn through the KV cache, into an ActivationStore.

A T-turn session costs one pass over its tokens: each turn's tokens are fed once, on top of the KV cache of the
turns before. An assistant turn with `text=None` is written by the model (greedy) when its turn comes; the
session is then re-rendered with that text and capture continues from the first position that changed. Hooks
keep only the selected positions of each chunk, so memory grows with what is kept, not with the sequence.

`mode`: "turns" feeds one chunk per turn (what a chat does); "single" feeds everything available in one pass per
rendering; "auto" (default) is "single", which gives the same numbers, cheaper, since a chunked pass through the
KV cache equals the full pass (the tests check this for every family).
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from probes.hooks import PROJECTOR_HOOK, lm_hook, split_hook, vision_hook
from probes.loading import LoadedModel
from probes.render import RenderedSession, render
from probes.session import Session, Turn
from probes.store import ActivationStore, SessionActivations

log = logging.getLogger(__name__)

MODES = ("auto", "turns", "single")
HOOK_SHORTHANDS = ("resid_post", "resid_pre", "attn_out", "mlp_out", "vision", "projector")


class CaptureError(ValueError):
    pass


def resolve_hooks(loaded: LoadedModel, hooks: str | Iterable[str] | None = None,
                  layers: Iterable[int] | None = None) -> list[str]:
    """TL hook names from shorthands ("resid_post", "attn_out", "mlp_out", "resid_pre", "vision", "projector")
    or full names; `layers` restricts the LM layers of shorthands. Default: resid_post of every LM layer."""
    if hooks is None:
        hooks = ["resid_post"]
    elif isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    lm_layers = list(range(loaded.n_layers)) if layers is None else list(layers)
    bad = [i for i in lm_layers if not 0 <= i < loaded.n_layers]
    if bad:
        raise CaptureError(f"layers {bad} out of range: the model has {loaded.n_layers} layers")
    out: list[str] = []
    for h in hooks:
        if h in ("resid_post", "resid_pre", "attn_out", "mlp_out"):
            out += [lm_hook(i, f"hook_{h}") for i in lm_layers]
        elif h == "vision":
            vl = loaded.adapter.vision_layers(loaded.hf_model) if loaded.adapter.is_multimodal else None
            if vl is None:
                raise CaptureError(f"{loaded.family}: no vision tower to hook")
            out += [vision_hook(i) for i in range(len(vl))]
        elif h == "projector":
            out.append(PROJECTOR_HOOK)
        elif "." in h:
            out.append(h)
        else:
            raise CaptureError(f"unknown hook {h!r}: use one of {HOOK_SHORTHANDS} or a transformer-lens hook name")
    return list(dict.fromkeys(out))


@dataclass
class _Chunk:
    start: int
    end: int
    keep: np.ndarray  # absolute positions kept in [start, end)
    images: list[int]


def _is_vision(name: str) -> bool:
    return name.startswith("vision_")


class _Recorder:
    """Hook functions that keep the selected positions of the chunk being run."""

    def __init__(self, names: list[str], dtype: torch.dtype) -> None:
        self.names = names
        self.dtype = dtype
        self.lm: dict[str, list[tuple[np.ndarray, Tensor]]] = {n: [] for n in names if not _is_vision(n)}
        self.vision: dict[str, list[tuple[int, Tensor]]] = {n: [] for n in names if _is_vision(n)}
        self.chunk: _Chunk | None = None
        self.on = True

    def fn(self, x: Tensor, name: str) -> None:
        if not self.on or self.chunk is None:
            return None
        c = self.chunk
        if _is_vision(name):
            image = c.images[0] if len(c.images) == 1 else -1
            self.vision[name].append((image, x.detach().reshape(-1, x.shape[-1]).to("cpu", self.dtype, copy=True)))
        else:
            if x.dim() < 3 or x.shape[1] != c.end - c.start:
                raise CaptureError(f"hook {name} gives shape {tuple(x.shape)}; capture stores per-position "
                                   f"activations shaped [batch, pos ({c.end - c.start}), ...]")
            if len(c.keep):
                lo, hi = int(c.keep[0]) - c.start, int(c.keep[-1]) + 1 - c.start
                if hi - lo == len(c.keep):  # a contiguous run: slice and copy once
                    kept = x.detach()[0, lo:hi].to("cpu", self.dtype, copy=True)
                else:  # fancy indexing already makes the copy
                    kept = x.detach()[0, torch.as_tensor(c.keep - c.start, device=x.device)].to("cpu", self.dtype)
                self.lm[name].append((c.keep, kept.reshape(len(c.keep), -1)))  # [pos, heads, d] -> [pos, heads*d]
        return None

    def crop(self, p: int) -> None:
        """Forget everything at positions >= p (they will be recomputed)."""
        for name, parts in self.lm.items():
            self.lm[name] = [(pos[pos < p], t[torch.as_tensor(pos < p)]) for pos, t in parts if (pos < p).any()]


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
    model, adapter = loaded.hf_model, loaded.adapter
    device = loaded.device
    rec = _Recorder(hooks, dtype)
    cache, done, prev_ids, logits = _new_cache(loaded), 0, None, None
    stop_ids = adapter.stop_token_ids()

    def run(ids: Tensor, a: int, b: int, pos: Tensor | None, images: dict[str, Tensor]) -> Tensor:
        kw: dict[str, Any] = {"input_ids": ids[:, a:b].to(device), "past_key_values": cache, "use_cache": True}
        if pos is not None:
            kw["position_ids"] = pos[..., a:b].to(device)
        if "logits_to_keep" in loaded.forward_params:
            kw["logits_to_keep"] = 1
        kw.update({k: v.to(device) for k, v in adapter.forward_extras(ids, a, b).items()})
        kw.update({k: v.to(device) if isinstance(v, Tensor) else v for k, v in images.items()})
        if loaded.backend == "bridge":  # through the bridge, so that every TL hook point fires
            kw.pop("use_cache")
            logits, new_cache = loaded.bridge(kw.pop("input_ids"), return_type="logits_and_cache", **kw)
            return SimpleNamespace(logits=logits, past_key_values=new_cache)
        return model(**kw)

    with loaded.hooks([(name, rec.fn) for name in hooks]):
        while True:
            if rendered is None:
                rendered = render(adapter, session)
            ids = rendered.input_ids
            if prev_ids is not None:  # keep the cached prefix that the new rendering shares
                p = _common_prefix(prev_ids[0, :done], ids[0])
                p = _not_inside_image(p, rendered)
                if p < done:
                    _crop_to(cache, p)
                    rec.crop(p)
                    done = p
            selected = rendered.token_map.select(positions)
            everything = range(len(rendered.images)) if adapter.positions_need_images else ()
            pos = adapter.position_ids(model, ids, rendered.image_inputs(adapter, everything))
            spans = rendered.turn_chunks() if mode == "turns" else [(0, rendered.n_positions)]
            for a, b in spans:
                if b <= done:
                    continue
                a = max(a, done)
                ks = rendered.images_in(a, b)
                rec.chunk = _Chunk(a, b, selected[(selected >= a) & (selected < b)], ks)
                images = rendered.image_inputs(adapter, ks)
                out = run(ids, a, b, pos, images)
                cache, logits, done = out.past_key_values, out.logits, b
            rec.chunk = None
            prev_ids = ids
            t = rendered.generation_turn
            if t is None or t >= len(session.turns) or session.turns[t].text is not None:
                break
            # Greedy generation of turn t, hooks off; then roll the cache back and re-render with the text.
            rec.on = False
            new: list[int] = []
            gen_ids, gen_pos = ids, pos
            for _ in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                if nxt in stop_ids:
                    break
                new.append(nxt)
                gen_ids = torch.cat([gen_ids, torch.tensor([[nxt]])], dim=1)
                if gen_pos is not None:  # text positions simply continue after the last one
                    gen_pos = torch.cat([gen_pos, gen_pos[..., -1:] + 1], dim=-1)
                n = gen_ids.shape[1]
                out = run(gen_ids, n - 1, n, gen_pos, {})
                cache, logits = out.past_key_values, out.logits
            _crop_to(cache, done)
            rec.on = True
            session.turns[t].text = adapter.tokenizer.decode(new, skip_special_tokens=True).strip()
            rendered = None  # render again, with the new text
    lm_names = [n for n in hooks if not _is_vision(n)]
    if lm_names:
        got = np.concatenate([p for p, _ in rec.lm[lm_names[0]]] or [np.zeros(0, int)])
        if not np.isin(selected, got).all():
            # A selector such as "final" or "turn:-1" now picks positions that an earlier rendering (before a
            # generated turn existed) did not: capture the completed session once more, with nothing to generate.
            return capture_session(loaded, session, hooks, positions, mode, max_new_tokens, dtype)
    return _assemble(session, rendered, rec, positions, hooks, selected)


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


def _assemble(session: Session, rendered: RenderedSession, rec: _Recorder, positions: str, hooks: list[str],
              selected: np.ndarray) -> SessionActivations:
    kinds: dict[str, list[Tensor]] = {}
    layers: dict[str, list[int]] = {}
    rows: dict[str, pd.DataFrame] = {}
    tm = rendered.token_map.df
    last = np.r_[tm["turn"].to_numpy()[1:] != tm["turn"].to_numpy()[:-1], True]
    for name in hooks:
        kind, layer = split_hook(name)
        if _is_vision(name):
            parts = rec.vision[name]
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
            parts = rec.lm[name]
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


def capture(loaded: LoadedModel, sessions: Iterable[Session], out: str, hooks: str | list[str] | None = None,
            positions: str = "all", layers: Iterable[int] | None = None, mode: str = "auto",
            max_new_tokens: int = 32, dtype: str = "float32", progress: bool = True) -> ActivationStore:
    """Capture every session into the store at `out`; sessions already there are skipped (resume)."""
    names = resolve_hooks(loaded, hooks, layers)
    rendered_positions = positions
    spec = {"model": loaded.name, "family": loaded.family, "hooks": names, "positions": rendered_positions,
            "mode": mode, "max_new_tokens": max_new_tokens, "dtype": dtype}
    store = ActivationStore(out, spec=spec)
    sessions = list(sessions)
    todo = [s for s in sessions if not store.done(s.session_id)]
    if len(todo) < len(sessions):
        log.info("resuming: %d of %d sessions already captured", len(sessions) - len(todo), len(sessions))
    for s in tqdm(todo, desc="capture", unit="session", disable=not progress):
        store.write(capture_session(loaded, s, names, positions, mode, max_new_tokens, getattr(torch, dtype)))
    return store
