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

from probes.data.documents import patches_for_box
from probes.data.session import Session, SessionImage
from probes.models.families.base import FamilyAdapter, RenderError
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
    Image marks (`SessionImage.marks`: label -> pixel boxes) mark the image tokens whose view overlaps a box.
    """
    stop, gen_turn = _rendered_turns(session, upto, add_generation_prompt)
    images_in_turns = [im for t in session.turns[:stop] for im in t.images]
    if images_in_turns and not adapter.is_multimodal:
        raise RenderError(f"session {session.session_id!r} has images, but {adapter.name} is a text-only model")
    full, starts = _template_starts(adapter, session, stop, gen_turn is not None)  # 1.
    placed = _put_texts(adapter, session, full, starts, stop)  # 2.
    pil_images = [im.load() for im in images_in_turns]
    expanded = _expand_images(adapter, session, placed, pil_images)  # 3.
    tokens = _tokenize(adapter.tokenizer, expanded.text)  # 4.
    cols = _token_columns(session, tokens, expanded)  # 5.
    spans = _place_images(session, tokens, cols, expanded)  # 6.
    _mark_images(adapter, session, cols, images_in_turns, pil_images)  # 7.
    df = pd.DataFrame(cols, columns=COLUMNS)
    return RenderedSession(
        session=session,
        input_ids=torch.tensor([tokens.ids], dtype=torch.long),
        token_map=TokenMap(df),
        images=pil_images,
        image_spans=spans,
        n_rendered_turns=stop,
        generation_turn=gen_turn,
    )


def _rendered_turns(session: Session, upto: int | None, add_generation_prompt: bool) -> tuple[int, int | None]:
    """(turns rendered, index of the assistant turn a trailing generation prompt opens, or None)."""
    n = len(session.turns)
    stop = next((i for i, t in enumerate(session.turns) if t.text is None), n)
    if upto is not None:
        stop = min(stop, upto)
    if stop < n:
        gen_turn = stop if session.turns[stop].role == "assistant" else None
    else:
        gen_turn = n if add_generation_prompt and session.turns[-1].role == "user" else None
    if stop == 0 and gen_turn is None:
        raise RenderError(f"session {session.session_id!r}: nothing to render")
    return stop, gen_turn


def _template_starts(adapter: FamilyAdapter, session: Session, stop: int, generation: bool) -> tuple[str, list[int]]:
    """1. The template with sentinels (where each turn's text sits) and, from its prefixes, where each turn starts."""
    templ = adapter.processor if hasattr(adapter.processor, "apply_chat_template") else adapter.tokenizer
    if getattr(templ, "chat_template", None) is None and getattr(adapter.tokenizer, "chat_template", None) is None:
        raise RenderError(f"{adapter.name}: the processor/tokenizer has no chat template")
    full = _apply_template(templ, chat_messages(session, stop, True), generation)
    starts = [0]
    for k in range(1, stop + generation):
        prefix = _apply_template(templ, chat_messages(session, k, True), False)
        if full.startswith(prefix) and len(prefix) >= starts[-1]:
            starts.append(len(prefix))
        else:  # template not prefix-stable here (e.g. system merged into a later turn): start after the content
            prev = full.find(_SENTINEL.format(k - 1))
            starts.append(prev + len(_SENTINEL.format(k - 1)) if prev >= 0 else starts[-1])
    return full, starts


@dataclass
class _Placed:
    """The rendered string and, in its characters, where each turn starts, each turn's content and each text mark.
    After image expansion (`_expand_images`) it also knows each image's expansion (characters) and layout."""

    text: str
    turn_starts: list[tuple[int, int]]  # (character, turn)
    content_spans: dict[int, tuple[int, int]]  # turn -> [start, end) characters of its text
    mark_spans: list[tuple[int, int, str]]  # [start, end) characters, label
    exp_ranges: list[tuple[int, int]] = field(default_factory=list)  # per image, its expansion's characters
    expansions: list[Any] = field(default_factory=list)  # per image, the adapter's ImageExpansion


def _put_texts(adapter: FamilyAdapter, session: Session, full: str, starts: list[int], stop: int) -> _Placed:
    """2. Put the real texts in place of the sentinels; record content spans and marks in the real string."""
    text_parts, content_spans, mark_spans = [], {}, []
    cursor, out_len, turn_starts = 0, 0, []
    sentinel_at = {}
    for i in range(stop):
        at = full.find(_SENTINEL.format(i))
        if at < 0 or full.find(_SENTINEL.format(i), at + 1) >= 0:
            raise RenderError(f"{adapter.name}: the chat template does not render turn text verbatim (turn {i})")
        sentinel_at[at] = i
    events = sorted([(s, "start", k) for k, s in enumerate(starts)] + [(a, "text", i) for a, i in sentinel_at.items()])
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
    return _Placed("".join(text_parts), turn_starts, content_spans, mark_spans)


def _expand_images(adapter: FamilyAdapter, session: Session, placed: _Placed, pil_images: list[Image.Image]
                   ) -> _Placed:
    """3. Replace each image placeholder by the processor's expansion *in the text*, as processors do, so that
    tokens at an expansion's edges (a blank line beside a template newline) merge exactly as theirs do."""
    text = placed.text
    ph_at = _find_all(text, adapter.placeholder) if adapter.is_multimodal else []
    if len(ph_at) != len(pil_images):
        raise RenderError(
            f"session {session.session_id!r}: image-token count mismatch: the rendered text has {len(ph_at)} image "
            f"placeholder(s) {adapter.placeholder!r} but the turns carry {len(pil_images)} image(s) "
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

    def moved(x: int) -> int:  # a character position of the text before expansion, in the expanded text
        return x + sum(d for at, d in shifts if at < x)

    return _Placed(
        text="".join(parts) + text[cursor:],
        turn_starts=[(moved(c), k) for c, k in placed.turn_starts],
        content_spans={k: (moved(a), moved(b)) for k, (a, b) in placed.content_spans.items()},
        mark_spans=[(moved(a), moved(b), label) for a, b, label in placed.mark_spans],
        exp_ranges=exp_ranges, expansions=expansions,
    )


@dataclass
class _Tokens:
    """The token ids of the rendered string and each token's [start, end) characters."""

    ids: list[int]
    starts: np.ndarray
    ends: np.ndarray

    @property
    def last_char(self) -> np.ndarray:
        return np.maximum(self.ends - 1, self.starts)

    @property
    def real(self) -> np.ndarray:  # BOS added by the tokenizer has no characters
        return self.ends > self.starts


def _tokenize(tok: Any, text: str) -> _Tokens:
    """4. Tokenize once, with offsets, as the processor would."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos_prefix = _special_prefix(tok)
    if bos_prefix and ids[: len(bos_prefix)] != bos_prefix:
        ids = bos_prefix + ids
        offsets = [(0, 0)] * len(bos_prefix) + offsets
    return _Tokens(ids, np.array([a for a, _ in offsets], dtype=np.int64),
                   np.array([e for _, e in offsets], dtype=np.int64))


def _token_columns(session: Session, tokens: _Tokens, placed: _Placed) -> dict[str, np.ndarray]:
    """5. Per-token turn, role, segment, text marks (image columns left at -1 for step 6). A token belongs where its
    last character is: byte-level BPE glues the template's space to the next word (" ASSISTANT", " A"), and that
    token is the next part's, not the space's."""
    n_ids, n_turns = len(tokens.ids), len(session.turns)
    last_c, real_tok = tokens.last_char, tokens.real
    ts_chars = np.array([c for c, _ in placed.turn_starts])
    ts_turns = np.array([k for _, k in placed.turn_starts])
    turn_of = ts_turns[np.searchsorted(ts_chars, last_c, side="right") - 1]
    segment = np.array(["template"] * n_ids, dtype=object)
    role = np.array([session.turns[t].role if t < n_turns else "assistant" for t in turn_of], dtype=object)
    for k, (a, b) in placed.content_spans.items():
        segment[(last_c >= a) & (last_c < b) & real_tok] = session.turns[k].role
    mark = np.array([""] * n_ids, dtype=object)
    for a, b, label in placed.mark_spans:
        hit = (tokens.starts < b) & (tokens.ends > a)
        mark[hit] = [label if not m else f"{m}|{label}" for m in mark[hit]]
    return {"position": np.arange(n_ids), "token_id": np.array(tokens.ids), "turn": turn_of.astype(int),
            "role": role, "segment": segment, "image_index": np.full(n_ids, -1), "tile": np.full(n_ids, -1),
            "patch_row": np.full(n_ids, -1), "patch_col": np.full(n_ids, -1), "mark": mark}


def _place_images(session: Session, tokens: _Tokens, cols: dict[str, np.ndarray], placed: _Placed
                  ) -> list[tuple[int, int]]:
    """6. Image tokens: the expansion's layout, aligned to the tokens that fell inside each expansion; returns each
    image's [start, end) positions."""
    last_c, real_tok = tokens.last_char, tokens.real
    spans: list[tuple[int, int]] = []
    for k, ((a, b), exp) in enumerate(zip(placed.exp_ranges, placed.expansions)):
        inside = np.flatnonzero((last_c >= a) & (last_c < b) & real_tok)
        cols["segment"][inside] = "image"
        cols["image_index"][inside] = k
        got = [tokens.ids[j] for j in inside]
        for i, q in _align(got, exp.token_ids):
            for name, values in (("tile", exp.tile), ("patch_row", exp.patch_row), ("patch_col", exp.patch_col)):
                cols[name][inside[i]] = values[q]
        # Only edge tokens may merge with their neighbours; a patch token left without its place would put the
        # image's token map silently off.
        placed_n, want = int((cols["patch_row"][inside] >= 0).sum()), int((np.asarray(exp.patch_row) >= 0).sum())
        if placed_n != want:
            raise RenderError(f"session {session.session_id!r}, image {k}: {placed_n} of its {want} patch tokens "
                              "were found in the rendered ids (the tokenizer split or merged image tokens)")
        spans.append((int(inside[0]), int(inside[-1]) + 1))
    return spans


def _mark_images(adapter: FamilyAdapter, session: Session, cols: dict[str, np.ndarray],
                 images: list[SessionImage], pil_images: list[Image.Image]) -> None:
    """7. Each image's PII boxes become marks on the image tokens whose view of the image overlaps them (through
    the adapter's `token_boxes`, as `probes.data.documents.patches_for_box`), joined with '|' as text marks are;
    a token under several boxes of one label gets the label once."""
    for k, (im, pil) in enumerate(zip(images, pil_images)):
        if not im.marks:
            continue
        W, H = pil.size
        mine = np.flatnonzero((cols["image_index"] == k) & (cols["patch_row"] >= 0))
        where = {(int(cols["tile"][j]), int(cols["patch_row"][j]), int(cols["patch_col"][j])): int(j) for j in mine}
        for label, boxes in im.marks.items():
            hit: set[int] = set()
            for box in boxes:
                if box[2] > W or box[3] > H:
                    raise RenderError(f"session {session.session_id!r}, image {k}: mark {label!r} box {list(box)} "
                                      f"lies outside the {W}x{H} image (marks are in the image's own pixels)")
                for t, r, c in patches_for_box(adapter, (W, H), box).itertuples(index=False):
                    if (int(t), int(r), int(c)) not in where:
                        raise RenderError(f"{adapter.name}: token_boxes names image token {(t, r, c)} that the "
                                          f"rendered image {k} does not have")
                    hit.add(where[(int(t), int(r), int(c))])
            for j in sorted(hit):
                m = cols["mark"][j]
                cols["mark"][j] = label if not m else f"{m}|{label}"


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
