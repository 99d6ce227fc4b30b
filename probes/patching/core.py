"""Activation patching for cross-task leakage, on the toolkit's own hooks (transformer-lens cannot pass images).

A *pair* is one clean and one corrupt input that should behave differently: the clean one leaks (or is the
document with the asked value), the corrupt one does not. Corruptions (`build_pair`):

- "image": the same document with another identity's value in the asked field (`documents.render_pair`):
  pixel-identical outside the value boxes, same tokens, same positions.
- "framing": the same document and request under another framing (a leaking 'caption' vs a refusing 'direct'):
  the probe turn's text changes length, so positions after it shift (see alignment below).
- "text": symmetric text replacement, `replacements` {old: new} in the turn texts; the token length must not
  change (checked).
- "noise": Gaussian noise of `noise_std` (3) times the standard deviation of the image-token embeddings, added to
  those embeddings (a secondary check; the same seeded noise in every row).

Metrics (`probes.patching.metrics`): a logit difference between two continuations the pair tells apart (its
`contrast`: for an image pair the clean value's token vs the corrupt value's, at the first token where they
differ; for a framing pair the model's own first answer token under the leaking framing vs the refusal's), the
summed log-probability of the PII value under teacher forcing, and the normalised score (patched - corrupt) /
(clean - corrupt). Every forward feeds the prompt and the teacher-forced first continuation, so one forward gives
them all.

Pair check (`pair_check`): before a pair's cells are patched, its separation (clean - corrupt logit_diff) must be
at least `min_separation` (default `MIN_SEPARATION`, 1 nat); a pair below it, or one that cannot be measured
(`PairRejected`: e.g. the clean framing's own answer is the refusal), is dropped from the rows, never silently: the
pairs table (`pair_checks(rows)`, `patching_<experiment>_pairs.csv`) lists every pair with its separation, kept
and reason, and a `PairsDroppedWarning` gives the count.

Null by construction: every cell row says whether the patch wrote exactly (bitwise) the values the base run
already held there (`null_by_construction`): then the patched run is the base run and the cell cannot have
changed anything (e.g. the text before the image in an image pair, task-swap positions before the probe turn);
statistics leave such cells out of their test families.

How a pair is run. `prepare` runs each side once through the whole model (images, vision tower, LM) and keeps
its metrics, every hooked activation at every position, and the LM's input embeddings (`blocks.0.hook_resid_pre`:
text embeddings with the image features merged in). Every patched forward after that feeds those embeddings
(`inputs_embeds`, no pixels), so the vision tower runs once per side, not once per configuration; `prepare`
checks once per model that this path gives the same metrics as the full one.

- Exact patching (`exact_patching`): a cell is (layer, component, position group); component is resid_pre,
  resid_post, attn_out or mlp_out (`blocks.{l}.hook_{component}`). Denoising runs the corrupt input with the
  clean activation of the cell patched in; noising runs the clean input with the corrupt one. Many cells run as
  ONE forward: the batch dimension holds the configurations, and one hook per hook point writes each row's own
  positions (`patched_metrics`; a row may patch several hooks, or none).
- Attribution patching (`attribution_patching`, AtP): metric(patched) - metric(base) ~ sum over the cell's
  positions of (a_source - a_base) . d metric / d a, the gradient taken on the base run. `prepare(grad=True)`
  gets every cell's gradient from one forward and one backward per metric; with the other side's forward that is
  two forwards for all cells. `atp_agreement` compares it with exact patching on EFFECTS (patched - base) per pair:
  Spearman over the pair's cells (null-by-construction cells left out), mean and median over pairs, and the
  top-k recall of exact patching's k largest cells (k = 10).
- AtP* (Kramar et al. 2024). GradDrop (`prepare_graddrop`, `graddrop_patching`, method 'atp_graddrop'): for each
  layer l, the AtP estimate with the gradient through layer l's attn_out and mlp_out dropped; the estimate of
  |effect| is the sum over l of their absolute values / (L - 1) (unsigned: compared on |effect|). L extra forwards
  and backwards per side. The attention-saturation correction (recompute the softmax of a head whose query or key
  is patched) is not implemented: it corrects nodes that ARE a head's query or key; the cells here are residual-
  stream contributions (resid_pre, attn_out, mlp_out summed over heads), whose path through a later softmax is
  the whole rest of the forward (exact patching). A one-layer version (the first attention layer reading the
  patched positions recomputed exactly, the rest linear) would need the attention modules called outside the
  model's forward with their rotary and mask arguments, family by family; left for later.
- Task swap: the "framing" pair patched in both directions (leaking framing into refusing and back); the `flip`
  metric says whether the winning continuation changed.
- Attention knockout (`knockout`): queries of a target set (the probe turn and the answer) may not attend to keys
  of a source set (the PII patches, an earlier turn) in a window of layers. A forward pre-hook on each attention
  module rewrites its 4-D attention mask per batch row (sdpa: a boolean mask, where the model passed none and
  would have relied on is_causal; eager: the model's additive float mask, blocked cells set to the dtype's
  minimum). A query always keeps its own key (no fully masked row). Knocking out an empty set changes nothing
  (tested on eager and sdpa, which agree). Flash attention takes no mask and is refused.

Position groups (`position_groups`): `pii_patches` (the image tokens whose boxes overlap the value's ink box,
`documents.patches_for_box`; for an image pair, either document's box), `other_image`, `turn{t}` (each turn's
non-image tokens, template included, the final prompt token excepted), `final` (the last prompt token, where the
answer starts). Also by name: `all` (every position, teacher-forced answer included), `answer`, or any token-map
selector (`mark:ssn`, `last:2`). Alignment of a pair of unequal lengths (framing swap): a group with as many
positions on both sides is patched position by position (alignment "position", or "shifted" when the positions
moved); a group whose size differs is patched at its last position only ("last", the default: the turn's summary
position as the model reads it) or with the source group's mean written into every base position ("mean").
We align by group rather than padding the shorter framing: padding would add tokens the model was never shown.

Outputs: tidy rows (model, family, experiment, corruption, direction, method, session_id, identity_id, framing,
scenario, pii_type, turn_distance, layer, component, hook, position_group, alignment, target, window,
n_positions, metric, value, clean, corrupt, n; then contrast and null_by_construction), the pairs table,
`summarize` (means with bootstrap CIs clustered by identity), and `run_patching`, which writes CSVs and figures for
`mmret patch`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
import weakref
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from probes.data.documents import Box, changed_boxes, patches_for_box, render_pair
from probes.data.identities import Identity, make_identities
from probes.models.loading import LoadedModel
from probes.patching.metrics import (METRICS, MIN_SEPARATION, Answer, PairRejected, PatchingError, answer_metrics,
                                     make_answer, own_answer, patch_score, value_answer)
from probes.models.render import RenderedSession, render
from probes.data.session import Session, SessionImage, Turn, read_sessions
from probes.data.files import atomic_write_bytes, parts_folder
from probes.data.builders import FRAMINGS, disclosure_request, frame, mark_values

log = logging.getLogger(__name__)

COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
DIRECTIONS = ("denoise", "noise")
CORRUPTIONS = ("image", "framing", "text", "noise")
EXPERIMENTS = ("denoise", "noise", "atp", "taskswap", "knockout")
ALIGNS = ("last", "mean")
DEFAULT_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
EMBEDS = "blocks.0.hook_resid_pre"  # the LM's input: text embeddings with image features merged in
ROW_COLUMNS = ("model", "family", "experiment", "corruption", "direction", "method", "session_id", "identity_id",
               "framing", "corrupt_framing", "scenario", "pii_type", "turn_distance", "layer", "component", "hook",
               "position_group", "alignment", "target", "window", "n_positions", "metric", "value", "clean",
               "corrupt", "n")


# ---- runs and pairs -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One side of a pair: its session, rendering, teacher-forced ids and position groups; `prepare` fills in
    metrics, input embeddings, activations (hook -> [pos, d]) and, with grad, d metric / d activation."""

    session: Session
    rendered: RenderedSession
    ids: Int[Tensor, "1 pos"]  # the prompt, then the PII value's tokens but the last (teacher forcing)
    groups: dict[str, np.ndarray]
    noise: tuple[float, int] | None = None  # (std multiple, seed): this run is the clean run's embeddings + noise
    metrics: dict[str, float] = field(default_factory=dict)
    embeds: Float[Tensor, "1 pos d"] | None = None
    cache: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, dict[str, Tensor]] | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None  # per layer (keys, values), for prefix reuse
    gd_grads: list[dict[str, dict[str, Tensor]]] | None = None  # GradDrop: per dropped layer, like `grads`
    _position_ids: Any = None

    @property
    def n_prompt(self) -> int:
        return self.rendered.n_positions

    @property
    def n(self) -> int:
        return int(self.ids.shape[1])

    def group(self, name: str) -> np.ndarray:
        """Positions of group `name`: a default group, 'all', 'answer' or a token-map selector."""
        if name in self.groups:
            return self.groups[name]
        if name == "all":
            return np.arange(self.n)
        if name == "answer":
            return np.arange(self.n_prompt, self.n)
        if ":" in name or name == "final":
            return self.rendered.token_map.select(name)
        raise PatchingError(f"position group {name!r}: expected one of {sorted(self.groups)}, 'all', 'answer' or a "
                            "token-map selector such as 'mark:ssn' or 'last:1'")


