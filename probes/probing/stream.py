"""Probe sweeps that stream from disk under a memory cap: a store larger than memory fitted cell by cell.

    plan = plan_cells(store, ["last", "image"])           # probes.probing.targets: from the manifest, no tensor read
    df = probe_sweep_streamed(plan, targets, max_memory_mb=2048, target="digits")

The same tables as `probe_sweep(probe_cells(store, ...), targets, ...)` (rows, order, accuracies, null draws):
a cell's fit, its folds, bootstrap and permutation draws depend only on its own activations, the targets, the
groups and the seed, so splitting the sweep changes nothing. What the cap covers (`stream_budget`, in bytes):

    reserved   held for the whole sweep: the plan (`CellPlan.nbytes`), the result rows it will produce, and an
               eighth of the cap for the allocators' slack (SLACK_SHARE)
    means      the cell means of one chunk of layers (every block), their fill masks and the blocks' labels
    read       one query: a batch of sessions' vectors at those layers, their manifest rows, one shard's span
               (mapped, copied and indexed) and the manifest row group the query decodes
    fit        one slice of a block's cells: its inputs, outputs and `fit_probes`' working set

The peak is estimated as reserved + means + max(read, fit) (reading and fitting never overlap). Not covered:
the interpreter and the libraries' code and allocator pools, the store object and the targets the caller
holds, which any sweep needs (benchmarks/streaming.py measures what the sweep adds above them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import pandas as pd

from probes.probing.sweep import SweepConfig, probe_sweep_chunks
from probes.probing.targets import CellBlock, CellPlan, ProbeDataError, read_cells

MB = 2 ** 20
META_BYTES = 1024  # a manifest row of a query's answer, with its transient string splits and row lists
SCAN_BYTES = 256  # a manifest row decoded by a filtered read (the row groups it scans), all columns
ROW_BYTES = 1600  # a result or null row: its dict while the sweep runs, plus its share of the final tables
SAMPLE_BYTES = 160  # a held-out sample (return_samples): its row in a cell's frame and in the concatenation
TARGET_BYTES = 128  # a targets row while a slice is aligned to them (an index and its hash table)
N_CS = 7  # the C grid fitted (probes.probing.linear.DEFAULT_CS)
# Left to what the estimates do not see: memory freed but kept by the allocators (glibc's heap between objects
# still alive, pyarrow's scan threads' stacks and arenas). Measured on benchmarks/streaming.py at a 32 MB cap:
# 3-5 MB above the live data.
SLACK_SHARE = 1 / 8

__all__ = ["StreamBudget", "stream_budget", "probe_sweep_streamed", "probe_sweep_chunks"]


@dataclass(frozen=True)
class StreamBudget:
    """How a streamed sweep splits its work to stay under `max_memory_mb` (`stream_budget`): layers read per pass,
    stored positions per query, cells per fit (a slice of a block) and cells solved together inside a fit; and the
    estimates, in bytes, of what is resident at once (see the module docstring): `reserved`, `means`, `read`,
    `fit`."""

    layers_per_chunk: int
    positions_per_read: int
    cells_per_fit: int
    cells_per_batch: int
    means: int
    read: int
    fit: int
    reserved: int = 0

    @property
    def total(self) -> int:
        """Peak estimate: what is reserved, the means, and the larger of reading and fitting."""
        return self.reserved + self.means + max(self.read, self.fit)


def _fit_bytes(n: int, d: int, k: int, n_classes: int, cfg: SweepConfig) -> tuple[int, int]:
    """(bytes per cell of a fit's inputs and outputs, bytes of `fit_probes`' working set per cell solved together)
    for n examples of width d, k target columns: X[keep] and its k-fold repeat (float32), the finiteness mask, the
    folds' and all-data probes; per solved cell the centred/standardised copies, the d x d covariance and its
    eigenvectors, the solver's logits and L-BFGS state (`fit_probes`' own estimate, 100 n Q K) and the C path."""
    Q = cfg.n_folds * (3 + 1) + 1 if cfg.nested else cfg.n_folds + 1  # training parts (3 inner folds nested)
    K = n_classes
    per_cell = n * d * 4 * (1 + k) + n * d * k + (cfg.n_folds + 2) * d * K * 4 * k
    per_solved = 6 * n * d * 4 + 4 * d * d * 4 + 100 * n * Q * K + 2 * Q * N_CS * d * K * 4
    if cfg.method == "ridge":
        per_solved += (Q + 1) * (n * d + min(n, d) ** 2 + N_CS * d * K) * 4
    return per_cell, per_solved


def result_bytes(plan: CellPlan, k: int, cfg: SweepConfig) -> int:
    """What the sweep's output holds by its end: result and null rows (ROW_BYTES each) for every planned cell,
    and with `return_samples` one sample per example and cell."""
    per_column = 2 + int(cfg.control_task)
    rows = k * per_column + (4 + int(cfg.control_task) if k > 1 else 0)
    if cfg.mdl:
        rows += (k + int(k > 1)) * per_column
    if cfg.return_null:
        rows += cfg.n_permutations * (k + int(k > 1))
    cells = sum(len(keys) for _, keys in plan.blocks) * len(plan.layers)
    samples = plan.vectors_per_layer() * len(plan.layers) * SAMPLE_BYTES if cfg.return_samples else 0
    return cells * rows * ROW_BYTES + samples


def _means_bytes(plan: CellPlan) -> int:
    """Per layer of a chunk: every block's cell means (float32), fill masks and labels (plain values)."""
    labels = len(plan.labels.columns) * 8 + 64
    return sum(len(idx) * len(keys) * (plan.d * 4 + 1) + len(idx) * labels for idx, keys in plan.blocks)


