"""`mmret study run CONFIG`: the whole study from one config, each stage redone only when its inputs changed.

    sessions -> per model: leakage, capture, probes, patching, mitigation -> statistics -> figures -> report

Each stage writes one folder under the study's `out` (per model: `out/<model>/<stage>/`) and, last, a
`stage.json` holding its content hash (`analysis.study.config.stage_hash`: its own config section, the seed, the
hashes of the stages it reads, the model's fingerprint, the package version). A stage whose folder holds a
`stage.json` with the current hash is skipped; any other is run into `<folder>.partial-<hash>` and renamed into
place only when complete, so a killed study never leaves a half-written stage that looks done, and the next run
with the same config resumes it (the capture store inside a partial folder skips sessions it already holds).
Editing one config section redoes that stage and what reads it; nothing else.

Models load lazily, once, the first time a stage needs one: a rerun with nothing changed loads none.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis.mitigation import Mitigation, run_mitigation
from analysis.patching_stats import cell_effects, patching_tests, reachability, reachability_message
from analysis.report import write_report
from analysis.results import run_leakage, run_patching
from analysis.study import figures as study_figures
from analysis.study.config import (
    StudyConfig,
    StudyConfigError,
    default_config_path,
    load_study_config,
    marker_hash,
    mitigation_source,
    model_fingerprint,
    package_version,
    patching_config,
    stage_hash,
)
from probes.activations.capture import capture
from probes.activations.folder import FORMAT as STORE_FORMAT
from probes.activations.lock import exclusive
from probes.activations.store import ActivationStore
from probes.data.builders import mmprivacy_sessions, multiturn_sessions
from probes.data.files import atomic_write_bytes, atomic_write_text
from probes.data.identities import make_identities
from probes.data.session import Session, read_sessions, write_sessions
from probes.leakage import SCORER_VERSION, evaluate_in_parts, leakage_parts
from probes.mitigation.evaluate import Setting
from probes.mitigation.measures import hypervolume_gain
from probes.mitigation.settings import blackbox_settings, leak_directions, steer_settings
from probes.mitigation.sites import HOOK_OF, located_hooks, random_hooks
from probes.mitigation.steer import random_direction_like
from probes.models.loading import load_model
from probes.organism import DEFAULT_MODEL
from probes.probing.sweep import main_metric, null_p_values, probe_sweep, token_readout
from probes.probing.targets import patch_cells, probe_cells, session_targets
from probes.stats import benjamini_hochberg, cell_tests


class StudyError(RuntimeError):
    """A stage failed; the message names the stage, the model and the folder kept for resuming."""


@dataclass
class StageRecord:
    stage: str
    model: str
    status: str  # ran | skipped | disabled
    seconds: float
    folder: str


@dataclass
class Study:
    cfg: StudyConfig
    progress: bool = True
    records: list[StageRecord] = field(default_factory=list)
    _loaded: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.cfg.out

    def model(self, entry: dict[str, Any]):
        """The loaded model of a config entry (loaded on first use)."""
        if entry["name"] not in self._loaded:

            path = str(DEFAULT_MODEL) if entry["path"] == "default" else entry["path"]
            self._loaded[entry["name"]] = load_model(
                path, device=entry["device"], dtype=None if entry["dtype"] == "auto" else entry["dtype"],
                backend=entry["backend"], device_map=None if entry["device_map"] == "none" else entry["device_map"],
                trust_remote_code=entry["trust_remote_code"])
        return self._loaded[entry["name"]]

    def stage(self, name: str, model: str, folder: Path, h: str, fn: Callable[[Path], None]) -> Path:
        """Run `fn(work_folder)` unless `folder` is current for hash `h`; see the module docstring."""
        done = folder / "stage.json"
        if marker_hash(done) == h:
            self.records.append(StageRecord(name, model, "skipped", 0.0, str(folder)))
            return folder
        partial = folder.with_name(f"{folder.name}.partial-{h}")
        for stale in folder.parent.glob(f"{folder.name}.partial-*"):
            if stale != partial:
                shutil.rmtree(stale)
        t0 = time.time()
        if not (partial / "stage.json").exists():  # else: finished, but killed before the rename
            partial.mkdir(parents=True, exist_ok=True)
            try:
                fn(partial)
            except Exception as err:
                raise StudyError(f"stage {name!r}" + (f" of model {model!r}" if model else "")
                                 + f" failed: {err} (its partial output is kept in {partial}; rerun to resume)"
                                 ) from err
            atomic_write_text(partial / "stage.json", json.dumps(
                {"stage": name, "model": model, "hash": h, "seconds": round(time.time() - t0, 2),
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
        self.records.append(StageRecord(name, model, "ran", round(time.time() - t0, 2), str(folder)))
        if self.progress:
            print(f"[study] {name}{' / ' + model if model else ''}: done in {time.time() - t0:.1f} s -> {folder}")
        return folder

    def skip(self, name: str, model: str = "") -> None:
        self.records.append(StageRecord(name, model, "disabled", 0.0, ""))


# ---- stages -------------------------------------------------------------------------------------------------------
def document_spec(cfg: StudyConfig) -> dict[str, Any]:
    """Size and layout of the rendered documents: the config's, or ('auto') the first model's own (the organism
    records them in training.json), else 336 px / fixed (llava-1.5's input size)."""

    size, layout = cfg.get("sessions.image_size"), cfg.get("sessions.layout")
    path = cfg.data["models"][0]["path"]
    meta_file = Path(DEFAULT_MODEL if path == "default" else path) / "training.json"
    meta = json.loads(meta_file.read_text())["config"] if meta_file.exists() else {}
    if size == "auto":
        size = int(meta.get("image_size", 336))
    if layout == "auto":
        layout = meta.get("layout", "fixed")
    return {"size": size, "layout": layout}


def build_sessions(cfg: StudyConfig, work: Path) -> None:

    doc, seed = document_spec(cfg), cfg.data["seed"]
    mmp, mt = cfg.get("sessions.mmprivacy"), cfg.get("sessions.multiturn")
    single = mmprivacy_sessions(make_identities(mmp["identities"], seed=seed), work / "images",
                                framings=mmp["framings"], pii_types=mmp["pii_types"], design=mmp["design"],
                                seed=seed, relative_to=work, **doc)
    write_sessions(single, work / "mmprivacy.jsonl")
    multi = multiturn_sessions(make_identities(mt["identities"], seed=seed + 1), work / "images",
                               k_distractors=mt["k_distractors"], reshow=mt["reshow"],
                               framing_pairs=[tuple(p) for p in mt["framing_pairs"]], pii_types=mt["pii_types"],
                               seed=seed, design="cycle", relative_to=work, **doc)
    write_sessions(multi, work / "multiturn.jsonl")


def run_leakage_stage(study: Study, entry: dict[str, Any], sessions: Path, work: Path) -> None:

    c, loaded = study.cfg.section("leakage"), study.model(entry)
    # Both evaluations keep their finished parts in the (partial) stage folder until the whole stage is done, so a
    # stage killed in either resumes without generating anything twice.
    run_leakage(loaded, sessions / "mmprivacy.jsonl", work, max_new_tokens=c["max_new_tokens"],
                batch_size=c["batch_size"], n_boot=study.cfg.get("statistics.n_boot"), seed=study.cfg.data["seed"],
                model=entry["name"], progress=study.progress, keep_parts=True)
    # Context retention: the multi-turn sessions' probe turn, scored the same way (ASR by turn distance).
    multi_jsonl = sessions / "multiturn.jsonl"
    kw = dict(max_new_tokens=c["max_new_tokens"], model=entry["name"])
    parts = leakage_parts(work, multi_jsonl, loaded, batch_size=c["batch_size"], **kw)
    multi = evaluate_in_parts(loaded, list(read_sessions(multi_jsonl)), parts, batch_size=c["batch_size"],
                              progress=study.progress, **kw)
    atomic_write_bytes(work / "multiturn_results.csv", multi.to_csv(index=False).encode())
    _remove_parts(work)


def _remove_parts(work: Path) -> None:
    """A finished stage's resumable parts (`.leakage-parts-*`, `.patching-parts-*`, any depth): no longer needed."""
    for folder in sorted(work.rglob(".*-parts-*")):
        if folder.is_dir():
            shutil.rmtree(folder)


def run_capture_stage(study: Study, entry: dict[str, Any], sessions: Path, work: Path,
                      shard: tuple[int, int] | None = None) -> None:
    """Capture the multi-turn sessions into `work/store` (with `shard`: worker i's part of a split into n)."""
    c = study.cfg.section("capture")
    capture(study.model(entry), list(read_sessions(sessions / "multiturn.jsonl")), str(work / "store"),
            hooks=c["hooks"], positions=c["positions"], layers=None if c["layers"] == "all" else c["layers"],
            batch_size=c["batch_size"], progress=study.progress, shard=shard)


def capture_extra(fp: dict[str, Any]) -> dict[str, Any]:
    """What the capture stage's hash adds to its section and the sessions: the weights and the store's format (a
    store of an older format is captured again rather than refused)."""
    return {**fp, "store_format": STORE_FORMAT}


def model_fp(entry: dict[str, Any]) -> dict[str, Any]:
    """A model entry and its weights' fingerprint: part of every per-model stage's hash."""
    return {"model": entry, "weights": model_fingerprint(entry["path"])}


def run_capture_shard(cfg: StudyConfig, shard: tuple[int, int], progress: bool = True) -> list[Path]:
    """`mmret study run --shard i/n`: the sessions stage (built once: workers take turns on a lock), then worker
    i's part of every model's capture, written into the capture stage's partial folder beside the other
    workers'. Nothing else runs: the stage finishes, and the study goes on, when `mmret study run` runs without
    --shard after every worker (it finds their sessions captured and resumes past them). Returns the stores."""
    study = Study(cfg, progress)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".sessions.lock"):
        h_sess = stage_hash(cfg, "sessions", extra=document_spec(cfg))
        sessions = study.stage("sessions", "", out / "sessions", h_sess, lambda w: build_sessions(cfg, w))
    stores = []
    for entry in cfg.data["models"] if cfg.get("capture.enabled") else []:
        h = stage_hash(cfg, "capture", [h_sess], capture_extra(model_fp(entry)))
        folder = out / entry["name"] / "capture"
        if marker_hash(folder / "stage.json") == h:
            continue
        partial = folder.with_name(f"{folder.name}.partial-{h}")
        partial.mkdir(parents=True, exist_ok=True)
        run_capture_stage(study, entry, sessions, partial, shard=shard)
        stores.append(partial / "store")
    return stores


