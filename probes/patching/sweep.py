"""The experiment runner: `patch_sessions` makes each session the clean side of a pair (or, for knockout, one run),
checks the pair (`probes.patching.checks`), patches every cell of the `PatchingConfig` and returns tidy rows;
`summarize` averages them over pairs.

Rows: model, family, experiment, corruption, direction, method, session_id, identity_id, framing, corrupt_framing,
scenario, pii_type, turn_distance, layer, component, hook, position_group, alignment, target, window, n_positions,
metric, value, clean, corrupt, n (`ROW_COLUMNS`); then contrast and null_by_construction. No PII: the public labels
only. `summarize`: means with bootstrap CIs clustered by identity.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from probes.data.files import atomic_write_bytes
from probes.data.identities import Identity, make_identities
from probes.data.session import Session
from probes.leakage import model_label
from probes.models.loading import LoadedModel
from probes.patching.atp_star import prepare_qk, qk_estimates, qk_rows
from probes.patching.attribution import attribution_patching, graddrop_patching, prepare_graddrop
from probes.patching.checks import PAIR_COLUMNS, PAIR_DTYPES, pair_check, rejected_pair, warn_dropped
from probes.patching.config import PatchingConfig, PatchingError, patching_config
from probes.patching.exact import Cell, exact_patching, sweep_cells
from probes.patching.forwards import prepare, prepare_pair
from probes.patching.knockouts import default_sources, knockout
from probes.patching.metrics import PairRejected, make_answer
from probes.patching.pairs import Pair, build_pair, labels_boxes, make_run, probe_turn, session_identity
from probes.stats import bootstrap_ci

log = logging.getLogger(__name__)

ROW_COLUMNS = ("model", "family", "experiment", "corruption", "direction", "method", "session_id", "identity_id",
               "framing", "corrupt_framing", "scenario", "pii_type", "turn_distance", "layer", "component", "hook",
               "position_group", "alignment", "target", "window", "n_positions", "metric", "value", "clean",
               "corrupt", "n")
Result = tuple[list[dict[str, Any]], dict[str, Any] | None]  # a session's rows and its pair check (or None)


def _public(labels: dict[str, Any]) -> dict[str, Any]:
    keys = ("session_id", "identity_id", "framing", "scenario", "pii_type", "turn_distance")
    return {k: labels.get(k) for k in keys}


def other_identities(sessions: Sequence[Session], seed: int) -> list[Identity]:
    """The identities of `sessions` (from their private labels), the pool an image pair draws its other value from;
    two drawn ones when the sessions hold fewer than two."""
    pool: dict[str, Identity] = {}
    for s in sessions:
        ident = session_identity(s)
        if ident is not None:
            pool.setdefault(ident.identity_id, ident)
    out = list(pool.values())
    if len(out) < 2:
        out += make_identities(2, seed=90_000 + seed)
    return out


def pick_other(ident: Identity | None, pool: list[Identity], swap: Sequence[str]) -> Identity:
    """The next identity of the pool whose swapped values all differ from `ident`'s."""
    ids = [p.identity_id for p in pool]
    start = ids.index(ident.identity_id) + 1 if ident is not None and ident.identity_id in ids else 0
    for k in range(len(pool)):
        cand = pool[(start + k) % len(pool)]
        if ident is None or all(cand.value(f) != ident.value(f) for f in swap):
            return cand
    raise PatchingError("no other identity with different values to swap in")


def default_groups(pairs: Sequence[Pair]) -> list[str]:
    """Groups present on both sides of every pair, in a fixed order (PII patches, other patches, turns, final)."""
    names: list[str] = []
    for p in pairs:
        for g in [*p.clean.groups, *p.corrupt.groups]:
            if g not in names:
                names.append(g)
    common = [g for g in names if all(g in p.clean.groups and g in p.corrupt.groups for p in pairs)]
    order = {"pii_patches": 0, "other_image": 1, "final": 10_000}
    return sorted(common, key=lambda g: (order.get(g, 2 + int(g[4:]) if g.startswith("turn") else 5000), g))


