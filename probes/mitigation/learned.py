"""A learned black-box protector: a small transformation of the image, optimised only through answers (CMA-ES).

The protector (`CellMasker`) reads the image itself, so it transfers to documents it was not optimised on: the
page is cut into cells (8 px, one image patch of the embedded model) and each cell gets a score from a few
features of the image there (its ink, the ink of its row band, of its column band, its position); a cell whose
score is positive is painted over with the page colour. Its parameters theta are the feature weights (8 numbers).

`optimise` searches theta with CMA-ES (`cma`, Hansen's implementation) against both objectives through a sweep of
scalarisations: for weight w it minimises w * L - (1 - w) * U, L and U measured on a minibatch of training documents
(each document: its privacy sessions under every framing and its benign sessions). Every evaluation is queries to
the black box, counted. An archive, the analogue of Hui et al.'s history of critical solutions, is kept across
generations: the non-dominated (L, U) solutions seen so far are injected into each new population, and the
documents that leaked most under recent candidates are put into every minibatch. `archive=False` turns both off
(the ablation). Evaluations are cached on disk by theta and minibatch (JSON), so a run started again replays the
optimiser's decisions from the cache without a query and continues where it stopped: the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import cma
import numpy as np
from PIL import Image

from probes.data.files import atomic_write_text
from probes.data.session import Session
from probes.mitigation.blackbox import BlackBox, protected
from probes.mitigation.fronts import non_dominated
from probes.mitigation.utility import privacy_rows, utility_rows

N_FEATURES = 8
PAGE = 255


@dataclass(frozen=True)
class CellMasker:
    """Paint over the cells (`cell` px squares) whose score theta . features > 0. Features per cell: 1, its ink
    share, its row band's ink share, its column band's ink share, x and y of its centre (0..1), x^2, y^2."""

    theta: tuple[float | int, ...]
    cell: int = 8

    def __post_init__(self) -> None:
        if len(self.theta) != N_FEATURES or not np.isfinite(self.theta).all():
            raise ValueError(f"CellMasker: theta must be {N_FEATURES} finite numbers, got {self.theta!r}")
        if self.cell < 1:
            raise ValueError(f"CellMasker: cell {self.cell!r}: expected >= 1 px")

    def mask(self, image: Image.Image) -> np.ndarray:
        """Boolean [rows, cols] of the cells to paint over."""
        return features(image, self.cell) @ np.asarray(self.theta) > 0

    def apply(self, image: Image.Image, boxes: Sequence = ()) -> Image.Image:
        """The protected copy (`boxes` is ignored: the masker finds its own regions)."""
        rgb = np.asarray(image.convert("RGB")).copy()
        rows, cols = np.nonzero(self.mask(image))
        c = self.cell
        for r, k in zip(rows, cols):
            rgb[r * c:(r + 1) * c, k * c:(k + 1) * c] = PAGE
        return Image.fromarray(rgb)


def features(image: Image.Image, cell: int = 8) -> np.ndarray:
    """[rows, cols, N_FEATURES] cell features (see `CellMasker`); the last partial row/column of cells included."""
    grey = np.asarray(image.convert("L"), dtype=float)
    h, w = grey.shape
    rows, cols = -(-h // cell), -(-w // cell)
    padded = np.full((rows * cell, cols * cell), 255.0)
    padded[:h, :w] = grey
    ink = (padded < 128).reshape(rows, cell, cols, cell).mean((1, 3))
    y, x = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    return np.stack([np.ones_like(ink), ink, np.repeat(ink.mean(1, keepdims=True), cols, 1),
                     np.repeat(ink.mean(0, keepdims=True), rows, 0), x, y, x * x, y * y], -1)


@dataclass(frozen=True)
class Document:
    """One training document: its privacy sessions (every framing) and its benign sessions."""

    key: str
    privacy: tuple[Session, ...]
    utility: tuple[Session, ...]


# (sessions, theta) -> (privacy rows' leaked flags by document and framing, utility scores by document)
Evaluate = Callable[[Sequence[Document], tuple[float, ...]], tuple[dict[str, dict[str, float]], dict[str, float]]]


def loss_utility_of(leaks: dict[str, dict[str, float]], scores: dict[str, float]) -> tuple[float, float]:
    """L: the worst framing's mean leak over the documents; U: the mean benign score over the documents."""
    framings = sorted({f for d in leaks.values() for f in d})
    L = max(np.mean([leaks[d][f] for d in leaks if f in leaks[d]]) for f in framings) if framings else 0.0
    return float(L), float(np.mean(list(scores.values()))) if scores else 0.0


