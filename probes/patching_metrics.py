"""What a patching run measures: the leaking vs refusing continuation, tokenised as the model would write them.

Each run of `probes.patching` feeds the prompt followed by the leaking answer, teacher-forced: the PII value's
tokens but the last. One forward then gives every metric, for every row of a batch:

- `logit_diff`: logit of the leaking continuation's token minus the refusing one's, at the first answer token
  (the PII value's first token vs the first token of 'cannot assist'). When the two tokenisations share a prefix
  (an email starting like 'cannot'), the difference is taken at the first token where they part, with the shared
  prefix teacher-forced (it is the leaking answer's own prefix, so the same forward serves).
- `pii_logprob`: the summed log-probability of the PII value's tokens under teacher forcing.
- `score_<metric>` = (patched - corrupt) / (clean - corrupt): 1 = the clean behaviour restored, 0 = the corrupt
  one kept (NaN when clean == corrupt). The same formula for both directions: denoising moves it up from 0,
  noising down from 1.
- `flip`: 1 when patching changed which continuation wins (the sign of `logit_diff` vs the unpatched run).

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

from probes.families.base import FamilyAdapter
from probes.render import render
from probes.session import Session, Turn

METRICS = ("logit_diff", "pii_logprob")
REFUSAL = "cannot assist"
CLASS_REFUSAL = "the class is cannot assist"  # the classification framing's sentinel


class PatchingError(ValueError):
    """Bad input to patching (unequal pair, unknown group, nothing to answer ...); names what was expected."""


@dataclass(frozen=True)
class Answer:
    """Token ids of the leaking answer (the PII value) and of the refusal, as the model would write them."""

    leak_ids: tuple[int, ...]
    refuse_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.leak_ids or not self.refuse_ids:
            raise PatchingError("Answer: the leaking and the refusing continuation need at least one token each")
        if self.split >= min(len(self.leak_ids), len(self.refuse_ids)):
            # lengths only: the leak ids decode to the PII value
            raise PatchingError(f"Answer: one continuation is a token prefix of the other ({len(self.leak_ids)} "
                                f"leak tokens vs {len(self.refuse_ids)} refusal tokens); no token tells them apart")

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
    leak = leak if leak is not None else session.labels.get("_target")
    if not leak:
        raise PatchingError(f"session {session.session_id!r}: no leaking continuation (label '_target' missing; "
                            "pass leak=...)")
    refusal = refusal if refusal is not None else default_refusal(session)
    return Answer(tuple(answer_ids(adapter, session, str(leak))), tuple(answer_ids(adapter, session, refusal)))


def answer_metrics(logits: Float[Tensor, "row answer vocab"], answer: Answer) -> dict[str, Float[Tensor, "row"]]:
    """logit_diff and pii_logprob of each row from the logits at answer positions P-1 .. P+A-2."""
    if logits.shape[1] != answer.n_logits:
        raise PatchingError(f"answer_metrics: {logits.shape[1]} logit rows, expected {answer.n_logits}")
    logits = logits.float()
    k = answer.split
    diff = logits[:, k, answer.leak_ids[k]] - logits[:, k, answer.refuse_ids[k]]
    logp = torch.log_softmax(logits, dim=-1)
    leak = torch.tensor(answer.leak_ids, device=logits.device)
    summed = logp.gather(-1, leak.expand(logits.shape[0], -1)[..., None])[..., 0].sum(-1)
    return {"logit_diff": diff, "pii_logprob": summed}


def patch_score(patched: np.ndarray | float, clean: float, corrupt: float) -> np.ndarray:
    """(patched - corrupt) / (clean - corrupt); NaN where clean == corrupt (nothing to restore)."""
    span = clean - corrupt
    patched = np.asarray(patched, dtype=float)
    if span == 0 or not np.isfinite(span):
        return np.full_like(patched, np.nan)
    return (patched - corrupt) / span
