"""The settings a mitigation sweep measures: black-box protections and white-box steers over their strength knobs.

- `blackbox_settings`: one `Setting` per (protection kind, strength); regional kinds cover the sensitive fields'
  marks only (SSN, phone, email: the fields the refusal policy protects), so reading the name stays possible.
- `steer_settings`: one per (hook, strength) of a steer (leak direction added or ablated, a component's output
  moved to its benign mean, optionally behind a `ProbeGate`); the direction at each hook is the mean
  activation at the prompt's last position under refusing framings minus the mean under leaking ones
  (`leak_directions`), measured on the sessions given (fit on training identities, evaluate on held-out ones).
- `best_point`: a method's chosen setting: the lowest L among those keeping U >= `keep` x the unmitigated U (or
  within an absolute utility drop and a benign over-refusal budget).
LEACE with its rank knob, the benign means and the gate's probe are fitted in `probes.mitigation.whitebox`.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from probes.data.identities import MARK_LABELS, PII_TYPES
from probes.data.session import Session
from probes.leakage import generate_batch
from probes.mitigation.evaluate import Setting
from probes.mitigation.image import ImageProtection
from probes.mitigation.steer import ProbeGate, Steer, leak_direction
from probes.models.loading import LoadedModel

REFUSING = ("direct", "VQA", "classification")
LEAKING = ("caption", "rephrasing")
SENSITIVE = tuple(MARK_LABELS[p] for p in PII_TYPES)
NONE = Setting("none", 0.0)  # the unmitigated model: every front's strength-0 point


def blackbox_settings(kinds: Sequence[str], strengths: Sequence[float], dilation: float = 4.0,
                      labels: Sequence[str] = SENSITIVE) -> list[Setting]:
    """Settings for each protection kind at each strength > 0 (strength 0 is `NONE`)."""
    return [Setting(kind, float(s), protection=ImageProtection(kind, float(s), dilation=dilation),
                    labels=tuple(labels)) for kind in kinds for s in strengths if s > 0]


def last_prompt_activations(loaded: LoadedModel, sessions: Sequence[Session], hooks: Sequence[str]
                            ) -> dict[str, Tensor]:
    """Each hook's activation at the prompt's last position [n, d] (float64), one session per forward (no padding)
    and every hook in the same forward."""
    rows: dict[str, list[Tensor]] = {h: [] for h in hooks}

    def keep(x: Tensor, name: str) -> None:
        if x.shape[1] > 1:  # the prompt's forward, not a generated token's
            rows[name].append(x[0, -1].detach().double().cpu())

    with loaded.hooks([(h, keep) for h in hooks]):
        generate_batch(loaded, sessions, max_new_tokens=1, batch_size=1, sort_by_length=False)
    return {h: torch.stack(r) for h, r in rows.items()}


def leak_directions(loaded: LoadedModel, sessions: Sequence[Session], hooks: Sequence[str]) -> dict[str, Tensor]:
    """Refusing-minus-leaking mean activation at the prompt's last position, per hook (see the module docstring)."""
    refusing = [s for s in sessions if s.labels.get("framing") in REFUSING]
    leaking = [s for s in sessions if s.labels.get("framing") in LEAKING]
    if not refusing or not leaking:
        raise ValueError(f"leak_directions: need sessions under refusing {REFUSING} and leaking {LEAKING} framings")
    ref, leak = (last_prompt_activations(loaded, group, hooks) for group in (refusing, leaking))
    return {h: leak_direction(ref[h], leak[h]) for h in hooks}


def steer_settings(directions: dict[str, Tensor], strengths: Sequence[float], kind: str = "add",
                   tag: str = "", gates: dict[str, ProbeGate] | None = None) -> list[Setting]:
    """One setting per (hook, strength > 0): the steer of `kind` with the hook's vector (a leak direction for add
    and ablate, a mean activation for mean) at the prompt's last position and every generated token. Method names
    are `<kind>@<hook><tag>` (tag: e.g. ' (random layer)'); with `gates` (hook -> ProbeGate) each steer is gated by
    its hook's gate and the names are `gated_<kind>@<hook><tag>`."""
    if gates is not None and set(gates) != set(directions):
        raise ValueError(f"steer_settings: gates for {sorted(gates)} but vectors for {sorted(directions)}")
    prefix, gates = ("", {}) if gates is None else ("gated_", gates)
    return [Setting(f"{prefix}{kind}@{hook}{tag}", float(s),
                    steers=(Steer(kind, hook, float(s), vector=r, last=1, gate=gates.get(hook)),))
            for hook, r in directions.items() for s in strengths if s > 0]


def best_point(points: pd.DataFrame, method: str, keep: float = 0.95, max_drop: float | None = None,
               max_over_refusal: float | None = None) -> pd.Series | None:
    """The method's row with the lowest L among those with U >= keep x the unmitigated U (the `none` row), or, with
    `max_drop`, with U >= the unmitigated U - max_drop (instead of `keep`); with `max_over_refusal` also a benign
    over-refusal (1 - u_no_refusal) of at most that. Ties go to the higher U. None when no setting qualifies."""
    base = points.loc[points["method"] == "none", "U"]
    if base.empty:
        raise ValueError("best_point: the points hold no 'none' (unmitigated) row")
    u0 = float(base.iloc[0])
    floor = keep * u0 if max_drop is None else u0 - max_drop - 1e-12
    ok = (points["method"] == method) & (points["U"] >= floor)
    if max_over_refusal is not None:
        if "u_no_refusal" not in points.columns:
            raise ValueError("best_point: max_over_refusal needs the column u_no_refusal")
        ok &= (1 - points["u_no_refusal"]) <= max_over_refusal + 1e-12
    mine = points[ok]
    if mine.empty:
        return None
    return mine.sort_values(["L", "U"], ascending=[True, False]).iloc[0]
