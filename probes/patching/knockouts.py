"""Attention knockout (`knockout`): queries of a target set (the probe turn and the answer) may not attend to keys of
a source set (the PII patches, an earlier turn) in a window of layers. A forward pre-hook on each attention module
rewrites its 4-D attention mask per batch row (sdpa: a boolean mask, where the model passed none and would have
relied on is_causal; eager: the model's additive float mask, blocked cells set to the dtype's minimum). A query
always keeps its own key (no fully masked row). Knocking out an empty set changes nothing (tested on eager and sdpa,
which agree). Flash attention takes no mask and is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from probes.models.loading import LoadedModel
from probes.patching.config import PatchingError
from probes.patching.forwards import forward
from probes.patching.metrics import METRICS, Answer
from probes.patching.pairs import Run, probe_turn

Knock = tuple[np.ndarray, np.ndarray, frozenset[int]]  # (source positions, target positions, layers)


@contextmanager
def knockout_hooks(loaded: LoadedModel, knocks: Sequence[Knock], n: int) -> Iterator[None]:
    """Pre-hooks on the attention modules: row b's targets may not attend to its sources in its layers."""
    layers = loaded.adapter.lm_layers(loaded.hf_model)
    handles = []
    try:
        for li, layer in enumerate(layers):
            mine = [(b, s, t) for b, (s, t, ls) in enumerate(knocks) if li in ls and len(s) and len(t)]
            if not mine:
                continue
            blocked = torch.zeros(len(knocks), 1, n, n, dtype=torch.bool)
            for b, s, t in mine:
                blocked[b, 0, torch.as_tensor(t)[:, None], torch.as_tensor(s)[None, :]] = True
            diag = torch.arange(n)
            blocked[:, :, diag, diag] = False  # a query keeps its own key: no fully masked row
            attn = getattr(layer, loaded.adapter.attn_name)
            handles.append(attn.register_forward_pre_hook(_mask_hook(blocked), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _mask_hook(blocked: Tensor) -> Callable[..., tuple[Any, dict[str, Any]]]:
    def pre(mod, args, kwargs):
        impl = getattr(getattr(mod, "config", None), "_attn_implementation", "eager") or "eager"
        if "flash" in impl:
            raise PatchingError(f"attention knockout needs an attention mask; {impl} takes none (load the model "
                                "with attn_implementation='sdpa' or 'eager')")
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rows, q = hs.shape[0], hs.shape[1]
        block = blocked.to(hs.device)
        mask = kwargs.get("attention_mask")
        if mask is None:  # sdpa relied on is_causal: make causality explicit
            allowed = torch.ones(q, q, dtype=torch.bool, device=hs.device).tril()[None, None] & ~block
            if impl == "sdpa":
                new = allowed
            else:
                new = torch.zeros(rows, 1, q, q, dtype=hs.dtype, device=hs.device)
                new = new.masked_fill(~allowed, torch.finfo(hs.dtype).min)
        elif mask.dtype == torch.bool:
            new = mask[..., :q].expand(rows, -1, -1, -1) & ~block
        else:
            new = mask[..., :q].expand(rows, -1, -1, -1).masked_fill(block, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": new}
    return pre


def probe_positions(run: Run) -> np.ndarray:
    """The knockout target: every position from the probe turn's first token on (answer tokens included)."""
    p = probe_turn(run.session)
    start = run.rendered.token_map.turn_bounds(p)[0]
    return np.arange(start, run.n)


def knockout(loaded: LoadedModel, run: Run, answer: Answer, sources: dict[str, np.ndarray],
             windows: Sequence[int], target: np.ndarray | None = None, batch_size: int = 16
             ) -> list[dict[str, Any]]:
    """Knock out each source set from the target (default `probe_positions`) in every window of consecutive
    layers; rows per (source, window size, first layer): the metrics, with `clean` the unablated run's."""
    target = probe_positions(run) if target is None else np.asarray(target)
    L = loaded.n_layers
    configs = []
    for name, src in sources.items():
        for w in windows:
            if not 1 <= w <= L:
                raise PatchingError(f"knockout window {w}: expected 1 .. {L} layers")
            for start in range(0, L - w + 1):
                configs.append((name, w, start, (np.asarray(src), target, frozenset(range(start, start + w)))))
    got: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for b0 in range(0, len(configs), batch_size):
        chunk = configs[b0:b0 + batch_size]
        with torch.no_grad(), knockout_hooks(loaded, [c[3] for c in chunk], run.n):
            res, _ = forward(loaded, run, answer, embeds=run.embeds.expand(len(chunk), -1, -1))
        for m in METRICS:
            got[m].append(res[m].float().cpu().numpy())
    vals = {m: np.concatenate(v) for m, v in got.items()}
    rows = []
    for i, (name, w, start, (src, _, _)) in enumerate(configs):
        for m in METRICS:
            rows.append({"method": "knockout", "direction": "knockout", "layer": start, "component": "attention",
                         "position_group": name, "target": "probe", "window": w, "n_positions": len(src),
                         "contrast": answer.contrast, "null_by_construction": not len(src),
                         "metric": m, "value": float(vals[m][i]), "clean": run.metrics[m], "corrupt": np.nan})
    return rows


def default_sources(run: Run, probe: int) -> list[str]:
    """Knockout sources: the PII patches, the whole image, and every turn before the probe turn."""
    out = [g for g in ("pii_patches", "other_image") if g in run.groups]
    turns = sorted(int(g[4:]) for g in run.groups if g.startswith("turn"))
    return out + [f"turn{t}" for t in turns if t < probe]
