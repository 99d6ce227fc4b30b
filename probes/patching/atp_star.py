"""AtP* attention-saturation (QK) correction for residual-stream cells (Kramar et al. 2024, sec. 3.1), alone and
with GradDrop (the full AtP*).

Plain AtP (`attribution_patching`) linearises the metric M in the patched activation. Where the patch moves a
softmax far (a key or query that wins or loses an attention head), the linear estimate through the softmax is
badly off: AtP* recomputes the attention pattern exactly and keeps the gradient with respect to the pattern.

Our cells are residual-stream contributions (layer c, component resid_pre / attn_out / mlp_out / resid_post,
position group P), not one head's query or key. The first attention the patched values feed is layer m = c for
resid_pre, m = c + 1 for the others; its pattern A_m reads the patched residual r_m through its norm, q/k
projections, rotary embedding and softmax (all heads, every query). `atp_qk` (`qk_patching`) estimates

    M(patched) - M(base) ~ dM/dr_m|A_m fixed . (r'_m - r_m) + dM/dA_m . (A_m(r'_m) - A_m(r_m))

- EXACT: r'_m, the residual stream entering layer m (for an attn_out cell, layer c's MLP is replayed on the
  patched positions; for the others r'_m - r_m is the patch itself), and the whole pattern A_m(r'_m) (layer m
  replayed up to its softmax, every head and query).
- LINEAR (first order, gradients of the base run): everything else: layer m's value/output path, its MLP, the
  residual skip, every later layer (their patterns included) and the unembedding.
Cells with no attention after them (attn_out/mlp_out/resid_post of the last layer) get the linear term only on
the exact residual stream after the last layer (for an attn_out cell: AtP with that layer's MLP exact).
Where A_m(r') - A_m(r) equals its linearisation (a small patch), the estimate equals plain AtP to first order:
dM/dr_m|A fixed + J_A^T dM/dA = dM/dr_m.

`atp_star` (`atp_star_patching`, the full AtP*): GradDrop (as `graddrop_patching`) on the QK-corrected estimate:
for each layer l, the estimate above with the gradients taken with layer l's attn_out and mlp_out cut on the
backward pass (when l = m, no gradient reaches A_m: the pattern term is 0 and r_m's gradient is the residual skip);
|estimate| summed over l / (L - 1): unsigned, compared on |effect|.

`atp_layer` (`qk_rows(..., "atp_layer")`, from the same replays): layer m replayed WHOLE on r'_m (its pattern,
values, output projection and MLP, every position), the rest linear: dM/dr_{m+1} . (f_m(r'_m) - f_m(r_m)). It
keeps what the QK correction drops: the product of the pattern's change and the values' change (a patch that
changes both what is read and where it is read), and layer m's MLP. Exact where the model after layer m is linear
in r_{m+1} (tested: the last layer, with the final norm removed). Not in Kramar et al.: a one-layer exact
patching followed by AtP, in the spirit of AtP*'s "recompute the first non-linearity exactly".

Cost (`prepare_qk`): one forward and one backward per metric of the base run (its residual-stream gradients), one
layer's backward per layer and metric, and with `graddrop` L more forwards and backwards (`prepare_graddrop`);
per cell a replay of layer m alone, batched, giving its pattern (atp_qk) and its output (atp_layer), and of layer
c for an attn_out cell. The layers run with eager attention during these (the pattern must exist as a tensor);
the rows' base metrics are the pair's own.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from probes.models.loading import LoadedModel
from probes.patching.attribution import prepare_graddrop
from probes.patching.config import PatchingError
from probes.patching.exact import Cell, metric_rows, patch_values
from probes.patching.forwards import prepare
from probes.patching.metrics import METRICS, Answer
from probes.patching.pairs import Pair, Run

QK_METHODS = ("atp_qk", "atp_star", "atp_layer")
UNSIGNED = ("atp_star",)  # GradDrop sums absolute values: compared on |effect|
REPLAY_RTOL = 1e-4  # replaying a layer on its captured inputs must give the forward's output (relative max error)


@dataclass
class QKPrep:
    """What the QK correction needs of one (base) run: per layer m its replay inputs, its base pattern, and per
    gradient variant (None: plain; l: layer l dropped) and metric the pair (dM/dr_m with A_m fixed, dM/dA_m)."""

    session_id: str
    n: int
    resid: list[Tensor]  # r_m [pos, d] for m = 0 .. L (the last: the last layer's output)
    inputs: list[tuple[tuple, dict[str, Any]]]  # per layer: the decoder layer's call, hidden states left out
    pattern: list[Tensor]  # A_m [heads, pos, pos]
    output: list[Tensor]  # layer m's output on r_m [pos, d] (= r_{m+1})
    g_next: list[dict[str, Tensor]]  # dM/dr_{m+1} [pos, d] per metric (plain gradients)
    terms: dict[int | None, list[dict[str, tuple[Tensor, Tensor | None]]]]  # variant -> m -> metric -> (gfix, gA)


def qk_hooks(n_layers: int) -> list[str]:
    """The residual-stream hooks the correction reads: every layer's input and the last layer's output."""
    return [f"blocks.{m}.hook_resid_pre" for m in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


class _Stop(Exception):
    """Raised by a hook to end a layer replay once the attention pattern is known (`stop`: the rest not needed)."""


@contextmanager
def _eager(loaded: LoadedModel) -> Iterator[list[torch.nn.Module]]:
    """The LM's decoder layers, with eager attention for a while (the pattern then exists as a tensor)."""
    layers = list(loaded.adapter.lm_layers(loaded.hf_model))
    configs = {id(c): c for c in (getattr(getattr(x, loaded.adapter.attn_name), "config", None) for x in layers)
               if c is not None}
    if not configs:
        raise PatchingError(f"{loaded.name}: its attention modules carry no config; cannot switch them to eager "
                            "attention for the QK correction")
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield layers
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


