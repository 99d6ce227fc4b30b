"""Online code (MDL) of probe labels, every cell batched: the second probe metric beside held-out accuracy.

Voita & Titov 2020 ("Information-Theoretic Probing with Minimum Description Length"): the labels are sent block by
block, each block encoded by a probe trained on every block before it; the first block goes with the uniform code
(log2 K bits a label). The total (the online codelength) is small when a few examples already give a good probe
and large when the probe only gets there by fitting many examples; `compression` = uniform codelength / online
codelength is 1 when nothing is learnt. Accuracy alone cannot tell those two apart: the control task (Hewitt &
Liang) is one answer, the codelength another, from the real labels alone.

    code = online_codelength(X, y, groups)      # X [cell, n, d]; one row per cell

- Examples are ordered group by group (the groups shuffled with `seed`) and block ends sit at `fractions` of n,
  moved up to the next group boundary: no identity is in a block and in the prefix that encodes it, as no identity
  is in the train and test part of a fold in `fit_probes`.
- Each prefix's probe is `fit_probes`' L2 multinomial logistic regression (the same objective, standardisation on
  its own training part, and solver): every prefix of a chunk of cells is one problem of one batched solve, warm
  started along the C grid (every C of it, or up to a given C).
- A prefix's probe predicts (m p + K u) / (m + K): its softmax p mixed with the uniform u as m examples and K
  pseudo-counts (Laplace's rule, which it is for a probe that has learnt only the class frequencies). The probe's
  intercepts are unpenalised, so on a prefix of a dozen examples they fit the frequencies exactly and a class
  absent there gets probability ~0: without the mixture one such label could cost more than the rest of its block;
  with it, at most log2(m + K) bits.

Columns: cell, C (the penalty used), online_bits, uniform_bits (n log2 K), compression, n, blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.probing.linear import DEFAULT_CS, Activations, Groups, Labels, ProbeError, check_inputs
from probes.probing.solver import MASKED, LogReg, SolverOptions, raw_weights, solve_path, standardisation

# Voita & Titov start at 0.1% of ~10^5 examples; probe sets here hold 10^2-10^4, so the first block is 1/64.
DEFAULT_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def _check_fractions(fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or len(fr) < 2 or (fr <= 0).any() or (np.diff(fr) <= 0).any() or fr[-1] != 1.0:
        raise ProbeError(f"fractions must rise strictly from > 0 to 1.0 (two blocks at least), got {list(fractions)}")
    return fr


def block_order(groups: Groups, fractions: Sequence[float] | np.ndarray = DEFAULT_FRACTIONS, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(order [n], ends [blocks]): example indices group by group in a seeded random order of the groups, and each
    block's end in that order (exclusive), always at a group boundary; the last end is n."""
    fr = _check_fractions(fractions)
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(uniq))[inv]  # where each example's group goes
    order = np.argsort(rank, kind="stable")
    bounds = np.append(np.flatnonzero(np.diff(rank[order])) + 1, len(order))  # ends of the groups, in order
    ends = np.unique(bounds[np.searchsorted(bounds, np.ceil(fr * len(order)))])
    if len(ends) < 2:
        raise ProbeError(f"{len(uniq)} group(s) make one block; the online code needs two at least")
    return order, ends


@dataclass(frozen=True)
class CodeConfig:
    """How `online_codelength` codes: block ends at `fractions` of n (checked here), groups shuffled with `seed`,
    and the probes' solver (`tol`, `max_iter`, `cells_per_batch` cells at a time on `device`)."""

    fractions: Sequence[float] | np.ndarray = DEFAULT_FRACTIONS  # kept as a tuple
    seed: int = 0
    n_classes: int | None = None
    device: str | torch.device | None = None  # kept as its name
    tol: float = 1e-4
    max_iter: int = 100
    cells_per_batch: int = 16

    def __post_init__(self):
        object.__setattr__(self, "fractions", tuple(float(f) for f in np.asarray(self.fractions).reshape(-1)))
        _check_fractions(self.fractions)
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        if int(self.cells_per_batch) < 1:
            raise ProbeError(f"cells_per_batch must be >= 1, got {self.cells_per_batch!r}")


