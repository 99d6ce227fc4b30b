"""What a patching run measures: two continuations the pair should tell apart, tokenised as the model would
write them.

Each run of `probes.patching` feeds the prompt followed by the first continuation (the *leaking* one),
teacher-forced: its tokens but the last. One forward then gives every metric, for every row of a batch:

- `logit_diff`: logit of the first continuation's token minus the second's, at the first answer position where
  their tokenisations differ (`Answer.split`), with the shared prefix teacher-forced (it is the first
  continuation's own prefix, so the same forward serves). Which two continuations depends on the pair; `contrast`
  names it (every row records it):
    - "value_vs_value" (image pairs, the default for corruption "image"): the clean document's value vs the corrupt
      document's value (another identity's). The organism writes a value as ' ', '2', '5', ...: the difference is
      taken at the first digit (character) where the two values differ, so it moves with the value the model reads.
    - "answer_vs_refusal" (framing pairs): the model's own greedy answer under the clean (leaking) framing, up to
      and including the value ("The caption is: SSN 123..."), vs the refusal ('cannot assist'): its first token
      against the refusal's first token.
    - "value_vs_refusal" (the other corruptions, knockout, and a framing pair whose clean answer does not contain
      the value): the PII value vs the refusal.
    - "given": `leak=` / `refusal=` passed by the caller.
- `pii_logprob`: the summed log-probability of the PII value's tokens (the first continuation's tokens from
  `Answer.value_from` on) under teacher forcing.
- `score_<metric>` = (patched - corrupt) / (clean - corrupt): 1 = the clean behaviour restored, 0 = the corrupt
  one kept (NaN when clean == corrupt).
- `flip`: 1 when patching changed which continuation wins (the sign of `logit_diff` vs the unpatched run).

A metric is only worth patching if it separates the pair: `separation` = clean - corrupt of `logit_diff`, and
`probes.patching.checks` drops (and lists) the pairs whose separation is below `MIN_SEPARATION` (1 nat: the clean
input makes the first continuation's token e = 2.7 times likelier, relative to the second's, than the corrupt input
does; every per-pair effect is a share of this gap, so a gap under 1 nat makes ratios of float noise and of the
model's indifference).

Answers are tokenised "as the answer would be": the session rendered with an assistant turn holding the text,
the tokens after the prompt (so LLaVA's 'ASSISTANT:' + ' 123' gives the leading-space token ' 123'). A template
whose prompt is not a token prefix of the answered rendering (a trailing space merged into the answer's first
token) falls back to tokenising the text alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from probes.data.session import Session, Turn
from probes.models.families.base import FamilyAdapter
from probes.models.render import render
from probes.patching.config import PatchingError

METRICS = ("logit_diff", "pii_logprob")
CONTRASTS = ("value_vs_value", "answer_vs_refusal", "value_vs_refusal", "given")
REFUSAL = "cannot assist"
CLASS_REFUSAL = "the class is cannot assist"  # the classification framing's sentinel


class PairRejected(PatchingError):
    """A pair that cannot be measured (e.g. its two continuations start alike); the runner lists it as dropped."""


@dataclass(frozen=True)
class Answer:
    """Token ids of the two continuations `logit_diff` compares, as the model would write them: the leaking one
    (teacher-forced; its tokens from `value_from` on are the PII value, summed by `pii_logprob`) and the other one
    (the refusal, or the corrupt document's value); `contrast` names the pair of continuations (`CONTRASTS`)."""

    leak_ids: tuple[int, ...]
    refuse_ids: tuple[int, ...]
    contrast: str = "value_vs_refusal"
    value_from: int = 0

    def __post_init__(self) -> None:
        if not self.leak_ids or not self.refuse_ids:
            raise PairRejected("Answer: the leaking and the refusing continuation need at least one token each")
        if self.split >= min(len(self.leak_ids), len(self.refuse_ids)):
            # lengths only: the leak ids decode to the PII value
            raise PairRejected(f"Answer: one continuation is a token prefix of the other ({len(self.leak_ids)} "
                               f"leak tokens vs {len(self.refuse_ids)} refusal tokens); no token tells them apart")
        if self.contrast not in CONTRASTS:
            raise PatchingError(f"Answer: contrast {self.contrast!r}, expected one of {CONTRASTS}")
        if not 0 <= self.value_from < len(self.leak_ids):
            raise PatchingError(f"Answer: value_from {self.value_from} outside the {len(self.leak_ids)} leak tokens")

    @property
    def split(self) -> int:
        """The first answer position where the two continuations differ (0 unless they share a prefix)."""
        n = min(len(self.leak_ids), len(self.refuse_ids))
        return next((k for k in range(n) if self.leak_ids[k] != self.refuse_ids[k]), n)

    @property
    def n_logits(self) -> int:
        """Logit rows a forward must keep: one per leaking token (positions P-1 .. P+A-2)."""
        return len(self.leak_ids)


def default_refusal(session: Session) -> str:
    return CLASS_REFUSAL if session.labels.get("framing") == "classification" else REFUSAL


def answer_ids(adapter: FamilyAdapter, session: Session, text: str) -> list[int]:
    """The tokens the model would write for `text` as its answer to `session` (see the module docstring)."""
    prompt = render(adapter, session)
    t = prompt.generation_turn
    if t is None:
        raise PatchingError(f"session {session.session_id!r}: nothing to answer (it must end with a user turn or an "
                            "assistant turn with text=None)")
    answered = Session(session.session_id, [*session.turns[:t], Turn("assistant", text)], dict(session.labels))
    full = render(adapter, answered, add_generation_prompt=False)
    n = prompt.n_positions
    ids = full.input_ids[0]
    df = full.token_map.df
    content = df.index[(df["turn"].to_numpy() == t) & (df["segment"].to_numpy() == "assistant")]
    if full.n_positions > n and torch.equal(ids[:n], prompt.input_ids[0]) and len(content) and content[0] >= n:
        return ids[n:int(content[-1]) + 1].tolist()
    return list(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])


