"""The study config: one YAML file naming everything a study does, validated before any work starts.

    cfg = load_study_config("study.yaml")                 # defaults filled in, every key checked
    cfg = load_study_config("study.yaml", overrides={"probes.method": "ridge", "seed": 1})
    cfg.get("probes.position_groups")                     # dotted access
    stage_hash(cfg, "probes", upstream=[...])             # what decides whether a stage's outputs are current

The schema is `DEFAULTS` (every key with its default; the default's type is the key's type) plus `CHOICES`
(the allowed values of the keys that have a fixed set). An unknown key, a wrong type or a value outside its set
raises `StudyConfigError` naming the file, the dotted key and what was expected. A hand-written check is shorter
than a schema library here and gives exactly these messages.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from probes.data.builders import FRAMINGS
from probes.data.identities import PII_TYPES
from probes.mitigation.image import KINDS as PROTECTION_KINDS
from probes.patching import ATP_METHODS, DEFAULT_COMPONENTS, EXPERIMENTS, PatchingConfig, PatchingError

STAGES = ("sessions", "leakage", "capture", "probes", "patching", "mitigation", "statistics", "figures", "report")
ANY = object()  # a list of this in DEFAULTS: any element type

DEFAULTS: dict[str, Any] = {
    "name": "study",
    "out": "results/study",  # relative paths are relative to the working directory
    "figures_dir": "",  # also copy the figures (PDF, PNG, CSV) and the report here (e.g. the repo's figures/)
    "seed": 0,
    "models": [{"name": "organism", "path": "default"}],  # path "default": the embedded model
    "sessions": {
        "image_size": "auto",  # auto: the model's own size (the organism's training.json), else 336
        "layout": "auto",  # auto: the organism's layout, else fixed
        "mmprivacy": {"identities": 16, "framings": list(FRAMINGS), "pii_types": list(PII_TYPES),
                      "design": "cycle"},
        "multiturn": {"identities": 60, "k_distractors": [3], "framing_pairs": [["caption", "caption"]],
                      "pii_types": ["SSN"], "reshow": [False]},
    },
    "leakage": {"enabled": True, "max_new_tokens": 32, "batch_size": 8},
    "capture": {"enabled": True, "hooks": "resid_post", "layers": "all", "positions": "last:*+image:0",
                "batch_size": 8},
    # n_permutations: reruns of the whole probe pipeline on targets permuted across identities (the null of the
    # probe tests); at least 2
    "probes": {"enabled": True, "targets": ["digits"], "position_groups": ["last", "image"], "method": "logreg",
               "n_folds": 5, "mdl": False, "n_permutations": 20},
    "patching": {"enabled": True, "experiments": ["denoise", "taskswap"], "framings": ["caption"],
                 "components": list(DEFAULT_COMPONENTS), "max_pairs": 24, "batch_size": 16, "atp_method": "atp"},
    # allow_underpowered: run a patching stage whose pairs can never reach significance (a pipeline check), with
    # the warning instead of the refusal
    # Steers at the located cells (the patching stage's strongest, else the probes', else `layers`) against the same
    # steer at a random layer and along a random direction, and black-box image protections, measured on held-out
    # identities (`identities`, never located nor fitted on) on one privacy-utility plane (`run_mitigation_stage`).
    # Off unless a config turns it on: it generates (about 30 s on the default study) and its leak direction needs a
    # refusing and a leaking framing among sessions.mmprivacy.framings.
    "mitigation": {"enabled": False, "sites": "auto", "top_k": 1, "layers": [], "component": "resid_post",
                   "steer": "add", "strengths": [1.0, 2.0], "controls": ["random_layer", "random_direction"],
                   "protections": ["blur", "mask"], "protection_strengths": [0.5, 1.0], "dilation": 4.0,
                   "identities": 8, "max_new_tokens": 32},
    "statistics": {"alpha": 0.05, "n_boot": 500, "n_perm": 10000, "allow_underpowered": False},
    "report": {"formats": ["html", "md"]},
}
MODEL_DEFAULTS: dict[str, Any] = {"name": "", "path": "", "device": "cpu", "dtype": "auto", "device_map": "none",
                                  "backend": "torch", "trust_remote_code": False}

CHOICES: dict[str, tuple] = {
    "sessions.layout": ("auto", "fixed", "random", "grid"),
    "sessions.mmprivacy.framings": FRAMINGS,
    "sessions.mmprivacy.pii_types": PII_TYPES,
    "sessions.mmprivacy.design": ("cycle", "cross"),
    "sessions.multiturn.framing_pairs": FRAMINGS,
    "sessions.multiturn.pii_types": PII_TYPES,
    "probes.method": ("logreg", "ridge", "dim"),
    "patching.experiments": EXPERIMENTS,
    "patching.atp_method": ATP_METHODS,
    "patching.framings": FRAMINGS,
    "patching.components": ("resid_pre", "resid_post", "attn_out", "mlp_out"),
    "report.formats": ("html", "md"),
    "models.backend": ("torch", "bridge"),
    "mitigation.sites": ("auto", "patching", "probes", "given"),
    "mitigation.component": ("resid_pre", "resid_post", "attn_out", "mlp_out"),
    "mitigation.steer": ("add", "ablate"),
    "mitigation.controls": ("random_layer", "random_direction"),
    "mitigation.protections": PROTECTION_KINDS,
}
INT_OR_AUTO = {"sessions.image_size"}
INT_LIST_OR_ALL = {"capture.layers"}
MAY_BE_EMPTY = {"mitigation.layers", "mitigation.strengths", "mitigation.controls", "mitigation.protections"}
POSITIVE = {"sessions.mmprivacy.identities", "sessions.multiturn.identities", "leakage.max_new_tokens",
            "leakage.batch_size", "capture.batch_size", "probes.n_folds", "probes.n_permutations", "patching.max_pairs",
            "patching.batch_size", "statistics.n_boot", "statistics.n_perm", "mitigation.top_k",
            "mitigation.identities", "mitigation.max_new_tokens"}
# Lists of numbers and their range: (element type, low, high, whether low itself is allowed)
NUMBER_LISTS = {"mitigation.layers": (int, 0, None, True), "mitigation.strengths": (float, 0.0, None, False),
                "mitigation.protection_strengths": (float, 0.0, 1.0, False)}


class StudyConfigError(ValueError):
    """The config names a key that does not exist, or a value of the wrong type or outside its allowed set."""


@dataclass
class StudyConfig:
    data: dict[str, Any]
    source: str = "<dict>"  # the file it came from, for messages
    overrides: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        node: Any = self.data
        for part in key.split("."):
            node = node[part]
        return node

    @property
    def out(self) -> Path:
        return Path(self.data["out"])

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.data[name])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


def _fail(source: str, key: str, msg: str) -> StudyConfigError:
    return StudyConfigError(f"{source}: {key}: {msg}")


def _check_value(source: str, key: str, value: Any, default: Any) -> Any:
    """`value` checked against the default's type and the key's allowed values; returns it (ints may be floats'
    place-holders: an int where a float is expected is accepted)."""
    if key in INT_OR_AUTO:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 8):
            raise _fail(source, key, f"{value!r}: expected 'auto' or an image size in pixels (an integer >= 8)")
        return value
    if key in INT_LIST_OR_ALL:
        if value == "all":
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise _fail(source, key, f"{value!r}: expected 'all' or a list of layer indices (integers >= 0)")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _fail(source, key, f"{value!r}: expected true or false")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(source, key, f"{value!r}: expected an integer")
        if key in POSITIVE and value < 1:
            raise _fail(source, key, f"{value}: expected an integer >= 1")
        if key == "probes.n_permutations" and value < 2:
            raise _fail(source, key, f"{value}: expected an integer >= 2 (the null's spread needs two draws)")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(source, key, f"{value!r}: expected a number")
        if key == "statistics.alpha" and not 0 < value < 1:
            raise _fail(source, key, f"{value}: expected a number between 0 and 1")
        if key == "mitigation.dilation" and value < 0:
            raise _fail(source, key, f"{value}: expected a number of pixels >= 0")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise _fail(source, key, f"{value!r}: expected a string")
    elif isinstance(default, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list) or not (value or key in MAY_BE_EMPTY):
            raise _fail(source, key, f"{value!r}: expected a {'' if key in MAY_BE_EMPTY else 'non-empty '}list")
        flat = value
        if key in NUMBER_LISTS:
            return _number_list(source, key, value, *NUMBER_LISTS[key])
        if key == "sessions.multiturn.framing_pairs":
            for pair in value:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise _fail(source, key, f"{pair!r}: expected a pair [turn-1 framing, probe framing]")
            flat = [f for pair in value for f in pair]
        elif default:  # the elements' type is the default's first element's
            kind = type(default[0])
            for v in flat:
                if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                    raise _fail(source, key, f"{v!r}: expected a list of {kind.__name__}")
        if key == "probes.targets":
            bad = [v for v in value if v not in ("digits", "chars", "identity") and not v.startswith("label:")]
            if bad:
                raise _fail(source, key, f"{bad[0]!r} is not allowed; expected digits, chars, identity or "
                                         f"label:<session label> (e.g. label:framing)")
        allowed = CHOICES.get(key)
        if allowed is not None:
            bad = [v for v in flat if v not in allowed]
            if bad:
                raise _fail(source, key, f"{bad[0]!r} is not allowed; expected values from {', '.join(allowed)}")
        return value
    allowed = CHOICES.get(key)
    if allowed is not None and value not in allowed:
        raise _fail(source, key, f"{value!r} is not allowed; expected one of {', '.join(map(str, allowed))}")
    return value


def _number_list(source: str, key: str, value: list, kind: type, low: float, high: float | None,
                 low_ok: bool) -> list:
    """A list of numbers of `kind` (an int is a float's place-holder) in (low, high], or [low, high] with low_ok."""
    bounds = f"{'>=' if low_ok else '>'} {low:g}" + ("" if high is None else f" and <= {high:g}")
    for v in value:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
        if not number or v < low or (v == low and not low_ok) or (high is not None and v > high):
            raise _fail(source, key, f"{v!r}: expected a list of {'integers' if kind is int else 'numbers'} "
                                     f"{bounds}")
    return [kind(v) for v in value]


def _merge(source: str, prefix: str, user: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(user, Mapping):
        raise _fail(source, prefix or "(top level)", f"expected a mapping of keys, got {type(user).__name__}")
    out = copy.deepcopy(dict(default))
    for k, v in user.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in default:
            raise _fail(source, key, f"unknown key; expected one of {', '.join(default)}")
        if k == "models":
            out[k] = _models(source, v)
        elif isinstance(default[k], dict):
            out[k] = _merge(source, key, v if v is not None else {}, default[k])
        else:
            out[k] = _check_value(source, key, v, default[k])
    return out


def _models(source: str, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        value = [{"path": value}]
    if not isinstance(value, list) or not value:
        raise _fail(source, "models", "expected a non-empty list of {name, path, ...} entries")
    models, names = [], set()
    for i, m in enumerate(value):
        m = {"path": m} if isinstance(m, str) else m
        key = f"models[{i}]"
        if not isinstance(m, Mapping) or "path" not in m:
            raise _fail(source, key, "expected a mapping with at least 'path' (an HF id, a local folder or "
                                     "'default' for the embedded model)")
        entry = _merge(source, key, m, MODEL_DEFAULTS)
        entry["backend"] = _check_value(source, "models.backend", entry["backend"], "")
        entry["name"] = entry["name"] or _model_name(entry["path"])
        if entry["name"] in names:
            raise _fail(source, f"{key}.name", f"{entry['name']!r} is used twice; model names must be unique")
        names.add(entry["name"])
        models.append(entry)
    return models


def _model_name(path: str) -> str:
    return "organism" if path == "default" else Path(str(path).rstrip("/")).name


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise StudyConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it ('3' -> 3, 'true' -> True, '[0, 1]' -> [0, 1], 'ridge' -> 'ridge')."""
    return yaml.safe_load(text) if text.strip() else text


def load_study_config(source: str | os.PathLike | Mapping[str, Any],
                      overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Read (a YAML path, or a mapping), apply `overrides` (dotted keys), fill defaults, validate everything."""
    if isinstance(source, Mapping):
        raw, where = copy.deepcopy(dict(source)), "<config>"
    else:
        where = str(source)
        try:
            raw = yaml.safe_load(Path(source).read_text())
        except FileNotFoundError:
            raise StudyConfigError(f"{where}: no such config file") from None
        except yaml.YAMLError as err:
            raise StudyConfigError(f"{where}: not valid YAML ({err})") from None
        raw = raw or {}
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{where}: expected a mapping of keys at the top level")
    for key, value in (overrides or {}).items():
        if key.split(".")[0] not in DEFAULTS:
            raise StudyConfigError(f"{where}: override {key}: unknown key; expected one of {', '.join(DEFAULTS)}")
        set_dotted(raw, key, value)
    data = _merge(where, "", raw, DEFAULTS)
    _check_patching_pairs(where, data)
    _check_mitigation(where, data)
    for experiment in data["patching"]["experiments"]:  # each experiment's PatchingConfig checks its own fields
        try:
            patching_config(data, experiment)
        except PatchingError as err:
            raise _fail(where, "patching", str(err)) from None
    return StudyConfig(data, where, dict(overrides or {}))


def patching_config(data: Mapping[str, Any], experiment: str, model: str | None = None) -> PatchingConfig:
    """The PatchingConfig of one experiment of the study's patching stage (`data`: a validated study config's data;
    `model`: the label its rows get)."""
    pt = data["patching"]
    return PatchingConfig(experiment, components=tuple(pt["components"]), batch_size=pt["batch_size"],
                          max_pairs=pt["max_pairs"], n_boot=data["statistics"]["n_boot"], seed=data["seed"],
                          atp_method=pt["atp_method"], model=model)


def _check_patching_pairs(source: str, data: dict[str, Any]) -> None:
    """Refuse a patching stage whose pairs could never give a significant cell: the two-sided sign-flip test over n
    identities cannot go below 2 / 2^n (or 1 / (1 + n_perm)); below alpha nothing survives even uncorrected. The
    study warns after the stage when a lone effect cannot pass the correction for its family's size."""
    from probes.stats import min_clusters_for_bh, min_sign_flip_p

    pt, st = data["patching"], data["statistics"]
    if not pt["enabled"] or set(pt["experiments"]) <= {"knockout"} or st["allow_underpowered"]:
        return
    n = min(pt["max_pairs"], data["sessions"]["mmprivacy"]["identities"])  # the stage patches one pair per identity
    p_min = min_sign_flip_p(n, "two-sided", st["n_perm"])
    if p_min > st["alpha"]:
        need = min_clusters_for_bh(1, st["alpha"], "two-sided", st["n_perm"])
        if need is None:
            raise _fail(source, "statistics.n_perm", f"{st['n_perm']}: random sign flips allow no p-value below "
                                                     f"{p_min:.3g} > alpha {st['alpha']}; raise it")
        raise _fail(source, "patching.max_pairs", f"{pt['max_pairs']} (of {data['sessions']['mmprivacy']['identities']}"
                                                  f" identities): pairs of {n} identities allow no p-value below "
                                                  f"{p_min:.3g} > alpha {st['alpha']}, so no patching cell could "
                                                  f"ever be significant; expected at least {need} "
                                                  "(or statistics.allow_underpowered: true for a pipeline check)")


# The framings the embedded model's policy refuses and those it leaks under: `probes.mitigation.settings`' REFUSING
# and LEAKING, repeated because that module loads torch and `mmret study validate` must not (a test keeps them equal).
REFUSING_FRAMINGS = ("direct", "VQA", "classification")
LEAKING_FRAMINGS = ("caption", "rephrasing")
# Patching experiments whose cells can place a steer, preferred first: taskswap swaps the framing, as the leak
# direction does (refusing minus leaking); denoise and noise swap the document's value (knockout has no such cells).
PATCHING_SOURCES = ("taskswap", "denoise", "noise", "atp")


def mitigation_source(data: Mapping[str, Any]) -> tuple[str, str | None]:
    """Where the mitigation stage's steer sites come from (`data`: a validated config's data): ("given", None) for
    `mitigation.layers`, ("patching", experiment) or ("probes", None). sites auto: the given layers when there are
    any, else the patching stage's first experiment of PATCHING_SOURCES when it runs, else the probes stage when it
    (and capture) runs, else ("given", None) with no layers, which validation refuses."""
    m, pt = data["mitigation"], data["patching"]
    experiment = next((e for e in PATCHING_SOURCES if e in pt["experiments"]), None)
    site = m["sites"]
    if site == "auto":
        if m["layers"]:
            site = "given"
        elif pt["enabled"] and experiment is not None:
            site = "patching"
        elif data["probes"]["enabled"] and data["capture"]["enabled"]:
            site = "probes"
        else:
            site = "given"
    return site, experiment if site == "patching" else None


def _check_mitigation(source: str, data: dict[str, Any]) -> None:
    """Refuse a mitigation stage that could not run: nothing to measure, steer sites with nothing to read them from,
    or a leak direction without both a refusing and a leaking framing to take it from."""
    m = data["mitigation"]
    if not m["enabled"]:
        return
    if not m["strengths"] and not m["protections"]:
        raise _fail(source, "mitigation", "neither strengths (white-box steers) nor protections (black-box image "
                                          "protections) are given: nothing to measure (or enabled: false)")
    if not m["strengths"]:
        return
    site, _ = mitigation_source(data)
    if m["sites"] in ("patching", "probes") and m["layers"]:
        raise _fail(source, "mitigation.layers", f"{m['layers']} given with sites {m['sites']!r}, which reads the "
                                                 "located cells instead; set sites: given (or auto) to steer at them")
    if m["sites"] == "patching" and not (data["patching"]["enabled"] and set(data["patching"]["experiments"])
                                         & set(PATCHING_SOURCES)):
        raise _fail(source, "mitigation.sites", "'patching': expected an enabled patching stage running one of "
                                                f"{', '.join(PATCHING_SOURCES)}")
    if m["sites"] == "probes" and not (data["probes"]["enabled"] and data["capture"]["enabled"]):
        raise _fail(source, "mitigation.sites", "'probes': expected the capture and probes stages enabled")
    if site == "given" and not m["layers"]:
        raise _fail(source, "mitigation.layers", "[]: expected the layer indices to steer at (sites "
                                                 f"{m['sites']!r} finds no enabled patching or probes stage to read "
                                                 "them from)")
    framings = data["sessions"]["mmprivacy"]["framings"]
    if not set(framings) & set(REFUSING_FRAMINGS) or not set(framings) & set(LEAKING_FRAMINGS):
        raise _fail(source, "sessions.mmprivacy.framings",
                    f"{framings}: the mitigation stage's leak direction needs a refusing framing "
                    f"({', '.join(REFUSING_FRAMINGS)}) and a leaking one ({', '.join(LEAKING_FRAMINGS)}); add them "
                    "or set mitigation.strengths: [] (black-box protections only)")


def default_config_path() -> Path:
    """The shipped default study (runs on the embedded model; `make demo`)."""
    return Path(__file__).parent.parent / "studies" / "default.yaml"


# ---- content hashes ---------------------------------------------------------------------------------------------
def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(path: str) -> dict[str, Any]:
    """What identifies a model's weights: its config and `probes.models.loading.checkpoint_files` (content of files
    up to 256 MiB, the modification time of larger shards), so a model retrained in the same folder changes it; the HF
    id when not a local folder."""
    from probes.models.loading import checkpoint_files
    from probes.organism import DEFAULT_MODEL

    p = Path(DEFAULT_MODEL if path == "default" else path)
    if not p.is_dir():
        return {"id": path}
    return {"id": path, "config": (p / "config.json").read_text() if (p / "config.json").exists() else "",
            "files": checkpoint_files(p)}


def marker_hash(path: Path) -> str | None:
    """The hash a done-marker (stage.json, sweep_done.json) records; None when it is missing or unreadable (the work
    is then done again rather than trusted)."""
    try:
        return json.loads(Path(path).read_text()).get("hash")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def stage_hash(cfg: StudyConfig, stage: str, upstream: Iterable[str] = (), extra: Any = None) -> str:
    """The hash that decides whether `stage`'s outputs are current: its own config section, the seed, the hashes
    of the stages it reads, and `extra` (e.g. a model's fingerprint). Editing one section redoes that stage and
    every stage downstream of it, nothing else."""
    own = cfg.data.get(stage) if stage in cfg.data else None
    return digest({"stage": stage, "own": own, "seed": cfg.data["seed"], "upstream": list(upstream), "extra": extra,
                   "version": package_version()})


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mm-retention")
    except PackageNotFoundError:
        return "dev"