def online_codelength(X: Activations, y: Labels, groups: Groups,
                      C: float | Sequence[float] | np.ndarray | None = None, config: CodeConfig | None = None,
                      **options) -> pd.DataFrame:
    """The online codelength of y given each cell's activations (see the module docstring). X [cell, n, d], y [n]
    or [cell, n], groups [n]. Settings: a CodeConfig, or its fields as keywords (`fractions=`, `seed=`, ...).

    C: the logistic probe's penalty (sklearn's C). None (the default): every C of `DEFAULT_CS` is run and each cell
    keeps its shortest code, plus log2(len(DEFAULT_CS)) bits to say which C (a two-part code: the choice is paid for,
    so choosing cannot make noise compress). A number, or one per cell: that C alone, nothing added."""
    cfg = replace(config or CodeConfig(), **options) if options else (config or CodeConfig())
    seed, n_classes, device, fractions = cfg.seed, cfg.n_classes, cfg.device, cfg.fractions
    X, Y, K = check_inputs(X, y, groups, "logreg", n_classes)
    n_cells = X.shape[0]
    select = C is None
    Cs = DEFAULT_CS if select else np.asarray(C, dtype=np.float64).reshape(-1)
    if not select and Cs.size == 1:
        Cs = np.full(n_cells, Cs[0])
    if not select and (Cs.shape != (n_cells,) or not np.isfinite(Cs).all() or (Cs <= 0).any()):
        raise ProbeError(f"C must be None, one positive value or one per cell ({n_cells}), "
                         f"got {np.asarray(C).tolist()}")
    order, ends = block_order(groups, fractions, seed)
    device = torch.device(device) if device is not None else X.device
    idx = torch.as_tensor(order)
    pos = torch.arange(len(order), device=device)
    prefixes = torch.stack([pos < int(e) for e in ends[:-1]])  # [block - 1, n]: what encodes the next block
    grid = np.unique(Cs)
    at = None if select else torch.as_tensor(np.searchsorted(grid, Cs), device=device)
    totals = []
    for lo in range(0, n_cells, cfg.cells_per_batch):
        hi = lo + cfg.cells_per_batch
        # block order chunk by chunk: X may be a repeated view of one cell (a string's characters), never copied whole
        totals.append(_total_bits(X[lo:hi, idx].to(device=device, dtype=torch.float32), Y[lo:hi, idx].to(device), K,
                                  prefixes, ends, grid, None if select else at[lo:hi],
                                  SolverOptions(cfg.tol, cfg.max_iter)))
    total = torch.cat(totals).cpu().numpy()  # [cell, C] bits of the whole code at each C of `grid`
    if select:
        pick = total.argmin(1)
        online, chosen = total[np.arange(n_cells), pick] + math.log2(len(grid)), grid[pick]
    else:
        online, chosen = total[:, 0], Cs
    uniform = len(order) * math.log2(K)
    return pd.DataFrame({"cell": np.arange(n_cells), "C": chosen, "online_bits": online, "uniform_bits": uniform,
                         "compression": uniform / online, "n": len(order), "blocks": len(ends)})


def _total_bits(X: Float[Tensor, "c n d"], Y: Int[Tensor, "c n"], K: int, prefixes: Tensor, ends: np.ndarray,
                grid: np.ndarray, at: Tensor | None, options: SolverOptions) -> Float[Tensor, "c C"]:
    """Bits of the whole code of a chunk of cells (examples already in block order): at every C of the grid
    ([c, len(grid)]) when `at` is None, else at each cell's grid[at] ([c, 1])."""
    c, _, d = X.shape
    X, _, M, mean, std = standardisation(X, prefixes)  # X centred per cell (logits below need no centre)
    q = M.shape[0]
    Y1h = torch.nn.functional.one_hot(Y, K).to(X.dtype)
    class_ok = torch.einsum("qn,cnk->cqk", M, Y1h) > 0  # classes present in each prefix

    def bits(W, b):  # [c, q] float64: bits of block i + 1 under prefix i's probe, Laplace-mixed
        Wr, br = raw_weights(W, b.masked_fill(~class_ok, MASKED), mean, std)
        out = []
        for i in range(q):
            rows, m = slice(int(ends[i]), int(ends[i + 1])), int(ends[i])
            logits = torch.bmm(X[:, rows], Wr[:, i]) + br[:, i, None]
            p = torch.softmax(logits, -1).gather(-1, Y[:, rows, None])[..., 0].double()
            out.append(-torch.log2((m * p + 1.0) / (m + K)).sum(1))
        return torch.stack(out, 1)

    solver = LogReg(X, Y1h, M, (mean, std), class_ok, options)
    zeros = X.new_zeros(c, q, d, K), X.new_zeros(c, q, K)
    first = int(ends[0]) * math.log2(K)
    if at is None:
        _, _, per_C, _ = solve_path(solver, slice(0, q), grid, M.sum(1), *zeros, bits)  # [c, q, C]
        return first + per_C.sum(1)
    W, b, _, _ = solve_path(solver, slice(0, q), grid[:int(at.max()) + 1], M.sum(1), *zeros, None, frozen_after=at)
    return first + bits(W, b).sum(1, keepdim=True)