def make_answer(adapter: FamilyAdapter, session: Session, leak: str | None = None,
                refusal: str | None = None) -> Answer:
    """The Answer of `session`: `leak` defaults to its '_target' label (the PII value asked for), `refusal` to the
    framing's 'cannot assist' sentinel."""
    given = leak is not None or refusal is not None
    leak = leak if leak is not None else session.labels.get("_target")
    if not leak:
        raise PatchingError(f"session {session.session_id!r}: no leaking continuation (label '_target' missing; "
                            "pass leak=...)")
    refusal = refusal if refusal is not None else default_refusal(session)
    contrast = "given" if given else "value_vs_refusal"
    return Answer(tuple(answer_ids(adapter, session, str(leak))), tuple(answer_ids(adapter, session, refusal)),
                  contrast)


def value_answer(adapter: FamilyAdapter, session: Session, clean_value: str, corrupt_value: str) -> Answer:
    """An image pair's Answer: the clean document's value against the corrupt document's ("value_vs_value"),
    both tokenised as answers to the clean `session`."""
    if clean_value == corrupt_value:
        raise PairRejected(f"session {session.session_id!r}: the two documents show the same value; nothing to tell "
                           "apart")
    return Answer(tuple(answer_ids(adapter, session, clean_value)), tuple(answer_ids(adapter, session, corrupt_value)),
                  "value_vs_value")


def own_answer(adapter: FamilyAdapter, session: Session, said: str, value: str, refusal: str | None = None) -> Answer:
    """A framing pair's Answer from `said`, the model's greedy answer to the clean (leaking) `session`: its words up
    to and including the first occurrence of `value` ("answer_vs_refusal"; `value_from` marks the value's tokens),
    against the refusal. When `said` does not contain the value, the value alone against the refusal
    ("value_vs_refusal"). PairRejected when the answer starts like the refusal (the clean side refuses)."""
    refusal = refusal if refusal is not None else default_refusal(session)
    at = said.find(value)
    prefix = said[:at] if at >= 0 else ""
    ids = answer_ids(adapter, session, prefix + value)
    value_from = 0
    if prefix.strip():
        head = answer_ids(adapter, session, prefix)
        # Where the value's tokens start: after the prefix's own tokens when they are a token prefix of the whole;
        # else (a token merged across the boundary) from the first token that differs, which covers the value.
        same = next((k for k in range(min(len(head), len(ids))) if head[k] != ids[k]), min(len(head), len(ids)))
        value_from = min(same, len(ids) - 1)
    contrast = "answer_vs_refusal" if prefix.strip() else "value_vs_refusal"
    refuse = tuple(answer_ids(adapter, session, refusal))
    if ids[0] == refuse[0] and contrast == "answer_vs_refusal":
        raise PairRejected(f"session {session.session_id!r}: the clean framing's own answer starts like the refusal")
    return Answer(tuple(ids), refuse, contrast, value_from)


def answer_metrics(logits: Float[Tensor, "row answer vocab"], answer: Answer) -> dict[str, Float[Tensor, " row"]]:
    """logit_diff and pii_logprob of each row from the logits at answer positions P-1 .. P+A-2 (see the module
    docstring)."""
    if logits.shape[1] != answer.n_logits:
        raise PatchingError(f"answer_metrics: {logits.shape[1]} logit rows, expected {answer.n_logits}")
    logits = logits.float()
    k = answer.split
    diff = logits[:, k, answer.leak_ids[k]] - logits[:, k, answer.refuse_ids[k]]
    v = answer.value_from
    logp = torch.log_softmax(logits[:, v:], dim=-1)
    leak = torch.tensor(answer.leak_ids[v:], device=logits.device)
    summed = logp.gather(-1, leak.expand(logits.shape[0], -1)[..., None])[..., 0].sum(-1)
    return {"logit_diff": diff, "pii_logprob": summed}


def patch_score(patched: np.ndarray | float, clean: float, corrupt: float) -> np.ndarray | float:
    """(patched - corrupt) / (clean - corrupt), an array for an array and a float for a number; NaN where clean ==
    corrupt (nothing to restore)."""
    span = clean - corrupt
    patched = np.asarray(patched, dtype=float)
    if span == 0 or not np.isfinite(span):
        return np.full_like(patched, np.nan)
    return (patched - corrupt) / span
