"""Pre-aggregation: Nearest Neighbour Mixing (a layer), bucketing (a wrapper around any registered
aggregator) and Divide-and-Conquer (an aggregator).

Bounds, checked at each call on the active rows (w > 0) with the server's assumed f (rows that
earlier layers rejected do not lower f; see ``robust``), raising ``BoundError``:

* nnm: n > 2f (Allouah et al. 2023 assume fewer than half of the n clients Byzantine);
* bucketing: n > 2sf (Karimireddy et al. 2022, Theorem I: bucketing turns a fraction delta of
  Byzantine clients into at most s * delta Byzantine buckets, which the inner rule tolerates only
  below its breakdown point 1/2); the inner rule then checks its own bound on the ceil(n / s)
  bucket means with the same f;
* dnc: n > 2f and n > ceil(c f) (Shejwalkar & Houmansadr 2021 assume a Byzantine minority, and
  each iteration removes ceil(c f) rows, so some must remain).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import (Distances, column_tasks, new_matrix, readable, row_sq_norms, run_chunks,
                       sample_sq_dists)
from .base import Aggregator, Layer, check_nonneg_int, check_positive, require_rows
from .robust import (check_int, combine, finite_or_raise, make_report, nearest_sets, prepare,
                     prepare_rows)


def mix_rows(U: torch.Tensor, rows: torch.Tensor | None, M: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """A new [N, d] matrix: active row i (the i-th of ``rows``, all rows when None) becomes
    M[which[i]] @ U[rows]; the other rows are copied. One pass over U in column blocks, products
    written straight into the output (huge-page memory); when few rows of M are distinct each is
    multiplied once."""
    A = readable(U)
    N, d = A.shape
    dt = torch.float64 if A.dtype == np.float64 else torch.float32
    out_t = new_matrix(N, d, dt)
    out = out_t.numpy()
    r = None if rows is None else rows.cpu().numpy()
    n = N if r is None else len(r)
    inv = which.cpu().numpy()
    Mn = M.to(dt).cpu().numpy()
    dedup = 2 * len(Mn) <= n
    Mfull = None if dedup else np.ascontiguousarray(Mn[inv])
    rest = None if r is None or n == N else np.setdiff1d(np.arange(N), r)
    tasks, bc = column_tasks(d, N, A.itemsize)

    def work(t):
        buf = None if r is None else np.empty((n, bc), A.dtype)
        for j in range(t[0], t[1], bc):
            e = min(j + bc, t[1])
            src = A[:, j:e] if r is None else np.take(A[:, j:e], r, axis=0, out=buf[:, :e - j])
            if r is None and not dedup:
                np.matmul(Mfull, src, out=out[:, j:e])
            elif r is None:
                out[:, j:e] = (Mn @ src)[inv]
            else:
                out[r, j:e] = (Mn @ src)[inv] if dedup else Mfull @ src
                if rest is not None:
                    out[rest, j:e] = A[rest, j:e]

    run_chunks(tasks, work)
    return out_t.to(U.dtype) if out_t.dtype != U.dtype else out_t


def cut_is_tight(U: torch.Tensor, rows: torch.Tensor | None, k: int) -> bool:
    """Whether most rows' k-th and (k+1)-th nearest rows (itself first) are expected closer
    than float32 distances can tell: then float64 distances at once beat float32 ones re-checked
    row by row. Once earlier layers have dropped the attackers, or f overestimates them, the cut
    falls inside the honest rows, whose distances differ by ~1e-5 at d = 1e6. Read off a column
    sample: relative gaps there shrink by sqrt(sample / d) on all the columns."""
    n = U.shape[0] if rows is None else len(rows)
    if k >= n:
        return False
    D, _, s = sample_sq_dists(U, rows)
    near = torch.sort(D, dim=1).values  # itself (0) first
    a, b = near[:, k - 1], near[:, k]
    gap = ((b - a) / b.clamp_min(1e-300)).nan_to_num(1.0, 1.0, 1.0) * math.sqrt(s / U.shape[1])
    return float(gap.median()) < 3e-4


class NNM(Layer):
    """Nearest Neighbour Mixing (Allouah et al. 2023): replace each row by the mean of its n - f
    nearest rows (itself included; ties to the lower index), with one distance matrix (the
    float32 Gram, or a float64 one when ``cut_is_tight``; rows whose neighbour sets its error
    bound cannot settle are re-checked in float64) and one
    [n, n] x [n, d] product (rows with the same neighbour set mixed once). Keeps n rows and their
    weights (rows with w == 0 pass through unchanged). Needs n > 2f (the paper's setting: fewer
    than half of the clients Byzantine).
    Report scores: the mean squared distance of each row to the neighbours it mixed."""

    name = "nnm"

    def __init__(self, f: int):
        self.f = check_nonneg_int(self.name, "f", f)

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n, f = len(idx), self.f
        require_rows(self.name, n, 2 * f + 1, "n > 2f", f)
        k = n - f
        dist = Distances(U, rows, float64=cut_is_tight(U, rows, k))
        near = nearest_sets(dist, k)  # each row first in its own set, ties to the lower index
        scores = dist.D.gather(1, near).clamp_min(0).sum(1) / max(k - 1, 1)
        sets, which = torch.unique(near.sort(1).values, dim=0, return_inverse=True)
        M = torch.zeros(len(sets), n, dtype=torch.float64).scatter_(1, sets, 1.0 / k)
        out = mix_rows(U, rows, M, which)
        return out, w, make_report(self.name, U.shape[0], idx, scores, f=f, neighbours=k,
                                   rechecked=dist.refined)

    def __repr__(self):
        return f"NNM(f={self.f})"


class Bucketing(Aggregator):
    """Bucketing (Karimireddy et al. 2022): shuffle the active rows with ``ctx.generator``, average
    buckets of s rows, and aggregate the ceil(n / s) bucket means with an inner aggregator.

    f (the number of Byzantine clients) is passed to the inner rule too: f Byzantine clients spoil
    at most f buckets, so the inner rule's bound applies to the number of buckets, for example
    krum needs ceil(n / s) > 2f + 2. Bucketing itself needs n > 2sf (Karimireddy et al. 2022,
    Theorem I: delta * s below the inner rule's breakdown point 1/2). Report rows inherit their
    bucket's inner score and selection; ``info['buckets']`` lists the rows of each bucket.
    """

    def __init__(self, s: int, inner: Aggregator, inner_name: str, f: int = 0):
        self.s = s
        self.f = check_nonneg_int(f"bucketing({inner_name})", "f", f)
        self.inner = inner
        self.name = f"bucketing({inner_name})"

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n = len(idx)
        require_rows(self.name, n, 2 * self.s * self.f + 1, f"n > 2sf (s={self.s})", self.f)
        nb = math.ceil(n / self.s)
        perm = torch.randperm(n, generator=ctx.generator)
        bucket = torch.empty(n, dtype=torch.long)
        bucket[perm] = torch.arange(n) // self.s  # row perm[p] goes to bucket p // s
        B = _bucket_means(U, idx[perm], self.s)
        g, rep = self.inner(B, torch.ones(nb, dtype=B.dtype, device=B.device), ctx)
        keep = torch.ones(n, dtype=torch.bool) if rep.selected is None else rep.selected.cpu()[bucket]
        scores = None if rep.scores is None else rep.scores.cpu()[bucket]
        buckets = [idx.cpu()[perm[b * self.s:(b + 1) * self.s]].tolist() for b in range(nb)]
        return g, make_report(self.name, U.shape[0], idx, scores, keep, "bucket_rejected",
                              s=self.s, buckets=buckets, inner=rep)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self):
        return f"Bucketing(s={self.s}, f={self.f}, inner={self.inner!r})"


def _bucket_means(U: torch.Tensor, order: torch.Tensor, s: int) -> torch.Tensor:
    """[ceil(n / s), d]: the means of the rows U[order[b s:(b + 1) s]], in column blocks (no copy
    of U): s strided row additions per block (numpy's reduceat is 30x slower along rows)."""
    A = readable(U)
    d = A.shape[1]
    r = order.cpu().numpy()
    n = len(r)
    full, rest = divmod(n, s)
    out_t = new_matrix(full + (rest > 0), d, torch.float64 if A.dtype == np.float64 else torch.float32)
    out = out_t.numpy()
    inv_s, inv_rest = A.dtype.type(1.0 / s), A.dtype.type(1.0 / max(rest, 1))
    tasks, bc = column_tasks(d, n, A.itemsize)

    def work(t):
        for j in range(t[0], t[1], bc):
            e = min(j + bc, t[1])
            X = A[r, j:e]
            if full:
                acc = out[:full, j:e]
                np.copyto(acc, X[0:full * s:s])
                for k in range(1, s):
                    acc += X[k:full * s:s]
                acc *= inv_s
            if rest:
                np.multiply(X[full * s:].sum(0), inv_rest, out=out[full, j:e])

    run_chunks(tasks, work)
    return out_t.to(device=U.device, dtype=U.dtype)


class DnC(Aggregator):
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021). Each of ``iterations`` rounds
    samples b coordinates (from ``ctx.generator``), centres the sub-matrix, scores each row by its
    squared projection on the top right singular vector (found through the small n x n Gram
    matrix) and drops the ceil(c f) highest; the
    rows kept in every round are averaged. Needs n > 2f (the paper's Byzantine minority) and
    n > ceil(c f) (rows left after the removal). If the kept sets do not intersect,
    the rows kept most often are used (``info['fallback']``). Report scores: mean outlier score."""

    name = "dnc"

    def __init__(self, f: int, c: float, b: int, iterations: int):
        self.f = check_nonneg_int(self.name, "f", f)
        self.c = check_positive(self.name, "c", c)
        self.b = check_int(self.name, "b", b)
        self.iterations = check_int(self.name, "iterations", iterations)

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        bad = ~torch.isfinite(row_sq_norms(U)[idx])
        if bool(bad.any()):
            raise PhalanxError(f"{self.name}: rows {idx[bad].tolist()} have NaN/inf values; put the "
                               "'validate' layer before it")
        n, d = len(idx), U.shape[1]
        drop = math.ceil(self.c * self.f - 1e-9)
        require_rows(self.name, n, 2 * self.f + 1, "n > 2f", self.f)
        require_rows(self.name, n, drop + 1, "n > c*f", self.f)
        b = min(self.b, d)
        votes = torch.zeros(n, dtype=torch.long)
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(self.iterations):
            cols = torch.randperm(d, generator=ctx.generator)[:b].sort().values
            sub = U[:, cols.to(U.device)]
            sub = (sub if rows is None else sub[rows.to(U.device)]).double()
            sub = sub - sub.mean(0, keepdim=True)
            # top right singular vector v of sub via the n x n Gram matrix: with sub sub^T u = lam u,
            # v = sub^T u / sqrt(lam) and the score (sub v)_i^2 = lam u_i^2 (no [n, b] SVD needed)
            evals, evecs = torch.linalg.eigh(sub @ sub.T)
            score = (evals[-1].clamp_min(0) * evecs[:, -1].square()).cpu()
            total += score
            keep = torch.ones(n, dtype=torch.bool)
            if drop > 0:
                keep[torch.topk(score, drop).indices] = False
            votes += keep.long()
        keep = votes == self.iterations
        fallback = not bool(keep.any())
        if fallback:
            keep = votes == votes.max()
        g = finite_or_raise(self.name, combine(keep.double() / keep.sum(), U, idx))
        return g, make_report(self.name, U.shape[0], idx, total / self.iterations, keep, "outlier",
                              f=self.f, removed_per_iteration=drop, fallback=fallback)

    def __repr__(self):
        return f"DnC(f={self.f}, c={self.c}, b={self.b}, iterations={self.iterations})"


@DEFENSES.register("nnm")
def nnm(f: int = 0) -> Layer:
    """Nearest Neighbour Mixing layer (Allouah et al. 2023): each row -> mean of its n - f nearest."""
    return NNM(f)


@DEFENSES.register("bucketing")
def bucketing(s: int = 2, aggregator: str = "mean", f: int = 0, **params: Any) -> Aggregator:
    """Bucketing (Karimireddy et al. 2022): means of random buckets of s rows, then ``aggregator``
    built with ``params`` and the same f (the number of Byzantine clients; see Bucketing)."""
    check_int("bucketing", "s", s)
    if not isinstance(aggregator, str) or aggregator == "bucketing":
        raise PhalanxError(f"bucketing: aggregator must name a registered aggregator other than "
                           f"bucketing, got {aggregator!r}")
    if "f" in inspect.signature(DEFENSES.get(aggregator)).parameters:
        params["f"] = f  # the inner rule checks f first, in its own name
    inner = DEFENSES.build(aggregator, **params)
    if not isinstance(inner, Aggregator):
        raise PhalanxError(f"bucketing: aggregator must be an Aggregator, got {aggregator!r} "
                           f"({type(inner).__name__})")
    return Bucketing(s, inner, aggregator, f)


@DEFENSES.register("dnc")
def dnc(f: int = 0, c: float = 1.0, b: int = 10000, iterations: int = 5) -> Aggregator:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021): SVD outlier filtering on random
    coordinate subsets; drops ceil(c f) rows per iteration and keeps the intersection."""
    return DnC(f, c, b, iterations)
