"""Iterative rules: the geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2019) and
centered clipping (Karimireddy et al. 2021), on coefficients over the Gram matrix for few rows,
by passes over U otherwise."""

from __future__ import annotations

from typing import Any

import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..updates import Gram, combine, row_sq_dists
from .base import Aggregator, check_nonneg_int, check_positive
from .common import check_int, finite_or_raise, honest_majority, make_report, prepare_rows


def use_gram(n: int, passes: int) -> bool:
    """Whether iterating on coefficients over the Gram matrix (about n / 20 passes' worth of
    work, measured) beats ``passes`` passes over U."""
    return n <= 20 * passes


class GeoMed(Aggregator):
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2019):
    v <- sum_i b_i U_i / sum_i b_i with b_i = w_i / max(nu, |v - U_i|), from the weighted mean,
    until v moves by less than tol * |v| or after ``iterations`` steps. (RFA stops on the
    relative change of the objective; with far-away outliers that objective is huge and stops
    too early, so the step size is used instead.) Report scores: the final normalised b_i;
    ``info['objective']`` is sum_i w_i |v - U_i| / sum_i w_i. f is only checked: the geometric
    median's breakdown point is 1/2 (Pillutla et al.), so it needs n > 2f.

    With few rows the iterations run on coefficients over the Gram matrix; the last step is then
    redone with exact distances and the stopping rule checked on it (iterating further over U
    when it fails), so the result meets the same rule as iterating over U throughout."""

    name = "geomed"

    def __init__(self, iterations: int, nu: float, tol: float, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)
        self.iterations = check_int(self.name, "iterations", iterations)
        self.nu = check_positive(self.name, "nu", nu)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
            raise PhalanxError(f"geomed: tol must be a number >= 0, got {tol!r}")
        self.tol = float(tol)

    def _gram_phase(self, U, rows, alpha):
        """Weiszfeld on coefficients over the Gram matrix: (beta, steps, Gram), or None when a
        row has NaN/inf values."""
        n = len(alpha)
        gram = Gram(U, rows, extras=[torch.zeros(U.shape[1], dtype=U.dtype)])
        if bool(gram.bad.any()):
            return None
        G, o = gram.G, n  # the last point is the origin
        Gx, g_o = G[:n, :n], G[:n, o]
        diag = Gx.diagonal()
        beta, steps = alpha, 0
        for steps in range(1, self.iterations + 1):
            Gb = Gx @ beta
            dist = (diag - 2 * Gb + beta @ Gb).clamp_min(0).sqrt()
            new = alpha / dist.clamp_min(self.nu)
            new = new / new.sum()
            step = new - beta
            moved = float((step @ Gx @ step).clamp_min(0).sqrt())
            vnorm = float((new @ Gx @ new - 2 * new @ g_o + G[o, o]).clamp_min(0).sqrt())
            beta = new
            if moved <= self.tol * vnorm:
                break
        return beta, steps, Gx

    def __call__(self, U, w, ctx: RoundContext):
        U, wa, idx, rows = prepare_rows(self.name, U, w)
        honest_majority(self.name, len(idx), self.f)
        alpha = wa.double().cpu() / wa.double().sum().cpu()
        steps, budget, Gx = 0, self.iterations, None
        fast = self._gram_phase(U, rows, alpha) if use_gram(len(idx), 2 * min(self.iterations, 10)) else None
        if fast is not None:
            beta, steps, Gx = fast
            budget = max(1, self.iterations - steps)
        else:  # many rows, or rows with NaN/inf values: iterate over U throughout
            beta = alpha
        v = combine(beta, U, rows)
        done, converged = 0, False
        for done in range(1, budget + 1):  # over U: exact distances
            dist = row_sq_dists(U, v, rows).sqrt()
            beta = alpha / dist.clamp_min(self.nu)
            beta = beta / beta.sum()
            new = combine(beta, U, rows)
            moved = float(torch.linalg.vector_norm((new - v).double()))
            v = new
            if moved <= self.tol * float(torch.linalg.vector_norm(v.double())):
                converged = True
                break
        if Gx is not None and converged and done == 1:  # v = sum beta_i U_i: distances from the Gram
            Gb = Gx @ beta
            far = (Gx.diagonal() - 2 * Gb + beta @ Gb).clamp_min(0).sqrt()
        else:
            far = row_sq_dists(U, v, rows).sqrt()
        obj = float((alpha * far).sum())
        g = finite_or_raise(self.name, v)
        return g, make_report(self.name, U.shape[0], idx, beta, iterations=steps + done, objective=obj)

    def __repr__(self):
        return f"GeoMed(iterations={self.iterations}, nu={self.nu}, tol={self.tol}, f={self.f})"


class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy et al. 2021): from the previous aggregate v (0 at first),
    repeat v <- v + mean_i clip_tau(U_i - v), clip_tau(x) = x min(1, tau / |x|). Stateful: the
    center is kept across rounds (``state_dict`` / ``load_state_dict``). Report scores are each
    row's distance to the starting center. ``tau="auto"`` sets tau at every iteration to the median
    distance of the rows to the current center, so it follows the scale of the updates (our choice:
    the paper tunes a fixed tau). f is only checked: the paper's guarantee is for a Byzantine
    fraction delta = f / n well under 1/2, and no aggregator survives delta >= 1/2, so it needs
    n > 2f (we refuse only what no tau can rescue). With few rows the iterations run on
    coefficients over the Gram matrix of the rows and the center (one pass over U at the end)."""

    name = "centered_clipping"

    def __init__(self, tau: float | str, iterations: int, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)
        self.tau = tau if tau == "auto" else check_positive(self.name, "tau", tau)
        self.iterations = check_int(self.name, "iterations", iterations)
        self.center: torch.Tensor | None = None

    def _step(self, dist: torch.Tensor):
        tau = float(dist.median()) if self.tau == "auto" else self.tau
        scale = torch.where(dist > tau, tau / dist.clamp_min(1e-300), torch.ones_like(dist))
        return tau, scale, int((dist > tau).sum())

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n, d = len(idx), U.shape[1]
        honest_majority(self.name, n, self.f)
        if self.center is None:
            v0 = torch.zeros(d, dtype=U.dtype, device=U.device)
        elif self.center.numel() != d:
            raise PhalanxError(f"{self.name}: the stored center has d={self.center.numel()}, "
                               f"got updates with d={d}")
        else:
            v0 = self.center.to(device=U.device, dtype=U.dtype)
        first, tau, clipped = None, None, 0
        gram = Gram(U, rows, extras=[v0]) if use_gram(n, 2 * self.iterations) else None
        if gram is not None and not bool(gram.bad.any()):
            G = gram.G  # points: the rows, then v0
            theta = torch.zeros(n + 1, dtype=torch.float64)
            theta[n] = 1.0  # v = sum_j theta_j p_j, coefficients summing to 1
            diag = G.diagonal()[:n]
            for _ in range(self.iterations):
                Gt = G[:n] @ theta
                dist = (diag - 2 * Gt + theta @ G @ theta).clamp_min(0).sqrt()
                first = dist if first is None else first
                tau, scale, clipped = self._step(dist)
                theta = (1.0 - float(scale.mean())) * theta
                theta[:n] += scale / n
            v = combine(theta[:n], U, rows) + float(theta[n]) * v0
        else:
            v = v0
            for _ in range(self.iterations):
                dist = row_sq_dists(U, v, rows).sqrt()
                first = dist if first is None else first
                tau, scale, clipped = self._step(dist)
                # v + mean_i s_i (U_i - v) = (1 - mean(s)) v + mean_i s_i U_i
                v = (1.0 - float(scale.mean())) * v + combine(scale / n, U, rows)
        g = finite_or_raise(self.name, v)
        self.center = g.detach().clone()
        return g, make_report(self.name, U.shape[0], idx, first, tau=tau,
                              iterations=self.iterations, clipped=clipped)

    def state_dict(self) -> dict[str, Any]:
        return {"center": None if self.center is None else self.center.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"center"}:
            raise PhalanxError(f"{self.name}: state must have the key 'center', got keys {sorted(state)}")
        c = state.get("center")
        if c is not None and (not isinstance(c, torch.Tensor) or c.ndim != 1):
            raise PhalanxError(f"{self.name}: state 'center' must be a 1-D tensor or None, got {c!r}")
        self.center = None if c is None else c.clone()

    def __repr__(self):
        return f"CenteredClipping(tau={self.tau}, iterations={self.iterations}, f={self.f})"