def run_probes_stage(study: Study, entry: dict[str, Any], capture_dir: Path, work: Path) -> None:

    c, seed = study.cfg.section("probes"), study.cfg.data["seed"]
    n_boot = study.cfg.get("statistics.n_boot")
    store = ActivationStore(str(capture_dir / "store"))
    sessions = store.sessions(private_from=study.out / "sessions" / "multiturn.jsonl")  # targets: private labels
    blocks = probe_cells(store, c["position_groups"])
    results, samples, nulls, maps = [], [], [], []
    for target in c["targets"]:
        targets = session_targets(sessions, target)
        # The permutation null: targets permuted across identities, the whole fit (with any choice of C) rerun per draw.
        df, s, null = probe_sweep(blocks, targets, target=target, method=c["method"], n_folds=c["n_folds"],
                                  seed=seed, model=entry["name"], family=store.spec.get("family", ""), n_boot=n_boot,
                                  return_samples=True, mdl=c["mdl"], n_permutations=c["n_permutations"],
                                  return_null=True, progress=study.progress)
        results.append(df)
        samples.append(s)
        nulls.append(null)
        # Per-patch map at the layer where the image positions decode the target best: drawn over the document.
        # Closed-form ridge probes: 144 patches x characters fit in seconds where logreg takes minutes.
        layer = best_layer(df, "image")
        if layer is not None:
            per_patch = probe_sweep([patch_cells(store, layers=[layer], turn=0)], targets, target=target,
                                    method="ridge", n_folds=c["n_folds"], seed=seed, model=entry["name"],
                                    n_boot=0, control_task=False)
            maps.append(per_patch[per_patch["metric"] == main_metric(df)])
    atomic_write_bytes(work / "probe_results.csv", pd.concat(results, ignore_index=True).to_csv(index=False).encode())
    atomic_write_bytes(work / "probe_samples.csv", pd.concat(samples, ignore_index=True).to_csv(index=False).encode())
    atomic_write_bytes(work / "probe_null.csv", pd.concat(nulls, ignore_index=True).to_csv(index=False).encode())
    if maps:
        atomic_write_bytes(work / "patch_map.csv", pd.concat(maps, ignore_index=True).to_csv(index=False).encode())
    if c["targets"][0] in ("digits", "chars"):
        # The read-out's probe sits where the sweep found the final turn's last token decodes best: that fit is
        # already done, so the read-out does not search the layers again (None: no 'last' cells; it searches).
        write_token_readout(study, entry, store, c["targets"][0], best_layer(results[0], "last", final_turn=True),
                            work)