def patch_sessions(loaded: LoadedModel, sessions: Sequence[Session], config: PatchingConfig | str, *,
                   progress: bool = False, parts: str | os.PathLike | None = None, **options: Any) -> pd.DataFrame:
    """Run the experiment of `config` on every session (the clean side of each pair; the first `max_pairs`) and
    return the tidy rows (no summary). `config`: a PatchingConfig, or an experiment name with the config's other
    fields as `options` (which also override a given config's).

    Every pair is checked first (`pair_check`): a pair whose metric does not separate clean from corrupt by
    `min_separation` nats of logit_diff (None: keep every pair, the check still recorded), or that cannot be
    measured at all (`PairRejected`), is dropped from the rows and listed in the pairs table (`pair_checks(rows)`,
    one row per session, `PAIR_COLUMNS`); a PairsDroppedWarning says how many of how many were dropped and why.
    `parts`: a folder where each session's rows are kept as it finishes, so that a killed run started again with
    the same folder patches only the sessions it had not finished (the caller names the folder by its settings,
    as `run_patching` does)."""

    config = patching_config(config, options)
    sessions = list(sessions)[:config.max_pairs] if config.max_pairs else list(sessions)
    if not sessions:
        raise PatchingError("no sessions to patch")
    pool = other_identities(sessions, config.seed) if config.corruption == "image" else []
    patcher = SessionPatcher(loaded, config, pool, config.model or model_label(loaded))
    parts = Path(parts) if parts is not None else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
        n_done = sum((parts / f"{i:06d}.parquet").exists() for i in range(len(sessions)))
        if n_done:
            log.info("resuming: %d of %d sessions already done", n_done, len(sessions))
    frames: list[pd.DataFrame] = []
    checks: list[pd.DataFrame] = []
    for i, s in enumerate(tqdm(sessions, desc=f"patch {config.experiment}", unit="session", disable=not progress)):
        rows, check = saved_or_patched(lambda: patcher.rows(s), parts, i)
        frames.append(rows)
        checks.append(check)
    df = pd.concat([f for f in frames if len(f)] or [pd.DataFrame()], ignore_index=True)
    for c in ROW_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[list(ROW_COLUMNS) + [c for c in df.columns if c not in ROW_COLUMNS]]
    pairs = pd.concat([c for c in checks if len(c)] or [pd.DataFrame(columns=list(PAIR_COLUMNS))],
                      ignore_index=True).astype(PAIR_DTYPES)
    warn_dropped(pairs, config.experiment, config.min_separation)
    # Records, not a DataFrame: pandas compares attrs with == when concatenating, which a DataFrame cannot answer.
    df.attrs["pairs"] = pairs.to_dict("records")
    return df


