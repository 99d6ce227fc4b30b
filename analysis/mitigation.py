"""`mmret mitigate`: measure mitigation settings and write their results folder.

Writes into `out_dir`: mitigation_rows_privacy.csv and mitigation_rows_utility.csv (the tidy rows, no answer text),
mitigation_points.csv (one row per method and strength: L, U, per-framing ASR, per-task U, partial-disclosure
rate, refusal rate and leak rate among answers that did not refuse; every method's front starts at the unmitigated
point), mitigation_hypervolume.csv (each method's front: hypervolume with a 95% identity bootstrap interval,
against the reference point (L, U) = (1, 0), and its U at L <= 0.05 and L at U >= 0.95 x the unmitigated U),
mitigation_best.csv (each method's chosen point:
the lowest L keeping U >= 0.95 x the unmitigated U), and the figures `fronts` and `framing_shift` beside them.
With `risk_sessions` (memory, memory_unseen and multiturn sessions, `probes.mitigation.risks`) also
mitigation_risks.csv: parametric memory and context retention at the unmitigated point and at each method's chosen
point (memory_asr, memory_unseen_asr, asr_turn1, asr_turn3, turn_ratio).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.figures import plot_framing_shift, plot_fronts
from probes.data.files import atomic_write_bytes
from probes.data.session import Session
from probes.mitigation.evaluate import Setting, evaluate_settings, parts_path
from probes.mitigation.fronts import loss_at, utility_at
from probes.mitigation.measures import hypervolume_table, loss_utility
from probes.mitigation.risks import risk_rows, risk_table
from probes.mitigation.settings import NONE, best_point
from probes.mitigation.utility import utility_sessions
from probes.models.loading import LoadedModel


def with_baseline(rows: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """The rows with the unmitigated setting's rows copied under every method at strength 0 (each front's start)."""
    base = rows[rows["method"] == NONE.method]
    return pd.concat([rows] + [base.assign(method=m, strength=0.0) for m in methods], ignore_index=True)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, df.to_csv(index=False).encode("utf-8"))


@dataclass(frozen=True)
class Mitigation:
    """What `run_mitigation` measured: the points (one row per method and strength), their identity-bootstrap
    draws [draw, point, (L, U)] in the same row order, the hypervolume table and the queries this call made."""

    points: pd.DataFrame
    draws: np.ndarray | None
    hypervolume: pd.DataFrame
    queries: int
    risks: pd.DataFrame | None = None  # per chosen point: memory and context retention (with `risk_sessions`)


def disclosure_rates(privacy: pd.DataFrame) -> pd.DataFrame:
    """Per (method, strength) over every framing: the partial-disclosure rate, the refusal rate (RR) and the leak
    rate among answers that did not refuse (what a refusal-rate-only view hides)."""
    g = privacy.assign(answered_leak=privacy["leaked"].where(~privacy["refused"].astype(bool)))
    return (g.groupby(["method", "strength"], sort=False)
            .agg(partial_rate=("partial_disclosure", "mean"), refusal_rate=("refused", "mean"),
                 leak_among_answered=("answered_leak", "mean")).reset_index())


def operating_points(points: pd.DataFrame, hv: pd.DataFrame, max_loss: float = 0.05, keep: float = 0.95
                     ) -> pd.DataFrame:
    """`hv` with each method's U at L <= `max_loss` and its L at U >= `keep` x the unmitigated U (NaN where its
    front never gets there), read off the method's points (its front starts at the unmitigated point)."""
    clean_u = float(points.loc[points["method"] == NONE.method, "U"].iloc[0])
    rows = {m: (utility_at(g, max_loss), loss_at(g, keep * clean_u)) for m, g in points.groupby("method")}
    return hv.assign(**{f"U_at_L_le_{max_loss:g}": [rows[m][0] for m in hv["method"]],
                        f"L_at_U_ge_{keep:g}_clean": [rows[m][1] for m in hv["method"]]})


def chosen_settings(settings: Sequence[Setting], best: pd.DataFrame) -> list[Setting]:
    """The unmitigated setting and the setting of each chosen point (a method's strength-0 point is the
    unmitigated one), each once."""
    by_key = {(s.method, float(s.strength)): s for s in settings}
    out = {NONE.key(): NONE}
    for _, b in best.iterrows():
        s = NONE if float(b["strength"]) == 0 else by_key[(b["method"], float(b["strength"]))]
        out.setdefault(s.key(), s)
    return list(out.values())


def run_mitigation(loaded: LoadedModel, sessions: Sequence[Session], settings: Sequence[Setting],
                   out_dir: str | os.PathLike, n_boot: int = 1000, seed: int = 0, max_new_tokens: int = 32,
                   progress: bool = True, risk_sessions: Sequence[Session] | None = None) -> Mitigation:
    """Measure `settings` (the unmitigated setting is added) on the privacy `sessions` and the benign sessions of
    their documents, and write the folder described above. Resumable per setting. With `risk_sessions`, also
    memory and context retention at each chosen point (see above)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = [NONE] + [s for s in settings if s.method != NONE.method]
    benign = utility_sessions(sessions)
    priv, util, queries = evaluate_settings(loaded, settings, sessions, benign, out_dir=out,
                                            max_new_tokens=max_new_tokens, progress=progress)
    methods = sorted({s.method for s in settings} - {NONE.method})
    priv, util = with_baseline(priv, methods), with_baseline(util, methods)
    points, draws = loss_utility(priv, util, by=["method", "strength"], n_boot=n_boot, seed=seed)
    mitigated = (points["method"] != NONE.method).to_numpy()
    hv = operating_points(points, hypervolume_table(points[mitigated], None if draws is None else draws[:, mitigated]))
    points = points.merge(disclosure_rates(priv), on=["method", "strength"], how="left")
    best = pd.DataFrame([b for m in methods if (b := best_point(points, m)) is not None])
    write_csv(priv, out / "mitigation_rows_privacy.csv")
    write_csv(util, out / "mitigation_rows_utility.csv")
    write_csv(points.assign(queries_total=queries), out / "mitigation_points.csv")
    write_csv(hv, out / "mitigation_hypervolume.csv")
    write_csv(best, out / "mitigation_best.csv")
    plot_fronts(points[points["method"] != NONE.method], out, name="fronts")
    if len(best):
        before = points[points["method"] == NONE.method].assign(label="before")
        shift = pd.concat([before.assign(method=m) for m in best["method"]] + [best.assign(label="after")])
        plot_framing_shift(shift, out, name="framing_shift")
    risks = None
    if risk_sessions:
        rows, more = risk_rows(loaded, chosen_settings(settings, best), risk_sessions, max_new_tokens,
                               progress=progress)
        queries += more
        risks = risk_table(rows)
        write_csv(risks, out / "mitigation_risks.csv")
    shutil.rmtree(parts_path(loaded, sessions, benign, out, max_new_tokens))  # only this run's: others stay
    return Mitigation(points, draws, hv, queries, risks)
