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

Speed (``benchmarks/aggregators.py``). No rule copies U: the active rows are read in place.
Coordinate-wise rules sort cache-sized column blocks (numpy's SIMD sort) on worker threads.
Distance rules build on one float32 Gram matrix (``updates.Distances``): Krum, Multi-Krum,
Bulyan's selection and NNM re-check in float64 only the rows whose choice its proven error bound
leaves open, so they choose exactly the rows a float64 computation chooses (up to ties within
float64 rounding; bit-for-bit copies tie exactly and break by index). Bulyan's iterated Krum
updates each row's score as rows leave (O(n^2) in all, not O(n^3)). The geometric median and
centered clipping iterate on coefficients over the Gram matrix when n is small (one pass over U
at the end; the geometric median then checks its stopping rule with exact distances), and pass
over U twice per iteration otherwise.

Every factory also accepts ``f`` (the declared Byzantine count) so that a grid can pass the same
``f`` to every defense; rules whose computation does not use it still check their bound with it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import (Distances, Gram, column_tasks, combine, readable, row_sq_dists,  # noqa: F401
                       row_sq_norms, run_chunks)
from .base import Aggregator, Report, active, check_nonneg_int, check_positive, require_rows

_BLOCK_BYTES = 1 << 20  # one column block (n rows x bc columns) fits in a core's L2 cache


# ----------------------------------------------------------------------------- shared helpers

def _check(name: str, U, w) -> None:
    if not isinstance(U, torch.Tensor) or U.ndim != 2 or not U.is_floating_point():
        got = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
        raise PhalanxError(f"{name}: U must be a float tensor of shape [n, d], got {got}")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (U.shape[0],):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise PhalanxError(f"{name}: w must have shape [{U.shape[0]}] (one weight per row), got {got}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise PhalanxError(f"{name}: weights must be finite and >= 0, got {w.tolist()}")


def prepare(name: str, U: torch.Tensor, w: torch.Tensor, finite: bool = False):
    """Check (U, w) and return the active rows: (Ua, wa, idx). Avoids a copy when all are active.

    ``finite``: the rule cannot work around NaN/inf rows (a clustering, an eigendecomposition), so
    active rows with such values are a clear error rather than a numerical library's crash."""
    _check(name, U, w)
    U = U.detach()
    if bool((w > 0).all()):
        Ua, wa, idx = U, w, torch.arange(U.shape[0], device=w.device)
    else:
        Ua, wa, idx = active(U, w)
    if Ua.shape[0] == 0:
        raise PhalanxError(f"{name}: every row has weight 0; nothing to aggregate")
    if finite:  # one pass: a row's squared norm is finite exactly when its values are
        ok = torch.isfinite(row_sq_norms(Ua)).to(idx.device)
    if finite and not bool(ok.all()):
        bad = idx[~ok].tolist()
        raise PhalanxError(f"{name}: rows {bad} have NaN/inf values; put the 'validate' layer before it")
    return Ua, wa, idx


def prepare_rows(name: str, U: torch.Tensor, w: torch.Tensor):
    """Check (U, w) and return (U, wa, idx, rows) without copying: ``rows`` is None when every
    row is active, else ``idx`` (the active rows, which the kernels read in place)."""
    _check(name, U, w)
    idx = torch.nonzero(w > 0).flatten().cpu()
    if len(idx) == 0:
        raise PhalanxError(f"{name}: every row has weight 0; nothing to aggregate")
    rows = None if len(idx) == U.shape[0] else idx
    return U.detach(), w[idx.to(w.device)], idx, rows


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
    ok = (bool(np.isfinite(g.detach().numpy()).all()) if g.device.type == "cpu" and g.dtype in
          (torch.float32, torch.float64) else bool(torch.isfinite(g).all()))  # numpy: no thread wake-ups
    if not ok:
        raise PhalanxError(f"{name}: the aggregate has non-finite coordinates (too many rows with "
                           "NaN/inf values); put the 'validate' layer before it")
    return g


def row_norms(U: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row as float64 [n] (one pass; norms have no cancellation to fear)."""
    return torch.linalg.vector_norm(U, dim=1).double()


_NETWORK_MAX = 24  # rows up to which a sorting network over whole rows beats sorting columns


def sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort comparators (i, j), i < j, for n inputs (pruned to n)."""
    out, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        out.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return out


def sorted_column_map(U: torch.Tensor, kernel: Callable[[np.ndarray], np.ndarray],
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """g[j] = kernel(S)[j - start] where S [b, n] (numpy) holds a block of columns of U (of its
    ``rows`` when given), each sorted ascending, on worker threads (a kernel with ``at = True``
    is called as kernel(S, start)).

    NaN sorts last (as +inf would), so up to the trimmed count of NaN rows cannot reach the result.
    U is never modified: each block is copied into a buffer of its own and sorted there. Columns
    of many values are transposed and sorted (numpy's SIMD sort); columns of at most
    ``_NETWORK_MAX`` values go through a sorting network of min/max over whole rows (NaN read as
    +inf), which needs no transpose and no per-column call.
    """
    A = U.detach().numpy() if U.device.type == "cpu" and U.dtype in (torch.float32, torch.float64) \
        else readable(U)
    r = None if rows is None else rows.cpu().numpy()
    n, d = (A.shape[0] if r is None else len(r)), A.shape[1]
    out = np.empty(d, dtype=A.dtype)
    bc = max(64, _BLOCK_BYTES // (A.itemsize * max(n, 1)))
    tasks, _ = column_tasks(d, n, A.itemsize, block=bc)
    net = sorting_network(n) if n <= _NETWORK_MAX else None

    def work(t):
        buf = np.empty((bc, n) if net is None else (n, bc), dtype=A.dtype)
        tmp = np.empty((n, bc), dtype=A.dtype) if r is not None or net is not None else None
        for j in range(t[0], t[1], bc):
            e = min(j + bc, t[1])
            if net is not None:
                X = buf[:, :e - j]
                _rows_of(A, r, j, e, X)
                nan = np.isnan(X)
                if nan.any():
                    X[nan] = np.inf
                lo = tmp[0, :e - j]
                for a, b in net:
                    np.minimum(X[a], X[b], out=lo)
                    np.maximum(X[a], X[b], out=X[b])
                    X[a] = lo
                out[j:e] = kernel(X.T, j) if getattr(kernel, "at", False) else kernel(X.T)
                continue
            S = buf[:e - j]
            if r is None:
                S[...] = A[:, j:e].T
            else:
                np.take(A[:, j:e], r, axis=0, out=tmp[:, :e - j])
                S[...] = tmp[:, :e - j].T
            S.sort(axis=1)
            out[j:e] = kernel(S, j) if getattr(kernel, "at", False) else kernel(S)

    run_chunks(tasks, work)
    return torch.from_numpy(out).to(device=U.device, dtype=U.dtype)


def _rows_of(A: np.ndarray, r, j: int, e: int, out: np.ndarray) -> None:
    if r is None:
        out[...] = A[:, j:e]
    else:
        np.take(A[:, j:e], r, axis=0, out=out)


def honest_majority(name: str, n: int, f: int) -> None:
    """The bound every rule needs at least: n > 2f (fewer than half of the rows Byzantine)."""
    require_rows(name, n, 2 * f + 1, "n > 2f", f)


def median_kernel(n: int) -> Callable[[np.ndarray], np.ndarray]:
    lo, hi = (n - 1) // 2, n // 2
    return lambda S: (S[:, lo] + S[:, hi]) * S.dtype.type(0.5)


def bulyan_kernel(theta: int, beta: int, A: np.ndarray | None = None,
                  rows: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Mean of the beta values closest to the median of each sorted row s of S [b, theta]: the
    window [a, a + beta) where a counts the shifts that do not move it away from the median. For
    sorted values, |s[a + beta] - med| <= |s[a] - med| exactly when s[a] + s[a + beta] <= 2 med
    (up to equal values, whose order does not change the sum); these sums grow with a, so the
    shifts that qualify are a prefix, found by a binary search. Sums of two float32 values are
    exact in float64, so the choice is exact. A column where two values on either side of the
    median are exactly as far from it (quantized updates) is redone from its unsorted values
    ``A[rows, j]`` as the reference does it: the beta smallest distances, ties to the earlier
    row (without ``A``, such ties go to the right)."""
    W = theta - beta + 1
    lo_m, hi_m = (theta - 1) // 2, theta // 2

    steps = max(0, math.ceil(math.log2(W))) if W > 1 else 0

    def kernel(S: np.ndarray, j: int | None = None) -> np.ndarray:
        b = S.shape[0]
        flat = S.reshape(-1)
        base = np.arange(b) * theta
        two_med = flat[base + lo_m].astype(np.float64) + flat[base + hi_m]
        lo = np.zeros(b, dtype=np.int64)  # binary search for the prefix length, in [0, W - 1]
        hi = np.full(b, W - 1, dtype=np.int64)
        for _ in range(steps):
            mid = np.minimum((lo + hi) >> 1, W - 2)  # rows already settled (lo == hi) stay in range
            at = base + mid
            move = (flat[at].astype(np.float64) + flat[at + beta] <= two_med) & (lo < hi)
            lo = np.where(move, mid + 1, lo)
            hi = np.where(move | (lo >= hi), hi, mid)
        start = lo
        at = base + start
        acc = np.zeros(S.shape[0], dtype=S.dtype)
        for k in range(beta):  # beta gathers of one value per row beat one [b, beta] gather
            acc += flat[at + k]
        acc /= S.dtype.type(beta)
        if A is not None and j is not None:
            prev = np.maximum(at - 1, base)
            tie = np.flatnonzero((start > 0) & (flat[prev].astype(np.float64) + flat[prev + beta] == two_med))
            if len(tie):  # the float64 reference's own rule, in row order
                X = A[:, j + tie] if rows is None else A[np.ix_(rows, j + tie)]
                X = X.astype(np.float64)
                dist = np.abs(X - np.median(X, axis=0))
                pick = np.argsort(dist, axis=0, kind="stable")[:beta]
                acc[tie] = np.take_along_axis(X, pick, axis=0).mean(0)
        return acc

    kernel.at = True
    return kernel


# ----------------------------------------------------------------------------- exact choices

def _krum_bounds(dist: Distances, k: int):
    """Per row: the Krum score from the approximate distances, and bounds lo <= true <= hi."""
    inf = math.inf
    Dm = dist.D.clone()
    Dm.fill_diagonal_(inf)
    vals, nb = torch.topk(Dm, k, dim=1, largest=False)
    s = vals.sum(1)
    hi = s + dist.E.gather(1, nb).sum(1)
    L = dist.D - dist.E
    L.fill_diagonal_(inf)
    lo = torch.topk(L, k, dim=1, largest=False).values.sum(1)
    return s, lo, hi


def krum_choice(dist: Distances, k: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, keep): the m rows with the lowest Krum scores (sum of the k smallest distances to
    other rows; ties to the lower index), exactly as float64 distances rank them. A row is in for
    sure when fewer than m rows can score below it within the bounds, out for sure when m rows
    surely do; the rows left open are re-checked in float64 until only exact rows remain open."""
    n = dist.n
    while True:
        s, lo, hi = _krum_bounds(dist, k)
        if m >= n:
            return s, torch.ones(n, dtype=torch.bool)
        can = lo[None, :] <= hi[:, None]  # [j, i]: row i may rank before row j
        can.fill_diagonal_(False)
        sure = hi[None, :] < lo[:, None]
        sure.fill_diagonal_(False)
        sure_in, sure_out = can.sum(1) < m, sure.sum(1) >= m
        open_ = ~sure_in & ~sure_out
        todo = open_ & ~dist.exact
        cand = torch.nonzero(open_).flatten()
        twins = len(cand) > 1 and dist.identical(cand)
        if not bool(todo.any()) or twins:
            break
        dist.refine(torch.nonzero(todo).flatten())
    keep = sure_in.clone()
    slots = m - int(keep.sum())
    if slots > 0 and len(cand):  # exact scores decide, or copies of one row: the index does
        order = torch.arange(len(cand)) if twins else torch.argsort(s[cand], stable=True)
        keep[cand[order[:slots]]] = True
    return s, keep


class _Windows:
    """Each row's Krum window over the remaining rows R, updated as rows leave: ``order`` sorts
    each row's distances (self last), ``t`` is the position of the k-th remaining one, ``score``
    the sum up to it. Removing a row moves each ``t`` by a step or two, so the whole iterated
    selection costs O(n^2) after one sort."""

    def __init__(self, D: torch.Tensor, R: torch.Tensor, k: int):
        n = D.shape[0]
        Dm = D.clone()
        Dm.fill_diagonal_(math.inf)
        self.vals, self.order = torch.sort(Dm, dim=1, stable=True)
        self.ar = torch.arange(n)
        self.pos = torch.empty_like(self.order)
        self.pos.scatter_(1, self.order, self.ar.expand(n, n).contiguous())
        valid = R[self.order] & (self.order != self.ar[:, None])
        self.t = (valid.cumsum(1) >= k).int().argmax(1)
        win = valid & (self.ar[None, :] <= self.t[:, None])
        self.score = torch.where(win, self.vals, 0.0).sum(1)
        self.n = n

    def _scan(self, rows: torch.Tensor, start: torch.Tensor, R: torch.Tensor, step: int) -> torch.Tensor:
        """Per row, the nearest position beyond ``start`` (in direction ``step``) of a remaining
        row other than itself."""
        out = torch.empty_like(start)
        todo = torch.arange(len(rows))
        cur = start.clone()
        offs = torch.arange(1, 9) * step
        while len(todo):
            q = cur[todo, None] + offs[None, :]
            inb = (q >= 0) & (q < self.n)
            if not bool(inb.any()):
                raise RuntimeError("bulyan: internal error, a Krum window ran out of rows")
            rr = rows[todo, None]
            cols = self.order[rr, q.clamp(0, self.n - 1)]
            ok = inb & R[cols] & (cols != rr)
            has = ok.any(1)
            first = ok.int().argmax(1)
            out[todo[has]] = q[has, first[has]]
            cur[todo[~has]] = q[~has, -1]
            todo = todo[~has]
        return out

    def remove(self, x: int, R: torch.Tensor, k: int, k2: int) -> None:
        """Row x has left R (already cleared); the window size goes from k to k2."""
        rows = torch.nonzero(R).flatten()
        px, t = self.pos[rows, x], self.t[rows]
        inwin = px <= t
        dx = self.vals[rows, px]
        if k2 == k - 1:
            self.score[rows] -= torch.where(inwin, dx, self.vals[rows, t])
            move = ~inwin | (px == t)
            if bool(move.any()):
                t[move] = self._scan(rows[move], t[move], R, -1)
        elif k2 == k and bool(inwin.any()):
            r = rows[inwin]
            nt = self._scan(r, t[inwin], R, 1)
            self.score[r] += self.vals[r, nt] - dx[inwin]
            t[inwin] = nt
        self.t[rows] = t

    def fresh(self, cand: torch.Tensor, D: torch.Tensor, R: torch.Tensor, k: int) -> torch.Tensor:
        """The candidates' scores summed afresh (no drift from the updates)."""
        sub = D[cand].clone()
        sub[:, ~R] = math.inf
        sub[torch.arange(len(cand)), cand] = math.inf
        return torch.topk(sub, k, dim=1, largest=False).values.sum(1)


def iterated_krum(dist: Distances, f: int, theta: int) -> tuple[torch.Tensor, list[int]]:
    """Bulyan's selection: theta rounds of Krum (window max(r - f - 2, 1) over the r rows left),
    each removing its choice. Returns the first round's scores and the rows in the order chosen.
    Each round's choice is certain within the distances' bounds, or re-checked in float64."""
    n = dist.n
    R = torch.ones(n, dtype=torch.bool)
    chosen: list[int] = []
    first = None
    state = None
    emax = dist.E.max(1).values
    while len(chosen) < theta:
        r = n - len(chosen)
        if r == 1:
            chosen.append(int(torch.nonzero(R)[0]))
            break
        k = min(max(r - f - 2, 1), r - 1)
        if state is None:
            state = _Windows(dist.D, R, k)
        s = torch.where(R, state.score, math.inf)
        best = int(torch.argmin(s))
        err = k * emax + 1e-12 * s.abs().nan_to_num(0.0, 0.0, 0.0)
        cand = R & (s - err <= s[best] + err[best])
        if int(cand.sum()) > 1 and not dist.identical(torch.nonzero(cand).flatten()):
            todo = cand & ~dist.exact
            if bool(todo.any()):
                dist.refine(torch.nonzero(todo).flatten())
                state, emax = None, dist.E.max(1).values
                continue
            c = torch.nonzero(cand).flatten()
            best = int(c[int(torch.argmin(state.fresh(c, dist.D, R, k)))])
        elif int(cand.sum()) > 1:  # copies of one row: the lowest index
            best = int(torch.nonzero(cand)[0])
        if first is None:
            first = state.score.clone()
        chosen.append(best)
        R[best] = False
        if r - 1 >= 2:
            state.remove(best, R, k, min(max(r - 1 - f - 2, 1), r - 2))
    if first is None:
        first = torch.zeros(n, dtype=torch.float64)
    return first, chosen


def nearest_sets(dist: Distances, k: int) -> torch.Tensor:
    """[n, k]: each row's k nearest rows, itself first, ties to the lower index, exactly as
    float64 distances order them (rows whose k-th and (k+1)-th neighbours the bounds cannot
    separate are re-checked in float64)."""
    n = dist.n
    while k < n:
        D = dist.D.clone()
        D.fill_diagonal_(-1.0)
        nb = torch.topk(D, k, dim=1, largest=False).indices
        inset = torch.zeros(n, n, dtype=torch.bool).scatter_(1, nb, True)
        hi_in = torch.where(inset, D + dist.E, -math.inf).max(1).values
        lo_out = torch.where(inset, math.inf, D - dist.E).min(1).values
        todo = (hi_in >= lo_out) & ~dist.exact
        if not bool(todo.any()):
            break
        dist.refine(torch.nonzero(todo).flatten())
    D = dist.D.clone()
    D.fill_diagonal_(-1.0)
    return torch.sort(D, dim=1, stable=True).indices[:, :k]


# ----------------------------------------------------------------------------- aggregators

class Mean(Aggregator):
    """Weighted mean (FedAvg, McMahan et al. 2017): sum_i w_i U_i / sum_i w_i."""

    name = "mean"

    def __call__(self, U, w, ctx: RoundContext):
        U, wa, idx, rows = prepare_rows(self.name, U, w)
        coef = wa.double() / wa.double().sum()
        if rows is None and bool((wa == wa[0]).all()):  # equal weights: torch's sum, the floor itself
            g = U.sum(0).div_(U.shape[0])
        else:
            g = combine(coef, U, rows)
        g = finite_or_raise(self.name, g)
        return g, make_report(self.name, U.shape[0], idx, scores=coef)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when n is even.
    f is only checked: the median's breakdown point is 1/2, so it needs n > 2f."""

    name = "median"

    def __init__(self, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        honest_majority(self.name, len(idx), self.f)
        g = finite_or_raise(self.name, sorted_column_map(U, median_kernel(len(idx)), rows))
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
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n, f = len(idx), self.f
        honest_majority(self.name, n, f)
        g = sorted_column_map(U, lambda S: S[:, f:n - f].sum(1) / S.dtype.type(n - 2 * f), rows)
        return finite_or_raise(self.name, g), make_report(self.name, U.shape[0], idx, f=f)

    def __repr__(self):
        return f"TrimmedMean(f={self.f})"


class Krum(Aggregator):
    """Krum / Multi-Krum (Blanchard et al. 2017): score each row by the summed squared distance to
    its n - f - 2 nearest rows, average the m rows with the lowest scores (Krum: m = 1; ties go to
    the lower index). Needs n > 2f + 2. Scores in the report are the Krum scores (float64 for the
    rows re-checked near the choice, from the float32 Gram matrix elsewhere: relative error about
    1e-6); ``info['rechecked']`` counts the rows re-checked in float64."""

    def __init__(self, f: int, m: int | None = 1, name: str = "krum"):
        self.name = name
        self.f = check_nonneg_int(name, "f", f)
        self.m = None if m is None else check_int(name, "m", m)

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n, f = len(idx), self.f
        require_rows(self.name, n, 2 * f + 3, "n > 2f + 2", f)
        m = n - f if self.m is None else self.m
        if m > n:
            raise PhalanxError(f"{self.name}: m must be <= the number of active clients, "
                               f"got m={m}, n={n}")
        dist = Distances(U, rows)
        scores, keep = krum_choice(dist, min(max(n - f - 2, 1), n - 1), m)
        g = finite_or_raise(self.name, combine(keep.double() / m, U, idx))
        return g, make_report(self.name, U.shape[0], idx, scores, keep, "not_selected", f=f, m=m,
                              rechecked=dist.refined)

    def __repr__(self):
        return f"Krum(name={self.name!r}, f={self.f}, m={self.m})"


class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al. 2018): pick theta = n - 2f rows by iterated Krum, then average, per
    coordinate, the beta = theta - 2f values closest to the median. Needs n >= 4f + 3. Report
    scores: the first round's Krum scores."""

    name = "bulyan"

    def __init__(self, f: int):
        self.f = check_nonneg_int(self.name, "f", f)

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n, f = len(idx), self.f
        require_rows(self.name, n, 4 * f + 3, "n >= 4f + 3", f)
        theta, beta = n - 2 * f, n - 4 * f
        # float64 distances: the n - 2f rounds meet near-ties between honest rows so often (their
        # scores differ by ~1e-5 at d = 1e6) that re-checking float32 ones costs more
        dist = Distances(U, rows, float64=True)
        first, chosen = iterated_krum(dist, f, theta)
        chosen_t = torch.tensor(sorted(chosen), dtype=torch.long)
        sel = idx[chosen_t]
        g = sorted_column_map(U, bulyan_kernel(theta, beta, readable(U), sel.numpy()), sel)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[chosen_t] = True
        return finite_or_raise(self.name, g), make_report(
            self.name, U.shape[0], idx, first, keep, "not_selected", f=f, theta=theta, beta=beta,
            rechecked=dist.refined)

    def __repr__(self):
        return f"Bulyan(f={self.f})"


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
