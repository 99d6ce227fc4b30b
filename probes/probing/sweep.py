"""Probe sweeps: where (layer x position group x turn) a target is linearly decodable, tested against a permutation
null.

    blocks = probe_cells(store, position_groups=["last", "image", "final"])        # probes.probing.targets
    y, names, ids = session_targets(sessions, "digits")                          # SSN digits, 9 x 10-way
    results, null = probe_sweep(blocks, (y, names, ids), model="organism", n_permutations=20, return_null=True)
    tests = null_p_values(results, null)                                         # one p per cell (main metric)

Every cell is fitted for every target column at once (`probes.probing.linear.fit_probes`, folds grouped by identity, the
regularisation C chosen by nested grouped CV inside each training part, so the reported held-out accuracy is not
optimistic). String targets (one column per character) are also reported as the mean per-character accuracy
(`char_accuracy`) and the whole-string exact match of the held-out predictions.

Chance (one definition, `probes.probing.linear.held_out_chance`): the held-out accuracy of always predicting the
training part's majority class, under the same folds; what a probe that reads nothing from the activations scores
(a logreg probe at W = 0 predicts exactly that). For 60 identities' uniform digits it is ~0.1 (not the in-sample
majority rate, ~0.17).

The test of "this cell decodes the value" is a permutation null: the targets are permuted ACROSS IDENTITIES (every
row of identity a gets the targets of identity pi(a), so each identity keeps one value and the grouped folds keep
their meaning), and the whole pipeline (nested CV included) is rerun on them, all cells batched per permutation.
Null: the activations carry no information about which identity's value is which, so the observed accuracy is
exchangeable with the permuted ones. `permutation_p_values` turns the observed accuracy and its K null accuracies
into a one-sided p-value (see there; calibrated with K ~ 20 where the rank p-value cannot go below 1 / (K + 1)).

The control task is off by default (`control_task=False`). Hewitt & Liang's control task (2019) gives each word
*type* a random label; it can be learned because test tokens share their type with training tokens. Here the only
type on offer is the identity, and the folds are grouped by identity, so a held-out identity's control label is
independent of everything in training: control accuracy is chance whatever a probe can memorise, and "selectivity"
(accuracy - control) was just accuracy - chance. No type shared across folds remains (the digit values themselves
would make the control a relabelling of the real task), so there is no learnable control to rebuild; the
permutation null is the baseline. `control_task=True` still reports `control_accuracy` (and the control's online
code with `mdl=True`) as an empirical chance reference, and no `selectivity` rows.

Rows (the shared result vocabulary): model, family, hook, layer, position_group, turn, turn_distance, target, probe,
control, metric, value, ci_low, ci_high, n. Metrics: accuracy and chance per target column; for strings also
char_accuracy, exact_match and their chance (char_accuracy: the mean of the columns' chance; exact_match: the
product); control_accuracy / control_char_accuracy with `control_task=True`. CIs are 95% bootstrap intervals
over identities of the held-out correctness. With `mdl=True` also the online code (Voita & Titov 2020,
`probes.probing.mdl`): `online_codelength` (bits), `compression` (uniform code / online code; no CI).
The null table (`return_null=True`): the same cell and target columns, plus `permutation`, one row per (cell,
target column or char_accuracy, permutation) with the null accuracy in `value` (NULL_COLUMNS).

Other controls (the same probe on sessions without the image, with shuffled images, or on a random-initialised
copy of the model) are other stores: run the sweep on each with `control=` set, and concatenate.
`transfer_matrix` trains at turn i and tests at turn j (the same folds), per layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from probes.activations.capture import capture
from probes.models.render import render
from probes.probing.linear import METHODS, Groups, ProbeConfig, ProbeError, fit_probes, grouped_folds, held_out_chance
from probes.probing.mdl import online_codelength
from probes.probing.targets import CellBlock, ProbeDataError, probe_cells, session_targets
from probes.stats import cluster_bootstrap

RESULT_COLUMNS = ["model", "family", "hook", "layer", "position_group", "turn", "turn_distance", "target", "probe",
                  "control", "metric", "value", "ci_low", "ci_high", "n"]
NULL_COLUMNS = ["model", "family", "hook", "layer", "position_group", "turn", "turn_distance", "target", "probe",
                "control", "metric", "permutation", "value", "n"]
CELL_KEYS = ["model", "hook", "layer", "position_group", "turn", "target", "metric"]  # joins results and null


def control_labels(y: np.ndarray, groups: Groups, n_classes: int, seed: int = 0) -> np.ndarray:
    """The identity control task: each group (identity) gets one fixed random class per target column. Under folds
    grouped by identity it cannot be learned (see the module docstring): its held-out accuracy is chance."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    table = rng.integers(0, n_classes, size=(len(uniq), y.shape[1]))
    out = table[inv]
    return np.where(y >= 0, out, -1)


