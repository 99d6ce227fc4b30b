"""The batched solver shared by the linear probes (`linear.fit_probes`) and the online code (`mdl`): per-training-part
standardisation folded into the weights, and L2 multinomial logistic regression for many (cell, training part)
problems at once along a C grid (K-FAC-preconditioned L-BFGS; the method is described in `probes.probing.linear`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

MASKED = -1e9  # logit of a class absent from a training part


def standardisation(X: Float[Tensor, "c n d"], train_masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """X centred per cell, the centre [c, d], the training masks as weights M [q, n], and each training part's
    feature mean and std [c, q, d] of the centred data (a constant feature gets std 1)."""
    centre = X.mean(1)  # fold statistics of centred data are numerically safe even for large-mean features
    X = X - centre[:, None]
    M = train_masks.to(X.dtype)  # [q, n]
    n_q = M.sum(1)
    mean = torch.einsum("qn,cnd->cqd", M, X) / n_q[:, None]
    var = torch.einsum("qn,cnd->cqd", M, X * X) / n_q[:, None] - mean**2
    std = var.clamp_min(0).sqrt()
    std = torch.where(std > 1e-6 * std.amax(-1, keepdim=True).clamp_min(1e-12), std, torch.ones_like(std))  # constant
    return X, centre, M, mean, std


def raw_weights(W: Tensor, b: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Standardised (W [c, q, d, K], b [c, q, K]) -> weights giving the same logits on unstandardised inputs."""
    Wr = W / std[..., None]
    return Wr, b - torch.einsum("cqd,cqdk->cqk", mean, Wr)


def solve_path(solver, qs, Cs, n_train, W, b, score, frozen_after=None):
    """Solve problems `qs` at each C of the ascending grid, each warm-started from the previous solutions: from
    the third C on, extrapolated linearly (in log C) from the last two (about a fifth fewer passes than starting
    at the last one). Returns the last W, b and, when `score` is given, score(W, b) and convergence per C
    (stacked on a last axis). Problems of cell i are frozen at C index frozen_after[i] once past it."""
    W_prev, b_prev, state, scores, convs, path = W, b, None, [], [], []
    for j, C in enumerate(Cs):
        frozen = None if frozen_after is None else (frozen_after < j)[:, None].expand(W.shape[:2])
        W0, b0 = W, b
        if j >= 2:
            move = torch.ones(W.shape[:2], dtype=torch.bool, device=W.device) if frozen is None else ~frozen
            W0 = torch.where(move[..., None, None], 2 * W - W_prev, W)
            b0, state = torch.where(move[..., None], 2 * b - b_prev, b), None
        W_prev, b_prev = W, b
        lam = (1.0 / (float(C) * n_train))[None].expand(W.shape[:2])
        W, b, conv, state = solver.solve(qs, lam, W0, b0, state, frozen)
        if score is not None:
            scores.append(score(W, b)), convs.append(conv), path.append((W, b))
    if score is None:
        return W, b, None, None
    # every C's solution: [c, q, C, d, K] and [c, q, C, K] (the folds' probes at each cell's chosen C come from it)
    return (torch.stack([w for w, _ in path], 2), torch.stack([v for _, v in path], 2), torch.stack(scores, -1),
            torch.stack(convs, -1))


@dataclass(frozen=True)
class SolverOptions:
    """When a fit stops: every gradient entry at most `tol` in absolute value (sklearn's lbfgs rule) or `max_iter`
    line-search trials (passes over the data); `memory`: the L-BFGS pairs kept."""

    tol: float = 1e-4
    max_iter: int = 100
    memory: int = 10

    def __post_init__(self):
        if not self.tol > 0 or int(self.max_iter) < 1 or int(self.memory) < 1:
            raise ValueError(f"solver options: expected tol > 0, max_iter >= 1 and memory >= 1, got {self}")