def saved_or_patched(patch: Callable[[], Result], parts: Path | None, i: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, pair check) of session `i`: `patch()`'s; with `parts`, saved there as it finishes, and read back
    instead of patched again when a rerun finds them (a killed run resumes)."""
    if parts is None:
        rows, check = patch()
        return pd.DataFrame(rows), pd.DataFrame([check] if check else [], columns=list(PAIR_COLUMNS))
    part, check_part = parts / f"{i:06d}.parquet", parts / f"{i:06d}.pair.parquet"
    if not part.exists():  # the check is written first: a part present means both are
        rows, check = patch()
        atomic_write_bytes(check_part, pd.DataFrame([check] if check else [], columns=list(PAIR_COLUMNS))
                           .astype(PAIR_DTYPES).to_parquet(index=False))
        atomic_write_bytes(part, pd.DataFrame(rows).to_parquet(index=False))
    return pd.read_parquet(part), pd.read_parquet(check_part)


class SessionPatcher:
    """Patches one session at a time under a config: `rows(session)` -> its rows and its pair check (None where
    there is no pair: knockout, a session already under the corrupt framing)."""

    def __init__(self, loaded: LoadedModel, config: PatchingConfig, pool: list[Identity], label: str) -> None:
        self.loaded, self.config, self.pool, self.label = loaded, config, pool, label

    def rows(self, s: Session) -> Result:
        head = {"model": self.label, "family": self.loaded.family, "experiment": self.config.experiment, "n": 1,
                **_public(s.labels), "session_id": s.session_id}
        if self.config.experiment == "knockout":
            return self.knockout_rows(s, head), None
        pair = self.pair(s)
        if not isinstance(pair, Pair):
            return [], pair
        return self.pair_rows(pair, head)

    def knockout_rows(self, s: Session, head: dict[str, Any]) -> list[dict[str, Any]]:
        c, loaded = self.config, self.loaded
        boxes, size = labels_boxes(s)
        answer = make_answer(loaded.adapter, s, c.leak, c.refusal)
        run = make_run(loaded, s, answer, boxes, size)
        prepare(loaded, run, answer)
        src = {g: run.group(g) for g in (c.sources or default_sources(run, probe_turn(s)))}
        src = {g: v for g, v in src.items() if len(v)}
        windows = list(c.windows) if c.windows else [max(1, loaded.n_layers // 4)]
        return [{**head, "corruption": None, **r} for r in knockout(loaded, run, answer, src, windows,
                                                                    batch_size=c.batch_size)]

    def pair(self, s: Session) -> Pair | dict[str, Any] | None:
        """The session's pair; None for a session already under the corrupt framing (skipped), the pairs-table row
        of a pair that cannot be measured (`PairRejected`)."""
        c = self.config
        if c.corruption == "framing" and s.labels.get("framing") == c.corrupt_framing:
            log.info("session %s: already under the %s framing; skipped", s.session_id, c.corrupt_framing)
            return None
        other = None
        if c.corruption == "image":
            other = pick_other(session_identity(s), self.pool,
                               c.swap if c.swap is not None else (s.labels.get("pii_type"),))
        try:
            return build_pair(self.loaded, s, c.pair_spec(), other=other)
        except PairRejected as err:
            return rejected_pair(s, c.corruption, str(err))

    def pair_rows(self, pair: Pair, head: dict[str, Any]) -> Result:
        """The pair's rows in every direction, once its check passes (none when it does not)."""
        c, loaded = self.config, self.loaded
        cells = sweep_cells(loaded.n_layers, c.components, list(c.groups) if c.groups else default_groups([pair]),
                            c.layers)
        plain = c.method == "atp" and c.atp_method == "atp"
        grad = {"corrupt" if d == "denoise" else "clean" for d in c.directions} if plain else set()
        prepare_pair(loaded, pair, sorted({cell.hook for cell in cells}), grad=grad)
        check = pair_check(pair, c.min_separation)
        if not check["kept"]:
            return [], check
        head = {**head, "corrupt_framing": pair.corrupt.session.labels.get("framing")
                if c.corruption == "framing" else None, "corruption": c.corruption}
        rows: list[dict[str, Any]] = []
        for d in c.directions:
            if c.method == "atp":
                rows += [{**head, **r} for r in self.attribution_rows(pair, cells, d)]
            if c.method == "exact" or c.check_exact:
                rows += [{**head, **r} for r in exact_patching(loaded, pair, cells, d, c.batch_size, c.align)]
        return rows, check

    def attribution_rows(self, pair: Pair, cells: list[Cell], direction: str) -> list[dict[str, Any]]:
        """The estimates of the config's `atp_method` for one direction."""
        c, loaded = self.config, self.loaded
        if c.atp_method == "atp":
            return attribution_patching(pair, cells, direction, c.align)
        base = pair.roles(direction)[0]
        if c.atp_method == "atp_graddrop":
            prepare_graddrop(loaded, base, pair.answer, sorted({x.hook for x in cells}))
            return graddrop_patching(pair, cells, direction, c.align)
        prep = prepare_qk(loaded, base, pair.answer, graddrop=c.atp_method == "atp_star",
                          noise_from=pair.clean if base is pair.corrupt else None)
        found = qk_estimates(loaded, prep, pair, cells, direction, c.align, c.batch_size)
        return qk_rows(found, pair, cells, direction, c.atp_method)


def summarize(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean over pairs of every cell, with a bootstrap CI clustered by identity; `clean`/`corrupt` are means."""

    by = ["model", "family", "experiment", "corruption", "direction", "method", "layer", "component",
          "position_group", "target", "window", "metric"]
    d = df.copy()
    for c in by:
        d[c] = d[c].astype(object).where(d[c].notna(), "")
    out = bootstrap_ci(d, "value", by=by, group="identity_id", n_boot=n_boot, seed=seed)
    means = d.groupby(by, dropna=False, sort=True)[["clean", "corrupt"]].mean().reset_index()
    out = out.merge(means, on=by, how="left")
    for c in ("layer", "window"):
        out[c] = pd.to_numeric(out[c].replace("", np.nan))
    return out