@contextmanager
def _capture_inputs(layers: Sequence[torch.nn.Module], into: list) -> Iterator[None]:
    """Record each decoder layer's call (positional args but the hidden states, keyword args without the KV
    cache) during a forward, to replay the layer alone later."""
    def make(i: int) -> Callable:
        def pre(mod, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
            if "use_cache" in kw:
                kw["use_cache"] = False
            into[i] = (tuple(args[1:]), kw)
        return pre
    into[:] = [None] * len(layers)
    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replay(loaded: LoadedModel, layer: torch.nn.Module, x: Float[Tensor, "b pos d"], inputs: tuple,
            stop: bool = False, edit: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor | None, Tensor]:
    """(layer output or None when `stop`, attention pattern [b, heads, pos, pos]) of one decoder layer run alone
    on `x` with its captured inputs; `edit` rewrites the attention module's output (an attn_out patch)."""
    got: dict[str, Tensor] = {}

    def hook(mod, args, out):
        if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
            raise PatchingError(f"{loaded.name}: its attention module returns no attention pattern under eager "
                                "attention; the QK correction needs it")
        got["pattern"] = out[1]
        if stop:
            raise _Stop
        return None if edit is None else (edit(out[0]), *out[1:])

    args, kw = inputs
    handle = getattr(layer, loaded.adapter.attn_name).register_forward_hook(hook)
    try:
        y = layer(x, *args, **kw)
    except _Stop:
        y = None
    finally:
        handle.remove()
    if isinstance(y, tuple):
        y = y[0]
    return y, got["pattern"]


def _layer_terms(loaded: LoadedModel, layer: torch.nn.Module, r: Tensor, inputs: tuple, g_next: dict[str, Tensor]
                 ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]:
    """(output, metric -> (dM/dr_m with A_m fixed, dM/dA_m), pattern) of layer m replayed on r_m, given dM/d its
    output. gfix = (total gradient) - (the part through the pattern): the vector-Jacobian products of the layer."""
    x = r[None].detach().clone().requires_grad_(True)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.enable_grad():
        y, pattern = _replay(loaded, layer, x, inputs)
        for metric in METRICS:
            g = g_next[metric][None].to(y.dtype)
            g_pattern, g_total = torch.autograd.grad(y, [pattern, x], g, retain_graph=True)
            (through,) = torch.autograd.grad(pattern, x, g_pattern, retain_graph=True)
            out[metric] = ((g_total - through)[0].detach().float(), g_pattern[0].detach().float())
    return y[0].detach(), out, pattern[0].detach().float()


def prepare_qk(loaded: LoadedModel, run: Run, answer: Answer, graddrop: bool = False,
               noise_from: Run | None = None) -> QKPrep:
    """The QK correction's gradients of `run` (the base run: the corrupt side for denoising, the clean one for
    noising); with `graddrop`, also every layer-dropped variant (for `atp_star_patching`). `run` is not changed
    (a copy is prepared); a noise run needs its prepared clean run as `noise_from`, as in `prepare`."""
    L = loaded.n_layers
    hooks = qk_hooks(L)
    work = dataclasses.replace(run, metrics={}, embeds=None, cache={}, grads=None, kv=None, gd_grads=None)
    inputs: list = []
    with _eager(loaded) as layers:
        with _capture_inputs(layers, inputs):
            prepare(loaded, work, answer, hooks, grad=True, noise_from=noise_from)
        if graddrop:
            prepare_graddrop(loaded, work, answer, hooks)
        if any(i is None for i in inputs):
            raise PatchingError(f"{loaded.name}: a decoder layer was not called in the forward; cannot replay it")
        resid = [work.cache[h].float() for h in hooks]
        variants: dict[int | None, dict[str, dict[str, Tensor]]] = {None: work.grads}
        if graddrop:
            variants.update(enumerate(work.gd_grads))
        terms: dict[int | None, list] = {v: [] for v in variants}
        pattern: list[Tensor] = []
        output: list[Tensor] = []
        for m in range(L):
            for v, grads in variants.items():
                g_next = {metric: grads[metric][hooks[m + 1]] for metric in METRICS}
                if v == m:  # layer m's outputs cut: only the residual skip carries gradient, none reaches A_m
                    terms[v].append({metric: (g_next[metric].float(), None) for metric in METRICS})
                    continue
                y, got, a = _layer_terms(loaded, layers[m], work.cache[hooks[m]], inputs[m], g_next)
                terms[v].append(got)
                if v is None:
                    pattern.append(a)
                    output.append(y.float())
                    _check_replay(loaded, m, y, work.cache[hooks[m + 1]])
        for v, grads in variants.items():  # after the last layer: the plain gradient of the residual stream
            terms[v].append({metric: (grads[metric][hooks[L]].float(), None) for metric in METRICS})
    g_next = [{metric: work.grads[metric][hooks[m + 1]].float() for metric in METRICS} for m in range(L)]
    return QKPrep(str(run.session.session_id), run.n, resid, inputs, pattern, output, g_next, terms)


def _check_replay(loaded: LoadedModel, m: int, got: Tensor, want: Tensor) -> None:
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))
    if not err <= REPLAY_RTOL:
        raise PatchingError(f"{loaded.name}: layer {m} replayed alone on its captured inputs differs from the "
                            f"forward by {err:.3g} (relative); this family's layers need inputs the replay lacks")


