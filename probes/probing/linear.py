"""Linear probes fitted for every cell of a sweep at once: one batched torch problem, not a loop of sklearn fits.

A *cell* is one slice of activations that gets its own probe (a layer x position group x turn, say). All cells share
the examples, their groups (identities or documents) and the folds; each has its own activations X[cell] [n, d] and
may have its own labels (y [cell, n]: one character position per cell, say).

    fit = fit_probes(X, y, groups)                  # X [cell, n, d], y [n] or [cell, n], groups [n]
    fit.table                                       # one row per (cell, outer fold): accuracy, chance, C, ...
    fit.table.groupby("cell")[["accuracy", "chance"]].mean()
    fit.predict(X_new)                              # [cell, m] labels from the all-data refit
    fit.weights, fit.bias                           # [cell, d, classes], [cell, classes] in raw activation units

Protocol (mirrors sklearn's LogisticRegressionCV with `cv=` grouped folds, the usual probing recipe):
- Folds are grouped (`grouped_folds`): no identity/document is in both the train and the test part of a fold.
- Each feature is standardised with the mean/std of the fold's training part only (as a StandardScaler in a
  Pipeline would be); the L2 penalty acts on the standardised weights.
- Regularisation by nested CV (default): inside each outer fold's training part, `inner_folds` grouped inner folds
  score every C of the grid; the C with the best mean inner held-out accuracy (first best in ascending C, as
  sklearn does) is that outer fold's C, and the table reports the outer test part's accuracy at it. The outer test
  part never takes part in choosing, so the reported accuracy is an honest estimate (under the null its mean is
  chance; choosing C on the reporting folds, `nested=False`, scored ~0.03-0.04 above chance on 60 identities'
  permuted digits, benchmarks/validity_probes.py). The all-data probe (weights, predict) is refitted at the C with
  the best mean outer-fold accuracy. Every training part (outer and inner) of every cell is one problem of the same
  batched solve, so nested CV costs about (n_folds * (inner_folds + 1) + 1) / (n_folds + 1) times a flat fit.
- logreg: for every C of the grid and every training part, an L2 multinomial logistic regression is fitted on the
  training part and scored on its test part.
  Objective (sklearn's): mean cross-entropy over the training part + 1 / (2 C n_train) * ||W||^2, intercept free.
  For two classes it is still the multinomial model: the difference of its two weight columns is sklearn's
  binomial LogisticRegression at 2C.
- ridge: least squares on one-hot targets, the same grid read as alpha = 1 / C (sum-of-squares loss, sklearn's
  Ridge convention), solved in closed form from one eigendecomposition of the fold's Gram matrix per fold.
- dim: difference in means: nearest class mean in standardised space (for two classes: the projection on the mean
  difference, thresholded halfway). No penalty, so C is NaN.
Classes absent from a fold's training part are masked out of that fold's model (never predicted, no weights).

How logreg is solved: the (cell, fold) problems of a chunk of cells go through one batched solver together (X of a
cell is shared by its folds: one matmul per pass serves them all, the standardisation is folded into the weights).
They go along the C grid from the strongest penalty to the weakest, each C warm-started from the previous
solutions (as sklearn does; from the third C on, extrapolated linearly in log C). The solver is L-BFGS whose
initial inverse Hessian is the Kronecker-factored (K-FAC) one, H ~ A (x) S + lambda I: A = mean over examples of
diag(p) - p p^T (classes x classes, refreshed every step) and S the feature covariance (eigendecomposed once per
cell, shared by every fold and C). At W = 0 a step is exactly Newton's, so strongly penalised fits take 3-5
passes over the data where plain lbfgs takes ~20; weakly penalised ones take about as many as sklearn's lbfgs.
Steps pass an Armijo line search; a fit stops, like sklearn's lbfgs, when every gradient entry (standardised
weights and intercepts) is at most `tol` in absolute value, or after `max_iter` steps (`converged` says which).
Cells whose fits have all stopped leave the batch. Everything runs in float32 on `device`.

Speed (benchmarks/probes_fit.py: 192 cells, d 256, 2,000 examples, 10 classes, 5 folds, 7 Cs; one CPU thread of a
busy machine): 33 s against ~110 s for a loop of LogisticRegressionCV, at the same held-out accuracy (mean
|difference| 0.0006). On a CPU the gain is bounded: sklearn's lbfgs already spends its time in BLAS on these sizes,
so what remains is float32, larger matmuls and fewer passes for strongly penalised fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.probing.solver import MASKED, LogReg, SolverOptions, raw_weights, solve_path, standardisation

DEFAULT_CS = np.logspace(-4, 2, 7)  # 1e-4 ... 1e2: from 'weights ~ 0' to nearly unpenalised for n ~ 10^3
METHODS = ("logreg", "dim", "ridge")
# What the public functions accept (checked and converted inside, shapes in the docstrings)
Activations = Union[Tensor, np.ndarray]  # X: [cell, n, d] (or [n, d] for one cell)
Labels = Union[Tensor, np.ndarray, Sequence[int]]  # y: [n] or [cell, n] integer classes
Groups = Union[Sequence, np.ndarray]  # one identity/document per example
TABLE_COLUMNS = ("cell", "fold", "method", "C", "accuracy", "chance", "n_train", "n_test", "converged", "nested")


class ProbeError(ValueError):
    """Bad input to a probe fit; the message names the argument and what was expected."""


# ---- folds ------------------------------------------------------------------------------------------------------
def grouped_folds(groups: Groups, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train_idx, test_idx)] * n_folds with every group wholly on one side of every fold.

    Groups are shuffled (by `seed`), then dealt largest first to the fold holding the fewest examples so far (ties:
    fewest groups, then lowest index), so folds get near-equal numbers of examples and, for equal-sized groups, of
    groups. Each example is in exactly one test part. Indices are sorted.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ProbeError(f"groups must be 1-D (one group per example), got shape {groups.shape}")
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ProbeError(f"n_folds must be an int >= 2, got {n_folds!r}")
    uniq, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(uniq) < n_folds:
        raise ProbeError(f"groups has {len(uniq)} distinct values but n_folds={n_folds} needs at least {n_folds}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, shuffled among equals
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    n_examples, n_groups = np.zeros(n_folds, dtype=np.int64), np.zeros(n_folds, dtype=np.int64)
    for g in order:
        f = min(range(n_folds), key=lambda k: (n_examples[k], n_groups[k], k))
        fold_of_group[g] = f
        n_examples[f] += sizes[g]
        n_groups[f] += 1
    fold_of = fold_of_group[inverse]
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(n_folds)]


# ---- result -----------------------------------------------------------------------------------------------------
@dataclass
class ProbeFit:
    """What `fit_probes` found. `table`: one row per (cell, fold) with columns TABLE_COLUMNS (accuracy on that fold's
    test part at the chosen C; chance = the test part's majority-class rate). `cv_accuracy` [cell, len(Cs)]: mean
    held-out accuracy per C. `weights` [cell, d, classes] and `bias` [cell, classes]: the all-data refit at the
    chosen C, in raw activation units (logits = X @ weights + bias; a class never seen gets bias -1e9);
    `mean`/`std` [cell, d]: its standardisation, so weights * std[..., None] are the standardised weights the
    penalty saw. `folds`: the (train_idx, test_idx) pairs used."""

    method: str
    Cs: np.ndarray
    C: np.ndarray
    cv_accuracy: np.ndarray
    table: pd.DataFrame
    weights: Float[Tensor, "cell d k"]
    bias: Float[Tensor, "cell k"]
    mean: Float[Tensor, "cell d"]
    std: Float[Tensor, "cell d"]
    folds: list = field(repr=False, default_factory=list)
    # Each fold's probe at the cell's chosen C (raw units) and every example's held-out prediction from the fold
    # that tested it: per-example correctness (bootstrap CIs by identity, whole-string exact match) and transfer.
    oof: Int[Tensor, "cell n"] | None = field(repr=False, default=None)
    fold_weights: Float[Tensor, "cell fold d k"] | None = field(repr=False, default=None)
    fold_bias: Float[Tensor, "cell fold k"] | None = field(repr=False, default=None)

    def decision(self, X: Activations) -> Float[Tensor, "cell m k"]:
        """Logits of the all-data probes: X [cell, m, d] (or [m, d] when there is one cell)."""
        X = torch.as_tensor(X)
        if X.ndim == 2 and self.weights.shape[0] == 1:
            X = X[None]
        if X.ndim != 3 or X.shape[0] != self.weights.shape[0] or X.shape[2] != self.weights.shape[1]:
            raise ProbeError(f"X must be [cell={self.weights.shape[0]}, m, d={self.weights.shape[1]}], "
                             f"got {tuple(X.shape)}")
        W = self.weights.to(X.device)
        return torch.bmm(X.to(W.dtype), W) + self.bias.to(X.device)[:, None, :]

    def predict(self, X: Activations) -> Int[Tensor, "cell m"]:
        """Predicted class per cell and example (argmax of `decision`)."""
        return self.decision(X).argmax(-1)


# ---- the public fit ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeConfig:
    """How `fit_probes` fits (see its docstring for each field); validated once, here. `ProbeConfig(**options)` or
    `dataclasses.replace(config, **options)` builds one; `fit_probes(X, y, groups, method=...)` builds it for you."""

    method: str = "logreg"
    n_folds: int = 5
    Cs: Sequence[float] | np.ndarray = tuple(float(c) for c in DEFAULT_CS)  # kept as a tuple
    seed: int = 0
    device: str | torch.device | None = None  # kept as its name
    n_classes: int | None = None
    tol: float = 1e-4
    max_iter: int = 100
    cells_per_batch: int = 16
    nested: bool = True
    inner_folds: int = 3
    refit: bool = True
    progress: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ProbeError(f"method must be one of {METHODS}, got {self.method!r}")
        if not _is_int(self.n_folds) or self.n_folds < 2:
            raise ProbeError(f"n_folds must be an int >= 2, got {self.n_folds!r}")
        Cs = np.asarray(self.Cs, dtype=np.float64)
        if self.method != "dim" and (Cs.ndim != 1 or len(Cs) == 0 or (Cs <= 0).any() or (np.diff(Cs) <= 0).any()):
            raise ProbeError(f"Cs must be a non-empty 1-D grid of positive values in ascending order, got {Cs}")
        object.__setattr__(self, "Cs", tuple(float(c) for c in Cs.reshape(-1)))  # hashable, whatever was passed
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))  # a torch.device is accepted, kept as its name
        if self.nested and (not _is_int(self.inner_folds) or self.inner_folds < 2):
            raise ProbeError(f"inner_folds must be an int >= 2, got {self.inner_folds!r}")
        for name in ("max_iter", "cells_per_batch"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ProbeError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.tol > 0:
            raise ProbeError(f"tol must be > 0, got {self.tol!r}")

    @property
    def grid(self) -> np.ndarray:
        """The C grid as fitted: the Cs, or [NaN] for difference in means (no penalty)."""
        return np.array([np.nan]) if self.method == "dim" else np.asarray(self.Cs)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def fit_probes(X: Activations, y: Labels, groups: Groups, config: ProbeConfig | None = None, **options) -> ProbeFit:
    """Fit one linear probe per cell, all cells batched, with grouped cross-validation (see the module docstring).

    X [cell, n, d] activations (any float dtype; computed in float32 on `device`, default X's); y [n] labels shared
    by every cell or [cell, n] per cell, ints in [0, n_classes); groups [n] identity/document of each example.
    Settings: a ProbeConfig, or its fields as keywords (`fit_probes(X, y, groups, method="ridge")`; with both,
    the keywords replace the config's fields).
    Cs: the penalty grid (sorted ascending; ridge reads alpha = 1/C; dim ignores it). tol/max_iter: logreg's
    stopping rule per fit (max |gradient| <= tol, as sklearn's lbfgs; max_iter counts line-search trials, i.e.
    passes over the data). cells_per_batch: cells solved together (memory grows as about
    100 * cells_per_batch * n * n_problems * n_classes bytes, n_problems = n_folds + 1 flat or
    n_folds * (inner_folds + 1) + 1 nested; results do not depend on it).
    nested: C of each outer fold chosen by `inner_folds` grouped folds inside its training part (3: every training
    identity scores each C once, at 2/3 the cost of 4 inner folds), so the reported accuracy is not optimistic; False:
    C chosen on the reporting folds themselves (the pre-issue-16 protocol, optimistic under the null). The
    all-data probe's C is always the one with the best mean outer-fold accuracy. refit=False skips the all-data
    probe (weights/bias are then NaN): permutation nulls need only the held-out accuracy.

        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(3, 400, 32); y = torch.randint(0, 4, (400,)); groups = np.arange(400) // 4
        >>> X[1] += 3 * torch.nn.functional.one_hot(y, 32).float()       # plant the label in cell 1
        >>> fit_probes(X, y, groups).table.groupby("cell").accuracy.mean().round(1).tolist()
        [0.2, 0.9, 0.2]
    """
    cfg = replace(config or ProbeConfig(), **options) if options else (config or ProbeConfig())
    X, Y, K = check_inputs(X, y, groups, cfg.method, cfg.n_classes)
    Cs = cfg.grid
    folds = grouped_folds(groups, cfg.n_folds, cfg.seed)
    nested = bool(cfg.nested) and len(Cs) > 1  # one C (or dim): nothing to choose, nothing to nest
    device = torch.device(cfg.device) if cfg.device is not None else X.device
    problems = _problems(folds, np.asarray(groups), cfg, nested, device)
    out = _fit_chunks(X, Y, K, problems, Cs, cfg, device)
    table = _fold_table(out, Y.cpu().numpy(), K, folds, Cs, cfg.method, nested)
    best = out["best"].cpu().numpy()
    return ProbeFit(method=cfg.method, Cs=Cs, C=Cs[best], cv_accuracy=out["accuracy"].cpu().numpy().mean(1),
                    table=table, weights=out["weights"].cpu(), bias=out["bias"].cpu(), mean=out["mean"].cpu(),
                    std=out["std"].cpu(), folds=folds, oof=out["oof"].cpu(), fold_weights=out["fold_weights"].cpu(),
                    fold_bias=out["fold_bias"].cpu())


def _fit_chunks(X: Tensor, Y: Tensor, K: int, problems: dict, Cs: np.ndarray, cfg: ProbeConfig,
                device: torch.device) -> dict[str, Tensor]:
    """`_fit_chunk` over the cells, `cfg.cells_per_batch` at a time; the chunks' results concatenated."""
    chunks = []
    starts = range(0, X.shape[0], cfg.cells_per_batch)
    # Weakly penalised fits on separable folds push probabilities into float32 denormals, which a CPU computes
    # ~100x slower (nested CV's small inner training parts made a fit 20x slower); flushed to 0 while fitting.
    torch.set_flush_denormal(True)
    try:
        for lo in _progress(starts, cfg.progress, f"{cfg.method} probes ({X.shape[0]} cells)"):
            Xc = X[lo:lo + cfg.cells_per_batch].to(device=device, dtype=torch.float32)
            Yc = Y[lo:lo + cfg.cells_per_batch].to(device=device)
            chunks.append(_fit_chunk(Xc, Yc, K, problems, Cs, cfg))
    finally:
        torch.set_flush_denormal(False)  # torch's default
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def _fold_table(out: dict[str, Tensor], Yn: np.ndarray, K: int, folds: list, Cs: np.ndarray, method: str,
                nested: bool) -> pd.DataFrame:
    """One row per (cell, outer fold), TABLE_COLUMNS: the held-out accuracy at the fold's chosen C."""
    acc = out["accuracy"].cpu().numpy()  # [cell, fold, C] (outer folds)
    fold_best = out["fold_best"].cpu().numpy()
    n_cells, n_folds = acc.shape[:2]
    cells = np.arange(n_cells)
    return pd.DataFrame({
        "cell": np.repeat(cells, n_folds),
        "fold": np.tile(np.arange(n_folds), len(cells)),
        "method": method,
        "C": Cs[fold_best].reshape(-1),
        "accuracy": np.take_along_axis(acc, fold_best[..., None], 2)[..., 0].reshape(-1),
        "chance": held_out_chance(Yn, folds, K).reshape(-1),  # [cell, fold]
        "n_train": np.tile([len(tr) for tr, _ in folds], len(cells)),
        "n_test": np.tile([len(te) for _, te in folds], len(cells)),
        "converged": np.take_along_axis(out["converged"].cpu().numpy(), fold_best[..., None], 2)[..., 0].reshape(-1),
        "nested": nested,
    })


def held_out_chance(y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], n_classes: int) -> np.ndarray:
    """Chance, one definition everywhere: the held-out accuracy of always predicting the training part's majority
    class (ties: the lowest class, as argmax), per cell and fold [cell, fold] for y [cell, n] (or [n] -> [1, fold]).

    It is what a probe that reads nothing from the activations scores under the same folds: a logreg probe at
    W = 0 predicts exactly this class (its intercept is the training log-frequencies). Unlike the in-sample
    majority rate (max class share of all examples, ~0.17 for 60 uniform digits), it is not biased upward by
    picking the majority on the examples it is scored on; for balanced classes its expectation is ~1/K."""
    y = np.atleast_2d(np.asarray(y))
    out = np.zeros((y.shape[0], len(folds)))
    for f, (train, test) in enumerate(folds):
        for c in range(y.shape[0]):
            tr, te = y[c, train], y[c, test]
            tr, te = tr[tr >= 0], te[te >= 0]
            if len(te) and len(tr):
                out[c, f] = (te == np.bincount(tr, minlength=n_classes).argmax()).mean()
    return out


def _problems(folds, groups: np.ndarray, cfg: ProbeConfig, nested: bool, device: torch.device) -> dict:
    """The training/test parts every cell is fitted on: the outer folds first, then (nested) each outer fold's
    inner folds, grouped inside its training part. Returns train [Q + 1, n] (the Q parts' training rows and, last,
    all examples: problem q indexes these) and test [Q, n] masks on `device`, 'inner' [outer fold] -> indices of
    its inner parts (empty: flat CV) and n_folds (the outer folds come first)."""
    n = len(groups)

    def masks(train, test):
        tr, te = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        tr[train], te[test] = True, True
        return tr, te

    parts = [masks(tr, te) for tr, te in folds]
    inner = []
    if nested:
        k = cfg.inner_folds
        for train, _ in folds:
            try:
                sub = grouped_folds(groups[train], k, cfg.seed + 1)
            except ProbeError as err:
                raise ProbeError(f"nested CV: an outer training part is too small for inner_folds={k} ({err}); "
                                 f"lower inner_folds or n_folds, or pass nested=False") from err
            inner.append(list(range(len(parts), len(parts) + k)))
            parts += [masks(train[tr], train[te]) for tr, te in sub]
    train = torch.as_tensor(np.stack([tr for tr, _ in parts] + [np.ones(n, dtype=bool)]), device=device)
    test = torch.as_tensor(np.stack([te for _, te in parts]), device=device)
    return {"train": train, "test": test, "inner": inner, "n_folds": len(folds)}


def _progress(it, progress: bool, desc: str):
    """`it` wrapped in a tqdm bar when `progress` (library calls default to silent)."""
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def fit_probe(X: Activations, y: Labels, groups: Groups, **kwargs) -> ProbeFit:
    """One cell: `fit_probes(X[None], y, groups, **kwargs)` (its table has cell 0 only)."""
    X = torch.as_tensor(X)
    if X.ndim != 2:
        raise ProbeError(f"X must be [n, d] for fit_probe, got shape {tuple(X.shape)}")
    return fit_probes(X[None], y, groups, **kwargs)


def check_inputs(X, y, groups, method, n_classes) -> tuple[Tensor, Tensor, int]:
    if method not in METHODS:
        raise ProbeError(f"method must be one of {METHODS}, got {method!r}")
    X = torch.as_tensor(X)
    if X.ndim != 3 or not X.is_floating_point():
        raise ProbeError(f"X must be a float tensor [cell, n, d], got {X.dtype} of shape {tuple(X.shape)}")
    n_cells, n, _ = X.shape
    if not torch.isfinite(X).all():
        raise ProbeError("X holds NaN or inf values")
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ProbeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.ndim == 1:
        y = y[None].expand(n_cells, -1)
    if y.ndim != 2 or y.shape != (n_cells, n):
        raise ProbeError(f"y must be [n={n}] or [cell={n_cells}, n={n}] to match X {tuple(X.shape)}, "
                         f"got {tuple(y.shape)}")
    if len(groups) != n:
        raise ProbeError(f"groups must have one entry per example (n={n} from X), got {len(groups)}")
    y = y.long()
    if (y < 0).any():
        raise ProbeError("y must hold labels >= 0")
    K = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if int(y.max()) >= K:
        raise ProbeError(f"y has label {int(y.max())} but n_classes={K}")
    if K < 2:
        raise ProbeError(f"a probe needs at least 2 classes, got n_classes={K}")
    return X, y, K


# ---- one chunk of cells -----------------------------------------------------------------------------------------
def _fit_chunk(X: Float[Tensor, "c n d"], Y: Int[Tensor, "c n"], K: int, problems: dict, Cs: np.ndarray,
               cfg: ProbeConfig) -> dict[str, Tensor]:
    """Every training part (outer folds, then nested inner folds) and C of a chunk of cells, then the all-data refit
    at each cell's chosen C. problems: `_problems`' masks (train [Q + 1, n], test [Q, n]) and inner folds."""
    c, n, d = X.shape
    F, inner = problems["n_folds"], problems["inner"]
    data = _Chunk(X, Y, K, problems["train"], problems["test"])
    Wc, bc, acc, converged, solver = _fit_parts(data, Cs, cfg)  # [c, Q, C, d, K], [c, Q, C, K], [c, Q, C] x 2
    best = _best(acc[:, :F])  # the all-data probe's C: best mean outer-fold accuracy
    # Each outer fold's C: chosen by its inner folds (nested), else by the outer folds themselves (flat).
    fold_best = torch.stack([_best(acc[:, idx]) for idx in inner], 1) if inner else best[:, None].expand(c, F)
    fold_best = fold_best.contiguous()
    cidx, fidx = torch.arange(c, device=X.device)[:, None], torch.arange(F, device=X.device)[None]
    W_fold, b_fold = Wc[cidx, fidx, fold_best], bc[cidx, fidx, fold_best]  # [c, F, d, K], [c, F, K]
    Wf, bf = _refit(data, Cs, cfg, solver, best)  # [c, 1, d, K], [c, 1, K]
    return {"accuracy": acc[:, :F], "best": best, "fold_best": fold_best, "converged": converged[:, :F],
            **_raw_probes(data, Wf, bf, W_fold, b_fold)}


@dataclass
class _Chunk:
    """A chunk of cells standardised for fitting: X centred per cell, the centre [c, d], every training part's
    mean/std [c, Q + 1, d] and weights M [Q + 1, n], one-hot labels and the classes each part holds."""

    X: Tensor
    Y: Tensor
    K: int
    train: Tensor
    test: Tensor

    def __post_init__(self):
        self.X, self.centre, self.M, self.mean, self.std = standardisation(self.X, self.train)
        self.n_q = self.M.sum(1)
        self.Y1h = torch.nn.functional.one_hot(self.Y, self.K).to(self.X.dtype)  # [c, n, K]
        self.class_ok = torch.einsum("qn,cnk->cqk", self.M, self.Y1h) > 0  # [c, q, K]: classes in each part
        self.Q = self.test.shape[0]

    def score(self, W: Tensor, b: Tensor) -> Tensor:
        """Held-out accuracy [c, Q] of standardised weights of every part."""
        parts = slice(0, self.Q)
        return _accuracy(self.X, self.Y, self.test, *raw_weights(W, b, self.mean[:, parts], self.std[:, parts]),
                         self.class_ok[:, parts])


def _fit_parts(data: _Chunk, Cs: np.ndarray, cfg: ProbeConfig) -> tuple:
    """Every training part at every C: W [c, Q, C, d, K], b [c, Q, C, K], held-out accuracy and convergence
    [c, Q, C], and the logreg solver (None for the closed forms)."""
    c, _, d = data.X.shape
    Q, K = data.Q, data.K
    if cfg.method == "logreg":
        solver = LogReg(data.X, data.Y1h, data.M, (data.mean, data.std), data.class_ok,
                        SolverOptions(cfg.tol, cfg.max_iter))
        zeros = data.X.new_zeros(c, Q, d, K), data.X.new_zeros(c, Q, K)
        return (*solve_path(solver, slice(0, Q), Cs, data.n_q[:Q], *zeros, data.score), solver)
    if cfg.method == "ridge":
        Ws, bs = _ridge(data.X, data.Y1h, data.M, data.mean, data.std, Cs)  # [c, q, C, d, K], [c, q, K]
        acc = torch.stack([data.score(Ws[:, :Q, j], bs[:, :Q]) for j in range(len(Cs))], -1)
        data.closed_form = Ws[:, Q:], bs[:, Q:]  # the all-data fit at every C, for `_refit`
        return Ws[:, :Q], bs[:, :Q, None].expand(-1, -1, len(Cs), -1), acc, torch.ones_like(acc, dtype=torch.bool), None
    Ws, bs = _dim(data.X, data.Y1h, data.M, data.mean, data.std)  # [c, q, d, K], [c, q, K]
    acc = data.score(Ws[:, :Q], bs[:, :Q])[..., None]
    data.closed_form = Ws[:, Q:], bs[:, Q:]
    return Ws[:, :Q, None], bs[:, :Q, None], acc, data.X.new_ones(c, Q, 1, dtype=torch.bool), None


def _refit(data: _Chunk, Cs: np.ndarray, cfg: ProbeConfig, solver, best: Tensor) -> tuple[Tensor, Tensor]:
    """The all-data probe at each cell's chosen C (NaN without `cfg.refit`): logreg goes along the C grid up to each
    cell's chosen C (cells past theirs stay frozen there); the closed forms read it off."""
    c, _, d = data.X.shape
    K, Q = data.K, data.Q
    if not cfg.refit:
        return (torch.full((c, 1, d, K), torch.nan, device=data.X.device),
                torch.full((c, 1, K), torch.nan, device=data.X.device))
    if cfg.method == "logreg":
        Wf, bf, _, _ = solve_path(solver, slice(Q, Q + 1), Cs[:int(best.max()) + 1], data.n_q[Q:],
                                  data.X.new_zeros(c, 1, d, K), data.X.new_zeros(c, 1, K), None, frozen_after=best)
        return Wf, bf
    Ws, bs = data.closed_form
    if cfg.method == "ridge":
        return Ws[torch.arange(c, device=data.X.device), 0, best][:, None], bs
    return Ws, bs


def _raw_probes(data: _Chunk, Wf: Tensor, bf: Tensor, W_fold: Tensor, b_fold: Tensor) -> dict[str, Tensor]:
    """The all-data and the folds' probes in raw activation units (the centring undone: logits = (x - centre) W
    + b), the all-data standardisation, and every example's held-out prediction from the fold that tested it."""
    Q, F = data.Q, W_fold.shape[1]
    c, n, _ = data.X.shape
    Wr, br = raw_weights(Wf, bf.masked_fill(~data.class_ok[:, Q:], MASKED), data.mean[:, Q:], data.std[:, Q:])
    Wfr, bfr = raw_weights(W_fold, b_fold.masked_fill(~data.class_ok[:, :F], MASKED), data.mean[:, :F],
                           data.std[:, :F])
    oof = torch.full((c, n), -1, dtype=torch.long, device=data.X.device)  # held-out prediction of every example
    for f in range(F):
        rows = data.test[f].nonzero().squeeze(1)
        oof[:, rows] = (torch.bmm(data.X[:, rows], Wfr[:, f]) + bfr[:, f, None]).argmax(-1)
    centre = data.centre
    return {"weights": Wr[:, 0], "bias": br[:, 0] - torch.einsum("cd,cdk->ck", centre, Wr[:, 0]),
            "mean": data.mean[:, Q] + centre, "std": data.std[:, Q], "oof": oof, "fold_weights": Wfr,
            "fold_bias": bfr - torch.einsum("cd,cfdk->cfk", centre, Wfr)}


def _best(acc: Float[Tensor, "c fold C"]) -> Int[Tensor, " c"]:
    """Index of the best mean held-out accuracy per cell; the first (smallest C) among ties, as sklearn."""
    mean = acc.mean(1)
    return (mean >= mean.amax(-1, keepdim=True) - 1e-12).int().argmax(-1)


def _accuracy(X: Tensor, Y: Tensor, test_masks: Tensor, Wr: Tensor, br: Tensor, class_ok: Tensor) -> Tensor:
    """Held-out accuracy [c, fold] (float64) of raw weights Wr [c, fold, d, K] on each fold's test part."""
    accs = []
    for f in range(test_masks.shape[0]):
        rows = test_masks[f].nonzero().squeeze(1)
        logits = (torch.bmm(X[:, rows], Wr[:, f]) + br[:, f, None]).masked_fill(~class_ok[:, f, None], MASKED)
        accs.append((logits.argmax(-1) == Y[:, rows]).sum(1).double() / len(rows))
    return torch.stack(accs, 1)


# ---- difference in means and ridge: closed forms ---------------------------------------------------------------
def _dim(X, Y1h, M, mean, std) -> tuple[Tensor, Tensor]:
    """Nearest class mean in standardised space as a linear model: logit_k = x . mu_k - |mu_k|^2 / 2."""
    counts = torch.einsum("qn,cnk->cqk", M, Y1h)  # [c, q, K]
    sums = torch.einsum("cnd,cqnk->cqdk", X, M[None, :, :, None] * Y1h[:, None])
    mu = (sums / counts.clamp_min(1)[:, :, None] - mean[..., None]) / std[..., None]  # [c, q, d, K]
    mu = mu * (counts > 0)[:, :, None]
    return mu, -0.5 * (mu**2).sum(2)


def _ridge(X, Y1h, M, mean, std, Cs) -> tuple[Tensor, Tensor]:
    """Ridge on one-hot targets for every training part and alpha = 1/C: W = (Xs'Xs + alpha I)^-1 Xs'(Y - ybar),
    from one eigendecomposition of each part's standardised Gram matrix (one part at a time: memory c d^2).
    Returns W [c, q, C, d, K], b [c, q, K]."""
    n_q = M.sum(1)
    ybar = torch.einsum("qn,cnk->cqk", M, Y1h) / n_q[:, None]
    alphas = torch.as_tensor(1.0 / Cs, dtype=X.dtype, device=X.device)
    Ws = []
    for q in range(M.shape[0]):
        rows = M[q].nonzero().squeeze(1)
        Xq = (X[:, rows] - mean[:, q, None]) / std[:, q, None]  # standardised training part
        Yc = Y1h[:, rows] - ybar[:, q, None]
        if len(rows) < Xq.shape[-1]:
            # Fewer examples than features: the dual form Xs' (Xs Xs' + alpha I)^-1 Yc gives the same W from an
            # n x n eigendecomposition instead of d x d (probes on a few hundred sessions of a wide model).
            e, V = torch.linalg.eigh(Xq @ Xq.transpose(1, 2))
            VY = V.transpose(1, 2) @ Yc
            Ws.append(torch.stack([Xq.transpose(1, 2) @ (V @ (VY / (e.clamp_min(0) + a)[..., None]))
                                   for a in alphas], 1))
            continue
        e, U = torch.linalg.eigh(Xq.transpose(1, 2) @ Xq)
        UXY = U.transpose(1, 2) @ (Xq.transpose(1, 2) @ Yc)
        Ws.append(torch.stack([U @ (UXY / (e.clamp_min(0) + a)[..., None]) for a in alphas], 1))
    return torch.stack(Ws, 1), ybar


# ---- logistic regression: batched, K-FAC-preconditioned L-BFGS -------------------------------------------------