class LogReg:
    """L2 multinomial logistic regression for many (cell, training part) problems at once; see the module docstring.

    The data X [c, n, d] (centred per cell) is shared by all problems of a cell, each problem weighting its own
    training rows (M [q, n]), so one batched matmul per pass serves every fold; each problem's standardisation
    (mean, std [c, q, d]) is folded into its weights instead of copying X per fold. Logits are laid out
    [c, q, K, n] so the softmax over K runs along contiguous rows. `passes` counts passes over the data."""

    def __init__(self, X: Tensor, Y1h: Tensor, M: Tensor, stats: tuple[Tensor, Tensor], class_ok: Tensor,
                 options: SolverOptions = SolverOptions()):
        """X [c, n, d] centred, Y1h [c, n, K] one-hot labels, M [q, n] training weights, stats: each part's (mean,
        std) [c, q, d] (`standardisation`), class_ok [c, q, K] the classes present in each part."""
        mean, std = stats
        self.X, self.M, self.tol, self.max_iter, self.memory = X, M, options.tol, options.max_iter, options.memory
        self.Y = Y1h.argmax(-1)  # [c, n]
        self.YT = Y1h.transpose(1, 2)  # [c, K, n]
        self.mean, self.std, self.class_ok = mean, std, class_ok
        self.passes = 0  # passes over the data (each serves every unfinished cell of the chunk)
        # Feature covariance of the standardised data (all examples), eigendecomposed once: the S of H ~ A (x) S.
        Xs = (X - mean[:, -1:]) / std[:, -1:]
        e, self.U = torch.linalg.eigh(Xs.transpose(1, 2) @ Xs / X.shape[1])
        self.e = e.clamp_min(0)

    def solve(self, qs: slice, lam: Tensor, W: Tensor, b: Tensor, state=None, frozen=None):
        """Minimise mean CE over each problem's training rows + lam/2 |W|^2, from (W [c, q, d, K], b [c, q, K]).
        `state`: the data terms at this (W, b) from the previous call (saves a pass); `frozen` [c, q]: problems to
        leave as they are. At most max_iter line-search trials (= passes) per problem. Returns W, b, converged
        [c, q] and the state at the solution.

        Each problem's variables are one flat vector x = [V, b] with V = W^T U [K, d], the weights in the eigenbasis
        of S (an orthogonal change of basis: the penalty and L-BFGS's inner products are unchanged), where the
        K-FAC preconditioner is diagonal in features. Cells whose problems have all converged leave the working set
        as they finish, so a chunk costs about the sum of its cells' passes, not its slowest cell's times its size."""
        c, q, d, K = W.shape
        M = self.M[qs]
        w = M / M.sum(1, keepdim=True)  # [q, n]: mean over training rows
        cst = {"X": self.X, "Y": self.Y, "mean": self.mean[:, qs], "std": self.std[:, qs], "U": self.U,
               "e": self.e, "bias": torch.where(self.class_ok[:, qs], 0.0, MASKED), "lam": lam}
        V = torch.bmm(W.transpose(-1, -2).reshape(c, q * K, d), self.U).view(c, q, K * d)
        x = torch.cat([V, b], -1)
        var = dict(state) if state is not None else self._data_terms(cst, w, x)
        var["x"] = x
        var["gmax"] = self._gmax(cst, var)  # (the state's was for the previous lam)
        frozen = torch.zeros_like(lam, dtype=torch.bool) if frozen is None else frozen
        var["done"] = frozen | (var["gmax"] <= self.tol)
        var["iters"] = torch.zeros_like(lam, dtype=torch.long)  # passes each problem took (diagnostics)
        var["S"] = x.new_zeros(c, q, self.memory, x.shape[-1])  # L-BFGS memory: steps s, gradient changes y,
        var["Y"], var["rho"] = torch.zeros_like(var["S"]), x.new_zeros(c, q, self.memory)  # 1/s'y (0: unused)
        self._newest = self.memory - 1  # slot of the newest pair (a ring buffer)
        var["dx"] = self._direction(cst, var)
        var["t"] = torch.ones_like(lam)
        out = {k: v.clone() for k, v in var.items()}
        idx = torch.arange(c, device=W.device)
        for _ in range(self.max_iter):
            alive = ~var["done"].all(1)
            if not alive.any():
                break
            if alive.sum() <= 0.5 * len(idx):  # drop finished cells (their results are kept in `out`)
                for k, v in var.items():
                    out[k][idx] = v
                idx = idx[alive]
                var = {k: v[alive] for k, v in var.items()}
                cst = {k: v[alive] for k, v in cst.items()}
            self._step(cst, w, var)
        for k, v in var.items():
            out[k][idx] = v
        self.iters = out["iters"]
        V = out["x"][..., :K * d].reshape(c, q * K, d)
        W = torch.bmm(V, self.U.transpose(1, 2)).view(c, q, K, d).transpose(-1, -2)
        return W, out["x"][..., K * d:], out["done"], {k: out[k] for k in ("fd", "g", "A")}

    def _data_terms(self, cst, w, x) -> dict:
        """One pass over X: mean CE over the training rows (fd), its gradient (g: flat, eigenbasis), the K-FAC
        factor A [c, q, K, K], and gmax, sklearn's stopping quantity: max |full gradient| in the feature basis."""
        self.passes += 1
        X, mean, std, U = cst["X"], cst["mean"], cst["std"], cst["U"]
        c, q, K = cst["bias"].shape
        d = X.shape[2]
        Wstd = torch.bmm(x[..., :K * d].reshape(c, q * K, d), U.transpose(1, 2)).view(c, q, K, d)
        Wr = Wstd / std[:, :, None]
        br = x[..., K * d:] - (Wr * mean[:, :, None]).sum(-1) + cst["bias"]
        Z = torch.bmm(Wr.view(c, q * K, d), X.transpose(1, 2)).view(c, q, K, -1)
        Z += br[..., None]
        Z -= Z.amax(2, keepdim=True)
        label = cst["Y"][:, None, None, :].expand(c, q, 1, -1)
        z_label = Z.gather(2, label)[:, :, 0]  # [c, q, n]
        P = Z.exp_()
        norm = P.sum(2)
        P /= norm[:, :, None]
        fd = ((norm.log() - z_label) * w).sum(-1)
        Pw = P * w[:, None]
        A = torch.diag_embed(Pw.sum(-1)) - Pw @ P.transpose(-1, -2)
        R = Pw.scatter_add_(2, label, -w[None, :, None].expand(c, q, 1, -1))  # (P - Y) w
        gWr = torch.bmm(R.view(c, q * K, -1), X).view(c, q, K, d)
        gb = R.sum(-1)
        gW = (gWr - gb[..., None] * mean[:, :, None]) / std[:, :, None]
        gmax = torch.maximum((gW + cst["lam"][..., None, None] * Wstd).abs().amax((-1, -2)), gb.abs().amax(-1))
        gV = torch.bmm(gW.view(c, q * K, d), U).view(c, q, K * d)
        return {"fd": fd, "g": torch.cat([gV, gb], -1), "A": A, "gmax": gmax}

    def _gmax(self, cst, var) -> Tensor:
        """gmax from the eigenbasis gradient (rotated back), for a state computed under another lam."""
        c, q, K = cst["bias"].shape
        d = cst["X"].shape[2]
        gW = torch.bmm(var["g"][..., :K * d].reshape(c, q * K, d), cst["U"].transpose(1, 2)).view(c, q, K * d)
        gW = gW + cst["lam"][..., None] * torch.bmm(var["x"][..., :K * d].reshape(c, q * K, d),
                                                    cst["U"].transpose(1, 2)).view(c, q, K * d)
        return torch.maximum(gW.abs().amax(-1), var["g"][..., K * d:].abs().amax(-1))

    def _full_gradient(self, cst, var) -> Tensor:
        K, d = cst["bias"].shape[-1], cst["X"].shape[2]
        g = var["g"].clone()
        g[..., :K * d] += cst["lam"][..., None] * var["x"][..., :K * d]
        return g

    def _direction(self, cst, var) -> Tensor:
        """L-BFGS two-loop recursion over the memory (pairs with rho = 0 are skipped); H0 = the K-FAC inverse
        (A (x) S + lam I)^-1 (A^+ for the intercepts), scaled by s'y / y'H0y of the newest pair."""
        c, q, K = cst["bias"].shape
        d = cst["X"].shape[2]
        a, Ua = torch.linalg.eigh(var["A"])
        a = a.clamp_min(0)
        UaT = Ua.transpose(-1, -2)
        inv_w = 1.0 / (a[..., None] * cst["e"][:, None, None, :] + cst["lam"][..., None, None])
        inv_b = torch.where(a > 1e-6, 1.0 / a.clamp_min(1e-6), 0.0)[..., None]

        def h0(v):
            hV = Ua @ ((UaT @ v[..., :K * d].reshape(c, q, K, d)) * inv_w)
            hb = Ua @ ((UaT @ v[..., K * d:, None]) * inv_b)
            return torch.cat([hV.view(c, q, K * d), hb[..., 0]], -1)

        S, Y, rho, m = var["S"], var["Y"], var["rho"], self.memory
        order = [(self._newest + 1 + j) % m for j in range(m)]  # oldest first
        r = self._full_gradient(cst, var)
        alphas = {}
        for j in reversed(order):
            alphas[j] = rho[..., j] * torch.linalg.vecdot(S[:, :, j], r)
            r = torch.addcmul(r, alphas[j][..., None], Y[:, :, j], value=-1)
        r = h0(r)
        new = self._newest
        yHy = torch.linalg.vecdot(Y[:, :, new], h0(Y[:, :, new]))
        r = r * torch.where(rho[..., new] > 0, 1.0 / (rho[..., new] * yHy).clamp_min(1e-30), 1.0)[..., None]
        for j in order:
            r = torch.addcmul(r, (alphas[j] - rho[..., j] * torch.linalg.vecdot(Y[:, :, j], r))[..., None], S[:, :, j])
        return -r

    def _step(self, cst, w, var) -> None:
        """One line-search trial for every unfinished problem: accept (Armijo) and take a new L-BFGS direction,
        or halve the step. Updates `var` in place."""
        K, d = cst["bias"].shape[-1], cst["X"].shape[2]
        lam, done, t, x, dx = cst["lam"], var["done"], var["t"], var["x"], var["dx"]
        var["iters"] += ~done
        step = torch.where(done, 0.0, t)
        xc = torch.addcmul(x, step[..., None], dx)
        new = self._data_terms(cst, w, xc)
        f = var["fd"] + 0.5 * lam * x[..., :K * d].square().sum(-1)
        fc = new["fd"] + 0.5 * lam * xc[..., :K * d].square().sum(-1)
        g = self._full_gradient(cst, var)
        slope = torch.linalg.vecdot(g, dx)
        ok = ~done & (fc <= f + 1e-4 * step * slope + 1e-6 * (f.abs() + 1))  # Armijo, float32 round-off allowed
        new["x"] = xc
        for k, v in new.items():
            var[k] = torch.where(ok.view(ok.shape + (1,) * (v.ndim - 2)), v, var[k])
        s_, y_ = var["x"] - x, self._full_gradient(cst, var) - g  # zero where rejected
        sy = torch.linalg.vecdot(s_, y_)
        self._newest = (self._newest + 1) % self.memory
        var["S"][:, :, self._newest], var["Y"][:, :, self._newest] = s_, y_
        var["rho"][:, :, self._newest] = torch.where(ok & (sy > 1e-10), 1.0 / sy.clamp_min(1e-10), 0.0)
        var["done"] = done | (ok & (var["gmax"] <= self.tol))
        var["dx"] = torch.where(ok[..., None], self._direction(cst, var), dx)
        var["t"] = torch.where(ok, 1.0, 0.5 * t)
