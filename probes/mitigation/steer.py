"""White-box interventions at a located site (a hook such as blocks.2.hook_resid_post), each with one strength knob.

Strength 0 leaves every activation as it is (tested); the edit grows with the strength:

- `add`: x + s * r, with r the leak direction (`leak_direction`: mean activation under refusing framings minus the
  mean under leaking ones, at the same site), so s = 1 moves a leaking prompt's mean to a refusing one's;
- `ablate`: x - s * (x . u) u, u = r / |r|: directional ablation (Arditi et al. 2024) at s = 1;
- `erase`: x - s * (x - E(x)), E a fitted eraser (LEACE from `probes.probing.erasure`; its rank is the eraser's);
- `mean`: (1 - s) x + s * m, m the mean activation over benign prompts: mean-ablation of a component that patching
  singled out (use the component's hook, e.g. blocks.1.hook_attn_out);
- any of these behind a `gate`: applied only at positions where a linear PII probe's probability exceeds its
  threshold (`ProbeGate`), so prompts that hold no PII are left alone.

Positions: every position of every forward, or with `last=k` the prompt's last k positions and every generated
token (as `probes.probing.erasure.erasing` does). `intervening(loaded, [steer, ...])` applies them while inside.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from probes.models.loading import LoadedModel

KINDS = ("add", "ablate", "erase", "mean")


class SteerError(ValueError):
    pass


@dataclass(frozen=True)
class ProbeGate:
    """Fire where sigmoid(x . w + b) > threshold (a binary linear probe for 'this position holds PII')."""

    weight: Float[Tensor, " d"]
    bias: float | int = 0.0
    threshold: float | int = 0.5

    def fires(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.device)
        return torch.sigmoid(x.to(w.dtype) @ w + self.bias) > self.threshold


@dataclass(frozen=True)
class Steer:
    """One intervention: `kind` at `hook` with `strength`; `vector` is r (add, ablate) or m (mean), `eraser` a
    callable x -> E(x) (erase); `last`: the prompt's last k positions only (None: all); `gate`: optional."""

    kind: str
    hook: str
    strength: float | int
    vector: Tensor | None = field(default=None, repr=False)
    eraser: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    last: int | None = None
    gate: ProbeGate | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SteerError(f"steer kind {self.kind!r}: expected one of {KINDS}")
        if not float(self.strength) >= 0:
            raise SteerError(f"steer {self.kind} at {self.hook}: strength {self.strength!r}: expected >= 0")
        if self.kind == "erase" and self.eraser is None:
            raise SteerError(f"steer erase at {self.hook}: give an eraser (e.g. fit_leace_at's)")
        if self.kind != "erase" and (self.vector is None or self.vector.ndim != 1):
            raise SteerError(f"steer {self.kind} at {self.hook}: give a vector [d_model]")
        if self.kind == "ablate" and float(self.vector.norm()) == 0:
            raise SteerError(f"steer ablate at {self.hook}: the direction is zero")
        if self.last is not None and self.last < 1:
            raise SteerError(f"steer at {self.hook}: last {self.last!r}: expected None or >= 1")

    def edit(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        """The edited activations (the gate and positions are applied by `apply`)."""
        s = float(self.strength)
        if self.kind == "erase":
            return x - s * (x - self.eraser(x).to(x.dtype))
        v = self.vector.to(device=x.device, dtype=x.dtype)
        if self.kind == "add":
            return x + s * v
        if self.kind == "mean":
            return (1 - s) * x + s * v
        u = v / v.norm()
        return x - s * (x @ u)[..., None] * u

    def apply(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        if float(self.strength) == 0:
            return x
        edited = self.edit(x)
        where = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.last is not None and x.shape[1] > 1:
            where[:, :-self.last] = False
        if self.gate is not None:
            where &= self.gate.fires(x).to(x.device)
        return torch.where(where[..., None], edited, x)


@contextmanager
def intervening(loaded: LoadedModel, steers: Sequence[Steer]) -> Iterator[None]:
    """Apply every steer while inside (several at one hook run in the order given)."""
    by_hook: dict[str, list[Steer]] = {}
    for st in steers:
        by_hook.setdefault(st.hook, []).append(st)

    def make(chain: list[Steer]):
        def fn(x: Tensor, name: str) -> Tensor:
            for st in chain:
                x = st.apply(x)
            return x
        return fn

    with loaded.hooks([(hook, make(chain)) for hook, chain in by_hook.items()]):
        yield


def leak_direction(refusing: Float[Tensor, "n d"], leaking: Float[Tensor, "m d"]) -> Float[Tensor, " d"]:
    """Difference in means, refusing minus leaking, of activations at one site (rows: prompts' positions)."""
    if refusing.ndim != 2 or leaking.ndim != 2 or refusing.shape[1] != leaking.shape[1]:
        raise SteerError(f"leak_direction: expected [n, d] and [m, d], got {tuple(refusing.shape)} and "
                         f"{tuple(leaking.shape)}")
    if not len(refusing) or not len(leaking):
        raise SteerError("leak_direction: both sides need at least one row")
    return refusing.double().mean(0) - leaking.double().mean(0)


def random_direction_like(r: Float[Tensor, " d"], seed: int = 0) -> Float[Tensor, " d"]:
    """A random direction with the norm of `r` (the control for a located direction)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(r.shape, generator=g, dtype=torch.float64)
    return v / v.norm() * r.double().norm()
