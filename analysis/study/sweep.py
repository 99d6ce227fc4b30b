"""`mmret sweep CONFIG --grid key=v1,v2 ...`: one study per point of a grid, run by submitit, results merged.

    mmret sweep study.yaml --grid models=llava-hf/llava-1.5-7b-hf,Qwen/Qwen2.5-VL-3B-Instruct \
        --grid capture.layers=[0,8,16],[24,31] --grid seed=0,1 --executor slurm --partition gpu --gpus 1 --time 120

Each grid point is the config with those keys overridden (dotted keys, values read as YAML), validated before
anything is submitted, and runs as its own study in `OUT/jobs/<job>/` (so every stage skipping and resume of
`analysis.study.pipeline` applies inside a job). The executor is submitit's: `slurm` on a cluster, `local` (subprocesses
on this machine; what the tests run end to end) or `debug` (in this process). A job that fails is reported with
its log path and does not stop the others. Finished jobs (a `sweep_done.json` with the job's config hash) are
skipped on resubmission. The tidy result tables of every finished job are concatenated into `OUT/merged/`, with
one column per grid key saying which point a row came from.

submitit pickles the job function and its arguments into OUT/submitit/ to hand them to the worker: files this
sweep wrote itself, read back by the same user's jobs; results travel as CSV/JSON, never as pickles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.study.config import StudyConfigError, digest, load_study_config, marker_hash, parse_value
from analysis.study.pipeline import run_study
from probes.data.files import atomic_write_bytes, atomic_write_text

# Tidy tables a study writes (relative to a model's folder, or to the study for statistics), merged across jobs.
TABLES = {"leakage": "{model}/leakage/results.csv", "multiturn_leakage": "{model}/leakage/multiturn_results.csv",
          "probes": "{model}/probes/probe_results.csv", "patching": "{model}/patching/patching_rows.csv",
          "probe_tests": "statistics/probe_tests.csv", "leakage_tests": "statistics/leakage_tests.csv",
          "patching_tests": "statistics/patching_tests.csv"}


class SweepError(ValueError):
    """A bad --grid argument or config; the message names the key."""


@dataclass
class Job:
    name: str  # folder name under OUT/jobs
    point: dict[str, Any]  # the grid keys and values of this job
    config: dict[str, Any]  # the resolved config (validated), with `out` set to the job's folder
    hash: str


def split_values(text: str) -> list[str]:
    """'a,b' -> [a, b]; commas inside [...] or {...} do not split ('[0,1],[2]' -> ['[0,1]', '[2]'])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. probes.method=logreg,ridge)")
        grid[key.strip()] = [parse_value(v) for v in split_values(values)]
    return grid


def _slug(point: dict[str, Any]) -> str:
    text = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()) or "base"
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
    return text[:80] + "-" + digest(point)[:6]


def expand(config: str | os.PathLike | dict, grid: dict[str, list[Any]], out: str | os.PathLike, gpus: int = 0
           ) -> list[Job]:
    """Every grid point as a validated job (an invalid value fails here, before anything is submitted).

    `gpus` per job: models left on the CPU go to cuda, and with more than one GPU are spread over them with
    `device_map="auto"` (a model too big for one GPU loads across the node's)."""
    keys = list(grid)
    jobs = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        point = dict(zip(keys, values))
        name = _slug(point)
        cfg = load_study_config(config, {**point, "out": str(Path(out) / "jobs" / name)})
        for m in cfg.data["models"] if gpus else []:
            if m["device"] == "cpu":
                m["device"] = "cuda"
            if gpus > 1 and m["device_map"] == "none":
                m["device_map"], m["device"] = "auto", "cuda"
        jobs.append(Job(name, point, cfg.data, digest(cfg.data)))
    return jobs


def run_job(config: dict[str, Any], job_hash: str) -> str:
    """What a worker runs: the job's study, then its done marker. Returns the job folder."""
    study = run_study(config, progress=True)
    atomic_write_text(study.out / "sweep_done.json", json.dumps({"hash": job_hash}))
    return str(study.out)


def is_done(job: Job) -> bool:
    return marker_hash(Path(job.config["out"]) / "sweep_done.json") == job.hash