@dataclass
class Pair:
    clean: Run
    corrupt: Run
    answer: Answer
    corruption: str
    labels: dict[str, Any]  # the clean session's labels (private '_' ones included; rows copy public ones only)

    @property
    def same_length(self) -> bool:
        return self.clean.n == self.corrupt.n

    def roles(self, direction: str) -> tuple[Run, Run]:
        """(base, source): denoising runs the corrupt input with clean activations; noising the reverse."""
        if direction not in DIRECTIONS:
            raise PatchingError(f"direction {direction!r}: expected one of {DIRECTIONS}")
        return (self.corrupt, self.clean) if direction == "denoise" else (self.clean, self.corrupt)


def position_groups(adapter: Any, rendered: RenderedSession, pii_boxes: Sequence[Box] = (),
                    image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The default position groups of a prompt (see the module docstring); empty groups are left out.

    `pii_boxes`: ink boxes (x0, y0, x1, y1) in the document's pixels; the patches of every image of
    `image_size` (default: every image) that overlap one of them form `pii_patches`."""
    df = rendered.token_map.df
    pos = df["position"].to_numpy()
    image = df["segment"].to_numpy() == "image"
    pii = np.zeros(len(df), bool)
    key = ["tile", "patch_row", "patch_col"]
    for k, img in enumerate(rendered.images):
        if image_size is not None and tuple(img.size) != tuple(image_size):
            continue
        on_image = df[df["image_index"].to_numpy() == k]
        for box in pii_boxes:
            hit = patches_for_box(adapter, img.size, tuple(box))
            if len(hit):
                pii[on_image.merge(hit, on=key)["position"].to_numpy()] = True
    final = len(df) - 1
    groups = {"pii_patches": pos[pii], "other_image": pos[image & ~pii]}
    turns = df["turn"].to_numpy()
    for t in pd.unique(turns):
        groups[f"turn{t}"] = pos[(turns == t) & ~image & (pos != final)]
    groups["final"] = pos[-1:]
    return {k: v.astype(np.int64) for k, v in groups.items() if len(v)}


def _labels_boxes(session: Session) -> tuple[list[Box], tuple[int, int] | None]:
    box, size = session.labels.get("pii_box"), session.labels.get("doc_size")
    return ([tuple(box)] if box else []), (tuple(size) if size else None)


def make_run(loaded: LoadedModel, session: Session, answer: Answer, pii_boxes: Sequence[Box],
             image_size: tuple[int, int] | None) -> Run:
    """One side of a pair, rendered with its teacher-forced answer and position groups (not yet prepared)."""
    rendered = render(loaded.adapter, session)
    if rendered.generation_turn is None:
        raise PatchingError(f"session {session.session_id!r}: nothing to answer (end it with a user turn)")
    ids = torch.cat([rendered.input_ids, torch.tensor([answer.leak_ids[:-1]], dtype=torch.long)], dim=1)
    return Run(session, rendered, ids, position_groups(loaded.adapter, rendered, pii_boxes, image_size))


def _with_turns(session: Session, turns: list[Turn], suffix: str) -> Session:
    return Session(f"{session.session_id}~{suffix}", turns, dict(session.labels))


def session_identity(session: Session) -> Identity | None:
    """The identity a session's private `_identity` label holds (None without one)."""
    d = session.labels.get("_identity")
    return Identity.from_dict(d) if isinstance(d, dict) else None


def image_pair(session: Session, other: Identity, swap: Sequence[str] | None = None
               ) -> tuple[Session, list[Box]]:
    """The corrupt twin of `session`: its document re-rendered with `other`'s values in the `swap` fields (default:
    the asked PII type), and the value boxes of both documents (for `pii_patches`)."""
    ident = session_identity(session)
    lab = session.labels
    need = ("scenario", "pii_type", "doc_size", "doc_seed", "doc_layout")
    if ident is None or any(lab.get(k) is None for k in need):
        raise PatchingError(f"session {session.session_id!r}: an image pair needs the labels _identity and "
                            f"{', '.join(need)} (as mmprivacy_sessions / multiturn_sessions write them)")
    swap = tuple(swap) if swap is not None else (lab["pii_type"],)
    a, b = render_pair(ident, other, lab["scenario"], tuple(lab["doc_size"]), int(lab["doc_seed"]),
                       lab["doc_layout"], swap=swap)
    if all(a.fields[f].value == b.fields[f].value for f in swap):
        raise PatchingError(f"session {session.session_id!r}: identity {other.identity_id} has the same "
                            f"{', '.join(swap)} as {ident.identity_id}; pick another identity")
    clean_px = np.asarray(a.image)
    turns, replaced = [], 0
    for t in session.turns:
        images = []
        for im in t.images:
            same = np.array_equal(np.asarray(im.load()), clean_px)
            images.append(SessionImage.from_pil(b.image) if same else im)
            replaced += same
        turns.append(Turn(t.role, t.text, images, list(t.marks)))
    if not replaced:
        raise PatchingError(f"session {session.session_id!r}: none of its images is the document its labels "
                            "describe (re-rendering gives other pixels)")
    return _with_turns(session, turns, "image"), changed_boxes(a, b, swap)


def probe_turn(session: Session) -> int:
    """Index of the last user turn (the one asking for the PII)."""
    users = [i for i, t in enumerate(session.turns) if t.role == "user"]
    if not users:
        raise PatchingError(f"session {session.session_id!r} has no user turn")
    return users[-1]


def framing_pair(session: Session, corrupt_framing: str = "direct") -> Session:
    """The same session with its probe turn asked under `corrupt_framing` (same document, same request)."""
    lab = session.labels
    if corrupt_framing not in FRAMINGS:
        raise PatchingError(f"corrupt_framing {corrupt_framing!r}: expected one of {FRAMINGS}")
    if any(lab.get(k) is None for k in ("framing", "scenario", "pii_type")):
        raise PatchingError(f"session {session.session_id!r}: a framing pair needs labels framing, scenario, pii_type")
    request = disclosure_request(lab["scenario"], lab["pii_type"])
    p = probe_turn(session)
    old = session.turns[p]
    if old.text != frame(lab["framing"], request):
        raise PatchingError(f"session {session.session_id!r}: the probe turn is not frame({lab['framing']!r}, "
                            "request); cannot re-frame it")
    new = Turn("user", frame(corrupt_framing, request), list(old.images))
    ident = session_identity(session)
    if ident is not None:
        mark_values(new, ident)
    turns = [*session.turns[:p], new, *session.turns[p + 1:]]
    out = _with_turns(session, turns, corrupt_framing)
    out.labels["framing"] = corrupt_framing
    return out


def text_pair(session: Session, replacements: dict[str, str]) -> Session:
    """`session` with every `old` in its turn texts replaced by `new` (symmetric text replacement; the caller's
    `build_pair` checks that the token length stays the same)."""
    if not replacements:
        raise PatchingError("text corruption: give replacements {old: new}, e.g. {'SSN': 'Tel'}")
    turns, changed = [], False
    ident = session_identity(session)
    for t in session.turns:
        text = t.text
        if text is not None:
            for old, new in replacements.items():
                text = text.replace(old, new)
        if text == t.text:
            turns.append(Turn(t.role, t.text, list(t.images), list(t.marks)))
            continue
        changed = True
        nt = Turn(t.role, text, list(t.images))
        turns.append(mark_values(nt, ident) if ident is not None else nt)
    if not changed:
        raise PatchingError(f"session {session.session_id!r}: none of {list(replacements)} occurs in its turns")
    return _with_turns(session, turns, "text")


def build_pair(loaded: LoadedModel, session: Session, corruption: str, *, other: Identity | None = None,
               swap: Sequence[str] | None = None, corrupt_framing: str = "direct",
               replacements: dict[str, str] | None = None, noise_std: float = 3.0, seed: int = 0,
               leak: str | None = None, refusal: str | None = None) -> Pair:
    """A clean/corrupt pair from `session` (the clean side) by `corruption` (see the module docstring)."""
    if corruption not in CORRUPTIONS:
        raise PatchingError(f"corruption {corruption!r}: expected one of {CORRUPTIONS}")
    given = leak is not None or refusal is not None
    answer = make_answer(loaded.adapter, session, leak, refusal)
    boxes, size = _labels_boxes(session)
    noise = None
    if corruption == "image":
        if other is None:
            raise PatchingError("an image pair needs `other`, the identity whose values the corrupt document shows")
        corrupt, boxes = image_pair(session, other, swap)
        asked = session.labels.get("pii_type")
        if asked in (swap if swap is not None else (asked,)):
            corrupt.labels["_target"] = other.value(asked)
            if not given:  # the metric tells the two documents' values apart
                answer = value_answer(loaded.adapter, session, str(session.labels["_target"]),
                                      str(corrupt.labels["_target"]))
    elif corruption == "framing":
        if session.labels.get("framing") == corrupt_framing:
            raise PatchingError(f"session {session.session_id!r} is already under the {corrupt_framing!r} framing")
        corrupt = framing_pair(session, corrupt_framing)
        if not given:  # the model's own answer under the leaking framing against the refusal
            answer = framing_answer(loaded, session)
    elif corruption == "text":
        corrupt = text_pair(session, replacements or {})
    else:
        corrupt, noise = session, (float(noise_std), int(seed))
    clean_run = make_run(loaded, session, answer, boxes, size)
    corrupt_run = make_run(loaded, corrupt, answer, boxes, size)
    corrupt_run.noise = noise
    if corruption != "framing" and clean_run.n != corrupt_run.n:
        raise PatchingError(f"session {session.session_id!r}: the {corruption} corruption changes the token length "
                            f"({clean_run.n_prompt} -> {corrupt_run.n_prompt} prompt tokens); exact patching needs "
                            "equal lengths (for text: pick replacements of the same token length)")
    return Pair(clean_run, corrupt_run, answer, corruption, dict(session.labels))


def framing_answer(loaded: LoadedModel, session: Session, max_new_tokens: int = 32) -> Answer:
    """The Answer of a framing pair: the model's greedy answer to `session` (the clean, leaking framing) up to and
    including the value, against the refusal (`patching_metrics.own_answer`)."""
    from probes.leakage import generate_batch

    said = generate_batch(loaded, [session], max_new_tokens=max_new_tokens, batch_size=1, progress=False)[0]
    return own_answer(loaded.adapter, session, said, str(session.labels.get("_target", "")))


# ---- forwards -------------------------------------------------------------------------------------------------
def _forward_kwargs(loaded: LoadedModel, run: Run, rows: int, embeds: Tensor | None, keep: int, start: int = 0,
                    cache: Any = None, use_cache: bool = False) -> dict[str, Any]:
    """Forward inputs of `rows` copies of `run`: its ids and pixels (`embeds` None, one row only) or its input
    embeddings from position `start` on (after `cache`, the KV cache of positions < start); position ids and
    family extras of the teacher-forced sequence."""
    adapter, model = loaded.adapter, loaded.hf_model
    ids, n = run.ids, run.n
    images = run.rendered.image_inputs(adapter, range(len(run.rendered.images)))
    kw: dict[str, Any] = {"use_cache": use_cache or cache is not None, "past_key_values": cache}
    if embeds is None:
        if rows != 1 or start:
            raise PatchingError("internal: the full (pixel) path runs one whole row")
        kw["input_ids"] = ids
        kw.update(images)
    else:
        kw["inputs_embeds"] = embeds[:, start:].expand(rows, -1, -1)
    if run._position_ids is None:
        need = images if adapter.positions_need_images else {}
        run._position_ids = adapter.position_ids(model, ids, need)
        if run._position_ids is None:
            run._position_ids = False
    if run._position_ids is not False:
        pos = run._position_ids[..., start:]
        kw["position_ids"] = pos.expand(*pos.shape[:-2], rows, n - start)
    for k, v in adapter.forward_extras(ids, start, n).items():
        kw[k] = v.expand(rows, *v.shape[1:])
    if "logits_to_keep" in loaded.forward_params:
        kw["logits_to_keep"] = keep
    dev = loaded.device
    return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in kw.items()}


