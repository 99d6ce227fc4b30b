"""Activation patching for cross-task leakage, on the toolkit's own hooks (transformer-lens cannot pass images).

A *pair* is one clean and one corrupt input that should behave differently: the clean one leaks (or is the document
with the asked value), the corrupt one does not. The modules, in the order a run uses them:

- `metrics`: the two continuations a pair tells apart and the metrics of one forward (logit_diff, pii_logprob,
  scores);
- `config`: the choices and `PatchingConfig`, everything a run depends on, validated once;
- `pairs`: `Run`, `Pair`, the corruptions (`build_pair`: image, framing, text, noise) and the position groups;
- `forward`: the forwards and `prepare` (one full forward per side, then patched forwards from its embeddings);
- `exact`: exact patching of (layer, component, position group) cells, many per batched forward;
- `attribution`: attribution patching (AtP), GradDrop, and their agreement with exact patching;
- `knockout`: attention knockout of a source set from the probe turn in windows of layers;
- `checks`: the pair check (does the metric separate clean from corrupt?) and the pairs table;
- `sweep`: `patch_sessions`, the runner over sessions (resumable), and `summarize`;
- `generation`: does patching change what the model writes (`generation_check`, `asr_shift`).

`run_patching` (`analysis.results`) writes a run's tables and figures for `mmret patch`. Every public name of those
modules is importable from here.

Every name below is imported from its module on first use (PEP 562), so `import probes.patching.config` (the study
config's check) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module that defines it
    "QKPrep": "probes.patching.atp_star", "QK_METHODS": "probes.patching.atp_star",
    "atp_star_patching": "probes.patching.atp_star", "prepare_qk": "probes.patching.atp_star",
    "qk_estimates": "probes.patching.atp_star", "qk_patching": "probes.patching.atp_star",
    "qk_rows": "probes.patching.atp_star",
    "UNSIGNED_ESTIMATORS": "probes.patching.attribution", "atp_agreement": "probes.patching.attribution",
    "attribution_patching": "probes.patching.attribution", "effects": "probes.patching.attribution",
    "graddrop_patching": "probes.patching.attribution", "prepare_graddrop": "probes.patching.attribution",
    "top_k_recall": "probes.patching.attribution",
    "PAIR_COLUMNS": "probes.patching.checks", "PAIR_DTYPES": "probes.patching.checks",
    "PairsDroppedWarning": "probes.patching.checks", "pair_check": "probes.patching.checks",
    "pair_checks": "probes.patching.checks", "rejected_pair": "probes.patching.checks",
    "warn_dropped": "probes.patching.checks",
    "ALIGNS": "probes.patching.config", "ATP_METHODS": "probes.patching.config",
    "COMPONENTS": "probes.patching.config", "CORRUPTIONS": "probes.patching.config",
    "DEFAULT_COMPONENTS": "probes.patching.config", "DIRECTIONS": "probes.patching.config",
    "EXPERIMENTS": "probes.patching.config", "EXPERIMENT_DEFAULTS": "probes.patching.config",
    "PairSpec": "probes.patching.config", "PatchingConfig": "probes.patching.config",
    "patching_config": "probes.patching.config",
    "Cached": "probes.patching.exact", "Cell": "probes.patching.exact", "Patch": "probes.patching.exact",
    "exact_patching": "probes.patching.exact", "metric_rows": "probes.patching.exact",
    "null_by_construction": "probes.patching.exact", "patch_values": "probes.patching.exact",
    "patched_metrics": "probes.patching.exact", "sweep_cells": "probes.patching.exact",
    "EMBEDS": "probes.patching.forwards", "Hook": "probes.patching.forwards", "forward": "probes.patching.forwards",
    "forward_kwargs": "probes.patching.forwards", "frozen_params": "probes.patching.forwards",
    "metric_grads": "probes.patching.forwards", "prefix_cache": "probes.patching.forwards",
    "prepare": "probes.patching.forwards", "prepare_pair": "probes.patching.forwards",
    "asr_shift": "probes.patching.generation", "generation_check": "probes.patching.generation",
    "patched_generation": "probes.patching.generation",
    "Knock": "probes.patching.knockouts", "default_sources": "probes.patching.knockouts",
    "knockout": "probes.patching.knockouts", "knockout_hooks": "probes.patching.knockouts",
    "probe_positions": "probes.patching.knockouts",
    "Answer": "probes.patching.metrics", "CLASS_REFUSAL": "probes.patching.metrics",
    "CONTRASTS": "probes.patching.metrics", "METRICS": "probes.patching.metrics",
    "MIN_SEPARATION": "probes.patching.config", "PairRejected": "probes.patching.metrics",
    "PatchingError": "probes.patching.config", "REFUSAL": "probes.patching.metrics",
    "answer_ids": "probes.patching.metrics", "answer_metrics": "probes.patching.metrics",
    "default_refusal": "probes.patching.metrics", "make_answer": "probes.patching.metrics",
    "own_answer": "probes.patching.metrics", "patch_score": "probes.patching.metrics",
    "value_answer": "probes.patching.metrics",
    "Pair": "probes.patching.pairs", "Run": "probes.patching.pairs", "build_pair": "probes.patching.pairs",
    "corrupt_side": "probes.patching.pairs", "framing_answer": "probes.patching.pairs",
    "framing_pair": "probes.patching.pairs", "image_pair": "probes.patching.pairs",
    "labels_boxes": "probes.patching.pairs", "make_run": "probes.patching.pairs",
    "position_groups": "probes.patching.pairs", "probe_turn": "probes.patching.pairs",
    "session_identity": "probes.patching.pairs", "text_pair": "probes.patching.pairs",
    "ROW_COLUMNS": "probes.patching.sweep", "Result": "probes.patching.sweep",
    "SessionPatcher": "probes.patching.sweep", "default_groups": "probes.patching.sweep",
    "other_identities": "probes.patching.sweep", "patch_sessions": "probes.patching.sweep",
    "pick_other": "probes.patching.sweep", "saved_or_patched": "probes.patching.sweep",
    "summarize": "probes.patching.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'probes.patching' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
