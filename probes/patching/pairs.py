"""Pairs: one clean and one corrupt input that should behave differently (the clean one leaks, or is the document
with the asked value; the corrupt one does not), each side a `Run`. Corruptions (`build_pair`, `PairSpec`):

- "image": the same document with another identity's value in the asked field (`documents.render_pair`):
  pixel-identical outside the value boxes, same tokens, same positions.
- "framing": the same document and request under another framing (a leaking 'caption' vs a refusing 'direct'):
  the probe turn's text changes length, so positions after it shift (alignment: `probes.patching.exact`).
- "text": symmetric text replacement, `replacements` {old: new} in the turn texts; the token length must not
  change (checked).
- "noise": Gaussian noise of `noise_std` (3) times the standard deviation of the image-token embeddings, added to
  those embeddings (a secondary check; the same seeded noise in every row).

Position groups (`position_groups`): `pii_patches` (the image tokens whose boxes overlap the value's ink box,
`documents.patches_for_box`; for an image pair, either document's box), `other_image`, `turn{t}` (each turn's
non-image tokens, template included, the final prompt token excepted), `final` (the last prompt token, where the
answer starts). Also by name (`Run.group`): `all` (every position, teacher-forced answer included), `answer`, or
any token-map selector (`mark:ssn`, `last:2`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.data.builders import FRAMINGS, disclosure_request, frame, mark_values
from probes.data.documents import Box, changed_boxes, patches_for_box, render_pair
from probes.data.identities import Identity
from probes.data.session import Session, SessionImage, Turn
from probes.leakage import generate_batch
from probes.models.families.base import FamilyAdapter
from probes.models.loading import LoadedModel
from probes.models.render import RenderedSession, render
from probes.patching.config import DIRECTIONS, PairSpec, PatchingError
from probes.patching.metrics import Answer, make_answer, own_answer, value_answer


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
    position_ids: Tensor | bool | None = None  # set by the first forward (False: the family passes none)

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


def position_groups(adapter: FamilyAdapter, rendered: RenderedSession, pii_boxes: Sequence[Box] = (),
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


def labels_boxes(session: Session) -> tuple[list[Box], tuple[int, int] | None]:
    """The value's ink box and the document's size from the session's labels (none: no PII patches)."""
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
            images.append(SessionImage.from_pil(b.image, marks=im.marks) if same else im)
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


def text_pair(session: Session, replacements: Mapping[str, str]) -> Session:
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


def build_pair(loaded: LoadedModel, session: Session, corruption: str | PairSpec, *, other: Identity | None = None,
               **options: Any) -> Pair:
    """A clean/corrupt pair from `session` (the clean side) by `corruption` (see the module docstring): a `PairSpec`,
    or its corruption name with the spec's other fields as `options` (swap, corrupt_framing, replacements,
    noise_std, seed, leak, refusal). `other`: the identity an image pair's corrupt document shows."""
    spec = corruption if isinstance(corruption, PairSpec) else PairSpec(corruption, **options)
    answer = make_answer(loaded.adapter, session, spec.leak, spec.refusal)
    boxes, size = labels_boxes(session)
    corrupt, answer, boxes = corrupt_side(loaded, session, spec, other, answer, boxes)
    clean_run = make_run(loaded, session, answer, boxes, size)
    corrupt_run = make_run(loaded, corrupt, answer, boxes, size)
    corrupt_run.noise = (spec.noise_std, spec.seed) if spec.corruption == "noise" else None
    if spec.corruption != "framing" and clean_run.n != corrupt_run.n:
        raise PatchingError(f"session {session.session_id!r}: the {spec.corruption} corruption changes the token "
                            f"length ({clean_run.n_prompt} -> {corrupt_run.n_prompt} prompt tokens); exact patching "
                            "needs equal lengths (for text: pick replacements of the same token length)")
    return Pair(clean_run, corrupt_run, answer, spec.corruption, dict(session.labels))


def corrupt_side(loaded: LoadedModel, session: Session, spec: PairSpec, other: Identity | None, answer: Answer,
                 boxes: list[Box]) -> tuple[Session, Answer, list[Box]]:
    """(the corrupt session, the pair's Answer, the PII boxes) of `spec`'s corruption of `session`; a noise pair's
    corrupt session is the clean one (its noise is added to the embeddings when it is prepared)."""
    given = spec.leak is not None or spec.refusal is not None
    if spec.corruption == "image":
        if other is None:
            raise PatchingError("an image pair needs `other`, the identity whose values the corrupt document shows")
        corrupt, boxes = image_pair(session, other, spec.swap)
        asked = session.labels.get("pii_type")
        if asked in (spec.swap if spec.swap is not None else (asked,)):
            corrupt.labels["_target"] = other.value(asked)
            if not given:  # the metric tells the two documents' values apart
                answer = value_answer(loaded.adapter, session, str(session.labels["_target"]),
                                      str(corrupt.labels["_target"]))
        return corrupt, answer, boxes
    if spec.corruption == "framing":
        if session.labels.get("framing") == spec.corrupt_framing:
            raise PatchingError(f"session {session.session_id!r} is already under the {spec.corrupt_framing!r} "
                                "framing")
        corrupt = framing_pair(session, spec.corrupt_framing)
        if not given:  # the model's own answer under the leaking framing against the refusal
            answer = framing_answer(loaded, session)
        return corrupt, answer, boxes
    if spec.corruption == "text":
        return text_pair(session, spec.replacements or {}), answer, boxes
    return session, answer, boxes


def framing_answer(loaded: LoadedModel, session: Session, max_new_tokens: int = 32) -> Answer:
    """The Answer of a framing pair: the model's greedy answer to `session` (the clean, leaking framing) up to and
    including the value, against the refusal (`probes.patching.metrics.own_answer`)."""

    said = generate_batch(loaded, [session], max_new_tokens=max_new_tokens, batch_size=1, progress=False)[0]
    return own_answer(loaded.adapter, session, said, str(session.labels.get("_target", "")))
