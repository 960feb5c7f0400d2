"""Coordinate-wise rules: median and trimmed mean (Yin et al. 2018), and the column kernels
Bulyan's last step shares. Each cache-sized block of columns is sorted (numpy's SIMD sort) on
worker threads, or, for a few rows, run through a sorting network over whole rows."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..context import RoundContext
from ..updates import column_tasks, readable, run_chunks
from .base import Aggregator, check_nonneg_int
from .common import finite_or_raise, honest_majority, make_report, prepare_rows

_BLOCK_BYTES = 1 << 20  # one column block (n rows x bc columns) fits in a core's L2 cache
_ROWWISE_MAX = 128  # chosen rows up to which a block is transposed one row at a time


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
            elif n <= _ROWWISE_MAX:  # each chosen row written into its column of S: no gathered copy
                for k, i in enumerate(r):
                    S[:, k] = A[i, j:e]
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


def median_kernel(n: int) -> Callable[[np.ndarray], np.ndarray]:
    lo, hi = (n - 1) // 2, n // 2
    return lambda S: (S[:, lo] + S[:, hi]) * S.dtype.type(0.5)


def trimmed_kernel(n: int, f: int) -> Callable[[np.ndarray], np.ndarray]:
    """Mean of the middle n - 2f values of each sorted row: one float32 matrix-vector product
    (BLAS, several times faster than a pairwise sum over short strided rows)."""
    ones = np.ones(n - 2 * f, dtype=np.float32)

    def kernel(S: np.ndarray) -> np.ndarray:
        out = S[:, f:n - f] @ ones.astype(S.dtype, copy=False)
        out /= S.dtype.type(n - 2 * f)
        return out

    return kernel


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
        g = sorted_column_map(U, trimmed_kernel(n, f), rows)
        return finite_or_raise(self.name, g), make_report(self.name, U.shape[0], idx, f=f)

    def __repr__(self):
        return f"TrimmedMean(f={self.f})"
