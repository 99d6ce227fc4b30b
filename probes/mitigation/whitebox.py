"""What the white-box interventions other than the leak direction are fitted from (`steer` applies them).

- LEACE erasure of the PII concept with a rank knob (`leace_settings`): `fit_pii_leace` fits LEACE
  (`probes.probing.erasure`) of the asked value's digits where the steer edits (the prompt's last position and
  every generated token, one LEACE per kind of position); `truncated_eraser(leace, rank)` keeps its `rank`
  strongest whitened concept directions (the singular vectors of the whitened cross-covariance, strongest first),
  so rank 0 is no edit and the full rank is LEACE itself.
- Ablation of a component patching singled out: `benign_means` is each hook's mean activation at the prompt's last
  position over benign prompts, what a `mean` steer moves the component's output towards.
- The conditional gate: `fit_gate` fits a logistic-regression probe of "this prompt asks for PII" (privacy prompts
  against benign ones) on the activations where a gated steer acts (the prompt's last position and every generated
  token), as a `ProbeGate`: the steer then edits only where the probe fires.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from probes.data.session import Session
from probes.mitigation.evaluate import Setting
from probes.mitigation.settings import last_prompt_activations
from probes.mitigation.steer import ProbeGate, Steer, SteerError
from probes.models.loading import LoadedModel
from probes.probing.erasure import SiteEraser, SubspaceEraser, fit_leace_at, site_activations
from probes.probing.targets import session_targets


def _rank_k(leace: SubspaceEraser, rank: int) -> SubspaceEraser:
    """LEACE restricted to its first `rank` whitened concept directions: x - W^+ U_k U_k^T W (x - mu)."""
    if leace.basis is None or leace.whiten is None or leace.unwhiten is None:
        raise SteerError("truncated_eraser: expected a LEACE fitted by probes.probing.erasure.fit_leace")
    basis = leace.basis[:, :rank]
    return SubspaceEraser(leace.unwhiten @ basis, basis.T @ leace.whiten, leace.bias, int(basis.shape[1]), "leace",
                          leace.fit_cov, leace.site, 1.0, leace.whiten, leace.unwhiten, basis)


@dataclass(frozen=True, eq=False)
class PositionEraser:
    """An eraser for `Steer("erase")`: `prompt` on a forward over several tokens (the prompt), `generated` on a
    one-token forward (each generated token), computed in float64. repr: a digest of its matrices (resume keys)."""

    prompt: SubspaceEraser
    generated: SubspaceEraser

    @property
    def rank(self) -> int:
        return int(self.prompt.rank)

    def __call__(self, x: Tensor) -> Tensor:
        part = self.prompt if x.shape[1] > 1 else self.generated
        return part(x.double()).to(x.dtype)

    def __repr__(self) -> str:
        h = hashlib.sha256()
        for part in (self.prompt, self.generated):
            for t in (part.proj_left, part.proj_right, part.bias):
                h.update(t.detach().cpu().double().numpy().tobytes())
        return f"PositionEraser(rank={self.rank}, sha={h.hexdigest()[:16]})"


def truncated_eraser(leace: SiteEraser | SubspaceEraser, rank: int) -> PositionEraser:
    """The eraser of LEACE's `rank` strongest concept directions (each kind of position's LEACE truncated alike;
    a rank above LEACE's own is LEACE's)."""
    if rank < 0:
        raise SteerError(f"truncated_eraser: rank {rank!r}: expected >= 0")
    if isinstance(leace, SiteEraser):
        return PositionEraser(_rank_k(leace.prompt, rank), _rank_k(leace.generated, rank))
    one = _rank_k(leace, rank)
    return PositionEraser(one, one)


def leace_settings(leaces: dict[str, SiteEraser | SubspaceEraser], ranks: Sequence[int], tag: str = ""
                   ) -> list[Setting]:
    """One setting per (hook, rank > 0): LEACE truncated to that rank (`truncated_eraser`) at the prompt's last
    position and every generated token; ranks above LEACE's own are LEACE's (measured once, at LEACE's rank).
    Method names are `leace@<hook><tag>`, the strength is the rank."""
    out = []
    for hook, leace in leaces.items():
        full = int(leace.rank)
        for k in sorted({min(int(k), full) for k in ranks if int(k) > 0}):
            steer = Steer("erase", hook, 1.0, eraser=truncated_eraser(leace, k), last=1)
            out.append(Setting(f"leace@{hook}{tag}", float(k), steers=(steer,)))
    return out


def fit_pii_leace(loaded: LoadedModel, sessions: Sequence[Session], hook: str, max_new_tokens: int = 32
                  ) -> SiteEraser:
    """LEACE of the asked value's digits (one ten-way concept per digit position) at `hook`, fitted on the
    prompt's last position and on the generated tokens of `sessions` separately (where a `last=1` steer edits)."""
    y, _, _ = session_targets(list(sessions), "digits")
    return fit_leace_at(loaded, list(sessions), hook, y, 10, last=1, max_new_tokens=max_new_tokens)


def benign_means(loaded: LoadedModel, sessions: Sequence[Session], hooks: Sequence[str]) -> dict[str, Tensor]:
    """Each hook's mean activation at the prompt's last position over (benign) `sessions` [d] (float64)."""
    acts = last_prompt_activations(loaded, sessions, hooks)
    return {h: a.mean(0) for h, a in acts.items()}


def fit_gate(loaded: LoadedModel, positive: Sequence[Session], negative: Sequence[Session], hook: str,
             max_new_tokens: int = 8, threshold: float = 0.5, c: float = 1.0) -> ProbeGate:
    """A `ProbeGate` at `hook`: an L2 logistic regression (sklearn, inverse strength `c`) of positive (privacy)
    against negative (benign) sessions, on the activations at the prompt's last position and at each of the first
    `max_new_tokens` generated tokens; the features' standardisation is folded into the weights."""
    from sklearn.linear_model import LogisticRegression

    if not positive or not negative:
        raise SteerError("fit_gate: need positive and negative sessions")
    sessions = [*positive, *negative]
    X, owner, _ = site_activations(loaded, sessions, hook, last=1, max_new_tokens=max_new_tokens)
    y = (np.asarray(owner) < len(positive)).astype(int)
    X = X.numpy()
    mu, sd = X.mean(0), X.std(0) + 1e-8
    clf = LogisticRegression(C=c, max_iter=2000).fit((X - mu) / sd, y)
    w = clf.coef_[0] / sd
    b = float(clf.intercept_[0] - (w * mu).sum())
    return ProbeGate(torch.as_tensor(w, dtype=torch.float64), bias=b, threshold=threshold)