def best_layer(df: pd.DataFrame, group: str, final_turn: bool = False) -> int | None:
    """The layer whose `group` cells (of the last turn only, with `final_turn`) score best on the main metric."""
    cells = df[(df["position_group"] == group) & (df["metric"] == main_metric(df))]
    if final_turn:
        cells = cells[cells["turn"] == cells["turn"].max()]
    return int(cells.sort_values("value").iloc[-1]["layer"]) if len(cells) else None


def write_token_readout(study: Study, entry: dict[str, Any], store, target: str, layer: int | None,
                        work: Path) -> None:
    """Token-by-token read-out of the target's probe on a held-out identity's session (never in the store)."""

    c, seed = study.cfg.section("probes"), study.cfg.data["seed"]
    mt = study.cfg.section("sessions")["multiturn"]
    held_out = multiturn_sessions(make_identities(1, seed=seed + 90_000), work / "readout_images",
                                  k_distractors=mt["k_distractors"][-1:], reshow=mt["reshow"][:1],
                                  framing_pairs=[tuple(mt["framing_pairs"][0])], pii_types=mt["pii_types"][:1],
                                  seed=seed, design="cycle", **document_spec(study.cfg))[0]
    readout = token_readout(study.model(entry), store, held_out, target, layer=layer, method=c["method"],
                            n_folds=c["n_folds"], seed=seed,
                            private_from=study.out / "sessions" / "multiturn.jsonl")
    atomic_write_bytes(work / "token_readout.csv", readout.to_csv(index=False).encode())