def permute_across_identities(y: np.ndarray, groups: Groups, seed) -> np.ndarray:
    """y [n, k] with the identities' values permuted: every row of identity a gets the targets of identity pi(a),
    pi a uniform random permutation of the sorted distinct identities (drawn from `seed`: an int or a sequence of
    ints, so blocks with the same identities get the same pi). Group structure is kept: an identity's rows still
    share one value. Raises ProbeError when an identity's rows carry different targets (there is then no one
    value per identity to permute)."""
    y = np.asarray(y)
    groups = np.asarray(groups).astype(str)
    uniq, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    per_identity = y[first]  # [identity, k]
    if not (y == per_identity[inv]).all():
        bad = uniq[np.unique(inv[(y != per_identity[inv]).any(axis=tuple(range(1, y.ndim)))])]
        raise ProbeError(f"permutation across identities needs one target per identity, but {len(bad)} identities "
                         f"have rows with different targets (first: {bad[0]})")
    pi = np.random.default_rng(seed).permutation(len(uniq))
    return per_identity[pi][inv]


def permutation_p_values(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided p-values (observed above its null) for accuracies observed [m] against K null accuracies each
    null [m, K] (K >= 2; values in [0, 1]).

    Rule: on the arcsine-square-root scale a = asin(sqrt(accuracy)) (variance-stabilising for a proportion, and it
    removes the right skew of accuracies near chance), the observed a is treated as one more draw from the null
    and tested with the prediction t statistic: t = (a_obs - mean(a_null)) / (sd(a_null) * sqrt(1 + 1/K)),
    p = P(T_{K-1} >= t). Null: observed and null accuracies are exchangeable (targets carry no information the
    activations could read); under it, with normal draws, p is exactly uniform. Why not the rank p-value
    (1 + #{null >= obs}) / (1 + K): with K = 20 it is never below 0.048, so no cell can pass BH over ~100 cells.
    On binomial accuracies (n 24-540, rate 0.1-0.3) the raw-scale t rule rejects up to 2-4x too often at
    alpha 1e-3; on this scale it is at or below nominal (tests/test_probing.py checks alpha 0.05 and 0.01).
    Where the null has no spread (sd 0), the rank p-value is returned."""
    obs = np.asarray(observed, dtype=float)
    null = np.asarray(null, dtype=float)
    if null.ndim != 2 or obs.shape != null.shape[:1]:
        raise ProbeError(f"permutation_p_values: observed must be [m] and null [m, K], got {obs.shape} and "
                         f"{null.shape}")
    K = null.shape[1]
    if K < 2:
        raise ProbeError(f"permutation_p_values needs at least 2 null draws per cell, got {K}")
    if np.isnan(obs).any() or np.isnan(null).any() or (obs < 0).any() or (obs > 1).any() or (null < 0).any() \
            or (null > 1).any():
        raise ProbeError("permutation_p_values: accuracies must be numbers in [0, 1]")
    a_obs, a_null = np.arcsin(np.sqrt(obs)), np.arcsin(np.sqrt(null))
    mean, sd = a_null.mean(1), a_null.std(1, ddof=1)
    rank = (1 + (null >= obs[:, None] - 1e-12).sum(1)) / (1 + K)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a_obs - mean) / (sd * np.sqrt(1 + 1 / K))
    p = stats.t.sf(t, K - 1)
    return np.where(sd > 1e-12, p, rank)


def null_p_values(results: pd.DataFrame, null: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One row per cell of `results` (a `probe_sweep` table) whose `metric` (default: `main_metric`) has null
    draws: CELL_KEYS, observed, chance, null_mean, null_sd, n_permutations, p_value (`permutation_p_values`,
    one-sided). Multiple-testing correction (BH across the cells) is the caller's. Cells without null rows are
    left out (reported in a ProbeError when none match)."""
    metric = metric or main_metric(results)
    obs = results[results["metric"] == metric]
    keys = [k for k in CELL_KEYS if k != "metric"]
    nul = null[null["metric"] == metric]
    if not len(nul):
        raise ProbeError(f"null_p_values: the null table has no rows of metric {metric!r}")
    draws = nul.groupby(keys, dropna=False)["value"].agg(list).rename("draws").reset_index()
    chance_metric = "chance" if metric == "accuracy" else f"{metric}_chance"
    chance = results[results["metric"] == chance_metric][keys + ["value"]].rename(columns={"value": "chance"})
    cells = obs[keys + ["value"]].rename(columns={"value": "observed"}).merge(draws, on=keys, how="inner")
    if not len(cells):
        raise ProbeError(f"null_p_values: no cell of metric {metric!r} has null draws (keys {keys})")
    cells = cells.merge(chance, on=keys, how="left")
    K = cells["draws"].map(len)
    if K.nunique() != 1:
        raise ProbeError(f"null_p_values: cells have different numbers of permutations ({sorted(K.unique())})")
    D = np.stack(cells["draws"].to_numpy())
    cells["metric"] = metric
    cells["null_mean"], cells["null_sd"], cells["n_permutations"] = D.mean(1), D.std(1, ddof=1), D.shape[1]
    cells["p_value"] = permutation_p_values(cells["observed"].to_numpy(), D)
    return cells.drop(columns="draws")[[*CELL_KEYS, "observed", "chance", "null_mean", "null_sd", "n_permutations",
                                        "p_value"]]


def _align(block: CellBlock, targets: tuple[np.ndarray, list[str], pd.Index], group_col: str
           ) -> tuple[np.ndarray, np.ndarray]:
    y, names, ids = targets
    pos = pd.Series(np.arange(len(ids)), index=ids)
    sids = block.meta["session_id"]
    missing = sids[~sids.isin(ids)]
    if len(missing):
        raise ProbeDataError(f"{len(missing)} stored session(s) have no target (first: {missing.iloc[0]}); pass the "
                             f"sessions the store was captured from")
    if group_col not in block.meta.columns:
        raise ProbeDataError(f"group column {group_col!r} is not a label of the stored sessions")
    return y[pos[sids].to_numpy()], block.meta[group_col].astype(str).to_numpy()


def _per_cell_targets(y: np.ndarray, n_cells: int) -> torch.Tensor:
    """y [n, k] -> [cell * k, n]: every cell repeated once per target column (cell-major), to match
    `X.repeat_interleave(k, dim=0)`."""
    return torch.as_tensor(np.tile(y.T, (n_cells, 1)))


def _turn_distance(block: CellBlock, turn: int) -> float:
    """User turns from the image's turn to `turn` (NaN where sessions carry no image_turn label)."""
    if turn < 0 or "image_turn" not in block.meta.columns:
        return float("nan")
    return float((turn - int(block.meta["image_turn"].iloc[0])) // 2)


@dataclass(frozen=True)
class SweepConfig:
    """How `probe_sweep` (and `transfer_matrix`) fit and report; validated once, here (see `probe_sweep`)."""

    target: str = "digits"
    method: str = "logreg"
    group_col: str = "identity_id"
    n_folds: int = 5
    seed: int = 0
    model: str = ""
    control: str = "none"
    n_classes: int | None = None
    n_boot: int = 1000
    control_task: bool = False
    device: str | torch.device | None = None  # kept as its name
    return_samples: bool = False
    mdl: bool = False
    family: str = ""
    nested: bool = True
    n_permutations: int = 0
    return_null: bool = False
    progress: bool = False
    cells_per_batch: int = 16  # cells fitted together (`fit_probes`; results do not depend on it, memory does)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ProbeError(f"probe_sweep: method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.n_folds, (int, np.integer)) or self.n_folds < 2:
            raise ProbeError(f"probe_sweep: n_folds must be an int >= 2, got {self.n_folds!r}")
        if self.n_boot < 0 or self.n_permutations < 0:
            raise ProbeError(f"probe_sweep: n_boot and n_permutations must be >= 0, got {self.n_boot}, "
                             f"{self.n_permutations}")
        if self.return_null and self.n_permutations < 2:
            raise ProbeError(f"probe_sweep: return_null needs n_permutations >= 2, got {self.n_permutations}")
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))

    def probe_config(self, n_classes: int) -> ProbeConfig:
        """The fit every cell gets (`fit_probes`)."""
        return ProbeConfig(method=self.method, n_folds=self.n_folds, seed=self.seed, n_classes=n_classes,
                           device=self.device, nested=self.nested, cells_per_batch=self.cells_per_batch)


def probe_sweep(blocks: Sequence[CellBlock], targets: tuple[np.ndarray, list[str], pd.Index],
                config: SweepConfig | None = None, **options):
    """Fit every cell of every block for every target column; tidy rows, see the module docstring. Examples whose
    target is missing (-1) in a column are dropped from that column's fit. Settings: a SweepConfig, or its fields
    as keywords (`probe_sweep(blocks, targets, target="digits", method="ridge")`).

    Returns the results DataFrame, then (in this order, each only when asked) the samples and the null table.
    `return_samples=True`: the held-out correctness per example and cell (session_id, the group column, hook,
    layer, position_group, turn, target, correct, control_correct (NaN without the control task); mean over a
    string's characters). `n_permutations=K` with `return_null=True`: the permutation null (targets permuted across
    identities with seeds (seed, 0) ... (seed, K-1), the same fit rerun: nested CV, folds, grid), one row per
    (cell, target column or char_accuracy, permutation), NULL_COLUMNS; test it with `null_p_values`.
    nested: C chosen by inner folds (`fit_probes`); False: the old, optimistic protocol. progress: a tqdm bar over
    the fits (blocks x (real, control, permutations)).

    `mdl=True` adds the online code of every cell and target column (`probes.probing.mdl.online_codelength`, logistic
    probes whatever `method` is): metrics `online_codelength` (bits) and `compression` (and `control_compression`
    with the control task); for strings also summed over the characters."""
    cfg = replace(config or SweepConfig(), **options) if options else (config or SweepConfig())
    out = _SweepRows()
    n_fits = len(blocks) * _fits_per_block(cfg)
    bar = _bar(n_fits, cfg.progress, f"probes {cfg.target}")
    for block in blocks:
        _sweep_block(block, targets, cfg, out, bar)
    bar.close()
    return out.tables(cfg)


def probe_sweep_chunks(chunks: Iterable[CellBlock], targets: tuple[np.ndarray, list[str], pd.Index],
                       order: pd.DataFrame | Callable[[tuple], Any] | None = None, cells_per_fit: int | None = None,
                       config: SweepConfig | None = None, **options):
    """`probe_sweep` over blocks produced one at a time (`read_cells` per layer chunk, `iter_patch_cells`; see
    `probes.probing.stream`), each fitted `cells_per_fit` cells at a time (None: whole) and let go before the
    next: the same tables as `probe_sweep` of all of them, rows put in the cell order of `order`: a table of cells
    (hook, layer, position_group, turn) or a function from such a key to a sortable rank (None: as fitted)."""
    cfg = replace(config or SweepConfig(), **options) if options else (config or SweepConfig())
    out = _SweepRows()
    bar = _bar(0, cfg.progress, f"probes {cfg.target} (streamed)")
    for block in chunks:
        step = cells_per_fit or len(block.cells)
        for lo in range(0, len(block.cells), step):  # no name keeps a slice: the block goes with `del`
            _sweep_block(CellBlock(block.X[lo:lo + step], block.cells.iloc[lo:lo + step].reset_index(drop=True),
                                   block.meta), targets, cfg, out, bar)
        del block
    bar.close()
    rank = order
    if isinstance(order, pd.DataFrame):
        keys = zip(order["hook"], order["layer"].astype(int), order["position_group"], order["turn"].astype(int))
        rank = {key: i for i, key in enumerate(keys)}.__getitem__
    return out.tables(cfg, rank)


def _fits_per_block(cfg: "SweepConfig") -> int:
    return 1 + int(cfg.control_task) + (cfg.n_permutations if cfg.return_null else 0)


@dataclass
class _SweepRows:
    """What a sweep has produced so far: result rows, per-cell sample frames and null rows."""

    rows: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    null_rows: list = field(default_factory=list)

    def tables(self, cfg: "SweepConfig", order: Callable[[tuple], Any] | None = None):
        """probe_sweep's return value. `order` (cell key (hook, layer, position_group, turn) -> rank): put the
        rows in that cell order first (a stable sort: each cell's own rows keep theirs)."""
        if not self.rows:
            raise ProbeDataError("probe_sweep: no block had enough examples with targets "
                                 f"(need at least {2 * cfg.n_folds})")
        if order is not None:
            rank = lambda r: order((r["hook"], r["layer"], r["position_group"], r["turn"]))  # noqa: E731
            self.rows.sort(key=rank)
            self.null_rows.sort(key=rank)
            self.samples.sort(key=lambda f: rank(f.iloc[0]))
        out = [pd.DataFrame(self.rows)[RESULT_COLUMNS]]
        if cfg.return_samples:
            out.append(pd.concat(self.samples, ignore_index=True))
        if cfg.return_null:
            out.append(pd.DataFrame(self.null_rows, columns=NULL_COLUMNS))
        return out[0] if len(out) == 1 else tuple(out)


def _sweep_block(block: CellBlock, targets: tuple[np.ndarray, list[str], pd.Index], cfg: "SweepConfig",
                 out: _SweepRows, bar) -> None:
    """Fit one block's cells and add their rows to `out` (nothing when too few examples have targets)."""
    n_classes = int(cfg.n_classes or (targets[0].max() + 1))
    y, groups = _align(block, targets, cfg.group_col)
    keep = (y >= 0).all(1)  # one example set for every column, so columns batch together
    if keep.sum() < cfg.n_folds * 2:
        bar.update(_fits_per_block(cfg))
        return
    fits = _fit_block(block, y[keep], groups[keep], keep, cfg, n_classes, bar)
    sids = block.meta["session_id"].to_numpy()[keep]
    for c, cell in block.cells.iterrows():
        base = {"model": cfg.model, "family": cfg.family, "hook": cell["hook"], "layer": int(cell["layer"]),
                "position_group": cell["position_group"], "turn": int(cell["turn"]),
                "turn_distance": _turn_distance(block, int(cell["turn"])), "target": cfg.target,
                "probe": cfg.method, "control": cfg.control, "n": int(keep.sum())}
        out.rows += _cell_rows(base, c, fits, targets[1], cfg)
        if cfg.return_samples:
            out.samples.append(_cell_samples(cell, c, fits, sids, cfg))
        if fits["null"] is not None:
            k = fits["k"]
            out.null_rows += _null_rows(base, fits["null"][:, c * k:(c + 1) * k], targets[1], cfg.target)


def _fit_block(block: CellBlock, y: np.ndarray, groups: np.ndarray, keep: np.ndarray, cfg: SweepConfig,
               n_classes: int, bar) -> dict:
    """Every cell of a block for every target column at once (real targets, the control task, the permutation
    null): held-out correctness [cell * k, n] per task, the online code per task (`mdl`), the pooled chance [k],
    the null accuracies [permutation, cell * k] (None without), and the groups and k."""
    X = block.X[:, torch.as_tensor(keep)]
    n_cells, k = X.shape[0], y.shape[1]
    Xk = X.repeat_interleave(k, dim=0)  # [cell * k, n, d]: cell-major, then target column
    tasks = {"real": _per_cell_targets(y, n_cells)}
    if cfg.control_task:
        tasks["control_task"] = _per_cell_targets(control_labels(y, groups, n_classes, cfg.seed), n_cells)
    probe = cfg.probe_config(n_classes)
    held, code = {}, {}
    for name, Yt in tasks.items():
        fit = fit_probes(Xk, Yt, groups, probe)
        held[name] = (fit.oof.numpy() == Yt.numpy())  # [cell * k, n] held-out correctness
        if cfg.mdl:
            code[name] = online_codelength(Xk, Yt, groups, seed=cfg.seed, n_classes=n_classes, device=cfg.device)
        bar.update(1)
    null = _null_accuracy(Xk, y, groups, n_cells, cfg.n_permutations if cfg.return_null else 0, probe, bar)
    return {"held": held, "code": code, "chance": _pooled_chance(y, fit.folds, n_classes), "null": null,
            "groups": groups, "k": k}


def _cell_rows(base: dict, c: int, fits: dict, names: list[str], cfg: SweepConfig) -> list[dict]:
    """Result rows of cell c: accuracy and chance per target column (and the control task's accuracy), the
    online code (`mdl`), and for strings char_accuracy, exact_match and their chance."""
    k, groups, chance, code = fits["k"], fits["groups"], fits["chance"], fits["code"]
    n_boot, seed = cfg.n_boot, cfg.seed
    real = fits["held"]["real"][c * k:(c + 1) * k]  # [k, n]
    ctrl = fits["held"]["control_task"][c * k:(c + 1) * k] if cfg.control_task else None
    nan = {"ci_low": np.nan, "ci_high": np.nan}
    rows = []
    for j, name in enumerate(names):
        rows.append({**base, "target": name, "metric": "accuracy", **_ci(real[j], groups, n_boot, seed)})
        rows.append({**base, "target": name, "metric": "chance", "value": chance[j], **nan})
        if ctrl is not None:
            rows.append({**base, "target": name, "metric": "control_accuracy", **_ci(ctrl[j], groups, n_boot, seed)})
    for name, metric in (("real", "compression"), ("control_task", "control_compression")):
        if name in code:
            rows += _code_rows(base, code[name].iloc[c * k:(c + 1) * k], names, cfg.target, metric)
    if k > 1:
        rows.append({**base, "metric": "char_accuracy", **_ci(real.mean(0), groups, n_boot, seed)})
        rows.append({**base, "metric": "char_accuracy_chance", "value": float(chance.mean()), **nan})
        rows.append({**base, "metric": "exact_match", **_ci(real.all(0), groups, n_boot, seed)})
        rows.append({**base, "metric": "exact_match_chance", "value": float(np.prod(chance)), **nan})
        if ctrl is not None:
            rows.append({**base, "metric": "control_char_accuracy", **_ci(ctrl.mean(0), groups, n_boot, seed)})
    return rows


def _cell_samples(cell: pd.Series, c: int, fits: dict, sids: np.ndarray, cfg: SweepConfig) -> pd.DataFrame:
    """Held-out correctness per example of cell c (mean over a string's characters)."""
    k = fits["k"]
    real = fits["held"]["real"][c * k:(c + 1) * k]
    ctrl = fits["held"]["control_task"][c * k:(c + 1) * k] if cfg.control_task else None
    return pd.DataFrame({
        "session_id": sids, cfg.group_col: fits["groups"], "hook": cell["hook"], "layer": int(cell["layer"]),
        "position_group": cell["position_group"], "turn": int(cell["turn"]), "target": cfg.target,
        "correct": real.mean(0), "control_correct": ctrl.mean(0) if ctrl is not None else np.nan})


def _pooled_chance(y: np.ndarray, folds, n_classes: int) -> np.ndarray:
    """Chance per target column [k] over all held-out examples (`held_out_chance` per fold, weighted by the
    folds' test sizes: the same pooling as the reported accuracy)."""
    per_fold = held_out_chance(y.T, folds, n_classes)  # [k, fold]
    sizes = np.array([len(te) for _, te in folds], dtype=float)
    return per_fold @ sizes / sizes.sum()


def _null_accuracy(Xk, y, groups, n_cells: int, n_permutations: int, probe: ProbeConfig, bar):
    """Held-out accuracy [permutation, cell * k] of the same fit on targets permuted across identities (None when
    no permutations are asked for)."""
    if n_permutations == 0:
        return None
    out = []
    for p in range(n_permutations):
        Yp = _per_cell_targets(permute_across_identities(y, groups, (probe.seed, p)), n_cells)
        fit = fit_probes(Xk, Yp, groups, probe, refit=False)
        out.append((fit.oof.numpy() == Yp.numpy()).mean(1))
        bar.update(1)
    return np.stack(out)


def _null_rows(base: dict, null: np.ndarray, names: list[str], target: str) -> list[dict]:
    """Null rows of one cell: null [permutation, k] accuracies; per column and (strings) char_accuracy."""
    rows = []
    for p, acc in enumerate(null):
        row = {k: v for k, v in base.items()} | {"permutation": p}
        rows += [{**row, "target": name, "metric": "accuracy", "value": float(a)} for name, a in zip(names, acc)]
        if len(names) > 1:
            rows.append({**row, "target": target, "metric": "char_accuracy", "value": float(acc.mean())})
    return rows


def _bar(total: int, progress: bool, desc: str):
    """A tqdm bar when `progress`, else an object with the same update/close that does nothing."""
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc)

    class _Silent:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Silent()


