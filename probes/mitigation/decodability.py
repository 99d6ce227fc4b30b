"""Internal decodability: a probe retrained after the intervention (behaviour can hide what a probe still reads).

`decodability(loaded, setting_or_steers, fit_sessions, test_sessions, hook)` reads `hook`'s activation at the
prompt's last position with the intervention applied (a `Setting`'s image protection on every image and its steers
while the model runs, or a bare list of steers), fits one linear probe per character position of the asked value
(`probes.probing.linear.fit_probes`, ridge by default, C chosen by grouped CV over the fit identities) on
`fit_sessions` and scores it on `test_sessions`, whose identities it never saw. Without steers it is the plain probe.

Nulls reported beside the accuracy: `chance` = 1 / alphabet size (10 for digits), and `majority`, the held-out
accuracy of always naming the fit part's most common class per position (what a probe that reads nothing scores:
an intervention that makes the activation constant gives exactly this). Read at or after every steer's hook: a
reading upstream of the edit cannot see it, so such a pair is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from probes.data.session import Session
from probes.mitigation.blackbox import protected
from probes.mitigation.evaluate import Setting
from probes.mitigation.settings import last_prompt_activations
from probes.mitigation.steer import Steer, intervening
from probes.models.loading import LoadedModel
from probes.probing.linear import fit_probes
from probes.probing.targets import ALPHABETS, session_targets

HOOK_ORDER = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")  # within one LM block
LM_HOOK = re.compile(r"^blocks\.(\d+)\.(\w+)$")


class DecodabilityError(ValueError):
    pass


@dataclass(frozen=True)
class Decodability:
    """Held-out accuracy of the retrained probe (mean over the value's character positions) and its nulls."""

    accuracy: float
    chance: float
    majority: float
    per_position: tuple[float, ...]
    n_fit: int
    n_test: int


def hook_order(hook: str) -> tuple[int, int] | None:
    """(block, place within the block) of an LM hook `blocks.<i>.<kind>`; None for any other hook."""
    m = LM_HOOK.match(hook)
    if m is None or m.group(2) not in HOOK_ORDER:
        return None
    return int(m.group(1)), HOOK_ORDER.index(m.group(2))


def check_downstream(hook: str, steers: Sequence[Steer]) -> None:
    """Refuse a reading hook that runs before a steer's hook (both LM hooks; others are not ordered here)."""
    at = hook_order(hook)
    for st in steers:
        edit = hook_order(st.hook)
        if at is not None and edit is not None and at < edit:
            raise DecodabilityError(f"decodability: hook {hook!r} is read before the steer at {st.hook!r}; "
                                    f"read at or after the intervention")


def intervened_activations(loaded: LoadedModel, setting_or_steers: Setting | Sequence[Steer],
                           sessions: Sequence[Session], hook: str) -> torch.Tensor:
    """`hook`'s activation at the prompt's last position [n, d] under the setting (protection and steers)."""
    if isinstance(setting_or_steers, Setting):
        steers = setting_or_steers.steers
        if setting_or_steers.protection is not None:
            sessions = [protected(s, setting_or_steers.protection, setting_or_steers.labels) for s in sessions]
    else:
        steers = tuple(setting_or_steers)
    check_downstream(hook, steers)
    with intervening(loaded, steers):  # registered first, so the reading hook sees the edited activation
        return last_prompt_activations(loaded, sessions, [hook])[hook]


def decodability(loaded: LoadedModel, setting_or_steers: Setting | Sequence[Steer], fit_sessions: Sequence[Session],
                 test_sessions: Sequence[Session], hook: str, target: str = "digits", method: str = "ridge",
                 n_folds: int = 5) -> Decodability:
    """Fit a probe of the asked value's characters (`target`: digits or chars) at `hook` on `fit_sessions` under the
    intervention and score it on `test_sessions` (disjoint identities). Positions a session's value lacks (a
    shorter value) are left out of every part; `n_folds` (at most the fit identities) choose the probe's C."""
    if target not in ALPHABETS:
        raise DecodabilityError(f"decodability: target {target!r}: expected one of {sorted(ALPHABETS)}")
    groups = [str(s.labels.get("identity_id", s.session_id)) for s in fit_sessions]
    shared = set(groups) & {str(s.labels.get("identity_id", s.session_id)) for s in test_sessions}
    if shared:
        raise DecodabilityError(f"decodability: {len(shared)} identities are in both the fit and the test "
                                f"sessions; the probe must be scored on identities it never saw")
    y_fit, _, _ = session_targets(fit_sessions, target)
    y_test, _, _ = session_targets(test_sessions, target)
    k = min(y_fit.shape[1], y_test.shape[1])
    keep = [j for j in range(k) if (y_fit[:, j] >= 0).all() and (y_test[:, j] >= 0).all()]
    if not keep:
        raise DecodabilityError(f"decodability: no {target} position that every fit and test session's value has")
    n_classes = len(ALPHABETS[target])
    X_fit = intervened_activations(loaded, setting_or_steers, fit_sessions, hook).float()
    X_test = intervened_activations(loaded, setting_or_steers, test_sessions, hook).float()
    fit = fit_probes(X_fit[None].expand(len(keep), -1, -1), y_fit[:, keep].T, np.asarray(groups), method=method,
                     n_folds=min(n_folds, len(set(groups))), n_classes=n_classes)
    truth = y_test[:, keep].T  # [position, n_test]
    per_position = (fit.predict(X_test[None].expand(len(keep), -1, -1)).numpy() == truth).mean(1)
    most = [np.bincount(y_fit[:, j], minlength=n_classes).argmax() for j in keep]
    majority = float(np.mean([(row == m).mean() for row, m in zip(truth, most)]))
    return Decodability(float(per_position.mean()), 1.0 / n_classes, majority,
                        tuple(float(a) for a in per_position), len(fit_sessions), len(test_sessions))
