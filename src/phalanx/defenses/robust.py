"""Robust aggregators: mean (FedAvg), coordinate-wise median, trimmed mean, Krum, Multi-Krum,
Bulyan, geometric median (RFA) and centered clipping.

Weights: ``mean`` and ``geomed`` weight rows by ``w``; every other rule treats the rows with
``w > 0`` alike (a Byzantine client could claim a large weight), and rows with ``w == 0`` are
ignored everywhere.

Bounds. ``f`` is the server's assumed Byzantine count. Factories check only ``f >= 0``; each call
checks the rule's bound on n = the number of *active* rows (``w > 0``) and raises ``BoundError``
(``krum: needs n > 2f + 2 clients, got n=8, f=3``) when it cannot be met. median n > 2f (Yin et
al. 2018: breakdown point 1/2); trimmed_mean n > 2f (Yin et al. 2018: trim beta >= alpha, beta <
1/2); krum, multi_krum n > 2f + 2 (Blanchard et al. 2017, Proposition 1); bulyan n >= 4f + 3 (El
Mhamdi et al. 2018); geomed n > 2f (Pillutla et al., RFA: breakdown point 1/2);
centered_clipping n > 2f (Karimireddy et al. 2021: an honest majority). Rows that earlier layers
rejected do not lower f: they may all have been honest (a norm filter in a non-IID round), so up
to f Byzantine rows may remain among the active ones. With f = 0 every bound holds for n >= 1;
mean never uses f (it claims no robustness).

Coordinate-wise rules sort cache-sized column blocks (numpy's SIMD sort on CPU, ``torch.sort``
elsewhere), spread over ``torch.get_num_threads()`` threads. Distance-based rules build on one
matrix product (``updates.pairwise_sq_dists``).

Every factory also accepts ``f`` (the declared Byzantine count) so that a grid can pass the same
``f`` to every defense; rules whose computation does not use it still check their bound with it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import pairwise_sq_dists
from .base import Aggregator, Report, active, check_nonneg_int, check_positive, require_rows

_BLOCK_BYTES = 1 << 20  # one column block (n rows x bc columns) fits in a core's L2 cache


# ----------------------------------------------------------------------------- shared helpers

def prepare(name: str, U: torch.Tensor, w: torch.Tensor, finite: bool = False):
    """Check (U, w) and return the active rows: (Ua, wa, idx). Avoids a copy when all are active.

    ``finite``: the rule cannot work around NaN/inf rows (a clustering, an eigendecomposition), so
    active rows with such values are a clear error rather than a numerical library's crash."""
    if not isinstance(U, torch.Tensor) or U.ndim != 2 or not U.is_floating_point():
        got = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
        raise PhalanxError(f"{name}: U must be a float tensor of shape [n, d], got {got}")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (U.shape[0],):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise PhalanxError(f"{name}: w must have shape [{U.shape[0]}] (one weight per row), got {got}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise PhalanxError(f"{name}: weights must be finite and >= 0, got {w.tolist()}")
    U = U.detach()
    if bool((w > 0).all()):
        Ua, wa, idx = U, w, torch.arange(U.shape[0], device=w.device)
    else:
        Ua, wa, idx = active(U, w)
    if Ua.shape[0] == 0:
        raise PhalanxError(f"{name}: every row has weight 0; nothing to aggregate")
    if finite and not bool(torch.isfinite(Ua).all()):
        bad = idx[~torch.isfinite(Ua).all(1)].tolist()
        raise PhalanxError(f"{name}: rows {bad} have NaN/inf values; put the 'validate' layer before it")
    return Ua, wa, idx


def make_report(name: str, n: int, idx: torch.Tensor, scores: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, reason: str | None = None, **info: Any) -> Report:
    """Report over the full n rows from per-active-row ``scores`` and bool ``keep`` (None: all)."""
    idx = idx.cpu()
    rep = Report(name, n=n, info=info)
    if scores is not None:
        full = torch.full((n,), float("nan"), dtype=torch.float64)
        full[idx] = scores.detach().double().cpu()
        rep.scores = full
    sel = torch.zeros(n, dtype=torch.bool)
    keep = torch.ones(len(idx), dtype=torch.bool) if keep is None else keep.cpu().bool()
    sel[idx[keep]] = True
    rep.selected = sel
    if reason is not None:
        for row in idx[~keep].tolist():
            rep.reject(row, reason)
    return rep


def check_int(name: str, param: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PhalanxError(f"{name}: {param} must be an integer >= {low}, got {value!r}")
    return value


def finite_or_raise(name: str, g: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(g).all()):
        raise PhalanxError(f"{name}: the aggregate has non-finite coordinates (too many rows with "
                           "NaN/inf values); put the 'validate' layer before it")
    return g


def combine(coef: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i U_i as one matrix-vector product (coef: per row, any float dtype)."""
    return coef.to(device=U.device, dtype=U.dtype) @ U


def row_norms(U: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row as float64 [n] (one pass; norms have no cancellation to fear)."""
    return torch.linalg.vector_norm(U, dim=1).double()


def row_sq_dists(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|U_i - v|^2 for each row, float64 [n]: computed directly (no |a|^2 + |b|^2 - 2ab
    cancellation when v is close to a row), in column blocks of about 4 MiB (measured: smaller
    blocks pay more per-op overhead than they save in cache traffic)."""
    n, d = U.shape
    bc = max(1024, 4 * _BLOCK_BYTES // (U.element_size() * max(n, 1)))
    out = torch.zeros(n, dtype=torch.float64, device=U.device)
    for j in range(0, d, bc):
        out += torch.linalg.vector_norm(U[:, j:j + bc] - v[j:j + bc], dim=1).double().square()
    return out


def sorted_column_map(U: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """g[j] = kernel(S)[j - start] where S [b, n] holds a block of columns of U, each sorted ascending.

    NaN sorts last (as +inf would), so up to the trimmed count of NaN rows cannot reach the result.
    U is never modified: each block is sorted in a copy.
    """
    n, d = U.shape
    out = torch.empty(d, dtype=U.dtype, device=U.device)
    if U.device.type != "cpu":
        bc = max(1, (64 << 20) // (U.element_size() * n))
        for j in range(0, d, bc):
            out[j:j + bc] = kernel(torch.sort(U[:, j:j + bc].T, dim=1).values)
        return out
    A = U.numpy()
    bc = max(64, _BLOCK_BYTES // (A.itemsize * n))

    def work(start: int, stop: int) -> None:
        for j in range(start, stop, bc):
            e = min(j + bc, stop)
            # always a copy: when the block is already contiguous (d = 1, a column-major U),
            # ascontiguousarray would hand back a view and the sort would shuffle the caller's rows
            S = np.array(A[:, j:e].T, order="C", copy=True)
            S.sort(axis=1)
            out[j:e] = kernel(torch.from_numpy(S))

    threads = max(1, min(torch.get_num_threads(), math.ceil(d / bc)))
    if threads == 1:
        work(0, d)
        return out
    chunk = math.ceil(math.ceil(d / threads) / bc) * bc
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: work(s, min(s + chunk, d)), range(0, d, chunk)))
    return out


def honest_majority(name: str, n: int, f: int) -> None:
    """The bound every rule needs at least: n > 2f (fewer than half of the rows Byzantine)."""
    require_rows(name, n, 2 * f + 1, "n > 2f", f)


def median_kernel(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    lo, hi = (n - 1) // 2, n // 2
    return lambda S: (S[:, lo] + S[:, hi]) * 0.5


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: sum of squared distances to its n - f - 2 nearest other rows."""
    n = D.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=D.dtype, device=D.device)
    E = D.clone()
    E.fill_diagonal_(float("inf"))
    k = min(max(n - f - 2, 1), n - 1)  # Bulyan's last rounds run below Krum's bound: keep k >= 1
    return torch.topk(E, k, dim=1, largest=False).values.sum(1)


# ----------------------------------------------------------------------------- aggregators

class Mean(Aggregator):
    """Weighted mean (FedAvg, McMahan et al. 2017): sum_i w_i U_i / sum_i w_i."""

    name = "mean"

    def __call__(self, U, w, ctx: RoundContext):
        Ua, wa, idx = prepare(self.name, U, w)
        coef = wa.double() / wa.double().sum()
        g = finite_or_raise(self.name, combine(coef, Ua))
        return g, make_report(self.name, U.shape[0], idx, scores=coef)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when n is even.
    f is only checked: the median's breakdown point is 1/2, so it needs n > 2f."""

    name = "median"

    def __init__(self, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w)
        honest_majority(self.name, Ua.shape[0], self.f)
        g = finite_or_raise(self.name, sorted_column_map(Ua, median_kernel(Ua.shape[0])))
        return g, make_report(self.name, U.shape[0], idx, f=self.f)

    def __repr__(self):
        return f"Median(f={self.f})"


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f largest and f smallest values of
    each coordinate and average the n - 2f left. Needs n > 2f."""

    name = "trimmed_mean"

    def __init__(self, f: int):
        self.f = check_nonneg_int(self.name, "f", f)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w)
        n, f = Ua.shape[0], self.f
        honest_majority(self.name, n, f)
        g = sorted_column_map(Ua, lambda S: S[:, f:n - f].sum(1) / (n - 2 * f))
        return finite_or_raise(self.name, g), make_report(self.name, U.shape[0], idx, f=f)

    def __repr__(self):
        return f"TrimmedMean(f={self.f})"


class Krum(Aggregator):
    """Krum / Multi-Krum (Blanchard et al. 2017): score each row by the summed squared distance to
    its n - f - 2 nearest rows, average the m rows with the lowest scores (Krum: m = 1). Needs
    n > 2f + 2. Scores in the report are the Krum scores."""

    def __init__(self, f: int, m: int | None = 1, name: str = "krum"):
        self.name = name
        self.f = check_nonneg_int(name, "f", f)
        self.m = None if m is None else check_int(name, "m", m)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w)
        n, f = Ua.shape[0], self.f
        require_rows(self.name, n, 2 * f + 3, "n > 2f + 2", f)
        m = n - f if self.m is None else self.m
        if m > n:
            raise PhalanxError(f"{self.name}: m must be <= the number of active clients, "
                               f"got m={m}, n={n}")
        scores = krum_scores(pairwise_sq_dists(Ua), f)
        chosen = torch.argsort(scores, stable=True)[:m]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[chosen.cpu()] = True
        g = finite_or_raise(self.name, combine(keep.double() / m, Ua))
        return g, make_report(self.name, U.shape[0], idx, scores, keep, "not_selected", f=f, m=m)

    def __repr__(self):
        return f"Krum(name={self.name!r}, f={self.f}, m={self.m})"


class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al. 2018): pick theta = n - 2f rows by iterated Krum, then average, per
    coordinate, the beta = theta - 2f values closest to the median. Needs n >= 4f + 3."""

    name = "bulyan"

    def __init__(self, f: int):
        self.f = check_nonneg_int(self.name, "f", f)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w)
        n, f = Ua.shape[0], self.f
        require_rows(self.name, n, 4 * f + 3, "n >= 4f + 3", f)
        theta, beta = n - 2 * f, n - 4 * f
        D = pairwise_sq_dists(Ua).cpu()
        first = krum_scores(D, f)
        remaining, chosen = list(range(n)), []
        for _ in range(theta):  # theta Krum rounds on the small [n, n] matrix, not on [n, d]
            r = torch.tensor(remaining)
            best = remaining[int(torch.argmin(krum_scores(D[r][:, r], f)))]
            chosen.append(best)
            remaining.remove(best)
        chosen_t = torch.tensor(sorted(chosen))
        sel = Ua[chosen_t.to(Ua.device)]
        windows = torch.arange(beta)

        def kernel(S: torch.Tensor) -> torch.Tensor:
            med = (S[:, (theta - 1) // 2] + S[:, theta // 2]) * 0.5
            W = theta - beta + 1  # candidate windows of beta consecutive sorted values
            cost = torch.maximum(med[:, None] - S[:, :W], S[:, beta - 1:beta - 1 + W] - med[:, None])
            start = torch.argmin(cost, dim=1)
            cols = start[:, None] + windows.to(S.device)[None, :]
            return S.gather(1, cols).sum(1) / beta

        g = finite_or_raise(self.name, sorted_column_map(sel, kernel))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[chosen_t] = True
        return g, make_report(self.name, U.shape[0], idx, first, keep, "not_selected",
                              f=f, theta=theta, beta=beta)

    def __repr__(self):
        return f"Bulyan(f={self.f})"


class GeoMed(Aggregator):
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2019):
    v <- sum_i b_i U_i / sum_i b_i with b_i = w_i / max(nu, |v - U_i|), from the weighted mean,
    until v moves by less than tol * |v| or after ``iterations`` steps. (RFA stops on the
    relative change of the objective; with far-away outliers that objective is huge and stops
    too early, so the step size is used instead.) Report scores: the final normalised b_i;
    ``info['objective']`` is sum_i w_i |v - U_i| / sum_i w_i. f is only checked: the geometric
    median's breakdown point is 1/2 (Pillutla et al.), so it needs n > 2f."""

    name = "geomed"

    def __init__(self, iterations: int, nu: float, tol: float, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)
        self.iterations = check_int(self.name, "iterations", iterations)
        self.nu = check_positive(self.name, "nu", nu)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
            raise PhalanxError(f"geomed: tol must be a number >= 0, got {tol!r}")
        self.tol = float(tol)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, wa, idx = prepare(self.name, U, w)
        honest_majority(self.name, Ua.shape[0], self.f)
        alpha = wa.double() / wa.double().sum()
        v = combine(alpha, Ua)
        beta, steps = alpha, 0
        for steps in range(1, self.iterations + 1):
            dist = row_sq_dists(Ua, v).sqrt()
            beta = alpha / dist.clamp_min(self.nu)
            beta = beta / beta.sum()
            new = combine(beta, Ua)
            moved = float(torch.linalg.vector_norm((new - v).double()))
            v = new
            if moved <= self.tol * float(torch.linalg.vector_norm(v.double())):
                break
        obj = float((alpha * row_sq_dists(Ua, v).sqrt()).sum())
        g = finite_or_raise(self.name, v)
        return g, make_report(self.name, U.shape[0], idx, beta, iterations=steps, objective=obj)

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
    n > 2f (we refuse only what no tau can rescue)."""

    name = "centered_clipping"

    def __init__(self, tau: float | str, iterations: int, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)
        self.tau = tau if tau == "auto" else check_positive(self.name, "tau", tau)
        self.iterations = check_int(self.name, "iterations", iterations)
        self.center: torch.Tensor | None = None

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w)
        n, d = Ua.shape
        honest_majority(self.name, n, self.f)
        if self.center is None:
            v = torch.zeros(d, dtype=Ua.dtype, device=Ua.device)
        elif self.center.numel() != d:
            raise PhalanxError(f"{self.name}: the stored center has d={self.center.numel()}, "
                               f"got updates with d={d}")
        else:
            v = self.center.to(device=Ua.device, dtype=Ua.dtype)
        first = None
        clipped = 0
        for _ in range(self.iterations):
            dist = row_sq_dists(Ua, v).sqrt()
            first = dist if first is None else first
            tau = float(dist.median()) if self.tau == "auto" else self.tau
            scale = torch.where(dist > tau, tau / dist.clamp_min(1e-300), torch.ones_like(dist))
            clipped = int((dist > tau).sum())
            # v + mean_i s_i (U_i - v) = (1 - mean(s)) v + mean_i s_i U_i
            v = (1.0 - float(scale.mean())) * v + combine(scale / n, Ua)
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


# ----------------------------------------------------------------------------- registry

@DEFENSES.register("mean")
def mean(f: int = 0) -> Aggregator:
    """Weighted mean (FedAvg). f is not used (accepted so grids can pass f to every defense)."""
    check_nonneg_int("mean", "f", f)
    return Mean()


@DEFENSES.register("median")
def median(f: int = 0) -> Aggregator:
    """Coordinate-wise median (Yin et al. 2018); f only checked: n > 2f (breakdown point 1/2)."""
    return Median(f)


@DEFENSES.register("trimmed_mean")
def trimmed_mean(f: int = 0) -> Aggregator:
    """Coordinate-wise trimmed mean, f trimmed at each end (Yin et al. 2018); n > 2f."""
    return TrimmedMean(f)


@DEFENSES.register("krum")
def krum(f: int = 0) -> Aggregator:
    """Krum (Blanchard et al. 2017): the row with the lowest Krum score; n > 2f + 2."""
    return Krum(f, 1, "krum")


@DEFENSES.register("multi_krum")
def multi_krum(f: int = 0, m: int | None = None) -> Aggregator:
    """Multi-Krum (Blanchard et al. 2017): mean of the m lowest-scored rows (m=None: n - f)."""
    return Krum(f, m, "multi_krum")


@DEFENSES.register("bulyan")
def bulyan(f: int = 0) -> Aggregator:
    """Bulyan (El Mhamdi et al. 2018): iterated Krum then a trimmed mean around the median; n >= 4f + 3."""
    return Bulyan(f)


@DEFENSES.register("geomed")
def geomed(f: int = 0, iterations: int = 100, nu: float = 1e-6, tol: float = 1e-6) -> Aggregator:
    """Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2019); f only checked: n > 2f."""
    return GeoMed(iterations, nu, tol, f)


@DEFENSES.register("centered_clipping")
def centered_clipping(f: int = 0, tau: float | str = "auto", iterations: int = 5) -> Aggregator:
    """Centered clipping around the previous aggregate (Karimireddy et al. 2021); tau a number or
    'auto' (the median distance to the center). f only checked: n > 2f."""
    return CenteredClipping(tau, iterations, f)
