"""Render a Session through a model's own chat template into input ids, pixel inputs and a TokenMap.

How (and why this way): the checkpoint's chat template is the ground truth of how a family lays out a chat, so we
do not re-implement it. We render the template with a unique sentinel in place of every turn's text, which tells
where each turn's content sits in the rendered string; rendering growing prefixes of the conversation tells where
each turn begins (its header). The whole string is then tokenized once, with character offsets, exactly as the
processor would, and each image placeholder token is replaced by the processor's expansion for that image, whose
layout on the vision grid the family adapter knows.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from PIL import Image
from torch import Tensor

from probes.models.families.base import FamilyAdapter, RenderError
from probes.data.session import Session
from probes.models.tokenmap import COLUMNS, TokenMap

_SENTINEL = "\u27e6{}\u27e7"  # survives trim/upper/lower filters in chat templates


@dataclass
class RenderedSession:
    """A session as the model sees it. `upto` turns are rendered; a generation prompt may end it."""

    session: Session
    input_ids: Int[Tensor, "1 pos"]
    token_map: TokenMap
    images: list[Image.Image]
    image_spans: list[tuple[int, int]]  # [start, end) positions of each image's expansion
    n_rendered_turns: int  # turns with text that were rendered
    generation_turn: int | None  # index of the assistant turn the trailing generation prompt opens
    _inputs_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_positions(self) -> int:
        return int(self.input_ids.shape[1])

    def turn_chunks(self) -> list[tuple[int, int]]:
        """[start, end) position ranges, one per turn present in the token map, in order."""
        turns = self.token_map.df["turn"].to_numpy()
        cuts = np.flatnonzero(np.r_[True, turns[1:] != turns[:-1], True])
        return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]

    def image_inputs(self, adapter: FamilyAdapter, indices: Any) -> dict[str, Tensor]:
        """Model inputs for the images at `indices` (processed once per set of indices)."""
        key = tuple(indices)
        if key not in self._inputs_cache:
            self._inputs_cache[key] = adapter.image_inputs([self.images[k] for k in key])
        return self._inputs_cache[key]

    def images_in(self, start: int, end: int) -> list[int]:
        """Indices of images whose tokens lie in [start, end); an image cut by the range is an error."""
        inside = []
        for k, (a, b) in enumerate(self.image_spans):
            if a >= start and b <= end:
                inside.append(k)
            elif a < end and b > start:
                raise RenderError(f"positions [{start}, {end}) cut image {k} at [{a}, {b})")
        return inside


def chat_messages(session: Session, turns: int, sentinels: bool) -> list[dict[str, Any]]:
    """HF chat messages for the first `turns` turns (images before text, as the families' templates expect)."""
    messages = []
    for i, t in enumerate(session.turns[:turns]):
        content: list[dict[str, Any]] = [{"type": "image"} for _ in t.images]
        content.append({"type": "text", "text": _SENTINEL.format(i) if sentinels else (t.text or "")})
        messages.append({"role": t.role, "content": content})
    return messages


def _apply_template(tokenizer_or_processor: Any, messages: list, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer_or_processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render(adapter: FamilyAdapter, session: Session, upto: int | None = None,
           add_generation_prompt: bool = True) -> RenderedSession:
    """Render `session` for the family of `adapter`.

    Turns are rendered up to the first assistant turn whose text is None (to be generated), or up to `upto`
    turns. If rendering stops before an assistant turn, or the session ends with a user turn and
    `add_generation_prompt`, the template's generation prompt is added; its tokens belong to that (next)
    assistant turn, so "the last token of the probe turn" is where the model starts its answer.
    """
    sid = session.session_id
    n = len(session.turns)
    stop = next((i for i, t in enumerate(session.turns) if t.text is None), n)
    if upto is not None:
        stop = min(stop, upto)
    if stop < n:
        gen_turn = stop if session.turns[stop].role == "assistant" else None
    else:
        gen_turn = n if add_generation_prompt and session.turns[-1].role == "user" else None
    if stop == 0 and gen_turn is None:
        raise RenderError(f"session {sid!r}: nothing to render")
    images_in_turns = [im for t in session.turns[:stop] for im in t.images]
    if images_in_turns and not adapter.is_multimodal:
        raise RenderError(f"session {sid!r} has images, but {adapter.name} is a text-only model")

    templ = adapter.processor if hasattr(adapter.processor, "apply_chat_template") else adapter.tokenizer
    if getattr(templ, "chat_template", None) is None and getattr(adapter.tokenizer, "chat_template", None) is None:
        raise RenderError(f"{adapter.name}: the processor/tokenizer has no chat template")

    # 1. The template with sentinels: where each turn's text sits; prefixes: where each turn starts.
    full = _apply_template(templ, chat_messages(session, stop, True), gen_turn is not None)
    starts = [0]
    for k in range(1, stop + (gen_turn is not None)):
        prefix = _apply_template(templ, chat_messages(session, k, True), False)
        if full.startswith(prefix) and len(prefix) >= starts[-1]:
            starts.append(len(prefix))
        else:  # template not prefix-stable here (e.g. system merged into a later turn): start after the content
            prev = full.find(_SENTINEL.format(k - 1))
            starts.append(prev + len(_SENTINEL.format(k - 1)) if prev >= 0 else starts[-1])

    # 2. Put the real texts in; record content spans and marks in the real string.
    text_parts, content_spans, mark_spans = [], {}, []
    cursor, out_len, turn_starts = 0, 0, []
    boundaries = sorted((s, k) for k, s in enumerate(starts))
    sentinel_at = {}
    for i in range(stop):
        at = full.find(_SENTINEL.format(i))
        if at < 0 or full.find(_SENTINEL.format(i), at + 1) >= 0:
            raise RenderError(f"{adapter.name}: the chat template does not render turn text verbatim (turn {i})")
        sentinel_at[at] = i
    events = sorted([(s, "start", k) for s, k in boundaries] + [(a, "text", i) for a, i in sentinel_at.items()])
    for at, kind, k in events:
        text_parts.append(full[cursor:at])
        out_len += at - cursor
        cursor = at
        if kind == "start":
            turn_starts.append((out_len, k))
        else:
            real = session.turns[k].text or ""
            content_spans[k] = (out_len, out_len + len(real))
            for m in session.turns[k].marks:
                mark_spans.append((out_len + m.start, out_len + m.end, m.label))
            text_parts.append(real)
            out_len += len(real)
            cursor = at + len(_SENTINEL.format(k))
    text_parts.append(full[cursor:])
    text = "".join(text_parts)

    # 3. Replace each image placeholder by the processor's expansion *in the text*, as processors do, so that
    #    tokens at an expansion's edges ("\n\n" beside a template newline) merge exactly as theirs do.
    pil_images = [im.load() for im in images_in_turns]
    ph_at = _find_all(text, adapter.placeholder) if adapter.is_multimodal else []
    if len(ph_at) != len(pil_images):
        raise RenderError(
            f"session {sid!r}: image-token count mismatch: the rendered text has {len(ph_at)} image placeholder(s) "
            f"{adapter.placeholder!r} but the turns carry {len(pil_images)} image(s) "
            "(does a turn's text contain the placeholder literally?)"
        )
    expansions = [adapter.expand_image(im) for im in pil_images]
    parts, exp_ranges, shifts, cursor = [], [], [], 0
    for at, exp in zip(ph_at, expansions):
        etext = adapter.expansion_text(exp)
        parts += [text[cursor:at], etext]
        new_at = at + sum(d for _, d in shifts)
        exp_ranges.append((new_at, new_at + len(etext)))
        shifts.append((at, len(etext) - len(adapter.placeholder)))
        cursor = at + len(adapter.placeholder)
    text = "".join(parts) + text[cursor:]

    def moved(x: int) -> int:  # a character position of the text before expansion, in the expanded text
        return x + sum(d for at, d in shifts if at < x)

    turn_starts = [(moved(c), k) for c, k in turn_starts]
    content_spans = {k: (moved(a), moved(b)) for k, (a, b) in content_spans.items()}
    mark_spans = [(moved(a), moved(b), label) for a, b, label in mark_spans]

    # 4. Tokenize once, with offsets, as the processor would.
    tok = adapter.tokenizer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos_prefix = _special_prefix(tok)
    if bos_prefix and ids[: len(bos_prefix)] != bos_prefix:
        ids = bos_prefix + ids
        offsets = [(0, 0)] * len(bos_prefix) + offsets

    # 5. Per-token turn, segment, marks. A token belongs where its last character is: byte-level BPE glues the
    #    template's space to the next word (" ASSISTANT", " A"), and that token is the next part's, not the space's.
    ts_chars = np.array([c for c, _ in turn_starts])
    ts_turns = np.array([k for _, k in turn_starts])
    starts_c = np.array([a for a, _ in offsets])
    ends_c = np.array([e for _, e in offsets])
    last_c = np.maximum(ends_c - 1, starts_c)
    real_tok = ends_c > starts_c  # BOS added by the tokenizer has no characters
    turn_of = ts_turns[np.searchsorted(ts_chars, last_c, side="right") - 1]
    segment = np.array(["template"] * len(ids), dtype=object)
    role = np.array([session.turns[t].role if t < n else "assistant" for t in turn_of], dtype=object)
    for k, (a, b) in content_spans.items():
        segment[(last_c >= a) & (last_c < b) & real_tok] = session.turns[k].role
    mark = np.array([""] * len(ids), dtype=object)
    for a, b, label in mark_spans:
        hit = (starts_c < b) & (ends_c > a)
        mark[hit] = [label if not m else f"{m}|{label}" for m in mark[hit]]

    # 6. Image tokens: the expansion's layout, aligned to the tokens that fell inside each expansion.
    image_index = np.full(len(ids), -1)
    layout = np.full((3, len(ids)), -1)  # tile, patch_row, patch_col
    spans: list[tuple[int, int]] = []
    for k, ((a, b), exp) in enumerate(zip(exp_ranges, expansions)):
        inside = np.flatnonzero((last_c >= a) & (last_c < b) & real_tok)
        segment[inside] = "image"
        image_index[inside] = k
        got = [ids[j] for j in inside]
        for i, q in _align(got, exp.token_ids):
            layout[:, inside[i]] = exp.tile[q], exp.patch_row[q], exp.patch_col[q]
        # Only edge tokens may merge with their neighbours; a patch token left without its place would put the
        # image's token map silently off.
        placed, want = int((layout[1, inside] >= 0).sum()), int((np.asarray(exp.patch_row) >= 0).sum())
        if placed != want:
            raise RenderError(f"session {session.session_id!r}, image {k}: {placed} of its {want} patch tokens were "
                              "found in the rendered ids (the tokenizer split or merged image tokens)")
        spans.append((int(inside[0]), int(inside[-1]) + 1))
    cols = {
        "position": np.arange(len(ids)), "token_id": np.array(ids), "turn": turn_of.astype(int), "role": role,
        "segment": segment, "image_index": image_index, "tile": layout[0], "patch_row": layout[1],
        "patch_col": layout[2], "mark": mark,
    }
    df = pd.DataFrame(cols, columns=COLUMNS)
    return RenderedSession(
        session=session,
        input_ids=torch.tensor([ids], dtype=torch.long),
        token_map=TokenMap(df),
        images=pil_images,
        image_spans=spans,
        n_rendered_turns=stop,
        generation_turn=gen_turn,
    )


def _find_all(text: str, sub: str) -> list[int]:
    out, at = [], text.find(sub)
    while at >= 0:
        out.append(at)
        at = text.find(sub, at + len(sub))
    return out


def _align(got: list[int], want: list[int]) -> list[tuple[int, int]]:
    """(index in got, index in want) of matching tokens; only edge tokens differ when neighbours merged."""
    if got == want:
        return [(i, i) for i in range(len(got))]
    matcher = difflib.SequenceMatcher(a=got, b=want, autojunk=False)
    return [(blk.a + i, blk.b + i) for blk in matcher.get_matching_blocks() for i in range(blk.size)]


def _special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer itself puts before any text (BOS for Llama-style tokenizers), else []."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special)):
        if with_special[i:i + len(plain)] == plain:
            return list(with_special[:i])
    return []