def _forward(loaded: LoadedModel, run: Run, answer: Answer, rows: int, fwd_hooks: Sequence = (),
             embeds: Tensor | None = None, knocks: Sequence | None = None, start: int = 0,
             cache: Any = None, use_cache: bool = False) -> tuple[dict[str, Tensor], Any]:
    """(metrics [rows], model output) of one forward of `rows` copies of `run`, with `fwd_hooks` (which see
    positions start..n-1) and attention `knocks`."""
    kw = _forward_kwargs(loaded, run, rows, embeds, answer.n_logits, start, cache, use_cache)
    with loaded.hooks(list(fwd_hooks)), (_knockout_hooks(loaded, knocks, run.n) if knocks else nullcontext()):
        out = loaded.hf_model(**kw)
    return answer_metrics(out.logits[:, -answer.n_logits:], answer), out


def _keep_kv(loaded: LoadedModel, out: Any) -> list[tuple[Tensor, Tensor]] | None:
    """The per-layer (keys, values) of a forward, for prefix reuse; None where a sliding-window cache keeps only
    the last positions (Gemma 3) or the cache has another layout."""

    layers = getattr(getattr(out, "past_key_values", None), "layers", None)
    if loaded.sliding_window is not None or not layers or getattr(layers[0], "keys", None) is None:
        return None
    return [(layer.keys.detach(), layer.values.detach()) for layer in layers]