def stream_budget(plan: CellPlan, k: int, n_classes: int, max_memory_mb: float, cfg: SweepConfig,
                  n_targets: int = 0) -> StreamBudget:
    """Split a streamed sweep of `plan` (k target columns, n_classes classes, n_targets rows of targets) so that
    the estimate of everything it holds at once (module docstring) stays under `max_memory_mb`: what is reserved
    first, then half the rest for the cell means of a layer chunk, the other half for one read or one fit.
    ProbeDataError, naming the smallest cap that works, when even one layer, one session or one cell does not
    fit."""
    cap = int(max_memory_mb * MB)
    d, item, stored = plan.d, plan.itemsize, len(plan.store.layers(plan.kind))
    n = max(len(idx) for idx, _ in plan.blocks)
    reserved = plan.nbytes() + result_bytes(plan, k, cfg) + int(cap * SLACK_SHARE)
    per_layer = _means_bytes(plan)
    per_cell, per_solved = _fit_bytes(n, d, k, n_classes, cfg)
    align = n_targets * TARGET_BYTES
    rest = cap - reserved
    cpb = 16
    while cpb > 1 and cpb * per_solved > rest // 4:
        cpb //= 2
    biggest = int(plan.positions.max())
    fixed = plan.scan_rows * SCAN_BYTES + biggest * stored * d * item  # a scanned row group, a mapped shard span

    def read(positions: int, lc: int) -> int:  # one query: its vectors, manifest rows, a shard span copied twice
        return fixed + positions * (lc * d * item + META_BYTES) + 2 * biggest * lc * d * item

    need = reserved + 2 * per_layer + max(read(biggest, 1), per_cell + per_solved + align)
    lc = min(len(plan.layers), max(rest, 0) // 2 // per_layer)
    # A session is never split across reads: fewer layers a chunk until the largest session's read fits beside them.
    while lc > 1 and lc * per_layer + read(biggest, lc) > rest:
        lc -= 1
    if lc < 1 or need > cap:
        raise ProbeDataError(f"max_memory_mb={max_memory_mb}: too small for this sweep ({n} sessions, "
                             f"{plan.vectors_per_layer()} cell examples per layer of width {d}, plan, results and "
                             f"slack {reserved / MB:.1f} MB); it needs at least {need / MB:.1f} MB")
    left = rest - lc * per_layer
    positions = max(biggest, (left - read(0, lc)) // (lc * d * item + META_BYTES))
    fit_cells = max(1, (left - cpb * per_solved - align) // per_cell)
    return StreamBudget(lc, int(positions), int(fit_cells), cpb, lc * per_layer, read(int(positions), lc),
                        int(fit_cells) * per_cell + cpb * per_solved + align, reserved)


def probe_sweep_streamed(plan: CellPlan, targets: tuple[np.ndarray, list[str], pd.Index],
                         max_memory_mb: float | None = None, config: SweepConfig | None = None,
                         budget: StreamBudget | None = None, **options):
    """`probe_sweep(probe_cells(...), targets, ...)` for a store larger than memory: the same tables, with the
    activations read and fitted in parts so that the estimate of what the sweep holds (the plan, the result rows,
    the means of a layer chunk and one read or fit; `stream_budget`) stays under `max_memory_mb`. Settings: a
    SweepConfig or its fields. `budget`: a split given as it is, instead of the one `max_memory_mb` implies.

    Layers are read in chunks, each by batches of sessions (`read_cells`: a batch is reduced to its cell means at
    once); each chunk's blocks are fitted a slice of cells at a time; the rows are put in `probe_sweep`'s order
    (block, then its cells, then layer) at the end."""
    cfg = replace(config or SweepConfig(), **options) if options else (config or SweepConfig())
    if budget is None:
        if max_memory_mb is None:
            raise ProbeDataError("probe_sweep_streamed: give max_memory_mb (or a StreamBudget)")
        n_classes = int(cfg.n_classes or (targets[0].max() + 1))
        budget = stream_budget(plan, targets[0].shape[1], n_classes, max_memory_mb, cfg, len(targets[2]))
    cfg = replace(cfg, cells_per_batch=min(cfg.cells_per_batch, budget.cells_per_batch))
    key_rank = {key: (b, i) for b, (_, keys) in enumerate(plan.blocks) for i, key in enumerate(keys)}
    layer_rank = {layer: i for i, layer in enumerate(plan.layers)}

    def rank(cell: tuple) -> tuple[int, int, int]:  # (hook, layer, position_group, turn) -> probe_sweep's order
        return key_rank[(cell[2], int(cell[3]))] + (layer_rank[int(cell[1])],)

    return probe_sweep_chunks(_chunks(plan, budget), targets, rank, cells_per_fit=budget.cells_per_fit, config=cfg)


def _chunks(plan: CellPlan, budget: StreamBudget) -> Iterator[CellBlock]:
    """The blocks of each layer chunk, read once the previous chunk's are let go (none is referenced here once
    handed out)."""
    lc = budget.layers_per_chunk
    for lo in range(0, len(plan.layers), lc):
        blocks = read_cells(plan, plan.layers[lo:lo + lc], budget.positions_per_read)
        while blocks:
            yield blocks.pop(0)
