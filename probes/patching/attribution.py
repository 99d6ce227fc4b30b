"""Attribution patching (AtP) and how far its estimates agree with exact patching.

AtP (`attribution_patching`): metric(patched) - metric(base) ~ sum over the cell's positions of (a_source - a_base) .
d metric / d a, the gradient taken on the base run. `prepare(grad=True)` gets every cell's gradient from one forward
and one backward per metric; with the other side's forward that is two forwards for all cells. `atp_agreement`
compares it with exact patching on EFFECTS (patched - base) per pair: Spearman over the pair's cells (null-by-
construction cells left out), mean and median over pairs, and the top-k recall of exact patching's k largest cells
(k = 10).

AtP* (Kramar et al. 2024). GradDrop (`prepare_graddrop`, `graddrop_patching`, method 'atp_graddrop'): for each layer
l, the AtP estimate with the gradient through layer l's attn_out and mlp_out dropped; the estimate of |effect| is the
sum over l of their absolute values / (L - 1) (unsigned: compared on |effect|). L extra forwards and backwards per
side. AtP*'s attention-saturation correction (recompute the softmax of a head whose query or key is patched) is
not part of this module.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from probes.models.loading import LoadedModel
from probes.patching.config import PatchingError
from probes.patching.exact import Cell, metric_rows, patch_values
from probes.patching.forwards import forward, frozen_params, metric_grads
from probes.patching.metrics import METRICS, Answer
from probes.patching.pairs import Pair, Run


def attribution_patching(pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                         align: str = "last") -> list[dict[str, Any]]:
    """AtP estimate of every cell: base metric + sum over the cell's positions of (a_source - a_base) . grad,
    the gradient of the base run (`prepare_pair(grad=['corrupt'])` for denoising, ['clean'] for noising)."""
    base, source = pair.roles(direction)
    if base.grads is None:
        side = "corrupt" if direction == "denoise" else "clean"
        raise PatchingError(f"AtP {direction}: prepare the {side} run with grad=True first")
    rows = []
    for c in cells:
        dst, vals, how = patch_values(base, source, c, align)
        delta = vals.float() - base.cache[c.hook][dst].float()
        est = {m: base.metrics[m] + float((delta * base.grads[m][c.hook][dst].float()).sum()) for m in METRICS}
        rows += metric_rows(c, est, pair, direction, "atp", {"alignment": how, "n_positions": len(dst),
                                                             "null_by_construction": bool((delta == 0).all())})
    return rows


UNSIGNED_ESTIMATORS = ("atp_graddrop", "atp_star")  # estimate |effect| only (GradDrop sums absolute values)


def effects(df: pd.DataFrame) -> pd.Series:
    """Each row's change of its metric from the unpatched base run: value - corrupt (denoising) or value - clean
    (noising); 0 = the patch changed nothing."""
    base = df["corrupt"].where(df["direction"] == "denoise", df["clean"])
    return df["value"] - base


def prepare_graddrop(loaded: LoadedModel, run: Run, answer: Answer, hooks: Iterable[str]) -> Run:
    """GradDrop gradients of a prepared run: for each layer l, d metric / d activation of `hooks` with the gradient
    through layer l's residual-stream contribution dropped (its attn_out and mlp_out treated as constants on the
    backward pass; the forward is unchanged, so are the metrics). One forward and one backward per layer."""
    if run.embeds is None:
        raise PatchingError("prepare the run first (prepare / prepare_pair)")
    hooks = list(dict.fromkeys(hooks))
    run.gd_grads = []

    def cut(x: Tensor, name: str) -> Tensor:  # a new leaf: gradient reaches it, none flows back into the block
        return x.detach().requires_grad_(True)

    for layer in range(loaded.n_layers):
        kept: dict[str, Tensor] = {}

        def keep(x: Tensor, name: str) -> None:
            kept[name] = x

        cuts = [(f"blocks.{layer}.hook_{c}", cut) for c in ("attn_out", "mlp_out")]
        embeds = run.embeds.detach().requires_grad_(True)
        with torch.enable_grad(), frozen_params(loaded.hf_model):
            metrics, _ = forward(loaded, run, answer, cuts + [(h, keep) for h in hooks], embeds=embeds)
            grads = metric_grads(metrics, hooks, [kept[h] for h in hooks])
        run.gd_grads.append(grads)
    return run


def graddrop_patching(pair: Pair, cells: Sequence[Cell], direction: str = "denoise",
                      align: str = "last") -> list[dict[str, Any]]:
    """AtP* GradDrop estimate of |effect| of every cell: sum over layers l of |AtP estimate with layer l's
    gradient dropped| / (L - 1) (Kramar et al. 2024, sec. 3.2: a cell whose direct and indirect effects cancel in
    the full gradient shows up once one path is dropped). Unsigned: rows hold value = base + that magnitude, method
    'atp_graddrop' (`atp_agreement` compares it on |effect|). Needs `prepare_graddrop` on the base run."""
    base, source = pair.roles(direction)
    if base.gd_grads is None:
        raise PatchingError(f"GradDrop {direction}: run prepare_graddrop on the base run first")
    n = len(base.gd_grads)
    rows = []
    for c in cells:
        dst, vals, how = patch_values(base, source, c, align)
        delta = vals.float() - base.cache[c.hook][dst].float()
        est = {m: base.metrics[m] + sum(abs(float((delta * g[m][c.hook][dst].float()).sum()))
                                        for g in base.gd_grads) / max(n - 1, 1) for m in METRICS}
        rows += metric_rows(c, est, pair, direction, "atp_graddrop",
                            {"alignment": how, "n_positions": len(dst),
                             "null_by_construction": bool((delta == 0).all())})
    return rows


def atp_agreement(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """How well each estimator (method 'atp', and any AtP* rows: 'atp_graddrop') agrees with exact patching,
    measured on EFFECTS (`effects`: patched - base) PER PAIR, over the pair's cells, per (model, direction, metric,
    method):

    - spearman: Spearman correlation of the estimated and exact effects (NaN for an unsigned estimator);
    - spearman_abs: the same on |effect| (comparable for every estimator);
    - top_k_recall: share of exact patching's k cells of largest |effect| that are among the estimator's k
      largest (k capped at the pair's number of cells).

    Cells null by construction (`null_by_construction` on the exact row: both effects are 0 for want of any change)
    are left out, so agreement is not inflated by cells that nothing can move. Rows with scope 'pair' (one per
    session_id), then 'mean' and 'median' over pairs (n_pairs: how many pairs had a finite value). No pooled
    number over pairs: each pair's baseline would drive the ranks."""
    cell = ["session_id", "direction", "metric", "layer", "component", "position_group"]
    d = df[df["metric"].isin(METRICS)].assign(effect=lambda x: effects(x))
    exact = d[d["method"] == "exact"]
    if "null_by_construction" in exact.columns:
        exact = exact[~exact["null_by_construction"].astype("boolean").fillna(False).astype(bool)]
    estimates = d[d["method"] != "exact"]
    both = exact.merge(estimates, on=[*cell, "model"], suffixes=("_exact", "_est"))
    if not len(both):
        raise PatchingError("atp_agreement: no cells with both an exact and an estimator (AtP) row")
    out = []
    for (model, direction, metric, method), g in both.groupby(["model", "direction", "metric", "method_est"]):
        pairs = []
        for sid, s in g.groupby("session_id"):
            x, y = s["effect_exact"].to_numpy(float), s["effect_est"].to_numpy(float)
            signed = method not in UNSIGNED_ESTIMATORS
            kk = min(k, len(s))
            rec = {"model": model, "direction": direction, "metric": metric, "method": method, "scope": "pair",
                   "session_id": sid, "spearman": _spearman(x, y) if signed else np.nan,
                   "spearman_abs": _spearman(np.abs(x), np.abs(y)), "top_k_recall": top_k_recall(x, y, kk),
                   "k": kk, "n_cells": len(s), "n_pairs": 1}
            pairs.append(rec)
        out += pairs
        per = pd.DataFrame(pairs)
        for scope, fn in (("mean", np.nanmean), ("median", np.nanmedian)):
            row = {"model": model, "direction": direction, "metric": metric, "method": method, "scope": scope,
                   "session_id": None, "k": int(per["k"].min()), "n_cells": int(per["n_cells"].sum())}
            for col in ("spearman", "spearman_abs", "top_k_recall"):
                vals = per[col].to_numpy(float)
                row[col] = float(fn(vals)) if np.isfinite(vals).any() else np.nan
            row["n_pairs"] = int(np.isfinite(per["spearman_abs"].to_numpy(float)).sum())
            out.append(row)
    return pd.DataFrame(out)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN with fewer than 3 cells or a constant side (no ranking to compare)."""
    from scipy.stats import spearmanr  # noqa: F811 (imported here: scipy is slow to import)

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    return float(spearmanr(x, y).statistic)


def top_k_recall(exact: np.ndarray, estimate: np.ndarray, k: int = 10) -> float:
    """Share of the k cells of largest |exact effect| that are among the k of largest |estimate| (ties broken by
    cell order, the same way for both)."""
    if k < 1 or len(exact) < k:
        raise PatchingError(f"top_k_recall: k={k} with {len(exact)} cells")
    top = set(np.argsort(-np.abs(exact), kind="stable")[:k])
    got = set(np.argsort(-np.abs(estimate), kind="stable")[:k])
    return len(top & got) / k
