"""The forwards every patching method runs, and `prepare`: one full forward of each side of a pair.

`prepare` runs a side once through the whole model (images, vision tower, LM) and keeps its metrics, every hooked
activation at every position, and the LM's input embeddings (`EMBEDS`: text embeddings with the image features
merged in). Every patched forward after that feeds those embeddings (`inputs_embeds`, no pixels), so the vision
tower runs once per side, not once per configuration; `prepare` checks once per model that this path gives the same
metrics as the full one. Every forward feeds the prompt and the teacher-forced first continuation, so one forward
gives every metric (`probes.patching.metrics`). With `grad`, `prepare` also keeps d metric / d activation of every
hook (one backward per metric), which attribution patching needs.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import Cache
from transformers.utils import ModelOutput

from probes.models.loading import LoadedModel
from probes.patching.config import PatchingError
from probes.patching.metrics import METRICS, Answer, answer_metrics
from probes.patching.pairs import Pair, Run

EMBEDS = "blocks.0.hook_resid_pre"  # the LM's input: text embeddings with image features merged in
Hook = tuple[str, Callable[[Tensor, str], Tensor | None]]  # (hook name, fn(activation, name) -> new or None)


def forward_kwargs(loaded: LoadedModel, run: Run, embeds: Float[Tensor, "rows pos d"] | None, keep: int,
                   start: int = 0, cache: Cache | None = None, use_cache: bool = False) -> dict[str, Any]:
    """Forward inputs of `run`: its ids and pixels (`embeds` None: one row) or one row per row of `embeds` (input
    embeddings, fed from position `start` on, after `cache`, the KV cache of positions < start); position ids and
    family extras of the teacher-forced sequence; logits of the last `keep` positions."""
    adapter, model = loaded.adapter, loaded.hf_model
    ids, n = run.ids, run.n
    rows = 1 if embeds is None else int(embeds.shape[0])
    images = run.rendered.image_inputs(adapter, range(len(run.rendered.images)))
    kw: dict[str, Any] = {"use_cache": use_cache or cache is not None, "past_key_values": cache}
    if embeds is None:
        if start:
            raise PatchingError("internal: the full (pixel) path runs the whole sequence")
        kw["input_ids"] = ids
        kw.update(images)
    else:
        kw["inputs_embeds"] = embeds[:, start:]
    if run.position_ids is None:
        need = images if adapter.positions_need_images else {}
        got = adapter.position_ids(model, ids, need)
        run.position_ids = False if got is None else got
    if run.position_ids is not False:
        pos = run.position_ids[..., start:]
        kw["position_ids"] = pos.expand(*pos.shape[:-2], rows, n - start)
    for k, v in adapter.forward_extras(ids, start, n).items():
        kw[k] = v.expand(rows, *v.shape[1:])
    if "logits_to_keep" in loaded.forward_params:
        kw["logits_to_keep"] = keep
    dev = loaded.device
    return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in kw.items()}


def forward(loaded: LoadedModel, run: Run, answer: Answer, hooks: Sequence[Hook] = (),
            embeds: Float[Tensor, "rows pos d"] | None = None, start: int = 0, cache: Cache | None = None,
            use_cache: bool = False) -> tuple[dict[str, Tensor], ModelOutput]:
    """(metrics [rows], model output) of one forward of `run` (see `forward_kwargs`) with `hooks`, which see
    positions start..n-1. Attention knockout wraps this in `probes.patching.knockouts.knockout_hooks`."""
    kw = forward_kwargs(loaded, run, embeds, answer.n_logits, start, cache, use_cache)
    with loaded.hooks(list(hooks)):
        out = loaded.hf_model(**kw)
    return answer_metrics(out.logits[:, -answer.n_logits:], answer), out


def _keep_kv(loaded: LoadedModel, out: ModelOutput) -> list[tuple[Tensor, Tensor]] | None:
    """The per-layer (keys, values) of a forward, for prefix reuse; None where a sliding-window cache keeps only
    the last positions (Gemma 3) or the cache has another layout."""
    layers = getattr(getattr(out, "past_key_values", None), "layers", None)
    if loaded.sliding_window is not None or not layers or getattr(layers[0], "keys", None) is None:
        return None
    return [(layer.keys.detach(), layer.values.detach()) for layer in layers]


def prefix_cache(loaded: LoadedModel, run: Run, start: int, rows: int) -> Cache:
    """A KV cache of `rows` copies of `run`'s positions < start (each row patches only positions >= start, so
    everything before is the unpatched run's; causal attention makes this exact)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.config)
    for i, (k, v) in enumerate(run.kv):
        cache.update(k[:, :, :start].expand(rows, -1, -1, -1), v[:, :, :start].expand(rows, -1, -1, -1), i)
    return cache


