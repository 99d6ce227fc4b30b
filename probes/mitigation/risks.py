"""The risks beyond single-turn disclosure, measured at a mitigation's chosen setting: parametric memory and context
retention.

- Parametric memory: the share of name-only prompts (no image: `probes.data.builders.memory_probe_sessions`) whose
  answer holds the asked value of a memory-set identity (planted in training), pooled over framings and PII types
  (the organism card's `memory_asr`). Its floor is the same rate on identities never planted (`memory_unseen`
  sessions), about 0 for a model that does not guess; an image protection cannot change it (the prompts hold no
  image), a white-box intervention can.
- Context retention: the ASR of multi-turn sessions (`multiturn_sessions`, image shown in turn 1 only) by turn
  distance d (user turns from the image's showing to the probe: d = 1 asks right after it, d = 3 after two
  distractor exchanges); `turn_ratio` = ASR(d=3) / ASR(d=1). Null: 1, what the model keeps does not fade with the
  distance; undefined (NaN) when nothing leaks at d = 1. An image protection applies to the image in turn 1.

`risk_rows` answers such sessions under settings (`probes.mitigation.evaluate.Setting`) and scores them by the
toolkit's leak scorer; `risk_table` reduces the rows to one row per setting.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from probes.data.session import Session
from probes.leakage import score_responses
from probes.mitigation.blackbox import model_blackbox
from probes.mitigation.evaluate import Setting, setting_answers
from probes.models.loading import LoadedModel

RISK_KINDS = ("memory", "memory_unseen", "multiturn")
COLUMNS = ["method", "strength", "identity_id", "kind", "framing", "pii_type", "turn_distance", "leaked", "refused"]


def risk_rows(loaded: LoadedModel, settings: Sequence[Setting], sessions: Sequence[Session], max_new_tokens: int = 32,
              batch_size: int = 8, progress: bool = False) -> tuple[pd.DataFrame, int]:
    """One row per (setting, session) of `sessions` (kinds memory, memory_unseen, multiturn): method, strength,
    identity_id, kind, framing, pii_type, turn_distance, leaked, refused (no answer text); and the queries made."""
    sessions = list(sessions)
    bad = sorted({str(s.labels.get("kind")) for s in sessions} - set(RISK_KINDS))
    if bad:
        raise ValueError(f"risk_rows: session kinds {bad}: expected some of {RISK_KINDS}")
    box = model_blackbox(loaded, max_new_tokens, batch_size)
    out = []
    for setting in tqdm(settings, desc="risks", unit="setting", disable=not progress):
        scored = score_responses(sessions, setting_answers(loaded, box, setting, sessions))
        scored = scored.rename(columns={"leak": "leaked"}).assign(method=setting.method,
                                                                 strength=float(setting.strength))
        out.append(scored[COLUMNS])
    rows = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=COLUMNS)
    return rows, box.queries


def _rate(rows: pd.DataFrame) -> float:
    return float(rows["leaked"].mean()) if len(rows) else float("nan")


def turn_ratio(rows: pd.DataFrame, far: int = 3, near: int = 1) -> dict[str, float]:
    """ASR of multiturn rows at turn distance `near` and `far`, and their ratio far / near (NaN when nothing leaks
    at `near`, or when either distance has no rows)."""
    mt = rows[rows["kind"] == "multiturn"]
    dist = pd.to_numeric(mt["turn_distance"])
    a_near, a_far = _rate(mt[dist == near]), _rate(mt[dist == far])
    ratio = a_far / a_near if np.isfinite(a_near) and a_near > 0 else float("nan")
    return {f"asr_turn{near}": a_near, f"asr_turn{far}": a_far, "turn_ratio": ratio}


def risk_table(rows: pd.DataFrame, far: int = 3, near: int = 1) -> pd.DataFrame:
    """Per (method, strength): memory_asr, memory_unseen_asr, asr_turn<near>, asr_turn<far>, turn_ratio and the
    numbers of rows of each kind behind them."""
    missing = [c for c in ("method", "strength", "kind", "leaked", "turn_distance") if c not in rows.columns]
    if missing:
        raise ValueError(f"risk_table: columns {missing} missing (columns: {list(rows.columns)})")
    out = []
    for (method, strength), r in rows.groupby(["method", "strength"], sort=False):
        row = {"method": method, "strength": float(strength), "memory_asr": _rate(r[r["kind"] == "memory"]),
               "memory_unseen_asr": _rate(r[r["kind"] == "memory_unseen"]), **turn_ratio(r, far, near)}
        row.update({f"n_{k}": int((r["kind"] == k).sum()) for k in RISK_KINDS})
        out.append(row)
    return pd.DataFrame(out)
