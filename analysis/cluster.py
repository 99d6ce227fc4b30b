"""One capture spread over cluster jobs: a submitit array of n workers, worker i capturing shard i/n of the sessions
into the same store, then one check that every session is there once (`probes.activations.shards`).

    mmret capture --model M --sessions S.jsonl --out STORE --jobs 8 --executor slurm --partition gpu --gpus 1

Each worker loads the model itself and resumes its own shard: resubmitting after a failure (or a SLURM preemption)
captures only what is missing. The sessions travel as the path of their JSONL and the settings as plain values,
which submitit writes into `<out>.submitit/` to hand them to the workers (files this process wrote itself).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from probes.activations.shards import StoreCheck, verify_store
from probes.data.session import read_sessions


def capture_shard(model: str, sessions: str, out: str, shard: tuple[int, int], settings: dict[str, Any],
                  load: dict[str, Any]) -> int:
    """What worker `shard` = (i, n) runs: load the model, capture its part of `sessions` into `out`. Returns the
    number of sessions in its shard."""
    from probes.activations.capture import capture
    from probes.activations.shards import shard_batches
    from probes.models.loading import load_model

    loaded = load_model(model, **load)
    listed = list(read_sessions(sessions))
    capture(loaded, listed, out, shard=shard, **settings)
    return sum(len(b) for b in shard_batches(listed, settings.get("batch_size", 8), shard))


def capture_array(model: str | os.PathLike, sessions: str | os.PathLike, out: str | os.PathLike, n_jobs: int,
                  settings: dict[str, Any] | None = None, load: dict[str, Any] | None = None,
                  executor_kind: str = "local", **executor_args: Any) -> StoreCheck:
    """Submit `n_jobs` workers (a submitit array on `executor_kind`: slurm, local or debug), wait for them, then
    verify the store against the sessions. A failed worker is reported in the check (its sessions are missing);
    rerunning resubmits only shards with sessions left."""
    from analysis.study.sweep import executor

    settings = dict(settings or {})
    settings.setdefault("progress", False)
    out = Path(out)
    listed = list(read_sessions(sessions))
    pending = [i for i in range(n_jobs) if not _shard_done(out, listed, (i, n_jobs), settings.get("batch_size", 8))]
    if pending:
        ex = executor(Path(f"{out}.submitit"), executor_kind, **executor_args)
        with ex.batch():
            handles = [ex.submit(capture_shard, str(model), str(sessions), str(out), (i, n_jobs), settings,
                                 dict(load or {})) for i in pending]
        errors = []
        for i, h in zip(pending, handles):
            try:
                h.result()
            except Exception as err:  # the others' sessions still count: the check lists what is missing
                errors.append(f"shard {i}/{n_jobs}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
                              f" (log: {h.paths.stderr})")
        for e in errors:
            print(f"[capture] FAILED {e}")
    return verify_store(out, listed)


def _shard_done(out: Path, sessions: list, shard: tuple[int, int], batch_size: int) -> bool:
    from probes.activations.folder import shard_name
    from probes.activations.shards import shard_batches

    mine = [s for b in shard_batches(sessions, batch_size, shard) for s in b]
    return all((out / "shards" / f"{shard_name(s.session_id)}.parquet").exists() for s in mine)