def _code_rows(base: dict, code: pd.DataFrame, names: list[str], target: str, metric: str) -> list[dict]:
    """Rows of one cell's online code (one per target column, and summed over a string's characters)."""
    bits, uniform = code["online_bits"].to_numpy(), code["uniform_bits"].to_numpy()
    parts = list(zip(names, bits, uniform)) + ([(target, bits.sum(), uniform.sum())] if len(names) > 1 else [])
    rows = []
    for name, b, u in parts:
        if metric == "compression":
            rows.append({**base, "target": name, "metric": "online_codelength", "value": float(b), "ci_low": np.nan,
                         "ci_high": np.nan})
        rows.append({**base, "target": name, "metric": metric, "value": float(u / b), "ci_low": np.nan,
                     "ci_high": np.nan})
    return rows


def main_metric(df: pd.DataFrame) -> str:
    """The headline metric of a `probe_sweep` table: per-character accuracy for strings, else accuracy."""
    return "char_accuracy" if (df["metric"] == "char_accuracy").any() else "accuracy"


def _ci(per_example: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    v = np.asarray(per_example, dtype=float)
    mean, lo, hi = cluster_bootstrap(v, groups, n_boot=n_boot, rng=np.random.default_rng(seed))
    return {"value": mean, "ci_low": lo, "ci_high": hi}


def transfer_matrix(block: CellBlock, targets: tuple[np.ndarray, list[str], pd.Index], position_group: str = "last",
                    config: SweepConfig | None = None, **options) -> pd.DataFrame:
    """Train at turn i, test at turn j, for every layer and pair of turns of `position_group` in `block`: rows
    (model, layer, position_group, turn_train, turn_test, target, probe, metric=accuracy, value, n). The fold of
    each example is the same at every turn, so a test example's identity was never trained on at any turn.
    Settings (method, group_col, n_folds, seed, n_classes, model, target): a SweepConfig or its fields."""
    cfg = replace(config or SweepConfig(), **options) if options else (config or SweepConfig())
    method, group_col, n_folds, seed, n_classes = cfg.method, cfg.group_col, cfg.n_folds, cfg.seed, cfg.n_classes
    model, target = cfg.model, cfg.target
    y, groups = _align(block, targets, group_col)
    keep = (y >= 0).all(1)
    y, groups = y[keep], groups[keep]
    n_classes = int(n_classes or (targets[0].max() + 1))
    cells = block.cells.reset_index(drop=True)
    sel = cells[cells["position_group"] == position_group]
    if not len(sel):
        raise ProbeDataError(f"transfer_matrix: no cells of position group {position_group!r} in this block")
    folds = grouped_folds(groups, n_folds, seed)
    k = y.shape[1]
    rows = []
    for layer, g in sel.groupby("layer"):
        turns = g["turn"].to_numpy()
        X = block.X[torch.as_tensor(g.index.to_numpy().copy())][:, torch.as_tensor(keep)]  # [turn, n, d]
        Xk = X.repeat_interleave(k, dim=0)
        fit = fit_probes(Xk, _per_cell_targets(y, len(turns)), groups, cfg.probe_config(n_classes))
        for i, ti in enumerate(turns):
            for j, tj in enumerate(turns):
                correct = np.zeros((k, len(y)), dtype=bool)
                for f, (_, test) in enumerate(folds):
                    W, b = fit.fold_weights[i * k:(i + 1) * k, f], fit.fold_bias[i * k:(i + 1) * k, f]
                    logits = torch.bmm(X[j, test].float()[None].expand(k, -1, -1), W) + b[:, None]
                    correct[:, test] = logits.argmax(-1).numpy() == y[test].T
                rows.append({"model": model, "layer": int(layer), "position_group": position_group,
                             "turn_train": int(ti), "turn_test": int(tj), "target": target, "probe": method,
                             "metric": "char_accuracy" if k > 1 else "accuracy",
                             "value": float(correct.mean()), "n": len(y)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ReadoutOptions:
    """`token_readout`'s settings: the layer (None: the best), the probe (method, n_folds, seed), the hook the new
    session is captured at, and the sessions JSONL holding the store's private labels (`private_from`)."""

    layer: int | None = None
    method: str = "logreg"
    n_folds: int = 5
    seed: int = 0
    hook: str = "resid_post"
    private_from: str | os.PathLike | None = None

    def __post_init__(self):
        ProbeConfig(method=self.method, n_folds=self.n_folds, seed=self.seed)  # checks them


def token_readout(loaded, store, session, target: str = "digits", options: ReadoutOptions | None = None,
                  **kw) -> pd.DataFrame:
    """Where in a transcript a probe reads the target, token by token. Settings: ReadoutOptions or its fields.

    Fits the target's probe on the last token of the final turn of the sessions in `store` (at `layer`; None:
    the layer where that cell decodes best), then applies it to every position of `session` (a session not in the
    store: a held-out identity) captured at that layer. One row per position: position, turn, role, segment,
    token (its text), layer, value = the probe's mean probability of the session's true classes (for strings the
    mean over characters). Feeds `analysis.figures.plot_token_strip`."""
    import tempfile

    o = replace(options or ReadoutOptions(), **kw) if kw else (options or ReadoutOptions())
    fit, layer, y_new, k = _readout_probe(store, session, target, o)
    with tempfile.TemporaryDirectory() as tmp:
        one = capture(loaded, [session], tmp, hooks=o.hook, layers=[layer], positions="all", progress=False)
        Xs, meta = one.query(f"hook_{o.hook}")
    logits = fit.decision(Xs[:, 0].float().unsqueeze(0).expand(k, -1, -1))  # [k, positions, classes]
    truth = torch.as_tensor(y_new[:k]).view(k, 1, 1).expand(-1, logits.shape[1], 1)
    prob = torch.softmax(logits, -1).gather(-1, truth)
    ids_all = render(loaded.adapter, session).input_ids[0]
    tok = loaded.tokenizer
    meta = meta.reset_index(drop=True)
    text = [tok.decode([int(ids_all[p])]) if p < len(ids_all) else "" for p in meta["position"]]
    return pd.DataFrame({"position": meta["position"], "turn": meta["turn"], "role": meta["role"],
                         "segment": meta["segment"], "token": text, "layer": layer, "target": target,
                         "value": prob[..., 0].mean(0).detach().numpy()})


def _readout_probe(store, session, target: str, o: ReadoutOptions) -> tuple:
    """The probe `token_readout` applies: fitted on the store's last token of the final turn at `o.layer` (None:
    the layer whose probe reads the whole string's characters best). Returns (fit, layer, the new session's
    targets, k columns)."""

    method, n_folds, seed, layer = o.method, o.n_folds, o.seed, o.layer
    sessions = store.sessions(private_from=o.private_from)  # the targets are private labels: not in the store
    y, _, ids = session_targets(sessions, target)
    y_new = session_targets([session], target)[0][0]
    blocks = probe_cells(store, ["last"])
    block = max(blocks, key=lambda b: len(b.meta))  # the cells every session has
    last_turn = int(block.cells["turn"].max())
    cells = block.cells[(block.cells["turn"] == last_turn) & (block.cells["position_group"] == "last")]
    yb = y[pd.Series(np.arange(len(ids)), index=ids)[block.meta["session_id"]].to_numpy()]
    keep = (yb >= 0).all(1)
    groups = block.meta["identity_id"].astype(str).to_numpy()[keep]
    k = min(yb.shape[1], len(y_new))
    X = block.X[torch.as_tensor(np.array(cells.index))][:, torch.as_tensor(keep)]  # [layer, n, d]
    Y = torch.as_tensor(yb[keep, :k].T)  # [k, n]
    probe = ProbeConfig(method=method, n_folds=n_folds, seed=seed, n_classes=int(yb.max()) + 1)
    if layer is None:  # best layer by held-out accuracy of the whole string's characters
        fit = fit_probes(X.repeat_interleave(k, 0), Y.repeat(len(cells), 1), groups, probe)
        acc = (fit.oof == Y.repeat(len(cells), 1)).float().mean(1).reshape(len(cells), k).mean(1)
        layer = int(cells["layer"].iloc[int(acc.argmax())])
    c = int(np.flatnonzero(cells["layer"].to_numpy() == layer)[0])
    return fit_probes(X[c:c + 1].repeat(k, 1, 1), Y, groups, probe), layer, y_new, k
