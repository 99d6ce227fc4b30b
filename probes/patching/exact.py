"""Exact patching: a cell is (layer, component, position group); component is resid_pre, resid_post, attn_out or
mlp_out (`blocks.{l}.hook_{component}`). Denoising runs the corrupt input with the clean activation of the cell
patched in; noising runs the clean input with the corrupt one. Many cells run as ONE forward: the batch dimension
holds the configurations, and one hook per hook point writes each row's own positions (`patched_metrics`; a row may
patch several hooks, or none).

Alignment of a pair of unequal lengths (framing swap, `patch_values`): a group with as many positions on both sides
is patched position by position (alignment "position", or "shifted" when the positions moved); a group whose size
differs is patched at its last position only ("last", the default: the turn's summary position as the model reads
it) or with the source group's mean written into every base position ("mean"). We align by group rather than
padding the shorter framing: padding would add tokens the model was never shown.

Null by construction: every cell row says whether the patch wrote exactly the values the base run already held
there (`null_by_construction`): then the patched run is the base run and the cell cannot have changed anything (e.g.
the text before the image in an image pair, task-swap positions before the probe turn); statistics leave such cells
out of their test families.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.models.loading import LoadedModel
from probes.patching.config import ALIGNS, COMPONENTS, DEFAULT_COMPONENTS, PatchingError
from probes.patching.forwards import forward, prefix_cache
from probes.patching.metrics import METRICS, Answer, patch_score
from probes.patching.pairs import Pair, Run


@dataclass(frozen=True)
class Cell:
    """What one configuration patches: a component's output at a layer, over one position group."""

    layer: int
    component: str
    group: str

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_{self.component}"


# (hook name, positions, values) written into one row of a batched forward
Patch = tuple[str, Int[Tensor, " _k"], Float[Tensor, "_k d"]]  # _k: each patch its own count


def sweep_cells(n_layers: int, components: Sequence[str] = DEFAULT_COMPONENTS, groups: Sequence[str] = (),
                layers: Iterable[int] | None = None) -> list[Cell]:
    """Every (layer, component, group) cell, layer-major; `layers` defaults to all of them."""
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise PatchingError(f"components {bad}: expected some of {COMPONENTS}")
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if any(not 0 <= x < n_layers for x in layers):
        raise PatchingError(f"layers {layers}: the model has {n_layers} layers")
    if not groups:
        raise PatchingError("no position groups to patch")
    return [Cell(layer, c, g) for layer in layers for c in components for g in groups]


def patch_values(base: Run, source: Run, cell: Cell, align: str = "last"
                 ) -> tuple[Int[Tensor, " k"], Float[Tensor, "k d"], str]:
    """(base positions, the source's values for them, alignment) of one cell (see the module docstring)."""
    if align not in ALIGNS:
        raise PatchingError(f"align {align!r}: expected one of {ALIGNS}")
    pb, ps = base.group(cell.group), source.group(cell.group)
    if not len(pb) or not len(ps):
        raise PatchingError(f"position group {cell.group!r} is empty on one side of the pair")
    if cell.hook not in source.cache:
        raise PatchingError(f"hook {cell.hook} was not prepared (pass it to prepare/prepare_pair)")
    act = source.cache[cell.hook]
    if len(pb) == len(ps):
        dst, vals, how = pb, act[torch.as_tensor(ps, device=act.device)], "position"
        how = how if np.array_equal(pb, ps) else "shifted"
    elif align == "last":
        dst, vals, how = pb[-1:], act[int(ps[-1])][None], "last"
    else:
        dst, how = pb, "mean"
        vals = act[torch.as_tensor(ps, device=act.device)].float().mean(0).to(act.dtype).expand(len(pb), -1)
    return torch.as_tensor(dst, device=act.device), vals, how


def _setter(rows: Tensor, positions: Tensor, values: Tensor) -> Callable[[Tensor, str], Tensor]:
    def fn(x: Tensor, name: str) -> Tensor:
        x = x.clone()  # the values may come from a run whose layer sat on another device (another device_map)
        x[rows.to(x.device), positions.to(x.device)] = values.to(x.device, x.dtype)
        return x
    return fn


