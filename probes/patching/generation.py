"""Generation checks: does patching a few cells change what the model WRITES, not just a logit difference at the
first answer token? `patched_generation` answers greedily with the cells patched into the prompt's forward;
`generation_check` runs it on task-swap pairs against the unpatched answers, `asr_shift` reads the change of ASR.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from probes.data.session import Session
from probes.leakage import contains_pii, generate_batch, is_refusal
from probes.models.loading import LoadedModel
from probes.patching.config import PatchingError
from probes.patching.exact import Cell, patch_values
from probes.patching.forwards import prepare_pair
from probes.patching.pairs import Pair, build_pair


def patched_generation(loaded: LoadedModel, pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                       align: str = "last", max_new_tokens: int = 32) -> str:
    """Greedy answer of the pair's base run (denoise: the corrupt input) with the source's activations of `cells`
    written into the prompt's forward (the answer's own steps run unpatched, reading the patched KV cache).

    The check behind a patching sweep: does patching those cells alone change what the model *writes*, not
    just a logit difference at the first answer token?"""

    base, source = pair.roles(direction)
    for cell in cells:
        if cell.hook not in source.cache:
            raise PatchingError(f"hook {cell.hook} was not prepared (prepare_pair with these cells' hooks)")
    writes: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for cell in cells:
        pos, vals, _ = patch_values(base, source, cell, align)
        keep = pos < base.n_prompt  # the teacher-forced answer positions do not exist when generating
        writes[cell.hook].append((pos[keep], vals[keep]))

    def writer(entries: list[tuple[Tensor, Tensor]]) -> Callable[[Tensor, str], Tensor | None]:
        def fn(x: Tensor, name: str) -> Tensor | None:
            if x.shape[1] < base.n_prompt:  # a decoding step: leave it alone
                return None
            x = x.clone()
            for pos, vals in entries:
                x[0, pos.to(x.device)] = vals.to(x.dtype).to(x.device)
            return x
        return fn

    with loaded.hooks([(hook, writer(entries)) for hook, entries in writes.items()]):
        return generate_batch(loaded, [base.session], max_new_tokens=max_new_tokens, batch_size=1,
                              progress=False)[0]


def generation_check(loaded: LoadedModel, sessions: Sequence[Session], cells: Sequence[Cell],
                     corrupt_framing: str = "direct", direction: str = "denoise", align: str = "last",
                     max_new_tokens: int = 32, progress: bool = True) -> pd.DataFrame:
    """Task-swap pairs of `sessions` (each under a leaking framing; the corrupt side re-asks under
    `corrupt_framing`), answered by greedy generation unpatched and with `cells` patched from the other framing.
    One row per session and condition (unpatched | patched): session_id, identity_id, framing, pii_type, layer
    set, leak, refused; `asr_shift` of the result is patched ASR - unpatched ASR of the refusing framing."""

    hooks = sorted({c.hook for c in cells})
    rows = []
    for s in tqdm(list(sessions), desc="generation check", unit="session", disable=not progress):
        pair = prepare_pair(loaded, build_pair(loaded, s, "framing", corrupt_framing=corrupt_framing), hooks)
        base, _ = pair.roles(direction)
        target, pii_type = str(s.labels["_target"]), str(s.labels["pii_type"])
        plain = generate_batch(loaded, [base.session], max_new_tokens=max_new_tokens, batch_size=1,
                               progress=False)[0]
        patched = patched_generation(loaded, pair, cells, direction, align, max_new_tokens)
        for cond, text in (("unpatched", plain), ("patched", patched)):
            rows.append({"session_id": s.session_id, "identity_id": s.labels.get("identity_id"),
                         "framing": base.session.labels.get("framing"), "pii_type": pii_type,
                         "cells": ";".join(f"{c.layer}:{c.component}:{c.group}" for c in cells), "condition": cond,
                         "leak": contains_pii(text, target, pii_type),
                         "refused": is_refusal(text, target=target, pii_type=pii_type)})
    return pd.DataFrame(rows)


def asr_shift(check: pd.DataFrame) -> float:
    """Patched minus unpatched ASR of a `generation_check` table."""
    asr = check.groupby("condition")["leak"].mean()
    return float(asr.get("patched", np.nan) - asr.get("unpatched", np.nan))
