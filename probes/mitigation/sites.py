"""Where to intervene: the study's own findings, a random control, and a choice of strength under a KL budget.

- `located_hooks`: the top cells of a patching summary (largest mean effect of restoring a layer's component) as
  hook names, or the best cells of a probe sweep (highest held-out accuracy), strongest first.
- `random_hooks`: the control: the same component at layers drawn at random among those not located.
- `select_steer`: among candidate steers (site x strength), the one with the lowest privacy loss whose mean benign
  next-token KL stays within a budget (as Arditi et al. 2024 choose the refusal direction's layer); every
  candidate's L and KL are returned, so the choice can be checked.
"""

from __future__ import annotations

import random
from typing import Sequence

import pandas as pd

from probes.data.session import Session
from probes.leakage import generate_batch
from probes.mitigation.evaluate import benign_kl
from probes.mitigation.measures import privacy_loss
from probes.mitigation.steer import Steer, intervening
from probes.mitigation.utility import privacy_rows
from probes.models.loading import LoadedModel

HOOK_OF = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
           "mlp_out": "hook_mlp_out"}


def located_hooks(cells: pd.DataFrame, k: int = 1, score: str = "value", component: str | None = None) -> list[str]:
    """Hook names of the `k` cells with the largest `score` (one per layer and component), from a patching summary
    (columns layer, component, value) or a probe sweep (columns layer and a score; component from `component`,
    e.g. "resid_post" for probes of the residual stream)."""
    need = ["layer", score] + ([] if component else ["component"])
    missing = [c for c in need if c not in cells.columns]
    if missing:
        raise ValueError(f"located_hooks: columns {missing} missing (columns: {list(cells.columns)})")
    d = cells.dropna(subset=["layer", score]).copy()
    d["component"] = component or d["component"]
    unknown = sorted(set(d["component"]) - set(HOOK_OF))
    if unknown:
        raise ValueError(f"located_hooks: components {unknown} have no hook (expected {sorted(HOOK_OF)})")
    best = d.groupby(["layer", "component"])[score].mean().sort_values(ascending=False).head(k)
    return [f"blocks.{int(layer)}.{HOOK_OF[comp]}" for layer, comp in best.index]


def random_hooks(located: Sequence[str], n_layers: int, seed: int = 0) -> list[str]:
    """For each located hook, the same component at a random layer that is not located (the control)."""
    taken = {int(h.split(".")[1]) for h in located}
    free = [layer for layer in range(n_layers) if layer not in taken]
    if len(free) < len(located):
        raise ValueError(f"random_hooks: {n_layers} layers leave {len(free)} free for {len(located)} controls")
    layers = random.Random(seed).sample(free, len(located))
    return [f"blocks.{layer}.{h.split('.', 2)[2]}" for layer, h in zip(layers, located)]


def select_steer(loaded: LoadedModel, candidates: Sequence[Steer], privacy: Sequence[Session],
                 benign: Sequence[Session], kl_budget: float = 0.1, max_new_tokens: int = 32) -> pd.DataFrame:
    """One row per candidate: hook, kind, strength, L (worst framing ASR on `privacy`), kl (mean benign KL, nats),
    within_budget and chosen (the lowest L within the budget; ties by lower KL; none chosen if none fits)."""
    rows = []
    for st in candidates:
        with intervening(loaded, [st]):
            answers = generate_batch(loaded, privacy, max_new_tokens=max_new_tokens)
        rows.append({"hook": st.hook, "kind": st.kind, "strength": float(st.strength),
                     "L": privacy_loss(privacy_rows(privacy, answers)),
                     "kl": benign_kl(loaded, benign, [st])})
    out = pd.DataFrame(rows)
    out["within_budget"] = out["kl"] <= kl_budget
    out["chosen"] = False
    ok = out[out["within_budget"]]
    if len(ok):
        out.loc[ok.sort_values(["L", "kl"]).index[0], "chosen"] = True
    return out