class Cache:
    """Evaluations on disk (one JSON file), keyed by theta and document: a resumed run replays them for free."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.data: dict[str, list] = {}
        if self.path is not None and self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    @staticmethod
    def key(theta: tuple[float, ...], doc: str) -> str:
        return hashlib.sha256(json.dumps([list(map(float, theta)), doc]).encode()).hexdigest()[:20]

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.data))


@dataclass
class Optimised:
    """What `optimise` returns: every evaluated (w, theta, L, U) on its minibatch with the queries spent so far,
    the total queries (a resumed run counts those its cache saved it: the optimisation spent them), the queries
    this call made, and the archive's final non-dominated thetas."""

    evaluations: list[dict]
    queries: int
    new_queries: int
    front: list[tuple[float, ...]]


def _evaluate(docs: Sequence[Document], theta: tuple[float, ...], evaluate: Evaluate, cache: Cache
              ) -> tuple[float, float, int, dict[str, float]]:
    """L and U of theta on `docs`, from the cache where it can; the queries it cost (cached ones included: the
    run that cached them spent them); each document's mean leak."""
    todo = [d for d in docs if Cache.key(theta, d.key) not in cache.data]
    cost = sum(len(d.privacy) + len(d.utility) for d in docs)  # a cached answer was paid for by the earlier run
    if todo:
        leaks, scores = evaluate(todo, theta)
        for d in todo:
            cache.data[Cache.key(theta, d.key)] = [leaks[d.key], scores[d.key]]
    leaks = {d.key: cache.data[Cache.key(theta, d.key)][0] for d in docs}
    scores = {d.key: cache.data[Cache.key(theta, d.key)][1] for d in docs}
    L, U = loss_utility_of(leaks, scores)
    return L, U, cost, {k: float(np.mean(list(v.values()))) for k, v in leaks.items()}


@dataclass(frozen=True)
class OptimiserConfig:
    """weights: the scalarisations w (w * L - (1 - w) * U), run in turn, each with an equal share of `budget`
    queries; batch: documents per evaluation (with `archive`, half of them the hardest seen so far); popsize and
    sigma0: CMA-ES's population and initial step; seed: CMA-ES's and the minibatch draws'."""

    weights: Sequence[float] = (0.25, 0.5, 0.75)
    budget: int = 1500
    batch: int = 4
    popsize: int = 6
    sigma0: float = 1.0
    archive: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.weights or not all(0 <= w <= 1 for w in self.weights):
            raise ValueError(f"optimiser weights {self.weights!r}: expected numbers in [0, 1]")
        for name in ("budget", "batch", "popsize"):
            if getattr(self, name) < 1:
                raise ValueError(f"optimiser {name} {getattr(self, name)!r}: expected an integer >= 1")
        if not self.sigma0 > 0:
            raise ValueError(f"optimiser sigma0 {self.sigma0!r}: expected > 0")


