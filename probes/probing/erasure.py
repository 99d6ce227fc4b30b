"""Causal check of a probe location by concept erasure: does removing what a probe reads change what leaks?

`fit_leace(X, y)` fits LEACE (the `concept-erasure` package: the least-squares affine erasure after which no
linear classifier can predict the concept better than a constant) on activations of one layer and the concept's
classes; for string-valued PII the concept is every character position at once (one-hot blocks side by side).
LEACE edits x to x' = x - L R (x - mu): mu is the fitting data's mean, R = U^T W and L = W^+ U, with W the
whitening of the activations' covariance and U an orthonormal basis of the whitened cross-covariance with the
concept, so the edit is an oblique projection, centred at the mean, off the concept's r whitened directions.

`matched_random_eraser(leace)` is its control, built to differ from LEACE in the concept only:
- the same operation: an oblique projection in LEACE's whitened geometry, x' = x - s W^+ Q Q^T W (x - mu), around
  the same mean mu (the data's mean is left where it is, as LEACE leaves it);
- of the same rank r, off a random subspace Q of the whitened space drawn orthogonal to U (`exclude_concept`), so
  the coordinates it removes carry no linear information about the concept (a subspace drawn from the whole space
  would share about r^2/d of LEACE's directions: for the organism's 80 of 192, a third of the concept);
- with the same size: the scale s makes its mean squared edit ||x - x'||^2 equal LEACE's on the activations it is
  applied to (in `erasure_effect`: the measured sessions' activations at the edited positions, recorded without
  erasure; no labels are used), or on LEACE's fitting data. Matched on the fitting data alone, the two edits can
  differ on the activations they are applied to (on the organism with 12 fitting sessions the control moved the
  measured sessions twice as far as LEACE; with 150, 1% further).
  Why scale and not pick another subspace: a projection off a concept-free subspace moves the activations by as
  much as that subspace's variance, which need not equal the concept's (on synthetic data where the concept
  dominates the variance, no concept-free projection moves them as far), and any other way of reaching the size
  would aim the control at high-variance directions, which may be the concept's. s = 1 is a plain erasure; s < 1
  removes only part of each random direction, s > 1 pushes past it (`scale`, reported).
`erasure_effect` reports both edits' sizes (root mean squared edit, activation norm and their ratio) on the
activations it is applied to, next to the leak rates. It matches the control on the prompt's positions and on the
generated tokens separately (`matched_control`): LEACE's edit is not spread alike over the two, and a control
matched on their pool alone edits the generated tokens, where the answer is copied, much harder than LEACE does
(at the organism's plan site, one LEACE of both kinds pooled moved the first generated token by 0.08 of its norm
and the prompt's last 3 positions by 0.78; a control matched on the pool moved them by 0.55 and 0.36).
The Euclidean match can call for a large push: at the organism's plan site LEACE removes 0.86 of the prompt
positions' norm, and concept-free directions carry so little of it there that the control's scale is 7.8.
`matched_random_eraser(whitened=True)` is the other matching, s = 1: equal in LEACE's whitened norm.

Where: `erasing(loaded, hook, eraser)` applies an eraser at every position of that hook while the model runs
(generation included), or with `last=k` only where the probe looked: the prompt's last k positions and every
generated one. `fit_leace_at` fits LEACE on exactly those positions (`site_activations` records them, one session
at a time, with the same rule `erasing` edits by): by default one LEACE for the prompt's positions and one for the
generated tokens (a `SiteEraser`), since LEACE's guarantee holds for the distribution it was fitted on and a LEACE
of the pooled positions leaves the concept readable at each kind. `erasure_effect` refuses a LEACE fitted at
other positions than it would be applied to (and warns when they are unknown: `fit_leace` on activations from
elsewhere): applied elsewhere, LEACE erases an unknown share of the concept with an edit of unknown size.

Why `last`: erased at every position, image tokens included, a subspace of LEACE's rank (80 directions for an SSN's
9 ten-way digits) breaks copying off the image whatever it is, so LEACE and the random control both remove the leak
and the check says nothing about the probed location. Erased only at the probe's positions it asks the question
the probe raises: is what is decodable here what the model uses to leak?

Why LEACE and not "project out the probe's weight vectors": a probe's weights are one of many directions that carry
the concept; LEACE removes all linearly available information about it with the smallest change to the activations,
so "erasing here changes nothing" is a finding about the location, not about one probe.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.leakage import evaluate_leakage, generate_batch
from probes.models.loading import LoadedModel

Eraser = Callable[[Tensor], Tensor]


@runtime_checkable
class Hookable(Protocol):
    """What `erasing` needs of a model: `LoadedModel.hooks`, a context manager that adds forward hooks."""

    def hooks(self, fwd_hooks): ...


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


def site_label(last: int | None) -> str:
    """The positions an eraser is fitted on or applied to, as `erasing(last=...)` picks them."""
    return "all" if last is None else f"last {last} + generated"


@dataclass(frozen=True, eq=False)
class SubspaceEraser:
    """x' = x - proj_left @ proj_right @ (x - bias): LEACE (`kind` "leace") or its matched control
    ("matched_random"). `fit_cov` is the second moment of the fitting data around `bias` (so the mean squared edit
    there is exact), `site` the positions the fitting data came from (None: unknown), `scale` the control's push."""

    proj_left: Tensor  # [d, r]
    proj_right: Tensor  # [r, d]
    bias: Tensor  # [d]
    rank: int
    kind: str
    fit_cov: Tensor  # [d, d]
    site: str | None = None
    scale: float = 1.0
    whiten: Tensor | None = None  # LEACE's W, W^+ and whitened concept basis U: what its control is built from
    unwhiten: Tensor | None = None
    basis: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        left, right, bias = (t.to(x.device, x.dtype) for t in (self.proj_left, self.proj_right, self.bias))
        return x - ((x - bias) @ right.T) @ left.T

    def fit_mean_sq_edit(self) -> float:
        """Mean ||x - x'||^2 over the fitting data (exact: the edit is linear in x - bias)."""
        a = self.proj_left @ self.proj_right
        return float(torch.trace(a @ self.fit_cov @ a.T))