def _prefix_cache(loaded: LoadedModel, run: Run, start: int, rows: int) -> Any:
    """A KV cache of `rows` copies of `run`'s positions < start (each row patches only positions >= start, so
    everything before is the unpatched run's; causal attention makes this exact)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.config)
    for i, (k, v) in enumerate(run.kv):
        cache.update(k[:, :, :start].expand(rows, -1, -1, -1), v[:, :, :start].expand(rows, -1, -1, -1), i)
    return cache


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without grad for a while: AtP wants gradients of activations only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


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
    ctx = (torch.enable_grad(), _frozen(loaded.hf_model)) if grad else (torch.no_grad(), nullcontext())
    with ctx[0], ctx[1]:
        metrics, out = _forward(loaded, run, answer, 1, [(h, keep) for h in names], embeds=embeds, use_cache=True)
        if grad:
            acts = [kept[h] for h in hooks]
            run.grads = {}
            for i, m in enumerate(METRICS):
                got = torch.autograd.grad(metrics[m].sum(), acts, retain_graph=i < len(METRICS) - 1,
                                          allow_unused=True)
                run.grads[m] = {h: (g if g is not None else torch.zeros_like(a))[0].detach()
                                for h, a, g in zip(hooks, acts, got)}
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
        got, _ = _forward(loaded, run, answer, 1, embeds=run.embeds)
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


# ---- exact patching -------------------------------------------------------------------------------------------
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
Patch = tuple[str, Int[Tensor, "k"], Float[Tensor, "k d"]]


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


def patch_values(base: Run, source: Run, cell: Cell, align: str = "last") -> tuple[Tensor, Tensor, str]:
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


def _setter(rows: Tensor, positions: Tensor, values: Tensor):
    def fn(x: Tensor, name: str) -> Tensor:
        x = x.clone()
        x[rows, positions] = values.to(x.dtype)
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
        cache = _prefix_cache(loaded, base, start, len(idx)) if start > 0 else None
        with torch.no_grad():
            got, _ = _forward(loaded, base, answer, len(idx), fwd, embeds=base.embeds, start=start, cache=cache)
        for m in METRICS:
            out[m][idx] = got[m].float().cpu().numpy()
    return out


def _metric_rows(cell: Cell | None, patched: dict[str, float], pair: Pair, direction: str, method: str,
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


def null_by_construction(base: Run, cell: Cell, dst: Tensor, vals: Tensor) -> bool:
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
        rows += _metric_rows(c, {m: got[m][i] for m in METRICS}, pair, direction, "exact",
                             {"alignment": how, "n_positions": len(dst),
                              "null_by_construction": null_by_construction(base, c, dst, vals)})
    return rows


# ---- attribution patching -------------------------------------------------------------------------------------
def attribution_patching(pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                         align: str = "last") -> list[dict[str, Any]]:
    """AtP estimate of every cell: base metric + sum over the cell's positions of (a_source - a_base) . grad,
    the gradient of the base run (`prepare_pair(grad=['corrupt'])` for denoising, ['clean'] for noising)."""
    base, source = pair.roles(direction)
    if base.grads is None:
        side = "corrupt" if direction == "denoise" else "clean"
        raise PatchingError(f"AtP {direction}: prepare the {side} run with grad=True first")
    rows = []
    for c in cells:
        dst, vals, how = patch_values(base, source, c, align)
        delta = vals.float() - base.cache[c.hook][dst].float()
        est = {m: base.metrics[m] + float((delta * base.grads[m][c.hook][dst].float()).sum()) for m in METRICS}
        rows += _metric_rows(c, est, pair, direction, "atp", {"alignment": how, "n_positions": len(dst),
                                                              "null_by_construction": bool((delta == 0).all())})
    return rows


UNSIGNED_ESTIMATORS = ("atp_graddrop",)  # estimate |effect| only (GradDrop sums absolute values)


def effects(df: pd.DataFrame) -> pd.Series:
    """Each row's change of its metric from the unpatched base run: value - corrupt (denoising) or value - clean
    (noising); 0 = the patch changed nothing."""
    base = df["corrupt"].where(df["direction"] == "denoise", df["clean"])
    return df["value"] - base


# ---- AtP*: GradDrop (Kramar et al. 2024) -------------------------------------------------------------------------
def prepare_graddrop(loaded: LoadedModel, run: Run, answer: Answer, hooks: Iterable[str]) -> Run:
    """GradDrop gradients of a prepared run: for each layer l, d metric / d activation of `hooks` with the gradient
    through layer l's residual-stream contribution dropped (its attn_out and mlp_out treated as constants on the
    backward pass; the forward is unchanged, so are the metrics). One forward and one backward per layer."""
    if run.embeds is None:
        raise PatchingError("prepare the run first (prepare / prepare_pair)")
    hooks = list(dict.fromkeys(hooks))
    run.gd_grads = []

    def cut(x: Tensor, name: str) -> Tensor:  # a new leaf: gradient reaches it, none flows back into the block
        return x.detach().requires_grad_(True)

    for layer in range(loaded.n_layers):
        kept: dict[str, Tensor] = {}

        def keep(x: Tensor, name: str) -> None:
            kept[name] = x

        cuts = [(f"blocks.{layer}.hook_{c}", cut) for c in ("attn_out", "mlp_out")]
        embeds = run.embeds.detach().requires_grad_(True)
        with torch.enable_grad(), _frozen(loaded.hf_model):
            metrics, _ = _forward(loaded, run, answer, 1, cuts + [(h, keep) for h in hooks], embeds=embeds)
            acts = [kept[h] for h in hooks]
            grads: dict[str, dict[str, Tensor]] = {}
            for i, m in enumerate(METRICS):
                got = torch.autograd.grad(metrics[m].sum(), acts, retain_graph=i < len(METRICS) - 1,
                                          allow_unused=True)
                grads[m] = {h: (g if g is not None else torch.zeros_like(a))[0].detach()
                            for h, a, g in zip(hooks, acts, got)}
        run.gd_grads.append(grads)
    return run


def graddrop_patching(pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                      align: str = "last") -> list[dict[str, Any]]:
    """AtP* GradDrop estimate of |effect| of every cell: sum over layers l of |AtP estimate with layer l's
    gradient dropped| / (L - 1) (Kramar et al. 2024, sec. 3.2: a cell whose direct and indirect effects cancel in
    the full gradient shows up once one path is dropped). Unsigned: rows hold value = base + that magnitude, method
    'atp_graddrop' (`atp_agreement` compares it on |effect|). Needs `prepare_graddrop` on the base run."""
    base, source = pair.roles(direction)
    if base.gd_grads is None:
        raise PatchingError(f"GradDrop {direction}: run prepare_graddrop on the base run first")
    n = len(base.gd_grads)
    rows = []
    for c in cells:
        dst, vals, how = patch_values(base, source, c, align)
        delta = vals.float() - base.cache[c.hook][dst].float()
        est = {m: base.metrics[m] + sum(abs(float((delta * g[m][c.hook][dst].float()).sum()))
                                        for g in base.gd_grads) / max(n - 1, 1) for m in METRICS}
        rows += _metric_rows(c, est, pair, direction, "atp_graddrop",
                             {"alignment": how, "n_positions": len(dst),
                              "null_by_construction": bool((delta == 0).all())})
    return rows


def atp_agreement(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """How well each estimator (method 'atp', and any AtP* rows: 'atp_graddrop') agrees with exact patching,
    measured on EFFECTS (`effects`: patched - base) PER PAIR, over the pair's cells, per (model, direction, metric,
    method):

    - spearman: Spearman correlation of the estimated and exact effects (NaN for an unsigned estimator);
    - spearman_abs: the same on |effect| (comparable for every estimator);
    - top_k_recall: share of exact patching's k cells of largest |effect| that are among the estimator's k
      largest (k capped at the pair's number of cells).

    Cells null by construction (`null_by_construction` on the exact row: both effects are 0 for want of any change)
    are left out, so agreement is not inflated by cells that nothing can move. Rows with scope 'pair' (one per
    session_id), then 'mean' and 'median' over pairs (n_pairs: how many pairs had a finite value). No pooled
    number over pairs: each pair's baseline would drive the ranks."""
    cell = ["session_id", "direction", "metric", "layer", "component", "position_group"]
    d = df[df["metric"].isin(METRICS)].assign(effect=lambda x: effects(x))
    exact = d[d["method"] == "exact"]
    if "null_by_construction" in exact.columns:
        exact = exact[~exact["null_by_construction"].astype("boolean").fillna(False).astype(bool)]
    estimates = d[d["method"] != "exact"]
    both = exact.merge(estimates, on=[*cell, "model"], suffixes=("_exact", "_est"))
    if not len(both):
        raise PatchingError("atp_agreement: no cells with both an exact and an estimator (AtP) row")
    out = []
    for (model, direction, metric, method), g in both.groupby(["model", "direction", "metric", "method_est"]):
        pairs = []
        for sid, s in g.groupby("session_id"):
            x, y = s["effect_exact"].to_numpy(float), s["effect_est"].to_numpy(float)
            signed = method not in UNSIGNED_ESTIMATORS
            kk = min(k, len(s))
            rec = {"model": model, "direction": direction, "metric": metric, "method": method, "scope": "pair",
                   "session_id": sid, "spearman": _spearman(x, y) if signed else np.nan,
                   "spearman_abs": _spearman(np.abs(x), np.abs(y)), "top_k_recall": top_k_recall(x, y, kk),
                   "k": kk, "n_cells": len(s), "n_pairs": 1}
            pairs.append(rec)
        out += pairs
        per = pd.DataFrame(pairs)
        for scope, fn in (("mean", np.nanmean), ("median", np.nanmedian)):
            row = {"model": model, "direction": direction, "metric": metric, "method": method, "scope": scope,
                   "session_id": None, "k": int(per["k"].min()), "n_cells": int(per["n_cells"].sum())}
            for col in ("spearman", "spearman_abs", "top_k_recall"):
                vals = per[col].to_numpy(float)
                row[col] = float(fn(vals)) if np.isfinite(vals).any() else np.nan
            row["n_pairs"] = int(np.isfinite(per["spearman_abs"].to_numpy(float)).sum())
            out.append(row)
    return pd.DataFrame(out)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN with fewer than 3 cells or a constant side (no ranking to compare)."""
    from scipy.stats import spearmanr  # noqa: F811 (imported here: scipy is slow to import)

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    return float(spearmanr(x, y).statistic)


def top_k_recall(exact: np.ndarray, estimate: np.ndarray, k: int = 10) -> float:
    """Share of the k cells of largest |exact effect| that are among the k of largest |estimate| (ties broken by
    cell order, the same way for both)."""
    if k < 1 or len(exact) < k:
        raise PatchingError(f"top_k_recall: k={k} with {len(exact)} cells")
    top = set(np.argsort(-np.abs(exact), kind="stable")[:k])
    got = set(np.argsort(-np.abs(estimate), kind="stable")[:k])
    return len(top & got) / k


# ---- attention knockout ---------------------------------------------------------------------------------------
Knock = tuple[np.ndarray, np.ndarray, frozenset]  # (source positions, target positions, layers)


@contextmanager
def _knockout_hooks(loaded: LoadedModel, knocks: Sequence[Knock], n: int) -> Iterator[None]:
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


def _mask_hook(blocked: Tensor):
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
        with torch.no_grad():
            res, _ = _forward(loaded, run, answer, len(chunk), embeds=run.embeds, knocks=[c[3] for c in chunk])
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


# ---- the experiment runner ------------------------------------------------------------------------------------
def _public(labels: dict[str, Any]) -> dict[str, Any]:
    keys = ("session_id", "identity_id", "framing", "scenario", "pii_type", "turn_distance")
    return {k: labels.get(k) for k in keys}


def other_identities(sessions: Sequence[Session], seed: int) -> list[Identity]:
    """The identities of `sessions` (from their private labels), the pool an image pair draws its other value from;
    two drawn ones when the sessions hold fewer than two."""
    pool: dict[str, Identity] = {}
    for s in sessions:
        ident = session_identity(s)
        if ident is not None:
            pool.setdefault(ident.identity_id, ident)
    out = list(pool.values())
    if len(out) < 2:
        out += make_identities(2, seed=90_000 + seed)
    return out


def pick_other(ident: Identity | None, pool: list[Identity], swap: Sequence[str]) -> Identity:
    """The next identity of the pool whose swapped values all differ from `ident`'s."""
    ids = [p.identity_id for p in pool]
    start = ids.index(ident.identity_id) + 1 if ident is not None and ident.identity_id in ids else 0
    for k in range(len(pool)):
        cand = pool[(start + k) % len(pool)]
        if ident is None or all(cand.value(f) != ident.value(f) for f in swap):
            return cand
    raise PatchingError("no other identity with different values to swap in")


def default_groups(pairs: Sequence[Pair]) -> list[str]:
    """Groups present on both sides of every pair, in a fixed order (PII patches, other patches, turns, final)."""
    names: list[str] = []
    for p in pairs:
        for g in [*p.clean.groups, *p.corrupt.groups]:
            if g not in names:
                names.append(g)
    common = [g for g in names if all(g in p.clean.groups and g in p.corrupt.groups for p in pairs)]
    order = {"pii_patches": 0, "other_image": 1, "final": 10_000}
    return sorted(common, key=lambda g: (order.get(g, 2 + int(g[4:]) if g.startswith("turn") else 5000), g))


EXPERIMENT_DEFAULTS = {  # experiment -> (corruption, directions, method)
    "denoise": ("image", ("denoise",), "exact"),
    "noise": ("image", ("noise",), "exact"),
    "atp": ("image", ("denoise", "noise"), "atp"),
    "taskswap": ("framing", ("denoise", "noise"), "exact"),
    "knockout": (None, (), "knockout"),
}


def patch_sessions(loaded: LoadedModel, sessions: Sequence[Session], experiment: str, *,
                   corruption: str | None = None, directions: Sequence[str] | None = None,
                   components: Sequence[str] = DEFAULT_COMPONENTS, layers: Iterable[int] | None = None,
                   groups: Sequence[str] | None = None, batch_size: int = 16, align: str = "last",
                   corrupt_framing: str = "direct", replacements: dict[str, str] | None = None,
                   swap: Sequence[str] | None = None, noise_std: float = 3.0, seed: int = 0,
                   sources: Sequence[str] | None = None, windows: Sequence[int] | None = None,
                   check_exact: bool = True, leak: str | None = None, refusal: str | None = None,
                   model: str | None = None, progress: bool = False, parts: str | os.PathLike | None = None,
                   min_separation: float | None = MIN_SEPARATION) -> pd.DataFrame:
    """Run `experiment` on every session (the clean side of each pair) and return the tidy rows (no summary).

    Every pair is checked first (`pair_check`): a pair whose metric does not separate clean from corrupt by
    `min_separation` nats of logit_diff (None: keep every pair, the check still recorded), or that cannot be
    measured at all (`PairRejected`), is dropped from the rows and listed in the pairs table (`pair_checks(rows)`,
    one row per session, `PAIR_COLUMNS`); a PairsDroppedWarning says how many of how many were dropped and why.
    `parts`: a folder where each session's rows are kept as it finishes, so that a killed run started again with
    the same folder patches only the sessions it had not finished (the caller names the folder by its settings,
    as `run_patching` does)."""
    from probes.leakage import model_label

    if experiment not in EXPERIMENTS:
        raise PatchingError(f"experiment {experiment!r}: expected one of {EXPERIMENTS}")
    default_corruption, default_dirs, method = EXPERIMENT_DEFAULTS[experiment]
    corruption = corruption or default_corruption
    directions = tuple(directions or default_dirs)
    for d in directions:
        if d not in DIRECTIONS:
            raise PatchingError(f"direction {d!r}: expected one of {DIRECTIONS}")
    sessions = list(sessions)
    if not sessions:
        raise PatchingError("no sessions to patch")
    pool = other_identities(sessions, seed) if corruption == "image" else []
    label = model or model_label(loaded)
    layers = None if layers is None else list(layers)  # read once per session: an iterator would be spent

    def rows_of(s: Session) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The session's rows and its pair check (None where there is no pair: knockout, a skipped session)."""
        head = {"model": label, "family": loaded.family, "experiment": experiment, "n": 1, **_public(s.labels),
                "session_id": s.session_id}
        if experiment == "knockout":
            boxes, size = _labels_boxes(s)
            answer = make_answer(loaded.adapter, s, leak, refusal)
            run = make_run(loaded, s, answer, boxes, size)
            prepare(loaded, run, answer)
            p = probe_turn(s)
            src = {g: run.group(g) for g in (sources or _default_sources(run, p))}
            src = {g: v for g, v in src.items() if len(v)}
            ws = list(windows) if windows else [max(1, loaded.n_layers // 4)]
            return [{**head, "corruption": None, **r} for r in knockout(loaded, run, answer, src, ws,
                                                                        batch_size=batch_size)], None
        if corruption == "framing" and s.labels.get("framing") == corrupt_framing:
            log.info("session %s: already under the %s framing; skipped", s.session_id, corrupt_framing)
            return [], None
        other = None
        if corruption == "image":
            sw = tuple(swap) if swap is not None else (s.labels.get("pii_type"),)
            other = pick_other(session_identity(s), pool, sw)
        try:
            pair = build_pair(loaded, s, corruption, other=other, swap=swap, corrupt_framing=corrupt_framing,
                              replacements=replacements, noise_std=noise_std, seed=seed, leak=leak, refusal=refusal)
        except PairRejected as err:
            return [], rejected_pair(s, corruption, str(err))
        names = list(groups) if groups else default_groups([pair])
        cells = sweep_cells(loaded.n_layers, components, names, layers)
        hooks = sorted({c.hook for c in cells})
        grad = {"corrupt" if d == "denoise" else "clean" for d in directions} if method == "atp" else set()
        prepare_pair(loaded, pair, hooks, grad=grad)
        check = pair_check(pair, min_separation)
        if not check["kept"]:
            return [], check
        head["corrupt_framing"] = pair.corrupt.session.labels.get("framing") if corruption == "framing" else None
        head["corruption"] = corruption
        rows = []
        for d in directions:
            if method == "atp":
                rows += [{**head, **r} for r in attribution_patching(pair, cells, d, align)]
            if method == "exact" or check_exact:
                rows += [{**head, **r} for r in exact_patching(loaded, pair, cells, d, batch_size, align)]
        return rows, check

    # With `parts`, each session's rows (and its pair check) are saved as it finishes and a rerun reads them back
    # instead of patching again (a killed run resumes); the tables are then made from what was saved.
    parts = Path(parts) if parts is not None else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
        n_done = sum((parts / f"{i:06d}.parquet").exists() for i in range(len(sessions)))
        if n_done:
            log.info("resuming: %d of %d sessions already done", n_done, len(sessions))
    frames: list[pd.DataFrame] = []
    checks: list[pd.DataFrame] = []
    for i, s in enumerate(tqdm(sessions, desc=f"patch {experiment}", unit="session", disable=not progress)):
        if parts is None:
            rows, check = rows_of(s)
            frames.append(pd.DataFrame(rows))
            checks.append(pd.DataFrame([check] if check else [], columns=list(PAIR_COLUMNS)))
            continue
        part, check_part = parts / f"{i:06d}.parquet", parts / f"{i:06d}.pair.parquet"
        if not part.exists():  # the check is written first: a part present means both are
            rows, check = rows_of(s)
            atomic_write_bytes(check_part, pd.DataFrame([check] if check else [], columns=list(PAIR_COLUMNS))
                               .astype(PAIR_DTYPES).to_parquet(index=False))
            atomic_write_bytes(part, pd.DataFrame(rows).to_parquet(index=False))
        frames.append(pd.read_parquet(part))
        checks.append(pd.read_parquet(check_part))
    df = pd.concat([f for f in frames if len(f)] or [pd.DataFrame()], ignore_index=True)
    for c in ROW_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[list(ROW_COLUMNS) + [c for c in df.columns if c not in ROW_COLUMNS]]
    pairs = pd.concat([c for c in checks if len(c)] or [pd.DataFrame(columns=list(PAIR_COLUMNS))],
                      ignore_index=True).astype(PAIR_DTYPES)
    warn_dropped(pairs, experiment, min_separation)
    # Records, not a DataFrame: pandas compares attrs with == when concatenating, which a DataFrame cannot answer.
    df.attrs["pairs"] = pairs.to_dict("records")
    return df


# ---- pair checks ------------------------------------------------------------------------------------------------
PAIR_COLUMNS = ("session_id", "identity_id", "corruption", "contrast", "clean", "corrupt", "separation", "kept",
                "reason")
PAIR_DTYPES = {"session_id": object, "identity_id": object, "corruption": object, "contrast": object,
               "clean": float, "corrupt": float, "separation": float, "kept": bool, "reason": object}


class PairsDroppedWarning(UserWarning):
    """Some pairs were dropped from a patching run (their metric does not separate clean from corrupt)."""


def pair_check(pair: Pair, min_separation: float | None = MIN_SEPARATION) -> dict[str, Any]:
    """Does the pair's metric separate clean from corrupt? `separation` = clean - corrupt of logit_diff; kept when
    it is at least `min_separation` nats (`patching_metrics.MIN_SEPARATION`; None: kept unchecked). No PII: ids,
    the contrast and the two logit differences only."""
    clean, corrupt = pair.clean.metrics["logit_diff"], pair.corrupt.metrics["logit_diff"]
    sep = float(clean - corrupt)
    if min_separation is None:
        kept, reason = True, "not checked (min_separation=None)"
    elif not np.isfinite(sep) or sep < min_separation:
        kept, reason = False, f"separation {sep:.3g} < {min_separation:g} nats"
    else:
        kept, reason = True, "separates"
    return {"session_id": pair.labels.get("session_id", pair.clean.session.session_id),
            "identity_id": pair.labels.get("identity_id"), "corruption": pair.corruption,
            "contrast": pair.answer.contrast, "clean": float(clean), "corrupt": float(corrupt), "separation": sep,
            "kept": kept, "reason": reason}


def rejected_pair(session: Session, corruption: str, why: str) -> dict[str, Any]:
    """The pairs-table row of a pair that could not be measured at all (`PairRejected`; `why` names no PII)."""
    return {"session_id": session.session_id, "identity_id": session.labels.get("identity_id"),
            "corruption": corruption, "contrast": None, "clean": np.nan, "corrupt": np.nan, "separation": np.nan,
            "kept": False, "reason": f"rejected: {why}"}


def warn_dropped(pairs: pd.DataFrame, experiment: str, min_separation: float | None) -> None:
    """A PairsDroppedWarning saying how many of how many pairs were dropped, and why (none dropped: silent)."""
    dropped = pairs[~pairs["kept"]]
    if not len(dropped):
        return
    low = int(dropped["reason"].str.startswith("separation").sum())
    warnings.warn(f"patching {experiment}: {len(dropped)} of {len(pairs)} pairs dropped: {low} whose logit_diff "
                  f"does not separate clean from corrupt by {min_separation} nats, {len(dropped) - low} rejected "
                  "before patching (see the pairs table: pair_checks(rows), patching_<experiment>_pairs.csv)",
                  PairsDroppedWarning, stacklevel=3)


def pair_checks(rows: pd.DataFrame) -> pd.DataFrame:
    """The pairs table of a `patch_sessions` / `run_patching` result (`PAIR_COLUMNS`: kept, separation, reason per
    pair)."""
    pairs = rows.attrs.get("pairs")
    if not isinstance(pairs, list):
        raise PatchingError("pair_checks: these rows carry no pairs table (rows.attrs['pairs']); they are not the "
                            "direct result of patch_sessions or run_patching")
    return pd.DataFrame(pairs, columns=list(PAIR_COLUMNS)).astype(PAIR_DTYPES)


def _default_sources(run: Run, probe: int) -> list[str]:
    """Knockout sources: the PII patches, the whole image, and every turn before the probe turn."""
    out = [g for g in ("pii_patches", "other_image") if g in run.groups]
    turns = sorted(int(g[4:]) for g in run.groups if g.startswith("turn"))
    return out + [f"turn{t}" for t in turns if t < probe]


def summarize(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean over pairs of every cell, with a bootstrap CI clustered by identity; `clean`/`corrupt` are means."""
    from probes.stats import bootstrap_ci

    by = ["model", "family", "experiment", "corruption", "direction", "method", "layer", "component",
          "position_group", "target", "window", "metric"]
    d = df.copy()
    for c in by:
        d[c] = d[c].astype(object).where(d[c].notna(), "")
    out = bootstrap_ci(d, "value", by=by, group="identity_id", n_boot=n_boot, seed=seed)
    means = d.groupby(by, dropna=False, sort=True)[["clean", "corrupt"]].mean().reset_index()
    out = out.merge(means, on=by, how="left")
    for c in ("layer", "window"):
        out[c] = pd.to_numeric(out[c].replace("", np.nan))
    return out


# ---- generation check ---------------------------------------------------------------------------------------------
def patched_generation(loaded: LoadedModel, pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                       align: str = "last", max_new_tokens: int = 32) -> str:
    """Greedy answer of the pair's base run (denoise: the corrupt input) with the source's activations of `cells`
    written into the prompt's forward (the answer's own steps run unpatched, reading the patched KV cache).

    The check behind a patching sweep: does patching those cells alone change what the model *writes*, not
    just a logit difference at the first answer token?"""
    from probes.leakage import generate_batch

    base, source = pair.roles(direction)
    for cell in cells:
        if cell.hook not in source.cache:
            raise PatchingError(f"hook {cell.hook} was not prepared (prepare_pair with these cells' hooks)")
    writes: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for cell in cells:
        pos, vals, _ = patch_values(base, source, cell, align)
        keep = pos < base.n_prompt  # the teacher-forced answer positions do not exist when generating
        writes[cell.hook].append((pos[keep], vals[keep]))

    def writer(entries):
        def fn(x: Tensor, name: str) -> Tensor | None:
            if x.shape[1] < base.n_prompt:  # a decoding step: leave it alone
                return None
            x = x.clone()
            for pos, vals in entries:
                x[0, pos.to(x.device)] = vals.to(x.dtype).to(x.device)
            return x
        return fn

    with loaded.hooks([(hook, writer(entries)) for hook, entries in writes.items()]):
        return generate_batch(loaded, [base.session], max_new_tokens=max_new_tokens, batch_size=1,
                              progress=False)[0]


def generation_check(loaded: LoadedModel, sessions: Sequence[Session], cells: Sequence[Cell],
                     corrupt_framing: str = "direct", direction: str = "denoise", align: str = "last",
                     max_new_tokens: int = 32, progress: bool = True) -> pd.DataFrame:
    """Task-swap pairs of `sessions` (each under a leaking framing; the corrupt side re-asks under
    `corrupt_framing`), answered by greedy generation unpatched and with `cells` patched from the other framing.
    One row per session and condition (unpatched | patched): session_id, identity_id, framing, pii_type, layer
    set, leak, refused; `asr_shift` of the result is patched ASR - unpatched ASR of the refusing framing."""
    from probes.leakage import contains_pii, generate_batch, is_refusal

    hooks = sorted({c.hook for c in cells})
    rows = []
    for s in tqdm(list(sessions), desc="generation check", unit="session", disable=not progress):
        pair = prepare_pair(loaded, build_pair(loaded, s, "framing", corrupt_framing=corrupt_framing), hooks)
        base, _ = pair.roles(direction)
        target, pii_type = str(s.labels["_target"]), str(s.labels["pii_type"])
        plain = generate_batch(loaded, [base.session], max_new_tokens=max_new_tokens, batch_size=1,
                               progress=False)[0]
        patched = patched_generation(loaded, pair, cells, direction, align, max_new_tokens)
        for cond, text in (("unpatched", plain), ("patched", patched)):
            rows.append({"session_id": s.session_id, "identity_id": s.labels.get("identity_id"),
                         "framing": base.session.labels.get("framing"), "pii_type": pii_type,
                         "cells": ";".join(f"{c.layer}:{c.component}:{c.group}" for c in cells), "condition": cond,
                         "leak": contains_pii(text, target, pii_type), "refused": is_refusal(text, target=target, pii_type=pii_type)})
    return pd.DataFrame(rows)


def asr_shift(check: pd.DataFrame) -> float:
    """Patched minus unpatched ASR of a `generation_check` table."""
    asr = check.groupby("condition")["leak"].mean()
    return float(asr.get("patched", np.nan) - asr.get("unpatched", np.nan))
