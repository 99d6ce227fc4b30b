"""Pair checks: does a pair's metric separate clean from corrupt? Before a pair's cells are patched, its separation
(clean - corrupt logit_diff) must be at least `min_separation` (default `MIN_SEPARATION`, 1 nat); a pair below it,
or one that cannot be measured (`PairRejected`: e.g. the clean framing's own answer is the refusal), is dropped from
the rows, never silently: the pairs table (`pair_checks(rows)`, `patching_<experiment>_pairs.csv`) lists every pair
with its separation, kept and reason, and a `PairsDroppedWarning` gives the count."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from probes.data.session import Session
from probes.patching.config import MIN_SEPARATION, PatchingError
from probes.patching.pairs import Pair

PAIR_COLUMNS = ("session_id", "identity_id", "corruption", "contrast", "clean", "corrupt", "separation", "kept",
                "reason")
PAIR_DTYPES = {"session_id": object, "identity_id": object, "corruption": object, "contrast": object,
               "clean": float, "corrupt": float, "separation": float, "kept": bool, "reason": object}


class PairsDroppedWarning(UserWarning):
    """Some pairs were dropped from a patching run (their metric does not separate clean from corrupt)."""


def pair_check(pair: Pair, min_separation: float | int | None = MIN_SEPARATION) -> dict[str, Any]:
    """Does the pair's metric separate clean from corrupt? `separation` = clean - corrupt of logit_diff; kept when
    it is at least `min_separation` nats (`probes.patching.metrics.MIN_SEPARATION`; None: kept unchecked). No PII: ids,
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


def warn_dropped(pairs: pd.DataFrame, experiment: str, min_separation: float | int | None) -> None:
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
