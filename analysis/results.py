"""The functions that run one method and write its results folder (tables, figures beside them), for `mmret` and
the study: `run_leakage` (`mmret leak`), `run_probes` (`mmret probe`), `run_patching` (`mmret patch`).

The methods themselves live in `probes` and return DataFrames; what is written where, and which figure is drawn
from which table, is decided here, so `probes` never imports `analysis`."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from analysis.figures import (
    plot_atp_agreement,
    plot_knockout_curves,
    plot_leakage,
    plot_patching_heatmaps,
    plot_probe_heatmap,
    plot_retention_curves,
)
from analysis.tables import leakage_long, write_leakage_table
from probes.activations.store import ActivationStore
from probes.data.files import atomic_write_bytes, parts_folder
from probes.data.session import Session, read_sessions
from probes.leakage import LeakageError, evaluate_in_parts, leakage_parts, session_target
from probes.models.loading import LoadedModel, load_model
from probes.patching import (
    PatchingConfig,
    PatchingError,
    atp_agreement,
    pair_checks,
    patch_sessions,
    patching_config,
    summarize,
)
from probes.probing.stream import probe_sweep_streamed
from probes.probing.sweep import main_metric, probe_sweep
from probes.probing.targets import plan_cells, probe_cells, session_targets


def run_leakage(model_path_or_loaded: str | os.PathLike | LoadedModel, sessions_jsonl: str | os.PathLike,
                out_dir: str | os.PathLike, max_new_tokens: int = 32, batch_size: int = 8,
                refusal_patterns: Sequence[str] | None = None, keep_responses: bool = False, n_boot: int = 1000,
                seed: int = 0, device: str | None = None, dtype: str | None = None, model: str | None = None,
                progress: bool = True, keep_parts: bool = False) -> pd.DataFrame:
    """`mmret leak`: evaluate a model on a sessions file and write into `out_dir`: results.csv/.parquet (one row
    per response), leakage_long.csv, leakage_table.csv/.tex (the benchmark layout with bootstrap 95% CIs by
    identity) and leakage.pdf/.png/.csv (the figure). Returns the results DataFrame. Resumable: a killed run
    started again with the same sessions, model and settings generates only what it had not finished
    (`evaluate_in_parts`). `keep_parts`: leave the finished parts in `out_dir` (a caller with more work after
    this removes them when all of it is done)."""

    sessions = list(read_sessions(sessions_jsonl))  # parse everything first: a bad line fails before any work
    if not sessions:
        raise LeakageError(f"{sessions_jsonl}: no sessions")
    for s in sessions:
        try:
            session_target(s)
        except LeakageError as err:
            raise LeakageError(f"{sessions_jsonl}: {err}") from err
    loaded = model_path_or_loaded
    if not isinstance(loaded, LoadedModel):
        loaded = load_model(loaded, device=device, dtype=dtype)
    settings = dict(max_new_tokens=max_new_tokens, refusal_patterns=refusal_patterns, keep_responses=keep_responses,
                    model=model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = leakage_parts(out, sessions_jsonl, loaded, batch_size=batch_size, **settings)
    df = evaluate_in_parts(loaded, sessions, parts, batch_size=batch_size, progress=progress, **settings)
    atomic_write_bytes(out / "results.csv", df.to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(out / "results.parquet", df.to_parquet(index=False))
    long = leakage_long(df, n_boot=n_boot, seed=seed)
    write_leakage_table(long, out)
    plot_leakage(long, out)
    if not keep_parts:
        shutil.rmtree(parts)
    return df


def run_probes(store_dir: str, out_dir: str, target: str = "digits", position_groups: Sequence[str] = ("last",),
               turns: Sequence[int] | None = None, layers: Sequence[int] | None = None, method: str = "logreg",
               pii_type: str | None = None, group_col: str = "identity_id", n_folds: int = 5, seed: int = 0,
               control: str = "none", n_boot: int = 1000, figures: bool = True, mdl: bool = False,
               private_from=None, max_memory_mb: float | None = None) -> pd.DataFrame:
    """`mmret probe`: sweep every cell of the store at `store_dir` for `target`, write probe_results.csv and, with
    `figures`, the layer x position heatmap and the retention curves beside it. PII targets (digits, chars) come
    from the sessions' private labels: `private_from` (a sessions JSONL or list of sessions) or the store's
    private_labels.jsonl (see `ActivationStore.sessions`). `max_memory_mb`: stream the sweep from disk, the
    activations and fits held at once kept under about that (`probe_sweep_streamed`; the same results)."""

    store = ActivationStore(store_dir)
    sessions = store.sessions(private_from=private_from)
    targets = session_targets(sessions, target, pii_type)
    kw = dict(target=target, method=method, group_col=group_col, n_folds=n_folds, seed=seed, control=control,
              model=str(store.spec.get("model", "")), family=str(store.spec.get("family", "")), n_boot=n_boot, mdl=mdl)
    if max_memory_mb is None:
        df = probe_sweep(probe_cells(store, position_groups, turns, layers), targets, **kw)
    else:
        plan = plan_cells(store, position_groups, turns, layers)
        df = probe_sweep_streamed(plan, targets, max_memory_mb=max_memory_mb, **kw)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "probe_results.csv", df.to_csv(index=False).encode())
    if figures:
        metric = main_metric(df)
        plot_probe_heatmap(df, out, metric=metric)
        if df["turn_distance"].notna().any() and "last" in position_groups:
            plot_retention_curves(df, out, metric=metric)
    return df


def run_patching(loaded: LoadedModel | str | os.PathLike, sessions: Sequence[Session] | str | os.PathLike,
                 experiment: str, out_dir: str | os.PathLike, config: PatchingConfig | None = None, *,
                 figures: bool = True, device: str | None = None, dtype: str | None = None, progress: bool = True,
                 keep_parts: bool = False, **options: Any) -> pd.DataFrame:
    """`mmret patch`: run `experiment` (denoise, noise, atp, taskswap, knockout) on `sessions` (a list or a JSONL
    path; each the clean side of a pair) under `config` (a `PatchingConfig` of this experiment; `options`: its
    fields, which build one or override the given one's) and write into `out_dir`:

    - patching_<experiment>.csv: one row per pair, cell and metric (see `ROW_COLUMNS`, plus `contrast` and
      `null_by_construction`; no PII);
    - patching_<experiment>_pairs.csv (every experiment but knockout): the pair checks (`pair_check`), one row per
      pair, kept or dropped and why;
    - patching_<experiment>_summary.csv: means over pairs with bootstrap 95% CIs by identity;
    - atp_agreement.csv (experiment atp with `check_exact`): AtP vs exact on effects per pair (`atp_agreement`);
    - figures: layer x position heatmaps per component for each direction (patching_<experiment>_<direction>),
      knockout curves by window (knockout), AtP-vs-exact scatter (atp).

    `device`, `dtype`: where a model given by its path is loaded. Resumable: each session's rows are kept as it
    finishes, and a killed run started again with the same sessions and config patches only the rest.
    `keep_parts`: leave those parts in `out_dir` when done (a caller with more work after this removes them when all
    of it is done).

    Returns the per-pair rows."""

    # the config first: a bad option fails before anything is loaded or the output folder is made
    config = patching_config(config if config is not None else experiment, options)
    if config.experiment != experiment:
        raise PatchingError(f"experiment {experiment!r}: the config is for {config.experiment!r}")
    if not isinstance(loaded, LoadedModel):
        loaded = load_model(loaded, device=device, dtype=dtype)
    if not isinstance(sessions, (list, tuple)):
        sessions = list(read_sessions(sessions))
    sessions = list(sessions)[:config.max_pairs] if config.max_pairs else list(sessions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Finished sessions are kept under a name that hashes everything the rows depend on: a killed run started
    # again resumes, and a run with anything changed starts afresh in a folder of its own.
    parts = parts_folder(out, f"patching-parts-{experiment}", {**loaded.run_key, **asdict(config)},
                         [s.to_json() for s in sessions])
    df = patch_sessions(loaded, sessions, config, progress=progress, parts=parts)
    pairs = pair_checks(df)
    if not len(df):
        shutil.rmtree(parts)
        raise PatchingError(f"experiment {experiment!r}: no pair left to patch ({int((~pairs['kept']).sum())} of "
                            f"{len(pairs)} pairs dropped by the pair check; other sessions are already under the "
                            f"corrupt framing {config.corrupt_framing!r})")
    if experiment != "knockout":
        atomic_write_bytes(out / f"patching_{experiment}_pairs.csv", pairs.to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(out / f"patching_{experiment}.csv", df.to_csv(index=False).encode("utf-8"))
    summary = summarize(df, n_boot=config.n_boot, seed=config.seed)
    atomic_write_bytes(out / f"patching_{experiment}_summary.csv", summary.to_csv(index=False).encode("utf-8"))
    if experiment == "atp" and config.check_exact:
        agreement = atp_agreement(df)
        atomic_write_bytes(out / "atp_agreement.csv", agreement.to_csv(index=False).encode("utf-8"))
    if figures:
        write_figures(df, summary, out, experiment)
    if not keep_parts:
        shutil.rmtree(parts)
    return df


def write_figures(df: pd.DataFrame, summary: pd.DataFrame, out_dir: str | os.PathLike, experiment: str) -> None:

    if experiment == "knockout":
        plot_knockout_curves(summary, out_dir, name="knockout")
        return
    for (direction, method), _ in summary.groupby(["direction", "method"]):
        plot_patching_heatmaps(summary, out_dir, name=f"patching_{experiment}_{direction}_{method}",
                               direction=direction, method=method)
    if experiment == "atp" and (df["method"] == "exact").any():
        plot_atp_agreement(df, out_dir, name="atp_agreement")