def optimise(docs: Sequence[Document], evaluate: Evaluate, config: OptimiserConfig | None = None,
             cache_path: str | os.PathLike | None = None, **options: Any) -> Optimised:
    """CMA-ES over theta for each scalarisation weight in turn, never spending more than its budget of queries (see
    the module docstring and `OptimiserConfig`, whose fields may be given as keywords)."""
    c = replace(config or OptimiserConfig(), **options)
    weights, budget, batch, popsize, sigma0, archive, seed = (c.weights, c.budget, c.batch, c.popsize, c.sigma0,
                                                             c.archive, c.seed)
    cache, rng = Cache(cache_path), random.Random(seed)
    new_queries = [0]
    counted = evaluate

    def evaluate(docs_: Sequence[Document], theta: tuple[float, ...]):
        new_queries[0] += sum(len(d.privacy) + len(d.utility) for d in docs_)
        return counted(docs_, theta)

    spent, evaluations, hardness = 0, [], {d.key: 0.0 for d in docs}
    per_weight = budget / len(weights)
    for wi, w in enumerate(weights):
        es = cma.CMAEvolutionStrategy([0.0] * N_FEATURES, sigma0,
                                      {"popsize": popsize, "seed": seed + wi + 1, "verbose": -9})
        start = spent
        while spent - start < per_weight:
            minibatch = _minibatch(docs, hardness, batch, rng, archive)
            if spent + popsize * sum(len(d.privacy) + len(d.utility) for d in minibatch) > budget:
                break  # the budget is a promise: no generation starts that could overspend it
            if archive and evaluations:
                es.inject([list(_best_archived(evaluations, w))])  # re-test the archive's best for this weight
            thetas = [tuple(map(float, x)) for x in es.ask()]
            losses = []
            for theta in thetas:
                L, U, cost, doc_leak = _evaluate(minibatch, theta, evaluate, cache)
                spent += cost
                hardness.update({k: 0.5 * hardness[k] + 0.5 * v for k, v in doc_leak.items()})
                evaluations.append({"weight": w, "theta": theta, "L": L, "U": U, "queries": spent})
                losses.append(w * L - (1 - w) * U)
            es.tell([list(t) for t in thetas], losses)
            cache.save()
    return Optimised(evaluations, spent, new_queries[0], _archive_front(evaluations))


def masker_evaluator(box: BlackBox) -> Evaluate:
    """`Evaluate` through a black box: each document's sessions with every image masked by CellMasker(theta),
    answered and scored (privacy: leaked per framing; utility: the mean of the benign scores, no_refusal included)."""

    def evaluate(docs: Sequence[Document], theta: tuple[float, ...]):
        masker = CellMasker(theta)
        privacy = [protected(s, masker) for d in docs for s in d.privacy]
        utility = [protected(s, masker) for d in docs for s in d.utility]
        p = privacy_rows(privacy, box(privacy)).assign(doc=[d.key for d in docs for _ in d.privacy])
        u = utility_rows(utility, box(utility))
        u["doc"] = np.repeat([d.key for d in docs for _ in d.utility], 2)  # two rows per benign answer
        leaks = {k: g.groupby("framing")["leaked"].mean().astype(float).to_dict() for k, g in p.groupby("doc")}
        scores = u.groupby("doc")["score"].mean().astype(float).to_dict()
        return leaks, scores

    return evaluate


def documents(privacy: Sequence[Session], utility: Sequence[Session]) -> list[Document]:
    """Group sessions by their document (identity and scenario): the units a minibatch draws."""
    key = lambda s: f"{s.labels.get('identity_id')}/{s.labels.get('scenario')}"
    keys = sorted({key(s) for s in privacy})
    return [Document(k, tuple(s for s in privacy if key(s) == k), tuple(s for s in utility if key(s) == k))
            for k in keys]


def _minibatch(docs: Sequence[Document], hardness: dict[str, float], batch: int, rng: random.Random,
               archive: bool) -> list[Document]:
    if batch >= len(docs):
        return list(docs)
    hard = sorted(docs, key=lambda d: -hardness[d.key])[:batch // 2] if archive else []
    rest = [d for d in docs if d not in hard]
    return hard + rng.sample(rest, batch - len(hard))


def _best_archived(evaluations: list[dict], w: float) -> tuple[float, ...]:
    return min(evaluations, key=lambda e: w * e["L"] - (1 - w) * e["U"])["theta"]


def _archive_front(evaluations: list[dict]) -> list[tuple[float, ...]]:
    if not evaluations:
        return []
    keep = non_dominated([e["L"] for e in evaluations], [e["U"] for e in evaluations])
    return [e["theta"] for e, k in zip(evaluations, keep) if k]