def first_attention(cell: Cell) -> int:
    """m: the first layer whose attention reads the patched residual stream (L: none does)."""
    return cell.layer if cell.component == "resid_pre" else cell.layer + 1


def residual_changes(loaded: LoadedModel, prep: QKPrep, cells: Sequence[Cell], dsts: Sequence[Tensor],
                      deltas: Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """r'_m - r_m at each cell's positions: the patch itself, or for an attn_out cell layer c's output replayed
    with the patch added to its attention output (row 0 of each batch unpatched, so the difference is exact
    where nothing changes)."""
    out: list[Tensor | None] = [d for d in deltas]
    layers = list(loaded.adapter.lm_layers(loaded.hf_model))
    todo = defaultdict(list)
    for i, c in enumerate(cells):
        if c.component == "attn_out" and bool((deltas[i] != 0).any()):
            todo[c.layer].append(i)
    with _eager(loaded), torch.no_grad():
        for c_layer, idx in todo.items():
            for b0 in range(0, len(idx), batch_size):
                chunk = idx[b0:b0 + batch_size]
                x = prep.resid[c_layer][None].expand(len(chunk) + 1, -1, -1)

                def edit(a: Tensor, chunk: list[int] = chunk) -> Tensor:
                    a = a.clone()
                    for r, i in enumerate(chunk, start=1):
                        a[r, dsts[i].to(a.device)] += deltas[i].to(a.device, a.dtype)
                    return a
                y, _ = _replay(loaded, layers[c_layer], x.to(loaded.dtype), prep.inputs[c_layer], edit=edit)
                for r, i in enumerate(chunk, start=1):
                    out[i] = (y[r, dsts[i]] - y[0, dsts[i]]).float()
    return out


def pattern_changes(loaded: LoadedModel, prep: QKPrep, m: int, dsts: Sequence[Tensor], changes: Sequence[Tensor]
                    ) -> tuple[Tensor, Tensor]:
    """(A_m(r'_m) - A_m(r_m) [b, heads, pos, pos], layer m's output change [b, pos, d]) of a batch of patched
    residual streams (layer m replayed on them)."""
    layer = list(loaded.adapter.lm_layers(loaded.hf_model))[m]
    x = prep.resid[m][None].repeat(len(dsts), 1, 1)
    for r, (dst, ch) in enumerate(zip(dsts, changes)):
        x[r, dst] += ch
    with _eager(loaded), torch.no_grad():
        y, a = _replay(loaded, layer, x.to(loaded.dtype), prep.inputs[m])
    return a.float() - prep.pattern[m][None], y.float() - prep.output[m][None]


def qk_estimates(loaded: LoadedModel, prep: QKPrep, pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                 align: str = "last", batch_size: int = 16) -> list[dict[str, Any]]:
    """Per cell: its positions, alignment, whether the patch changes nothing, and per gradient variant (None: plain,
    l: layer l dropped) and metric the estimated change of the metric (linear term + exact-pattern term)."""
    base, source = pair.roles(direction)
    if prep.session_id != str(base.session.session_id) or prep.n != base.n:
        raise PatchingError(f"QK correction {direction}: prepare_qk was run on session {prep.session_id!r} "
                            f"({prep.n} positions), the base run is {base.session.session_id!r} ({base.n}); "
                            "prepare the base run (corrupt for denoise, clean for noise)")
    L = len(prep.pattern)
    for c in cells:
        if not 0 <= c.layer < L:
            raise PatchingError(f"cell {c}: the model has {L} layers")
    specs = [patch_values(base, source, c, align) for c in cells]
    deltas = [vals.float() - base.cache[c.hook][dst].float() for c, (dst, vals, _) in zip(cells, specs)]
    dsts = [dst for dst, _, _ in specs]
    changes = residual_changes(loaded, prep, cells, dsts, deltas, batch_size)
    found = [{"dst": dst, "alignment": how, "null": not bool((d != 0).any()),
              "est": {v: {metric: 0.0 for metric in METRICS} for v in prep.terms},
              "layer": {metric: 0.0 for metric in METRICS}}
             for (dst, _, how), d in zip(specs, deltas)]
    for i, c in enumerate(cells):
        if found[i]["null"]:
            continue
        m = first_attention(c)
        for v, per in prep.terms.items():
            for metric, (gfix, _) in per[m].items():
                found[i]["est"][v][metric] += float((gfix[dsts[i]] * changes[i]).sum())
                if v is None and m == L:  # no layer after: the layer-exact estimate is this linear term
                    found[i]["layer"][metric] = found[i]["est"][v][metric]
    by_m = defaultdict(list)
    for i, c in enumerate(cells):
        if not found[i]["null"] and first_attention(c) < L:
            by_m[first_attention(c)].append(i)
    for m, idx in by_m.items():
        for b0 in range(0, len(idx), batch_size):
            chunk = idx[b0:b0 + batch_size]
            dA, dY = pattern_changes(loaded, prep, m, [dsts[i] for i in chunk], [changes[i] for i in chunk])
            for r, i in enumerate(chunk):
                for metric in METRICS:
                    found[i]["layer"][metric] = float((prep.g_next[m][metric] * dY[r]).sum())
                for v, per in prep.terms.items():
                    for metric, (_, g_pattern) in per[m].items():
                        if g_pattern is not None:
                            found[i]["est"][v][metric] += float((g_pattern * dA[r]).sum())
    return found


def qk_rows(found: Sequence[dict[str, Any]], pair: Pair, cells: Sequence[Cell], direction: str,
            method: str = "atp_qk") -> list[dict[str, Any]]:
    """Rows (as `attribution_patching`'s) of `qk_estimates`' output: method 'atp_qk' (the plain-gradient variant,
    signed), 'atp_star' (GradDrop over the layer-dropped variants: sum of |.| / (L - 1), unsigned) or 'atp_layer'
    (layer m replayed whole, signed)."""
    if method not in QK_METHODS:
        raise PatchingError(f"method {method!r}: expected one of {QK_METHODS}")
    if len(found) != len(cells):
        raise PatchingError(f"qk_rows: {len(found)} estimates for {len(cells)} cells")
    base, _ = pair.roles(direction)
    rows = []
    for c, f in zip(cells, found):
        drops = [v for v in f["est"] if v is not None]
        if method == "atp_star" and not drops:
            raise PatchingError(f"AtP* {direction}: prepare_qk(..., graddrop=True) on the base run first")
        if method == "atp_qk":
            change = {metric: f["est"][None][metric] for metric in METRICS}
        elif method == "atp_layer":
            change = dict(f["layer"])
        else:
            change = {metric: sum(abs(f["est"][v][metric]) for v in drops) / max(len(drops) - 1, 1)
                      for metric in METRICS}
        est = {metric: base.metrics[metric] + change[metric] for metric in METRICS}
        rows += metric_rows(c, est, pair, direction, method, {"alignment": f["alignment"],
                                                              "n_positions": len(f["dst"]),
                                                              "null_by_construction": f["null"]})
    return rows


def qk_patching(loaded: LoadedModel, prep: QKPrep, pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                align: str = "last", batch_size: int = 16) -> list[dict[str, Any]]:
    """AtP with the attention-saturation correction (method 'atp_qk', signed; see the module docstring): rows as
    `attribution_patching`'s. `prep`: `prepare_qk` of the base run."""
    return qk_rows(qk_estimates(loaded, prep, pair, cells, direction, align, batch_size), pair, cells, direction)


def atp_star_patching(loaded: LoadedModel, prep: QKPrep, pair: Pair, cells: Sequence[Cell],
                      direction: str = "denoise", align: str = "last", batch_size: int = 16) -> list[dict[str, Any]]:
    """The full AtP* (method 'atp_star', unsigned like 'atp_graddrop'): base + sum over layers l of |the QK-corrected
    estimate with layer l's gradient dropped| / (L - 1). `prep`: `prepare_qk(..., graddrop=True)` of the base run."""
    if all(v is None for v in prep.terms):
        raise PatchingError(f"AtP* {direction}: prepare_qk(..., graddrop=True) on the base run first")
    return qk_rows(qk_estimates(loaded, prep, pair, cells, direction, align, batch_size), pair, cells, direction,
                   "atp_star")