def executor(folder: Path, kind: str, partition: str | None = None, gpus: int = 0, time_min: int = 60,
             cpus: int | None = None, mem_gb: int | None = None, parallel: int | None = None):
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster=kind)
    params: dict[str, Any] = {"timeout_min": time_min}
    if kind == "slurm":
        params.update(gpus_per_node=gpus, slurm_partition=partition, cpus_per_task=cpus or 8,
                      mem_gb=mem_gb or 64, slurm_array_parallelism=parallel or 16)
    elif kind == "local":
        params.update(gpus_per_node=gpus, cpus_per_task=cpus or 1)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def run_sweep(config: str | os.PathLike | dict, grid: dict[str, list[Any]], out: str | os.PathLike,
              executor_kind: str = "local", **executor_args: Any) -> pd.DataFrame:
    """Submit every unfinished job, wait, merge; returns the job table (job, grid keys, status, folder, log)."""
    out = Path(out)
    jobs = expand(config, grid, out, executor_args.get("gpus", 0) or 0)
    todo = [j for j in jobs if not is_done(j)]
    print(f"[sweep] {len(jobs)} job(s), {len(jobs) - len(todo)} already finished, submitting {len(todo)} "
          f"({executor_kind})")
    submitted = []
    if todo:
        ex = executor(out / "submitit", executor_kind, **executor_args)
        with ex.batch():
            handles = [ex.submit(run_job, j.config, j.hash) for j in todo]
        submitted = list(zip(todo, handles))
    status = {j.name: ("done (earlier)", "") for j in jobs if j not in todo}
    for job, handle in submitted:
        try:
            handle.result()
            status[job.name] = ("done", str(handle.paths.stdout))
        except Exception as err:  # one failed job must not hide the others' results
            log = handle.paths.stderr
            print(f"[sweep] job {job.name} FAILED: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
                  f"\n        log: {log}")
            status[job.name] = ("failed", str(log))
    table = pd.DataFrame([{"job": j.name, **{k: str(v) for k, v in j.point.items()}, "status": status[j.name][0],
                           "folder": j.config["out"], "log": status[j.name][1]} for j in jobs])
    atomic_write_bytes(out / "jobs.csv", table.to_csv(index=False).encode())
    merged = merge(jobs, [j for j in jobs if status[j.name][0].startswith("done")], out / "merged")
    print(f"[sweep] {int(table['status'].str.startswith('done').sum())} done, "
          f"{int((table['status'] == 'failed').sum())} failed; merged tables: "
          f"{', '.join(sorted(merged)) or 'none'} in {out / 'merged'}")
    return table


def merge(all_jobs: list[Job], finished: list[Job], out: Path) -> dict[str, Path]:
    """Concatenate each tidy table over the finished jobs, adding one column per grid key."""
    written = {}
    for name, pattern in TABLES.items():
        parts = []
        for job in finished:
            models = [m["name"] for m in job.config["models"]] if "{model}" in pattern else [""]
            for m in models:
                path = Path(job.config["out"]) / pattern.format(model=m)
                if path.exists():
                    df = pd.read_csv(path)
                    parts.append(df.assign(**{k: str(v) for k, v in job.point.items()}, job=job.name))
        if parts:
            out.mkdir(parents=True, exist_ok=True)
            written[name] = out / f"{name}.csv"
            atomic_write_bytes(written[name], pd.concat(parts, ignore_index=True).to_csv(index=False).encode())
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmret sweep", description=__doc__.split("\n")[0])
    p.add_argument("config", help="study YAML")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2 (repeatable; dotted config keys)")
    p.add_argument("--out", default=None, help="sweep folder (default: the config's out + '_sweep')")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"])
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job (models load with device_map across them)")
    p.add_argument("--time", type=int, default=60, help="minutes per job")
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--mem-gb", type=int, default=None)
    p.add_argument("--parallel", type=int, default=None, help="SLURM array parallelism")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow trust_remote_code: true in the config or a grid point (checked by `mmret sweep`)")
    a = p.parse_args(argv)
    grid = parse_grid(a.grid)
    out = a.out or str(load_study_config(a.config).out) + "_sweep"
    table = run_sweep(a.config, grid, out, a.executor, partition=a.partition, gpus=a.gpus, time_min=a.time,
                      cpus=a.cpus, mem_gb=a.mem_gb, parallel=a.parallel)
    return 0 if (table["status"] != "failed").all() else 1


__all__ = ["Job", "SweepError", "StudyConfigError", "expand", "merge", "parse_grid", "run_sweep", "main"]