def run_patching_stage(study: Study, entry: dict[str, Any], sessions: Path, work: Path) -> None:

    c = study.cfg.section("patching")
    single = [s for s in read_sessions(sessions / "mmprivacy.jsonl") if s.labels.get("framing") in c["framings"]]
    # One pair per identity: the tests resample and flip identities, so max_pairs counts identities (a "cross"
    # design asks one identity several times; more pairs of one person add no power).
    single = list({str(s.labels.get("identity_id")): s for s in reversed(single)}.values())[::-1]
    multi = list(read_sessions(sessions / "multiturn.jsonl"))
    rows = []
    for exp in c["experiments"]:
        config = patching_config(study.cfg.data, exp, model=entry["name"])
        df = run_patching(study.model(entry), multi if exp == "knockout" else single, exp, work / exp, config,
                          progress=study.progress, keep_parts=True)
        rows.append(df)
    atomic_write_bytes(work / "patching_rows.csv", pd.concat(rows, ignore_index=True).to_csv(index=False).encode())
    _remove_parts(work)


# ---- mitigation ---------------------------------------------------------------------------------------------------
HELDOUT_SEED = 70_000  # the mitigation stage evaluates identities of seed + this: a pool no other stage draws from
RESULT_COLUMNS = ["model", "family", "method", "site", "hook", "layer", "component", "strength", "framing", "target",
                  "metric", "value", "ci_low", "ci_high", "n"]


