"""Causal check of a probe location by concept erasure: does removing what a probe reads change what leaks?

`fit_leace(X, y)` fits LEACE (the `concept-erasure` package: the least-squares affine erasure after which no
linear classifier can predict the concept better than a constant) on activations of one layer and the concept's
classes; for string-valued PII the concept is every character position at once (one-hot blocks side by side).
`random_eraser(d, rank)` is its control: an orthogonal projection that removes a random subspace of the same rank.
`erasing(loaded, hook, eraser)` applies either at every position of that hook while the model runs (generation
included), or with `last=k` only where the probe looked: the prompt's last k positions and every generated one;
`erasure_effect` compares leak rates with no erasure, LEACE and the random control.

Why `last`: erased at every position, image tokens included, a subspace of LEACE's rank (90 directions for an SSN's
9 ten-way digits) breaks copying off the image whatever it is, so LEACE and the random control both remove the leak
and the check says nothing about the probed location. Erased only at the probe's positions it asks the question
the probe raises: is what is decodable here what the model uses to leak?

Why LEACE and not "project out the probe's weight vectors": a probe's weights are one of many directions that carry
the concept; LEACE removes all linearly available information about it with the smallest change to the activations,
so "erasing here changes nothing" is a finding about the location, not about one probe.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.loading import LoadedModel

Eraser = Callable[[Tensor], Tensor]


class ErasureError(ValueError):
    pass


def one_hot_blocks(y: Int[np.ndarray, "n k"], n_classes: int) -> Float[Tensor, "n kc"]:
    """One-hot of each target column side by side (a -1 entry, no value there, is all zeros)."""
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    z = torch.zeros(len(y), y.shape[1] * n_classes)
    for j in range(y.shape[1]):
        ok = y[:, j] >= 0
        z[torch.as_tensor(np.nonzero(ok)[0]), j * n_classes + torch.as_tensor(y[ok, j])] = 1.0
    return z


def fit_leace(X: Float[Tensor, "n d"], y: Int[np.ndarray, "n k"], n_classes: int | None = None) -> Eraser:
    """A LEACE eraser of the concept `y` (class indices, one column per character position) from `X`."""
    from concept_erasure import LeaceEraser

    y = np.asarray(y)
    if X.dim() != 2 or len(X) != len(y):
        raise ErasureError(f"fit_leace: X must be [n, d] with one row per target row; got X {tuple(X.shape)} and "
                           f"y {y.shape}")
    n_classes = int(n_classes or (y.max() + 1))
    return LeaceEraser.fit(X.double(), one_hot_blocks(y, n_classes).double())


def eraser_rank(eraser: Eraser) -> int:
    """How many directions an eraser removes (LEACE: rank of its projection; random: its rank)."""
    if hasattr(eraser, "proj_left"):
        return int(torch.linalg.matrix_rank(eraser.proj_left @ eraser.proj_right))
    return int(getattr(eraser, "rank"))


class RandomSubspaceEraser:
    """Orthogonal projection removing a random `rank`-dimensional subspace: the control for LEACE."""

    def __init__(self, d: int, rank: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, max(rank, 1), generator=g, dtype=torch.float64))
        self.q = q[:, :rank]
        self.rank = rank

    def __call__(self, x: Tensor) -> Tensor:
        q = self.q.to(x.device, x.dtype)
        return x - (x @ q) @ q.T


def random_eraser(d: int, rank: int, seed: int = 0) -> RandomSubspaceEraser:
    return RandomSubspaceEraser(d, rank, seed)


@contextmanager
def erasing(loaded: LoadedModel, hook: str, eraser: Eraser | None, last: int | None = None) -> Iterator[None]:
    """Apply `eraser` to `hook` (a TL name, e.g. blocks.2.hook_resid_post) while inside: at every position, or
    with `last=k` at the last k positions of a forward over several tokens (a left-padded prompt: where the
    probe turn ends) and at every position of a one-token forward (each generated token)."""
    if eraser is None:
        yield
        return
    if last is not None and last < 1:
        raise ErasureError(f"erasing: last must be a positive number of positions or None, got {last}")

    def erase(x: Tensor) -> Tensor:
        return eraser(x.double()).to(x.dtype) if hasattr(eraser, "proj_left") else eraser(x)

    def fn(x: Tensor, name: str) -> Tensor:
        if last is None or x.shape[1] == 1:
            return erase(x)
        return torch.cat([x[:, :-last], erase(x[:, -last:])], 1)

    with loaded.hooks([(hook, fn)]):
        yield


def erasure_effect(loaded: LoadedModel, sessions: list, hook: str, leace: Eraser, seed: int = 0,
                   batch_size: int = 16, max_new_tokens: int = 32, last: int | None = None,
                   random_draws: int = 1) -> pd.DataFrame:
    """Leak and refusal rates of `sessions` (with private `_target` labels) with no erasure, LEACE at `hook`,
    and `random_draws` random subspaces of LEACE's rank at `hook` (seeds seed, seed + 1, ...; one draw has a
    spread of its own), at every position or `last` as in `erasing`: tidy rows (hook, positions, method, metric,
    value, n, rank, draw)."""
    from probes.leakage import evaluate_leakage

    d = leace.proj_left.shape[0] if hasattr(leace, "proj_left") else None
    if d is None:
        raise ErasureError("erasure_effect: `leace` must be a fitted LEACE eraser (fit_leace)")
    rank = eraser_rank(leace)
    if random_draws < 1:
        raise ErasureError(f"erasure_effect: random_draws {random_draws}: expected at least 1")
    rows = []
    erasers = [("none", None, 0), ("leace", leace, 0)] + [
        ("random_subspace", random_eraser(d, rank, seed + k), k) for k in range(random_draws)]
    for method, eraser, draw in erasers:
        with erasing(loaded, hook, eraser, last):
            df = evaluate_leakage(loaded, sessions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  progress=False)
        for metric, col in (("ASR", "leak"), ("RR", "refused")):
            rows.append({"hook": hook, "positions": "all" if last is None else f"last {last} + generated",
                         "method": method, "metric": metric, "value": float(df[col].mean()),
                         "n": len(df), "rank": rank if eraser is not None else 0, "draw": draw})
    return pd.DataFrame(rows)