def patched_metrics(loaded: LoadedModel, base: Run, answer: Answer, rows: Sequence[Sequence[Patch]],
                    batch_size: int = 16, prefix: bool = True) -> dict[str, np.ndarray]:
    """Metrics of the base run with each row's patches written in, `batch_size` rows per forward.

    `prefix`: a batch whose rows patch nothing before position p starts at p, on the base run's KV cache of the
    positions before (exact: nothing before p changes). Rows are batched in order of their first patched
    position, latest first, so that late groups (the probe turn, the final token) run short forwards."""
    if batch_size < 1:
        raise PatchingError(f"batch_size {batch_size}: expected >= 1")
    if base.embeds is None:
        raise PatchingError("prepare the base run first")
    last = base.n - answer.n_logits  # the first position whose logits a metric reads
    starts = np.array([min([int(pos.min()) for _, pos, _ in r if len(pos)] + [last]) for r in rows], dtype=np.int64)
    use_prefix = prefix and base.kv is not None
    order = np.argsort(-starts, kind="stable") if use_prefix else np.arange(len(rows))
    out = {m: np.zeros(len(rows)) for m in METRICS}
    for b0 in range(0, len(rows), batch_size):
        idx = order[b0:b0 + batch_size]
        start = int(starts[idx].min()) if use_prefix else 0
        by_hook: dict[str, list[list[Tensor]]] = defaultdict(lambda: [[], [], []])
        for r, i in enumerate(idx):
            for hook, pos, vals in rows[i]:
                parts = by_hook[hook]
                parts[0].append(torch.full((len(pos),), r, dtype=torch.long, device=pos.device))
                parts[1].append(pos - start)
                parts[2].append(vals)
        fwd = [(h, _setter(torch.cat(p[0]), torch.cat(p[1]), torch.cat(p[2]))) for h, p in by_hook.items()]
        cache = prefix_cache(loaded, base, start, len(idx)) if start > 0 else None
        with torch.no_grad():
            got, _ = forward(loaded, base, answer, fwd, base.embeds.expand(len(idx), -1, -1), start, cache)
        for m in METRICS:
            out[m][idx] = got[m].float().cpu().numpy()
    return out


def metric_rows(cell: Cell | None, patched: dict[str, float], pair: Pair, direction: str, method: str,
                 extra: dict[str, Any]) -> list[dict[str, Any]]:
    """value / clean / corrupt rows of every metric, its score and the flip of the winning continuation."""
    base, _ = pair.roles(direction)
    head = {"direction": direction, "method": method, "contrast": pair.answer.contrast, **extra}
    if cell is not None:
        head.update(layer=cell.layer, component=cell.component, hook=cell.hook, position_group=cell.group)
    rows = []
    for m in METRICS:
        clean, corrupt = pair.clean.metrics[m], pair.corrupt.metrics[m]
        v = float(patched[m])
        rows.append({**head, "metric": m, "value": v, "clean": clean, "corrupt": corrupt})
        rows.append({**head, "metric": f"score_{m}", "value": float(patch_score(v, clean, corrupt)),
                     "clean": clean, "corrupt": corrupt})
    ld = base.metrics["logit_diff"]
    rows.append({**head, "metric": "flip", "value": float(np.sign(patched["logit_diff"]) != np.sign(ld)),
                 "clean": pair.clean.metrics["logit_diff"], "corrupt": pair.corrupt.metrics["logit_diff"]})
    return rows


@runtime_checkable
class Cached(Protocol):
    """Anything holding a run's activations by hook name (a prepared `Run`)."""

    cache: dict[str, Tensor]


def null_by_construction(base: Cached, cell: Cell, dst: Int[Tensor, " k"], vals: Float[Tensor, "k d"]) -> bool:
    """Whether writing `vals` at `dst` into the base run's `cell` changes nothing: the base run holds those values
    there already (e.g. positions before the image in an image pair, task-swap positions before the probe turn),
    so the patched run IS the base run. Equal within 8 units of the activations' dtype rounding, not bitwise: on a
    GPU the same prefix computed inside sequences of other lengths may differ in the last bits, and a consistent
    offset of that size in every pair would otherwise be tested, and starred. On this CPU they are bitwise equal."""
    have = base.cache[cell.hook][dst].float()
    want = vals.to(base.cache[cell.hook].dtype).float()
    eps = 8 * torch.finfo(base.cache[cell.hook].dtype).eps
    return bool(torch.allclose(have, want, rtol=eps, atol=eps * float(have.abs().max().clamp(min=1e-30))))


def exact_patching(loaded: LoadedModel, pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                   batch_size: int = 16, align: str = "last", prefix: bool = True) -> list[dict[str, Any]]:
    """Exact patching of every cell (one batched forward per `batch_size` cells, see `patched_metrics`); tidy
    rows, method 'exact', with `null_by_construction` (see the function of that name) and the pair's `contrast`."""
    base, source = pair.roles(direction)
    specs = [patch_values(base, source, c, align) for c in cells]
    got = patched_metrics(loaded, base, pair.answer, [[(c.hook, dst, vals)] for c, (dst, vals, _) in
                                                      zip(cells, specs)], batch_size, prefix)
    rows = []
    for i, (c, (dst, vals, how)) in enumerate(zip(cells, specs)):
        rows += metric_rows(c, {m: got[m][i] for m in METRICS}, pair, direction, "exact",
                            {"alignment": how, "n_positions": len(dst),
                             "null_by_construction": null_by_construction(base, c, dst, vals)})
    return rows