def patching_site_cells(rows: pd.DataFrame, experiment: str, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Candidate steer sites from a patching stage's rows: each (layer, component)'s pooled effect on the logit
    difference in `experiment` (`analysis.patching_stats.cell_effects`; 1: the cell alone restores the clean
    behaviour), at the final prompt position (where a last-position steer acts), restoring (denoise) and exact where
    the experiment has them; cells null by construction left out."""
    d = rows[rows["experiment"] == experiment]
    if not len(d):
        raise ValueError(f"the patching rows hold no {experiment!r} rows")
    for col, prefer in (("direction", "denoise"), ("method", "exact"), ("position_group", "final")):
        if prefer in set(d[col]):
            d = d[d[col] == prefer]
    cells = cell_effects(d, n_boot=n_boot, seed=seed)
    return cells[~cells["null_by_construction"].astype(bool)].assign(source=f"patching:{experiment}")


def probe_site_cells(results: pd.DataFrame) -> pd.DataFrame:
    """Candidate steer sites from a probes stage's results: the main metric's held-out score at the last token of
    each turn (the position a last-position steer acts at), component from the probed hook (hook_resid_post)."""
    d = results[(results["metric"] == main_metric(results)) & (results["position_group"] == "last")]
    if not len(d):
        raise ValueError("the probe results hold no 'last' position cells of the main metric")
    return d.assign(component=d["hook"].astype(str).str.extract(r"hook_(\w+)$")[0], source="probes")


def located_sites(study: Study, entry: dict[str, Any], n_layers: int) -> tuple[list[str], pd.DataFrame]:
    """The hooks to steer at (`probes.mitigation.sites.located_hooks`: the top `mitigation.top_k` cells of the
    study's patching or probes results, `mitigation_source`; or the given layers) and every candidate cell ranked."""
    c, seed = study.cfg.section("mitigation"), study.cfg.data["seed"]
    site, experiment = mitigation_source(study.cfg.data)
    base = study.out / entry["name"]
    if site == "given":
        bad = [layer for layer in c["layers"] if layer >= n_layers]
        if bad:
            raise StudyConfigError(f"mitigation.layers: {bad}: the model has layers 0-{n_layers - 1}")
        layers = list(dict.fromkeys(c["layers"]))
        cells = pd.DataFrame({"layer": layers, "component": c["component"], "value": np.nan, "source": "given"})
        hooks = [f"blocks.{layer}.{HOOK_OF[c['component']]}" for layer in layers]
    else:
        if site == "patching":
            cells = patching_site_cells(pd.read_csv(base / "patching" / "patching_rows.csv"), experiment,
                                        n_boot=study.cfg.get("statistics.n_boot"), seed=seed)
        else:
            cells = probe_site_cells(pd.read_csv(base / "probes" / "probe_results.csv"))
        hooks = located_hooks(cells, k=c["top_k"], score="value")
    ranked = (cells.groupby(["source", "layer", "component"], as_index=False)["value"].mean()
              .sort_values("value", ascending=False, na_position="last").reset_index(drop=True))
    ranked["hook"] = [f"blocks.{int(r.layer)}.{HOOK_OF[r.component]}" for r in ranked.itertuples()]
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["located"] = ranked["hook"].isin(hooks)
    return hooks, ranked


def heldout_sessions(cfg: StudyConfig, work: Path) -> list[Session]:
    """MM-Privacy sessions of `mitigation.identities` fresh identities (never located nor fitted on), drawn like the
    study's own (framings, PII types, design, documents)."""
    mmp, seed = cfg.get("sessions.mmprivacy"), cfg.data["seed"]
    people = make_identities(cfg.get("mitigation.identities"), seed=seed + HELDOUT_SEED)
    return mmprivacy_sessions(people, work / "images", framings=mmp["framings"], pii_types=mmp["pii_types"],
                              design=mmp["design"], seed=seed, **document_spec(cfg))


def cached_leak_directions(loaded: Any, fit: list[Session], hooks: list[str], path: Path) -> dict[str, Any]:
    """`probes.mitigation.settings.leak_directions` at `hooks`, kept in `path` (safetensors), so a resumed stage
    steers with the very vectors its finished settings were measured with (their parts are keyed by the bytes)."""
    from safetensors.torch import load_file, save

    if path.exists():
        kept = load_file(str(path))
        if set(hooks) <= set(kept):
            return {h: kept[h] for h in hooks}
    directions = leak_directions(loaded, fit, hooks)
    atomic_write_bytes(path, save({h: v.contiguous() for h, v in directions.items()}))
    return directions


def steer_grid(c: dict[str, Any], hooks: list[str], controls: list[str], directions: dict[str, Any],
               seed: int) -> tuple[list[Setting], dict[str, dict[str, str]], list[tuple[str, str]]]:
    """The located steers over `mitigation.strengths` and their controls: the same steer at a random layer (the
    direction fitted there) and along a random direction of the same norm at the located hook. Returns the settings,
    each method's role {site, hook} and the (located, control) method pairs whose hypervolumes are compared."""
    settings, roles, pairs = [], {}, []

    def add(dirs: dict[str, Any], site: str, tag: str) -> list[str]:
        new = steer_settings(dirs, c["strengths"], kind=c["steer"], tag=tag)
        settings.extend(new)
        roles.update({s.method: {"site": site, "hook": s.steers[0].hook} for s in new})
        method_of = {s.steers[0].hook: s.method for s in new}
        return [method_of[h] for h in dirs]

    located = add({h: directions[h] for h in hooks}, "located", "")
    if controls:
        pairs += zip(located, add({h: directions[h] for h in controls}, "random_layer", " (random layer)"))
    if "random_direction" in c["controls"]:
        rand = {h: random_direction_like(directions[h], seed=seed + i) for i, h in enumerate(hooks)}
        pairs += zip(located, add(rand, "random_direction", " (random direction)"))
    return settings, roles, pairs


def mitigation_rows(done: Mitigation, roles: dict[str, dict[str, str]], pairs: list[tuple[str, str]], model: str,
                    family: str) -> pd.DataFrame:
    """The stage's tidy rows in the shared vocabulary: per (method, strength) the privacy loss and utility with
    their identity-bootstrap intervals, each framing's ASR and each benign task's score; per method its front's
    hypervolume; per (located, control) pair the hypervolume gain (null: the located site buys no more than its
    control, gain 0) with its paired interval."""
    pts, rows = done.points, []
    draws = done.draws if done.draws is not None else np.full((1, len(pts), 2), np.nan)
    for i, p in enumerate(pts.to_dict("records")):
        base = {"method": p["method"], "strength": p["strength"], "n": p["n_identities"]}
        for j, (metric, col) in enumerate((("privacy_loss", "L"), ("utility", "U"))):
            low, high = np.quantile(draws[:, i, j], [0.025, 0.975])
            rows.append({**base, "metric": metric, "value": p[col], "ci_low": low, "ci_high": high})
        rows += [{**base, "framing": k[4:], "metric": "asr", "value": p[k]} for k in pts if k.startswith("asr_")]
        rows += [{**base, "target": k[2:], "metric": "task_score", "value": p[k]} for k in pts if k.startswith("u_")]
    n_of = pts.groupby("method")["n_identities"].max()
    for h in done.hypervolume.to_dict("records"):
        rows.append({"method": h["method"], "metric": "hypervolume", "value": h["hypervolume"], "n": n_of[h["method"]],
                     "ci_low": h.get("ci_low", np.nan), "ci_high": h.get("ci_high", np.nan)})
    for located, control in pairs if done.draws is not None else []:
        gain = hypervolume_gain(pts, done.draws, located, control)
        rows.append({"method": located, "target": control, "metric": "hypervolume_gain", "value": gain["gain"],
                     "ci_low": gain["ci_low"], "ci_high": gain["ci_high"], "n": n_of[located]})
    out = pd.DataFrame(rows).assign(model=model, family=family)
    role = out["method"].map(lambda m: roles.get(m, {"site": "none" if m == "none" else "image_protection"}))
    out["site"], out["hook"] = role.map(lambda r: r["site"]), role.map(lambda r: r.get("hook"))
    out["layer"] = out["hook"].str.extract(r"^blocks\.(\d+)\.")[0].astype(float).astype("Int64")
    out["component"] = out["hook"].str.extract(r"\.hook_(\w+)$")[0]
    return out.reindex(columns=RESULT_COLUMNS)


def run_mitigation_stage(study: Study, entry: dict[str, Any], sessions: Path, work: Path) -> None:
    """Steers at the located sites against their controls, and the black-box protections, measured on held-out
    identities (`analysis.mitigation.run_mitigation`: its points, fronts and figures, resumable per setting), the
    leak directions fitted on the study's own MM-Privacy identities (those patching located on), never on the
    evaluated ones. Writes sites.csv (every candidate cell ranked, the located ones and their random-layer
    controls), leak_directions.safetensors and mitigation_results.csv (`mitigation_rows`)."""
    c, seed = study.cfg.section("mitigation"), study.cfg.data["seed"]
    loaded = study.model(entry)
    settings = blackbox_settings(c["protections"], c["protection_strengths"], dilation=c["dilation"])
    roles, pairs = {}, []
    if c["strengths"]:
        hooks, sites = located_sites(study, entry, loaded.n_layers)
        controls = random_hooks(hooks, loaded.n_layers, seed=seed) if "random_layer" in c["controls"] else []
        fit = list(read_sessions(sessions / "mmprivacy.jsonl"))
        directions = cached_leak_directions(loaded, fit, list(dict.fromkeys(hooks + controls)),
                                            work / "leak_directions.safetensors")
        steers, roles, pairs = steer_grid(c, hooks, controls, directions, seed)
        settings += steers
        sites["control"] = sites["hook"].map(dict(zip(hooks, controls)))
        atomic_write_bytes(work / "sites.csv", sites.to_csv(index=False).encode())
    done = run_mitigation(loaded, heldout_sessions(study.cfg, work), settings, work,
                          n_boot=study.cfg.get("statistics.n_boot"), seed=seed, max_new_tokens=c["max_new_tokens"],
                          progress=study.progress)
    rows = mitigation_rows(done, roles, pairs, entry["name"], loaded.family)
    atomic_write_bytes(work / "mitigation_results.csv", rows.to_csv(index=False).encode())


def run_statistics_stage(study: Study, work: Path) -> None:
    """Tests per cell, each with its stated null, Benjamini-Hochberg within each family: leakage (each framing's
    leak against the direct ask of the same identity and PII type: task inconsistency; paired sign flip clustered by
    identity), probes (see `probe_tests`), patching (`analysis.patching_stats`: per-pair effects against "no
    change", two-sided, one family per experiment and direction; cells null by construction left out)."""

    s = study.cfg.section("statistics")
    kw = {"n_perm": s["n_perm"], "alpha": s["alpha"], "seed": study.cfg.data["seed"]}
    leak, probe, patch = [], [], []
    for entry in study.cfg.data["models"]:
        base = study.out / entry["name"]
        f = base / "leakage" / "results.csv"
        if f.exists():
            leak.append(leakage_tests(pd.read_csv(f), **kw))
        f = base / "probes" / "probe_null.csv"
        if f.exists():
            ids = pd.read_csv(base / "probes" / "probe_samples.csv", usecols=["identity_id"])["identity_id"]
            probe.append(probe_tests(pd.read_csv(base / "probes" / "probe_results.csv"), pd.read_csv(f),
                                     entry["name"], s["alpha"]).assign(n_groups=ids.nunique()))
        f = base / "patching" / "patching_rows.csv"
        if f.exists():
            patch.append(study_patching_tests(pd.read_csv(f), n_boot=study.cfg.get("statistics.n_boot"), **kw))
    for name, parts in (("leakage_tests", leak), ("probe_tests", probe), ("patching_tests", patch)):
        if parts:
            atomic_write_bytes(work / f"{name}.csv", pd.concat(parts, ignore_index=True).to_csv(index=False).encode())


def probe_tests(results: pd.DataFrame, null: pd.DataFrame, model: str, alpha: float) -> pd.DataFrame:
    """Does a cell decode the target? Null: the targets carry nothing the activations can read (targets permuted
    across identities, the whole pipeline rerun per draw; `probes.probing.sweep.null_p_values`, one-sided); family:
    every cell of the model's sweep on the main metric, Benjamini-Hochberg at `alpha`."""

    tests = null_p_values(results.assign(model=model), null.assign(model=model))
    reject, q = benjamini_hochberg(tests["p_value"].to_numpy(), alpha)
    return tests.assign(effect=tests["observed"] - tests["null_mean"], q_value=q, significant=reject)


def study_patching_tests(rows: pd.DataFrame, n_perm: int, alpha: float, seed: int, n_boot: int) -> pd.DataFrame:
    """`analysis.patching_stats.patching_tests` of the exact-patching rows, with a loud warning for every family
    whose identities cannot reach significance after correction."""
    import sys

    exact = rows[rows["method"] == "exact"]
    if not len(exact):
        return pd.DataFrame()
    tests = patching_tests(exact, n_perm=n_perm, alpha=alpha, seed=seed, n_boot=n_boot)
    for _, fam in reachability(tests, alpha).iterrows():
        if not fam["single_reachable"]:
            print(f"[study] WARNING: {reachability_message(fam, alpha, n_perm)}", file=sys.stderr)
    return tests


def leakage_tests(results: pd.DataFrame, **kw) -> pd.DataFrame:
    """Each framing's leak against the direct ask of the same identity, PII type and scenario (one-sided: more
    leakage than the direct ask, the benchmark's task inconsistency)."""

    keys = ["model", "identity_id", "pii_type", "scenario"]
    # The direct ask's leak rate per key: with several direct rows for one key (a loaded benchmark may ask twice),
    # each framing row still makes one pair, so n counts framing rows, not their products.
    direct = (results[results["framing"] == "direct"].assign(direct_leak=lambda d: d["leak"].astype(float))
              .groupby(keys, as_index=False)["direct_leak"].mean())
    paired = results[results["framing"] != "direct"].merge(direct, on=keys)
    paired = paired.assign(leak=paired["leak"].astype(float))
    return cell_tests(paired, "leak", "direct_leak", ["model", "pii_type", "framing"], **kw)


def run_figures_stage(study: Study, work: Path) -> None:

    study_figures.write_all(study, work)


def run_report_stage(study: Study, work: Path) -> None:

    write_report(study, work)


def publish(out: Path, dest: Path) -> None:
    """Copy the figures and the report to `dest` where missing or different (runs even when every stage was
    current, so a deleted copy comes back); each file lands whole (copy to a temp name, then rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [f for f in (out / "figures").glob("*") if f.suffix in (".pdf", ".png", ".csv")]
    files += [f for f in (out / "report").glob("report.*")]
    for f in files:
        target = dest / f.name
        src = f.stat()
        if target.exists() and (target.stat().st_size, target.stat().st_mtime) == (src.st_size, src.st_mtime):
            continue
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy2(f, tmp)
        os.replace(tmp, target)


# ---- the pipeline -------------------------------------------------------------------------------------------------
def run_study(config: str | os.PathLike | StudyConfig | dict | None = None, overrides: dict[str, Any] | None = None,
              progress: bool = True) -> Study:
    """Run (or resume) the study of `config` (a YAML path, a mapping or a loaded config; None: the shipped default)."""
    cfg = config if isinstance(config, StudyConfig) else load_study_config(
        config if config is not None else default_config_path(), overrides)
    study = Study(cfg, progress)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    t0 = time.time()
    h_sess = stage_hash(cfg, "sessions", extra=document_spec(cfg))
    sessions = study.stage("sessions", "", out / "sessions", h_sess, lambda w: build_sessions(cfg, w))
    reads: list[str] = []
    mitigated: list[str] = []  # read by the figures only: the statistics need no mitigation stage
    for entry in cfg.data["models"]:
        fp = model_fp(entry)

        def model_stage(name: str, upstream: list[str], fn: Callable[[Path], None], extra: Any = fp) -> str | None:
            """Run (or skip) one per-model stage; returns its hash, None when disabled."""
            if not cfg.get(f"{name}.enabled") or None in upstream:
                study.skip(name, entry["name"])
                return None
            h = stage_hash(cfg, name, upstream, extra)
            study.stage(name, entry["name"], out / entry["name"] / name, h, fn)
            return h

        # (each stage runs at once, inside this iteration: the lambdas may read `entry` directly)
        cap_dir = out / entry["name"] / "capture"
        # The scorer's version is part of the leakage stage's hash: new scoring rules rescore a finished stage.
        h_leak = model_stage("leakage", [h_sess], lambda w: run_leakage_stage(study, entry, sessions, w),
                             extra={**fp, "scorer": SCORER_VERSION})
        h_cap = model_stage("capture", [h_sess], lambda w: run_capture_stage(study, entry, sessions, w),
                            extra=capture_extra(fp))
        h_probe = model_stage("probes", [h_cap], lambda w: run_probes_stage(study, entry, cap_dir, w), extra=None)
        h_patch = model_stage("patching", [h_sess], lambda w: run_patching_stage(study, entry, sessions, w))
        reads += [h for h in (h_leak, h_probe, h_patch) if h is not None]
        # Mitigation reads the stage its steer sites come from (none for given layers or protections only).
        site = mitigation_source(cfg.data)[0] if cfg.get("mitigation.strengths") else "given"
        located_by = {"patching": [h_patch], "probes": [h_probe], "given": []}[site]
        h_mit = model_stage("mitigation", [h_sess, *located_by],
                            lambda w: run_mitigation_stage(study, entry, sessions, w),
                            extra={**fp, "n_boot": cfg.get("statistics.n_boot")})
        mitigated += [h_mit] if h_mit is not None else []
    h_stats = stage_hash(cfg, "statistics", reads)
    study.stage("statistics", "", out / "statistics", h_stats, lambda w: run_statistics_stage(study, w))
    h_fig = stage_hash(cfg, "figures", [h_stats, *reads, *mitigated])
    study.stage("figures", "", out / "figures", h_fig, lambda w: run_figures_stage(study, w))
    h_rep = stage_hash(cfg, "report", [h_fig, h_stats], extra={"config": cfg.data, "version": package_version()})
    study.stage("report", "", out / "report", h_rep, lambda w: run_report_stage(study, w))
    if cfg.data["figures_dir"]:
        publish(out, Path(cfg.data["figures_dir"]))
    log = pd.DataFrame([r.__dict__ for r in study.records])
    atomic_write_bytes(out / "stages.csv", log.to_csv(index=False).encode())
    if progress:
        ran = (log["status"] == "ran").sum()
        print(f"[study] {cfg.data['name']}: {ran} stage(s) run, {(log['status'] == 'skipped').sum()} current, "
              f"{time.time() - t0:.1f} s; report: {out / 'report' / 'report.html'}")
    return study
