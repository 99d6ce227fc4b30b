"""Privacy-utility fronts: which settings of a mitigation are worth having, and how much of the plane they cover.

A point is (L, U): L the privacy loss (lower is better: the worst attack success rate over the framings), U the
utility (higher is better). A point is dominated when another is at least as good on both and better on one; the
front is the set of points nothing dominates. The hypervolume of a front is the area it dominates inside the box
between the front and a reference point (L_ref, U_ref) that every sensible point beats: (1, 0) by default, the worst
L and the worst U. A method whose front has the larger hypervolume buys more privacy for less utility across the
whole plane, not only at one knob setting.

    front = pareto_front(points)                       # points: DataFrame with columns L, U (+ anything else)
    hv = hypervolume(front["L"], front["U"])           # in [0, 1] with the default reference
    utility_at(front, max_loss=0.05), loss_at(front, min_utility=0.95 * clean_u)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

Values = Sequence[float] | np.ndarray  # a list or a 1-D array
REFERENCE = (1.0, 0.0)  # (L_ref, U_ref): the worst privacy loss and the worst utility


class FrontError(ValueError):
    pass


def _check(L: np.ndarray, U: np.ndarray, reference: tuple[float, float]) -> None:
    if L.shape != U.shape or L.ndim != 1:
        raise FrontError(f"L and U must be 1-D of one length, got shapes {L.shape} and {U.shape}")
    if not (np.isfinite(L).all() and np.isfinite(U).all()):
        raise FrontError("L and U must be finite (a setting without a measurement has no place on a front)")
    if len(reference) != 2 or not np.isfinite(reference).all():
        raise FrontError(f"reference must be a finite (L_ref, U_ref) pair, got {reference!r}")


def non_dominated(L: Values, U: Values) -> np.ndarray:
    """Boolean mask of the points no other point dominates (lower L, higher U). Of identical points, one is kept
    (the first), so a front never lists the same (L, U) twice."""
    L, U = np.asarray(L, dtype=float), np.asarray(U, dtype=float)
    _check(L, U, REFERENCE)
    keep = np.ones(len(L), dtype=bool)
    for i in range(len(L)):
        better_eq = (L <= L[i]) & (U >= U[i])
        strictly = (L < L[i]) | (U > U[i])
        same = (L == L[i]) & (U == U[i]) & (np.arange(len(L)) < i)
        keep[i] = not (better_eq & strictly).any() and not same.any()
    return keep


def pareto_front(points: pd.DataFrame, loss: str = "L", utility: str = "U") -> pd.DataFrame:
    """The non-dominated rows of `points`, sorted by increasing loss (so utility increases along the front)."""
    for col in (loss, utility):
        if col not in points.columns:
            raise FrontError(f"pareto_front: column {col!r} not in the points (columns: {list(points.columns)})")
    keep = non_dominated(points[loss].to_numpy(float), points[utility].to_numpy(float))
    return points[keep].sort_values([loss, utility]).reset_index(drop=True)


def hypervolume(L: Values, U: Values, reference: tuple[float, float] = REFERENCE) -> float:
    """Area dominated by the points inside the box up to `reference` = (L_ref, U_ref): the union of the rectangles
    [L_i, L_ref] x [U_ref, U_i]. Points beyond the reference (L > L_ref or U < U_ref) add nothing. 0 for no points."""
    L, U = np.asarray(L, dtype=float), np.asarray(U, dtype=float)
    _check(L, U, reference)
    l_ref, u_ref = float(reference[0]), float(reference[1])
    inside = (L < l_ref) & (U > u_ref)
    L, U = L[inside], U[inside]
    if not len(L):
        return 0.0
    order = np.lexsort((-U, L))  # by L ascending, best U first among ties
    area, best_u = 0.0, u_ref
    edges = np.append(L[order], l_ref)
    for k, i in enumerate(order):  # sweep left to right: each strip's height is the best U seen so far
        best_u = max(best_u, U[i])
        area += (edges[k + 1] - edges[k]) * (best_u - u_ref)
    return float(area)


def utility_at(front: pd.DataFrame, max_loss: float, loss: str = "L", utility: str = "U") -> float:
    """The best utility among points with loss <= max_loss (NaN when none reaches it)."""
    ok = front[front[loss] <= max_loss]
    return float(ok[utility].max()) if len(ok) else float("nan")


def loss_at(front: pd.DataFrame, min_utility: float, loss: str = "L", utility: str = "U") -> float:
    """The lowest loss among points with utility >= min_utility (NaN when none keeps that much)."""
    ok = front[front[utility] >= min_utility]
    return float(ok[loss].min()) if len(ok) else float("nan")
