"""Measure mitigation settings: the privacy and utility rows of every (method, strength), resumable, plus benign KL.

A `Setting` is one point a front is drawn from: a black-box image protection, or white-box steers applied while the
model generates, or neither (the unmitigated model). `evaluate_settings` answers the privacy sessions and the benign
utility sessions under each setting and returns the tidy rows `measures.loss_utility` reads (columns `method`,
`strength` added); each setting's rows are saved as it finishes, so a killed run started again with the same
sessions does only the settings not yet saved. `benign_kl` is the secondary utility measure: the mean KL divergence
of the next-token distribution on benign prompts, unmitigated to mitigated.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from probes.data.files import atomic_write_bytes, parts_folder
from probes.data.session import Session
from probes.leakage import batch_inputs
from probes.mitigation.blackbox import BlackBox, Protection, model_blackbox, protected
from probes.mitigation.steer import Steer, intervening
from probes.mitigation.utility import privacy_rows, utility_rows
from probes.models.loading import LoadedModel
from probes.models.render import render


@dataclass(frozen=True)
class Setting:
    """One point of a front: `method` names the family of settings (a front per method), `strength` its knob.
    `protection` (black box) and `steers` (white box) may both be empty: the unmitigated model."""

    method: str
    strength: float | int
    protection: Protection | None = None
    steers: tuple[Steer, ...] = field(default=(), repr=False)
    labels: tuple[str, ...] | None = None  # regional protections: only these marks (None: every mark)

    def key(self) -> str:
        """A digest of everything the rows depend on (tensors by their bytes), for resumable parts."""
        h = hashlib.sha256(json.dumps([self.method, float(self.strength), repr(self.protection),
                                       self.labels], sort_keys=True).encode())
        for st in self.steers:
            h.update(repr((st.kind, st.hook, float(st.strength), st.last)).encode())
            if st.gate is not None:
                h.update(repr((float(st.gate.bias), float(st.gate.threshold))).encode())
            for t in (st.vector, getattr(st.gate, "weight", None)):
                if t is not None:
                    h.update(t.detach().cpu().double().numpy().tobytes())
            if st.eraser is not None:
                h.update(repr(st.eraser).encode())
        return h.hexdigest()[:16]


def setting_answers(loaded: LoadedModel, box: BlackBox, setting: Setting, sessions: Sequence[Session]) -> list[str]:
    """The answers to `sessions` under `setting`: its protection on every image of each session (wherever the image
    is shown), its steers while the model generates; through `box`, so every answer is counted."""
    if setting.protection is not None:
        sessions = [protected(s, setting.protection, setting.labels) for s in sessions]
    if not setting.steers:
        return box(sessions)
    with intervening(loaded, setting.steers):
        return box(sessions)


def evaluate_setting(loaded: LoadedModel, box: BlackBox, setting: Setting, privacy: Sequence[Session],
                     utility: Sequence[Session]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The privacy rows and the utility rows of one setting (no answer text kept)."""
    tag = {"method": setting.method, "strength": float(setting.strength)}
    p = privacy_rows(privacy, setting_answers(loaded, box, setting, privacy)).assign(**tag)
    u = utility_rows(utility, setting_answers(loaded, box, setting, utility)).assign(**tag)
    return p, u


def parts_path(loaded: LoadedModel, privacy: Sequence[Session], utility: Sequence[Session],
               out_dir: str | os.PathLike, max_new_tokens: int) -> Path:
    """Where `evaluate_settings` keeps each setting's rows for this model, these sessions and this answer length."""
    sessions_key = [s.session_id for s in [*privacy, *utility]]
    return parts_folder(out_dir, "mitigation-parts", {**loaded.run_key, "max_new_tokens": max_new_tokens},
                        sessions_key)


def evaluate_settings(loaded: LoadedModel, settings: Sequence[Setting], privacy: Sequence[Session],
                      utility: Sequence[Session], out_dir: str | os.PathLike | None = None, max_new_tokens: int = 32,
                      batch_size: int = 8, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Privacy rows, utility rows (every setting) and the number of queries this call made. With `out_dir`, each
    setting's rows are kept in a parts folder keyed by the sessions and settings and reused when run again."""
    box = model_blackbox(loaded, max_new_tokens, batch_size)
    parts = None
    if out_dir is not None:
        parts = parts_path(loaded, privacy, utility, out_dir, max_new_tokens)
        parts.mkdir(parents=True, exist_ok=True)
    priv, util = [], []
    for setting in tqdm(settings, desc="mitigation", unit="setting", disable=not progress):
        files = None if parts is None else (parts / f"{setting.key()}.privacy.parquet",
                                            parts / f"{setting.key()}.utility.parquet")
        if files is not None and all(f.exists() for f in files):
            p, u = (pd.read_parquet(f) for f in files)
        else:
            p, u = evaluate_setting(loaded, box, setting, privacy, utility)
            if files is not None:
                atomic_write_bytes(files[1], u.to_parquet(index=False))
                atomic_write_bytes(files[0], p.to_parquet(index=False))  # written last: the part's commit marker
        priv.append(p)
        util.append(u)
    return pd.concat(priv, ignore_index=True), pd.concat(util, ignore_index=True), box.queries


def _next_token_logprobs(loaded: LoadedModel, sessions: Sequence[Session]) -> torch.Tensor:
    """Log-probabilities of the first answer token after each session's prompt [n, vocab] (one prompt per forward:
    no padding, so the numbers are those of the prompt alone)."""
    out = []
    for s in sessions:
        kw = batch_inputs(loaded, [render(loaded.adapter, s, add_generation_prompt=True)])
        kw = {k: v.to(loaded.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        with torch.no_grad():
            logits = loaded.hf_model(**kw).logits[0, -1]
        out.append(torch.log_softmax(logits.double(), -1).cpu())
    return torch.stack(out)


def benign_kl(loaded: LoadedModel, sessions: Sequence[Session], steers: Sequence[Steer]) -> float:
    """Mean KL(unmitigated || mitigated) of the next-token distribution after each benign prompt (nats)."""
    base = _next_token_logprobs(loaded, sessions)
    with intervening(loaded, steers):
        steered = _next_token_logprobs(loaded, sessions)
    return float((base.exp() * (base - steered)).sum(-1).mean())