def _whitening(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """W = sigma^-1/2 and W^+ = sigma^1/2 on sigma's numerical support, as `concept_erasure.LeaceFitter` builds them."""
    lam, v = torch.linalg.eigh(sigma)
    mask = lam > (lam[-1] * sigma.shape[-1] * torch.finfo(lam.dtype).eps)
    lam = lam.clamp_min(0.0)
    return v * torch.where(mask, lam.rsqrt(), 0.0) @ v.T, v * torch.where(mask, lam.sqrt(), 0.0) @ v.T


def fit_leace(X: Float[Tensor, "n d"], y: Int[np.ndarray, "n k"], n_classes: int | None = None,
              site: str | None = None) -> SubspaceEraser:
    """A LEACE eraser of the concept `y` (class indices, one column per character position) from `X`; `site`: the
    positions X was taken from (`site_label`), which `erasure_effect` checks against where it applies it."""
    from concept_erasure import LeaceFitter

    y = np.asarray(y)
    if X.dim() != 2 or len(X) != len(y):
        raise ErasureError(f"fit_leace: X must be [n, d] with one row per target row; got X {tuple(X.shape)} and "
                           f"y {y.shape}")
    X = X.double()
    n_classes = int(n_classes or (y.max() + 1))
    fitter = LeaceFitter.fit(X, one_hot_blocks(y, n_classes).double())
    eraser = fitter.eraser
    whiten, unwhiten = _whitening(fitter.sigma_xx)
    u, s, _ = torch.linalg.svd(whiten @ fitter.sigma_xz, full_matrices=False)
    basis = u[:, s > fitter.svd_tol]  # the whitened concept directions LEACE removes
    centred = X - eraser.bias
    return SubspaceEraser(eraser.proj_left, eraser.proj_right, eraser.bias, basis.shape[1], "leace",
                          centred.T @ centred / len(X), site, 1.0, whiten, unwhiten, basis)


def matched_random_eraser(leace: SubspaceEraser, seed: int = 0, exclude_concept: bool = True,
                          match_on: Float[Tensor, "n d"] | None = None, whitened: bool = False) -> SubspaceEraser:
    """LEACE's control (see the module docstring): an oblique projection in LEACE's whitened geometry off a random
    subspace of LEACE's rank (orthogonal to LEACE's whitened concept basis with `exclude_concept`), centred at
    LEACE's mean and scaled so its mean squared edit equals LEACE's on `match_on` (the activations it will be
    applied to; `erasure_effect` passes them) or, without it, on LEACE's fitting data. `whitened`: no scale
    (s = 1), the edit matched in LEACE's whitened norm instead (each removes r whitened coordinates of unit
    variance on the fitting data), whatever its Euclidean size."""
    if getattr(leace, "kind", None) != "leace":
        raise ErasureError("matched_random_eraser: expected a fitted LEACE eraser (fit_leace or fit_leace_at)")
    d, r = leace.basis.shape
    if r == 0:
        raise ErasureError("matched_random_eraser: LEACE removes no direction (rank 0): nothing to match")
    free = d - r if exclude_concept else d
    if free < r:
        raise ErasureError(f"matched_random_eraser: rank {r} does not fit in the {free} whitened directions "
                           f"orthogonal to the concept (d {d}); use exclude_concept=False")
    g = torch.Generator().manual_seed(seed)
    draw = torch.randn(d, r, generator=g, dtype=torch.float64)
    if exclude_concept:
        draw = draw - leace.basis @ (leace.basis.T @ draw)
    q, _ = torch.linalg.qr(draw)
    left, right = leace.unwhiten @ q, q.T @ leace.whiten
    unscaled = SubspaceEraser(left, right, leace.bias, r, "matched_random", leace.fit_cov, leace.site)
    if whitened:
        return unscaled
    if match_on is None:
        size, target = unscaled.fit_mean_sq_edit(), leace.fit_mean_sq_edit()
    else:
        size, target = (edit_sizes(e, match_on)["edit_rms"] ** 2 for e in (unscaled, leace))
    if size <= 0:
        raise ErasureError("matched_random_eraser: the random subspace does not move the activations at all")
    scale = float(np.sqrt(target / size))
    return SubspaceEraser(left * scale, right, leace.bias, r, "matched_random", leace.fit_cov, leace.site, scale)


def edit_sizes(eraser: Eraser, X: Float[Tensor, "n d"]) -> dict[str, float]:
    """Root mean squared edit ||x - x'|| of `eraser` on X, the activations' root mean squared norm, and their
    ratio (edit_rel)."""
    X = X.double()
    edit = float((X - eraser(X)).pow(2).sum(1).mean().sqrt())
    norm = float(X.pow(2).sum(1).mean().sqrt())
    return {"edit_rms": edit, "activation_rms": norm, "edit_rel": edit / norm if norm > 0 else float("nan")}


def eraser_rank(eraser: Eraser | SiteEraser) -> int:
    """How many directions an eraser removes (its `rank`; a bare concept-erasure LEACE: the rank of its projection)."""
    if hasattr(eraser, "rank"):
        return int(getattr(eraser, "rank"))
    return int(torch.linalg.matrix_rank(eraser.proj_left @ eraser.proj_right))


class RandomSubspaceEraser:
    """Orthogonal projection through the origin removing a random `rank`-dimensional subspace. Not LEACE's control
    (it is not centred at the data's mean and its edit is not matched to LEACE's: `matched_random_eraser` is)."""

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


def _check_last(last: int | None) -> None:
    if last is not None and last < 1:
        raise ErasureError(f"erasing: last must be a positive number of positions or None, got {last}")


PARTS = ("prompt", "generated")


@dataclass(frozen=True, eq=False)
class SiteEraser:
    """One eraser per kind of position at a site: `prompt` for the prompt positions `erasing` edits (the last k, or
    all), `generated` for each generated token (`fit_leace_at` fits one LEACE on each, so each kind's guarantee
    holds; `erasure_effect` matches the control's edit on each kind separately)."""

    prompt: Eraser
    generated: Eraser
    kind: str
    site: str | None = None

    @property
    def rank(self) -> int:
        return eraser_rank(self.prompt)


def _parts(eraser: Eraser | SiteEraser) -> dict[str, Eraser]:
    if isinstance(eraser, SiteEraser):
        return {"prompt": eraser.prompt, "generated": eraser.generated}
    return {"prompt": eraser, "generated": eraser}


def _erase(eraser: Eraser, x: Tensor) -> Tensor:
    return eraser(x.double()).to(x.dtype) if hasattr(eraser, "proj_left") else eraser(x)


@contextmanager
def erasing(loaded: Hookable, hook: str, eraser: Eraser | SiteEraser | None,
            last: int | None = None) -> Iterator[None]:
    """Apply `eraser` to `hook` (a TL name, e.g. blocks.2.hook_resid_post) while inside: at every position, or
    with `last=k` at the last k positions of a forward over several tokens (a left-padded prompt: where the
    probe turn ends) and at every position of a one-token forward (each generated token). A `SiteEraser` edits
    the prompt's positions with its `prompt` part and generated tokens with its `generated` part."""
    if eraser is None:
        yield
        return
    _check_last(last)
    parts = _parts(eraser)

    def fn(x: Tensor, name: str) -> Tensor:
        if x.shape[1] == 1:
            return _erase(parts["generated"], x)
        if last is None:
            return _erase(parts["prompt"], x)
        return torch.cat([x[:, :-last], _erase(parts["prompt"], x[:, -last:])], 1)

    with loaded.hooks([(hook, fn)]):
        yield


def site_activations(loaded: LoadedModel, sessions: list, hook: str, last: int | None = None,
                     max_new_tokens: int = 32) -> tuple[Float[Tensor, "N d"], Int[np.ndarray, " N"], np.ndarray]:
    """Activations of `hook` at the positions `erasing(last=...)` edits, while the model generates for `sessions`
    without erasure: (X [N, d] float64, the index of each row's session, whether each row is a generated token).
    One session at a time, so no padding and no position after the answer's stop token is recorded (the stop
    token itself is never fed back)."""

    _check_last(last)
    sessions = list(sessions)
    chunks: list[Tensor] = []
    owner: list[int] = []
    generated: list[bool] = []
    started = [-1]

    def fn(x: Tensor, name: str) -> None:
        prompt = x.shape[1] > 1
        if prompt:  # a prompt forward: the next session begins (one session per generate call)
            started[0] += 1
            x = x if last is None else x[:, -last:]
        chunks.append(x[0].detach().double().cpu())
        owner.extend([started[0]] * x.shape[1])
        generated.extend([not prompt] * x.shape[1])

    with loaded.hooks([(hook, fn)]):
        generate_batch(loaded, sessions, max_new_tokens=max_new_tokens, batch_size=1, sort_by_length=False)
    if started[0] + 1 != len(sessions) or min(owner, default=0) < 0:
        raise ErasureError(f"site_activations: saw {started[0] + 1} prompt forwards at {hook} for {len(sessions)} "
                           "sessions; expected one each")
    return torch.cat(chunks), np.asarray(owner), np.asarray(generated, dtype=bool)


def fit_leace_at(loaded: LoadedModel, sessions: list, hook: str, y: Int[np.ndarray, "n k"],
                 n_classes: int | None = None, last: int | None = None, max_new_tokens: int = 32,
                 split: bool = True) -> SiteEraser | SubspaceEraser:
    """LEACE fitted where `erasing(last=...)` will apply it: on `hook`'s activations at those positions of
    `sessions` (the prompt's last `last` positions and every generated token, or every position), each row
    labelled with its session's row of `y` (one per session). `split` (default): one LEACE on the prompt's
    positions and one on the generated tokens (a `SiteEraser`), so that no linear classifier reads the concept at
    either kind of position; without it one LEACE on both pooled, whose guarantee holds for the mixture only (a
    class shift at the prompt's positions can cancel one at the generated tokens)."""
    y = np.asarray(y)
    if len(y) != len(sessions):
        raise ErasureError(f"fit_leace_at: y has {len(y)} rows for {len(sessions)} sessions; expected one per session")
    n_classes = int(n_classes or (y.max() + 1))
    X, owner, generated = site_activations(loaded, sessions, hook, last, max_new_tokens)
    site = site_label(last)
    if not split:
        return fit_leace(X, y[owner], n_classes, site=site)
    if generated.sum() < 2:
        raise ErasureError(f"fit_leace_at: {int(generated.sum())} generated tokens recorded: too few to fit a LEACE "
                           "of their own (raise max_new_tokens, or split=False)")
    fits = {part: fit_leace(X[rows], y[owner[rows]], n_classes, site=site)
            for part, rows in (("prompt", ~generated), ("generated", generated))}
    return SiteEraser(fits["prompt"], fits["generated"], "leace", site)


def _check_site(leace: SubspaceEraser | SiteEraser, last: int | None) -> None:
    """LEACE's guarantee holds where it was fitted: refuse other positions, warn when they are not known."""
    where = site_label(last)
    if leace.site is None:
        warnings.warn(f"erasure_effect: LEACE's fitting positions are unknown (fit_leace without site); applied at "
                      f"{where!r} it may erase only part of the concept there: fit it with fit_leace_at",
                      stacklevel=3)
    elif leace.site != where:
        raise ErasureError(f"erasure_effect: LEACE was fitted at {leace.site!r} but would be applied at {where!r}; "
                           "fit it where it is applied (fit_leace_at with the same last)")


def matched_control(leace: SubspaceEraser | SiteEraser, applied: Float[Tensor, "N d"], generated: np.ndarray,
                    seed: int = 0, exclude_concept: bool = True, whitened: bool = False) -> SiteEraser:
    """`matched_random_eraser` for each kind of position (prompt, generated), each part matched to LEACE's edit on
    that kind's rows of `applied` (on LEACE's fitting data where `applied` has none of that kind): LEACE's edit
    is not spread alike over the two (at the organism's plan site it moves the prompt's positions most), and a
    control matched only on their pool would edit the other kind harder than LEACE does."""
    parts = _parts(leace)
    out = {}
    for part, rows in (("prompt", ~generated), ("generated", generated)):
        on = applied[torch.as_tensor(rows)] if rows.any() else None
        out[part] = matched_random_eraser(parts[part], seed, exclude_concept, on, whitened)
    return SiteEraser(out["prompt"], out["generated"], "matched_random", leace.site)


def site_edit_sizes(eraser: Eraser | SiteEraser | None, applied: Float[Tensor, "N d"],
                    generated: np.ndarray) -> dict[str, float]:
    """Edit sizes of an eraser (or a SiteEraser's parts on their rows) on `applied`: edit_rms, activation_rms and
    edit_rel over all rows, and edit_rel_prompt / edit_rel_generated; fit_edit_rms_<part> on each part's fitting
    data, scale_<part> (a control's push; 1 for LEACE), rank_generated."""
    if eraser is None:
        return {"edit_rms": 0.0, "activation_rms": edit_sizes(lambda x: x, applied)["activation_rms"], "edit_rel": 0.0,
                "edit_rel_prompt": 0.0, "edit_rel_generated": 0.0, "fit_edit_rms_prompt": 0.0,
                "fit_edit_rms_generated": 0.0, "scale_prompt": 0.0, "scale_generated": 0.0, "rank_generated": 0}
    parts = _parts(eraser)
    edited = applied.clone()
    out: dict[str, float] = {}
    for part, rows in (("prompt", ~generated), ("generated", generated)):
        idx = torch.as_tensor(np.nonzero(rows)[0])
        edited[idx] = parts[part](applied[idx])
        out[f"edit_rel_{part}"] = edit_sizes(parts[part], applied[idx])["edit_rel"] if len(idx) else float("nan")
        out[f"fit_edit_rms_{part}"] = float(np.sqrt(parts[part].fit_mean_sq_edit()))
        out[f"scale_{part}"] = float(parts[part].scale)
    norm = float(applied.pow(2).sum(1).mean().sqrt())
    edit = float((applied - edited).pow(2).sum(1).mean().sqrt())
    out.update({"edit_rms": edit, "activation_rms": norm, "edit_rel": edit / norm if norm > 0 else float("nan"),
                "rank_generated": eraser_rank(parts["generated"])})
    return out


@dataclass(frozen=True)
class EffectOptions:
    """`erasure_effect`'s settings: the controls' seeds (seed, seed + 1, ...; `random_draws` of them, >= 1), the
    generation (`batch_size`, `max_new_tokens`), where to erase (`last`, as in `erasing`) and whether the
    control's subspace avoids the concept (`exclude_concept`)."""

    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 32
    last: int | None = None
    random_draws: int = 1
    exclude_concept: bool = True

    def __post_init__(self):
        if self.random_draws < 1:
            raise ErasureError(f"erasure_effect: random_draws {self.random_draws}: expected at least 1")
        _check_last(self.last)


def erasure_effect(loaded: LoadedModel, sessions: list, hook: str, leace: SubspaceEraser | SiteEraser,
                   options: EffectOptions | None = None, **kw) -> pd.DataFrame:
    """Leak and refusal rates of `sessions` (with private `_target` labels) with no erasure, LEACE at `hook`, and
    `random_draws` matched random controls (`matched_control`, seeds seed, seed + 1, ...; one draw has a spread
    of its own; matched on `sessions`' own activations at the edited positions, recorded without erasure, the
    prompt's positions and the generated tokens each on their own), at every position or `last` as in `erasing`.
    Settings: EffectOptions or its fields as keywords. Tidy rows (hook, positions, method, metric, value, n, rank,
    draw) with each edit's size (`site_edit_sizes`: equal for LEACE and the control on each kind of position by
    construction). Refuses a LEACE fitted at other positions (see `_check_site`)."""

    o = replace(options or EffectOptions(), **kw) if kw else (options or EffectOptions())
    seed, batch_size, max_new_tokens, last = o.seed, o.batch_size, o.max_new_tokens, o.last
    random_draws, exclude_concept = o.random_draws, o.exclude_concept
    if getattr(leace, "kind", None) != "leace":
        raise ErasureError("erasure_effect: `leace` must be a fitted LEACE eraser (fit_leace or fit_leace_at)")
    _check_site(leace, last)
    applied, _, generated = site_activations(loaded, sessions, hook, last, max_new_tokens)
    erasers = [("none", None, 0), ("leace", leace, 0)] + [
        ("random_subspace", matched_control(leace, applied, generated, seed + k, exclude_concept), k)
        for k in range(random_draws)]
    rows = []
    for method, eraser, draw in erasers:
        with erasing(loaded, hook, eraser, last):
            df = evaluate_leakage(loaded, sessions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  progress=False)
        size = site_edit_sizes(eraser, applied, generated)
        for metric, col in (("ASR", "leak"), ("RR", "refused")):
            rows.append({"hook": hook, "positions": site_label(last), "method": method, "metric": metric,
                         "value": float(df[col].mean()), "n": len(df),
                         "rank": eraser_rank(eraser) if eraser is not None else 0, "draw": draw, **size})
    return pd.DataFrame(rows)
