"""Distance rules: Krum and Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al.
2018), on one float32 Gram matrix (``updates.Distances``) with float64 re-checks only where its
proven error bound leaves a choice open; ``nearest_sets`` serves NNM (preagg.py)."""

from __future__ import annotations

import math

import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..updates import Distances, combine, readable
from .base import Aggregator, check_nonneg_int, require_rows
from .common import check_int, finite_or_raise, make_report, prepare_rows
from .coordinate import bulyan_kernel, sorted_column_map


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