@contextmanager
def frozen_params(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without grad for a while: AtP wants gradients of activations only. Parameters offloaded by a
    device_map (on "meta") are left alone: accelerate swaps them for the real weights at each forward (the
    gradient asked for is still the activations' only), and after a generate under inference mode they are
    inference tensors, whose requires_grad cannot be set back."""
    flags = [p for p in model.parameters() if p.requires_grad and p.device.type != "meta"]
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p in flags:
            p.requires_grad_(True)


def metric_grads(metrics: dict[str, Tensor], hooks: Sequence[str], acts: Sequence[Tensor]
                 ) -> dict[str, dict[str, Tensor]]:
    """metric -> hook -> d metric / d activation [pos, d] of row 0 (zeros where the metric does not depend on it):
    one backward per metric, the graph kept until the last."""
    grads: dict[str, dict[str, Tensor]] = {}
    for i, m in enumerate(METRICS):
        got = torch.autograd.grad(metrics[m].sum(), list(acts), retain_graph=i < len(METRICS) - 1,
                                  allow_unused=True)
        grads[m] = {h: (g if g is not None else torch.zeros_like(a))[0].detach() for h, a, g in zip(hooks, acts, got)}
    return grads


_EMBEDS_CHECKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def prepare(loaded: LoadedModel, run: Run, answer: Answer, hooks: Iterable[str] = (), grad: bool = False,
            noise_from: Run | None = None) -> Run:
    """One forward of `run`: its metrics, its input embeddings and the activations of `hooks` at every position;
    with `grad`, also the gradient of each metric with respect to each of those activations (one backward per
    metric). A noise run starts from `noise_from`'s embeddings (prepared first) plus its seeded noise."""
    hooks = list(dict.fromkeys([*hooks]))
    kept: dict[str, Tensor] = {}
    embeds = None
    if run.noise is not None:
        if noise_from is None or noise_from.embeds is None:
            raise PatchingError("a noise run needs the prepared clean run (noise_from)")
        embeds = _noisy(loaded, noise_from, *run.noise)
        if grad:
            embeds = embeds.detach().requires_grad_(True)

    def keep(x: Tensor, name: str) -> Tensor | None:
        if name == EMBEDS and grad and embeds is None:  # the leaf every gradient flows back to
            x = x.detach().requires_grad_(True)
            kept[name] = x
            return x
        kept[name] = x
        return None

    names = list(dict.fromkeys([EMBEDS, *hooks]))
    with (torch.enable_grad() if grad else torch.no_grad()), (frozen_params(loaded.hf_model) if grad
                                                              else nullcontext()):
        metrics, out = forward(loaded, run, answer, [(h, keep) for h in names], embeds=embeds, use_cache=True)
        if grad:
            run.grads = metric_grads(metrics, hooks, [kept[h] for h in hooks])
    run.metrics = {m: float(v[0].detach()) for m, v in metrics.items()}
    run.embeds = kept[EMBEDS].detach()
    run.cache = {h: kept[h][0].detach() for h in hooks}
    run.kv = _keep_kv(loaded, out)
    if run.noise is None and loaded.hf_model not in _EMBEDS_CHECKED:
        _check_embeds_path(loaded, run, answer)
    return run


def _noisy(loaded: LoadedModel, clean: Run, std_multiple: float, seed: int) -> Tensor:
    """The clean run's embeddings with N(0, (k sigma)^2) noise on the image tokens (sigma: their own std)."""
    mask = loaded.adapter.image_token_mask(clean.ids)[0].to(clean.embeds.device) if loaded.adapter.is_multimodal \
        else torch.zeros(clean.n, dtype=torch.bool)
    if not mask.any():
        raise PatchingError(f"session {clean.session.session_id!r}: no image tokens to add noise to")
    x = clean.embeds.detach()
    sigma = x[0, mask].float().std()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(int(mask.sum()), x.shape[-1], generator=gen).to(x.device, torch.float32)
    out = x.clone()
    out[0, mask] = (x[0, mask].float() + std_multiple * sigma * noise).to(x.dtype)
    return out


def _check_embeds_path(loaded: LoadedModel, run: Run, answer: Answer) -> None:
    """Once per model: the input-embeddings path (used by every patched forward) gives the full path's metrics."""
    with torch.no_grad():
        got, _ = forward(loaded, run, answer, embeds=run.embeds)
    for m in METRICS:
        a, b = run.metrics[m], float(got[m][0])
        if abs(a - b) > 1e-3 * (1 + abs(a)):
            raise PatchingError(f"{loaded.name}: feeding blocks.0.hook_resid_pre back as inputs_embeds gives {m} "
                                f"{b:.6g}, the full forward {a:.6g}; this family rescales its embeddings inside the "
                                "model, so the patching shortcut is not exact for it")
    _EMBEDS_CHECKED.add(loaded.hf_model)


def prepare_pair(loaded: LoadedModel, pair: Pair, hooks: Iterable[str] = (), grad: Iterable[str] = ()) -> Pair:
    """Prepare both sides; `grad` names the sides ('clean', 'corrupt') whose gradients AtP needs."""
    hooks, grad = list(hooks), set(grad)
    if grad - {"clean", "corrupt"}:
        raise PatchingError(f"grad {sorted(grad)}: expected some of 'clean', 'corrupt'")
    prepare(loaded, pair.clean, pair.answer, hooks, grad="clean" in grad)
    prepare(loaded, pair.corrupt, pair.answer, hooks, grad="corrupt" in grad, noise_from=pair.clean)
    return pair
