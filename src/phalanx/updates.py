"""Model parameters <-> flat vectors, and the numerical kernels over the [n, d] update matrix.

Everything here reads U in cache-sized column blocks and never copies it whole: a fresh [n, d]
tensor costs several passes over U in page faults alone (``new_matrix`` backs the few outputs
that must be that large with huge pages). Blocks are spread over ``torch.get_num_threads()``
worker threads that each run single-threaded numpy and BLAS calls, so a call makes no OpenMP
parallel region per block. Chunks of columns have a fixed size whatever the thread count and are
summed in a fixed order: results are the same bit for bit with any number of threads.

Distances (``Distances``) come from one float32 Gram matrix of the rows, centred on a central
row (``central_row``) so that the Gram entries are of the size of the distances. Each float32
product runs over K = 256 columns and the products are summed in float64, so every distance
carries a proven bound: |D~ - D| <= eps (r_i + r_j)^2 with eps = (K u / (1 - K u) + 3u) and
r_i the centred row norm (u = 2^-24, any summation order; Higham, Accuracy and Stability of
Numerical Algorithms, 3.1). Rules that choose rows re-check in float64 (``Distances.refine``)
only the rows whose choice that bound leaves open.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


def flatten_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters of ``model`` as one float32 vector [d] (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().clone()


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Write the flat vector ``flat`` [d] into ``model``'s parameters, in place."""
    d = num_params(model)
    if flat.ndim != 1 or flat.numel() != d:
        from .errors import PhalanxError

        raise PhalanxError(f"load_flat: expected a vector of {d} values, got shape {tuple(flat.shape)}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            k = p.numel()
            p.copy_(flat[offset:offset + k].view_as(p))
            offset += k


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- memory, threads

_HUGE_BYTES = 32 << 20  # outputs at least this large get huge pages
_CHUNK_BYTES = 16 << 20  # columns per task: fixed, so results do not depend on the thread count
BLOCK_BYTES = 1 << 20  # one column block of U fits in a core's L2 cache
KBLOCK = 256  # columns per float32 product (the Gram's error bound grows with it)
EXACT_BELOW = 1 << 24  # n^2 d up to which distances are computed in float64 from the start
U32 = 2.0 ** -24
U64 = 2.0 ** -53


_FREE: list = []  # mmaps of large outputs that are no longer used, for the next ones
_FREE_LOCK = threading.Lock()
_FREE_MAX = 4  # buffers kept at most (each the size of one output)


def _recycle(buf) -> None:
    with _FREE_LOCK:
        if len(_FREE) < _FREE_MAX:
            _FREE.append(buf)
            return
    buf.close()


def new_matrix(n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor [n, d]. Large ones come from a small pool of anonymous memory
    maps recycled when their tensor dies: a fresh 400 MB tensor costs ~100k page faults, several
    times the time needed to fill it (measured: 160-560 ms against 26 ms for memory already
    mapped), and a federation asks for the same shapes round after round. At most ``_FREE_MAX``
    unused buffers are kept; the rest are unmapped."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = n * d * itemsize
    if nbytes < _HUGE_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(n, d, dtype=dtype)
    buf = None
    with _FREE_LOCK:
        for i, b in enumerate(_FREE):
            if len(b) == nbytes:
                buf = _FREE.pop(i)
                break
    if buf is None:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    arr = np.frombuffer(buf, dtype=np_dtype).reshape(n, d)
    weakref.finalize(arr, _recycle, buf)  # the tensor keeps arr alive; its views keep the tensor
    return torch.from_numpy(arr)


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.Lock()
_BLAS = None
_LIMIT = [0, None]  # callers inside run_chunks, and the limiter the first of them set


def _blas_controller():
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except Exception:  # noqa: BLE001  (threadpoolctl missing or broken: run as configured)
            _BLAS = False
    return _BLAS


def workers() -> int:
    return max(1, torch.get_num_threads())


def run_chunks(tasks: Sequence, fn: Callable) -> list:
    """[fn(t) for t in tasks], spread over ``workers()`` threads with numpy's BLAS limited to one
    thread meanwhile (each task's calls are small; many threads per call only wait on each other).
    Results come back in task order."""
    global _POOL, _POOL_SIZE
    threads = min(workers(), len(tasks))
    ctl = _blas_controller()
    with _LOCK:
        if ctl and _LIMIT[0] == 0:
            _LIMIT[1] = ctl.limit(limits=1, user_api="blas")
        _LIMIT[0] += 1
        if threads > 1 and _POOL_SIZE < threads:
            _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, thread_name_prefix="phalanx"), threads
        pool = _POOL
    try:
        if threads <= 1:
            return [fn(t) for t in tasks]
        return list(pool.map(fn, tasks))
    finally:
        with _LOCK:
            _LIMIT[0] -= 1
            if _LIMIT[0] == 0 and _LIMIT[1] is not None:
                _LIMIT[1].restore_original_limits()
                _LIMIT[1] = None


def column_tasks(d: int, n: int, itemsize: int, block: int | None = None) -> tuple[list, int]:
    """Chunks [(start, stop)] of columns and the block size inside them, for n rows."""
    bc = block or max(KBLOCK, (BLOCK_BYTES // (itemsize * max(n, 1))) // KBLOCK * KBLOCK)
    step = max(bc, (_CHUNK_BYTES // (itemsize * max(n, 1))) // bc * bc)
    return [(j, min(j + step, d)) for j in range(0, d, step)], bc


def as_numpy(U: torch.Tensor) -> np.ndarray | None:
    """U as a numpy view (CPU float32/float64), or None when the fast kernels cannot read it."""
    if U.device.type != "cpu" or U.dtype not in (torch.float32, torch.float64) or U.ndim != 2:
        return None
    A = U.detach().numpy()
    return A if A.strides[1] == A.itemsize else None


def readable(U: torch.Tensor) -> np.ndarray:
    """U as a row-major CPU float32/float64 numpy array: a view when it already is one, else a
    copy (another device, dtype or memory layout: correct, not fast)."""
    A = as_numpy(U)
    if A is not None:
        return A
    dt = torch.float64 if U.dtype == torch.float64 else torch.float32
    return np.ascontiguousarray(U.detach().to(device="cpu", dtype=dt).numpy())


def _rows_block(A: np.ndarray, rows: np.ndarray | None, j: int, e: int, out: np.ndarray) -> np.ndarray:
    """out[...] = A[rows, j:e] (all rows when rows is None), without a temporary when the dtypes
    agree."""
    if rows is None:
        out[...] = A[:, j:e]
    elif out.dtype == A.dtype:
        np.take(A[:, j:e], rows, axis=0, out=out)
    else:
        out[...] = A[rows, j:e]
    return out


# ----------------------------------------------------------------------------- row passes

def row_sq_dists(U: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """|U_i - v|^2 for each row (of ``rows`` when given), float64 [n], computed directly (no
    |a|^2 + |b|^2 - 2ab cancellation when v is close to a row): float32 differences, squares
    summed pairwise per block, blocks summed in float64 (relative error about 1e-6)."""
    A = readable(U)
    r = None if rows is None else rows.cpu().numpy()
    n = A.shape[0] if r is None else len(r)
    vv = v.detach().to("cpu").numpy().astype(A.dtype, copy=False)
    tasks, bc = column_tasks(A.shape[1], n, A.itemsize)

    def work(t):
        acc = np.zeros(n)
        buf = np.empty((n, bc), A.dtype)
        for j in range(t[0], t[1], bc):
            e = min(j + bc, t[1])
            X = _rows_block(A, r, j, e, buf[:, :e - j])
            X -= vv[j:e]
            np.square(X, out=X)
            acc += X.sum(1)  # pairwise summation along the row
        return acc

    return torch.from_numpy(np.sum(run_chunks(tasks, work), axis=0))


def row_sq_norms(U: torch.Tensor) -> torch.Tensor:
    """|U_i|^2 for each row, float64 [n] (float32 squares summed pairwise per block, blocks summed
    in float64: relative error about 1e-6); inf or NaN for a row with non-finite values. Rows
    whose squares overflow float32 are redone in float64."""
    return row_dots(U)[0]


def row_dots(U: torch.Tensor, v: torch.Tensor | None = None,
             rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(|U_i|^2, U_i . v) for each row (of ``rows`` when given), float64 [n] each, in one pass
    over U (dots None without ``v``). Squares as ``row_sq_norms``; dots from float32 products
    over ``KBLOCK`` columns summed in float64 (error at most about KBLOCK u |U_i| |v|). A finite
    row whose squares or products overflow float32 is redone in float64; non-finite rows give
    inf or NaN."""
    A = readable(U)
    r = None if rows is None else rows.cpu().numpy()
    n = A.shape[0] if r is None else len(r)
    vv = None if v is None else v.detach().to("cpu").numpy().astype(A.dtype, copy=False)
    tasks, bc = column_tasks(A.shape[1], n, A.itemsize)
    K = KBLOCK

    def work(t):
        acc, dots = np.zeros(n), np.zeros(n)
        buf = np.empty((n, bc), A.dtype)
        rbuf = None if r is None else np.empty((n, bc), A.dtype)
        with np.errstate(all="ignore"):  # overflowing rows are redone below
            for j in range(t[0], t[1], bc):
                e = min(j + bc, t[1])
                Y = A[:, j:e] if r is None else _rows_block(A, r, j, e, rbuf[:, :e - j])
                X = buf[:, :e - j]
                np.square(Y, out=X)
                acc += X.sum(1)  # pairwise summation along the row
                if vv is None:
                    continue
                full = (e - j) // K * K
                if full:  # [blocks, n, K] @ [blocks, K, 1]: one float32 product per K columns
                    Y3 = Y[:, :full].reshape(n, full // K, K).transpose(1, 0, 2)
                    dots += np.matmul(Y3, vv[j:j + full].reshape(full // K, K, 1))[:, :, 0].sum(0, dtype=np.float64)
                if e - j > full:
                    dots += Y[:, full:] @ vv[j + full:e]
        return acc, dots

    parts = run_chunks(tasks, work)
    sq = np.sum([p[0] for p in parts], axis=0) if parts else np.zeros(n)
    dots = np.sum([p[1] for p in parts], axis=0) if parts else np.zeros(n)
    redo = np.flatnonzero(np.isinf(sq) | (~np.isfinite(dots) if vv is not None else False))
    for i in redo:  # overflow in float32 (|x| > 1.8e19) or a genuine inf/NaN
        x = A[i if r is None else r[i]].astype(np.float64)
        if not np.isfinite(x).all():
            sq[i] = math.inf if not np.isnan(x).any() else math.nan
            dots[i] = math.nan
            continue
        sq[i] = float(np.dot(x, x))
        if vv is not None:
            dots[i] = float(np.dot(x, vv.astype(np.float64)))
    return torch.from_numpy(sq), (None if vv is None else torch.from_numpy(dots))


def combine(coef: torch.Tensor, U: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i coef_i U_i over the rows (``rows`` when given) in U's dtype. Rows with a zero
    coefficient are not read at all (a NaN row a rule left out cannot spoil the sum)."""
    coef = coef.detach().double().cpu()
    idx = torch.arange(U.shape[0]) if rows is None else rows.cpu()
    nz = coef != 0
    if rows is None and bool(nz.all()):
        return coef.to(device=U.device, dtype=U.dtype) @ U
    sel, c = idx[nz], coef[nz]
    if len(sel) == 1 and float(c[0]) == 1.0:
        return U[int(sel[0])].detach().clone()
    if len(sel) == 0:
        return torch.zeros(U.shape[1], dtype=U.dtype, device=U.device)
    A = readable(U)
    r = sel.numpy()
    cn = c.numpy().astype(A.dtype)
    out = np.empty(A.shape[1], dtype=A.dtype)
    tasks, bc = column_tasks(A.shape[1], len(r), A.itemsize)

    def work(t):
        for j in range(t[0], t[1], bc):
            e = min(j + bc, t[1])
            np.matmul(cn, A[r, j:e], out=out[j:e])

    run_chunks(tasks, work)
    return torch.from_numpy(out).to(device=U.device, dtype=U.dtype)


# ----------------------------------------------------------------------------- Gram matrices

def sample_sq_dists(U: torch.Tensor, rows: torch.Tensor | None = None, cols: int = 1024):
    """Squared distances between the rows (``rows`` of them) on at most ``cols`` evenly spaced
    columns, float64 [n, n] (rows with NaN/inf there: +inf), the rows' squared norms there, and
    the number of columns used. A cheap sketch: relative differences between distances shrink
    like 1/sqrt(columns) for noisy rows."""
    A = U.detach()
    r = torch.arange(U.shape[0]) if rows is None else rows.cpu()
    n, d = len(r), U.shape[1]
    s = int(min(d, cols, max(64, (1 << 25) // max(n * n, 1))))
    idx = torch.unique(torch.linspace(0, d - 1, s).round().long())
    S = A.index_select(1, idx.to(A.device))
    S = (S if rows is None else S[r.to(A.device)]).double().cpu()
    ok = torch.isfinite(S).all(1)
    S = torch.where(ok[:, None], S, 0.0)
    norms = (S * S).sum(1)
    C = S - S.mean(0)
    sq = (C * C).sum(1)
    D = (sq[:, None] + sq[None, :] - 2.0 * (C @ C.T)).clamp_min(0)
    D.fill_diagonal_(0.0)
    D[~ok] = math.inf
    D[:, ~ok] = math.inf
    D.diagonal()[~ok] = 0.0
    return D, norms, len(idx)


def central_row(U: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[int, float]:
    """A row near the middle of the cloud, and how far the rows sit from the origin compared with
    each other. On a sample of evenly spaced columns (float64): the row whose n/2 nearest rows
    are closest (index into U), and median |u_i|^2 / median |u_i - u_j|^2. A Gram matrix centred
    on that row has entries of the size of the distances, whatever offset the rows share; when
    the ratio is small the rows themselves already do."""
    r = torch.arange(U.shape[0]) if rows is None else rows.cpu()
    D, norms, _ = sample_sq_dists(U, rows)
    ok = torch.isfinite(D).all(1)
    if not bool(ok.any()):
        return int(r[0]), math.inf
    D, norms = D[ok][:, ok], norms[ok]
    k = max(1, D.shape[0] // 2)
    score = torch.topk(D, k, dim=1, largest=False).values.sum(1)
    spread = float(D[~torch.eye(len(D), dtype=torch.bool)].median()) if len(D) > 1 else 0.0
    ratio = float(norms.median()) / spread if spread > 0 else math.inf
    return int(r[ok][int(torch.argmin(score))]), ratio


_SYRK_MIN = 128  # rows from which the products go through BLAS syrk, accumulated in place


def _syrk(X: np.ndarray, kb: int) -> np.ndarray:
    """X X^T in float64 from syrk over ``kb`` columns at a time, accumulated in X's dtype (BLAS
    beta = 1) over the block: no [blocks, m, m] intermediate, which costs more than the products
    themselves once m is in the hundreds."""
    from scipy.linalg import blas

    syrk = blas.ssyrk if X.dtype == np.float32 else blas.dsyrk
    C = None
    with np.errstate(all="ignore"):
        for k in range(0, X.shape[1], kb):
            a = np.ascontiguousarray(X[:, k:k + kb])  # [m, K] C order = [K, m] Fortran order
            C = syrk(1.0, a.T, beta=0.0 if C is None else 1.0, c=C, trans=1, lower=1, overwrite_c=1)
    L = np.tril(C).astype(np.float64)
    return L + np.tril(L, -1).T


def _product(X: np.ndarray, Y: np.ndarray | None, kb: int) -> np.ndarray:
    """X Y^T (X X^T when Y is None) in float64 from float32 products over ``kb`` columns each,
    summed in X's dtype over one block (at most a few dozen of them), then in float64."""
    if Y is None and X.shape[0] >= _SYRK_MIN:
        return _syrk(X, kb)
    w = X.shape[1]
    full = w // kb * kb
    P = np.zeros((X.shape[0], X.shape[0] if Y is None else Y.shape[0]))
    with np.errstate(all="ignore"):  # NaN/inf rows and out-of-range blocks are handled by the caller
        return _product_into(P, X, Y, kb, w, full)


def _product_into(P, X, Y, kb, w, full):
    if full:
        X3 = X[:, :full].reshape(X.shape[0], full // kb, kb).transpose(1, 0, 2)
        Y3 = X3 if Y is None else Y[:, :full].reshape(Y.shape[0], full // kb, kb).transpose(1, 0, 2)
        P += np.matmul(X3, Y3.transpose(0, 2, 1)).sum(0)
    if w > full:
        R = X[:, full:]
        P += R @ (R if Y is None else Y[:, full:]).T
    return P


def _gram_task(A, rows, extras, c, bc, kb, dtype):
    """The task running over one chunk of columns: (G partial [n+e, n+e], abs-error partial,
    bad points). With every row, no centre and U's dtype, blocks are read in place."""
    n = A.shape[0] if rows is None else len(rows)
    e_ = len(extras)
    m = n + e_
    in_place = rows is None and c is None and A.dtype == dtype
    big, small = 2.0 ** 100, 2.0 ** -100  # products this far from float32's range are safe

    def work(t):
        buf = None if in_place else np.empty((n, bc), dtype)
        ebuf = np.empty((e_, bc), dtype)
        G = np.zeros((m, m))
        bad = np.zeros(m, dtype=bool)
        tiny = 0.0
        for j in range(t[0], t[1], bc):
            e = min(j + bc, t[1])
            if in_place:
                X = A[:, j:e]
            else:
                X = buf[:, :e - j]
                if rows is None:
                    np.subtract(A[:, j:e], c[j:e], out=X) if c is not None else np.copyto(X, A[:, j:e])
                else:
                    _rows_block(A, rows, j, e, X)
                    if c is not None:
                        X -= c[j:e]
            Ex = ebuf[:, :e - j]
            for k, x in enumerate(extras):
                np.subtract(x[j:e], c[j:e], out=Ex[k]) if c is not None else np.copyto(Ex[k], x[j:e])
            P = np.zeros((m, m))
            P[:n, :n] = _product(X, None, kb)
            if e_:
                P[n:, :n] = _product(Ex, X, kb)
                P[:n, n:] = P[n:, :n].T
                P[n:, n:] = _product(Ex, None, kb)
            diag = P.diagonal()
            scale = 1.0
            top = diag.max() if m else 0.0
            if not (np.isfinite(diag).all() and top < big and (top > small or top == 0)):
                Y = np.concatenate([X, Ex])  # a copy: U is never written
                rb = ~np.isfinite(Y).all(1)  # NaN/inf values
                bad |= rb
                Y[rb] = 0
                top = float(np.abs(Y).max()) if Y.size else 0.0
                if top > 2.0 ** 40 or 0 < top < 2.0 ** -40:  # squares near float32's limits
                    scale = 2.0 ** -math.frexp(top)[1]
                    Y *= scale
                P = _product(Y, None, kb)
            G += P / (scale * scale)
            tiny += (e - j) * 2.0 ** -126 / (scale * scale)
        return G, tiny, bad

    return work


class Gram:
    """Gram matrix of the points x_i = p_i - c, where p are the rows of U (``rows`` of them, in
    that order) followed by the vectors ``extras``. c is 0 when the rows sit about as far from
    the origin as from each other (``central_row``'s ratio below 4: the blocks of U are then read
    in place, with no copy), else a central row of U (non-finite values read as 0); ``center``
    forces a row index or ``"origin"``. float32 products over ``KBLOCK`` columns, summed in
    float64 (float64 throughout with ``float64`` or a float64 U). Points with non-finite values
    are flagged in ``bad`` (their entries are meaningless). ``eps`` and ``tiny`` bound the error
    of each entry: |G~_ij - G_ij| <= eps r_i r_j + tiny, r_i = ``radius[i]`` >= |x_i|; a squared
    distance built from G~ is then off by at most eps (r_i + r_j)^2 + 4 tiny (``bound``)."""

    def __init__(self, U: torch.Tensor, rows: torch.Tensor | None = None,
                 extras: Sequence[torch.Tensor] = (), center: int | str | None = None,
                 float64: bool = False):
        A = readable(U)
        self.U, self.A = U, A
        self.rows = None if rows is None else rows.cpu().numpy().astype(np.int64)
        mid, ratio = central_row(U, rows) if center is None or center == "origin" else (int(center), 0.0)
        self.mid = mid  # the exact re-checks centre on it
        self.c_mid = np.nan_to_num(A[mid], nan=0.0, posinf=0.0, neginf=0.0).astype(A.dtype)
        f32 = A.dtype == np.float32 and not float64
        dtype = np.float32 if f32 else np.float64
        origin = center == "origin" or (center is None and ratio < 4)
        c = None if origin else self.c_mid.astype(dtype)
        self.center = None if origin else mid
        ex = [x.detach().to("cpu", torch.float32 if f32 else torch.float64).numpy() for x in extras]
        n = A.shape[0] if self.rows is None else len(self.rows)
        m = n + len(ex)
        kb = KBLOCK if f32 else (1 << 30)
        unit = U32 if f32 else U64
        # many rows: blocks of 8 K-blocks, so that the m^2 work per block stays small beside syrk
        block = 8 * KBLOCK if m >= _SYRK_MIN else None
        tasks, bc = column_tasks(A.shape[1], m, np.dtype(dtype).itemsize, block=block)
        parts = run_chunks(tasks, _gram_task(A, self.rows, ex, c, bc, kb, dtype))
        G = np.zeros((m, m))
        tiny, bad = 0.0, np.zeros(m, dtype=bool)
        for g, t, b in parts:  # in task order: the same sums with any number of threads
            G += g
            tiny += t
            bad |= b
        G = (G + G.T) / 2
        K = min(kb, bc, A.shape[1]) or 1
        nb = max(1, bc // K)
        gamma = (K + nb) * unit / (1 - (K + nb) * unit)
        self.eps = 1.01 * (gamma + (3 * unit if c is not None else 0.0)) + 8 * U64
        self.tiny = tiny
        self.G = torch.from_numpy(G)
        self.bad = torch.from_numpy(bad)
        diag = torch.from_numpy(np.maximum(np.diag(G), 0.0))
        self.radius = ((diag + tiny) * (1 + 2 * self.eps)).sqrt()
        self.n = n

    def sq_dists(self) -> torch.Tensor:
        """Squared distances between all points, float64 [m, m], clamped at 0; +inf to and from
        bad points (0 on the diagonal)."""
        g = self.G.diagonal()
        D = (g[:, None] + g[None, :] - 2.0 * self.G).clamp_min_(0.0)
        if bool(self.bad.any()):
            D[self.bad] = math.inf
            D[:, self.bad] = math.inf
        D.fill_diagonal_(0.0)
        return D

    def bound(self) -> torch.Tensor:
        """Bound on the error of each entry of ``sq_dists``, float64 [m, m] (0 for bad points)."""
        r = self.radius
        E = self.eps * (r[:, None] + r[None, :]).square() + 4 * self.tiny
        E.fill_diagonal_(0.0)
        if bool(self.bad.any()):
            E[self.bad] = 0.0
            E[:, self.bad] = 0.0
        return E

    def exact_rows(self, which: torch.Tensor) -> torch.Tensor:
        """Squared distances from the points ``which`` (indices < n, rows of U) to every row
        point, float64 [len(which), n]: float64 values (products of float32 values are exact in
        float64), centred like the Gram matrix when it is centred, one float64 product per
        column block (about a thousand columns: error about 1e-13 of (r_i + r_j)^2, as the float64
        Gram's). Entries of non-finite rows are meaningless."""
        A, rows = self.A, self.rows
        c = None if self.center is None else self.c_mid.astype(np.float64)
        n = self.n
        sel = which.cpu().numpy().astype(np.int64)
        tasks, bc = column_tasks(A.shape[1], n, 8)

        def work(t):
            X = np.empty((n, bc))
            C = np.zeros((len(sel), n))
            sq = np.zeros(n)
            for j in range(t[0], t[1], bc):
                e = min(j + bc, t[1])
                Xb = X[:, :e - j]
                src = A[:, j:e] if rows is None else A[rows, j:e]
                if c is None:
                    np.copyto(Xb, src)
                else:
                    np.subtract(src, c[j:e], out=Xb, dtype=np.float64)
                sq += np.einsum("ij,ij->i", Xb, Xb)
                C += Xb[sel] @ Xb.T  # one BLAS call: K-blocked batches cost 2x the pass here
            return C, sq

        C, sq = np.zeros((len(sel), n)), np.zeros(n)
        for a, b in run_chunks(tasks, work):
            C += a
            sq += b
        with np.errstate(invalid="ignore", over="ignore"):
            D = np.maximum(sq[sel][:, None] + sq[None, :] - 2.0 * C, 0.0)
        D[np.arange(len(sel)), sel] = 0.0
        return torch.from_numpy(D)


class Distances:
    """Squared distances between the rows of U (``rows`` of them) from one ``Gram`` (float64 when
    asked, or when n^2 d <= ``EXACT_BELOW`` where that costs little), with a bound ``E`` on each
    entry's error; ``refine(i)`` makes rows exact (float64, E = 0), reading U once
    for all the rows asked at once. Rows that are bit-for-bit copies of each other share one
    exact computation and are exactly 0 apart, so that ties between them break by index."""

    def __init__(self, U: torch.Tensor, rows: torch.Tensor | None = None, float64: bool = False):
        n = U.shape[0] if rows is None else len(rows)
        self.gram = Gram(U, rows, float64=float64 or n * n * U.shape[1] <= EXACT_BELOW)
        self.D = self.gram.sq_dists()
        self.E = self.gram.bound()
        self.exact = self.gram.bad.clone()
        self.refined = 0  # rows computed exactly so far (not counting copies)
        self.passes = 0  # passes over U spent on refining

    @property
    def n(self) -> int:
        return self.D.shape[0]

    def _same_rows(self, i: int, j: int) -> bool:
        """Whether rows i and j are bit-for-bit copies (compared in numpy: a torch call right
        after the worker threads' pass pays tens of ms of OpenMP wake-ups)."""
        g = self.gram
        ri, rj = (i, j) if g.rows is None else (int(g.rows[i]), int(g.rows[j]))
        return bool(np.array_equal(g.A[ri], g.A[rj]))

    def _all_float64(self) -> None:
        """Every distance in float64 (a second Gram, float64 throughout); their bound (about
        1e-13 of (r_i + r_j)^2) is then treated as exact."""
        g = self.gram
        rows = None if g.rows is None else torch.from_numpy(g.rows)
        g64 = Gram(g.U, rows, center=g.mid if g.center is not None else "origin", float64=True)
        self.D = g64.sq_dists()
        self.E = torch.zeros_like(self.D)
        self.exact[:] = True
        self.refined = self.n

    def identical(self, which: torch.Tensor) -> bool:
        """Whether the rows ``which`` are bit-for-bit copies of one another (their true distances
        to every row, and so their scores under any rule, are then equal)."""
        which = which.flatten().tolist()
        a = which[0]
        return all(bool(self.D[a, b] <= self.E[a, b]) and not bool(self.gram.bad[b])
                   and self._same_rows(a, b) for b in which[1:])

    def refine(self, which) -> None:
        which = torch.as_tensor(which, dtype=torch.long).flatten().unique()
        which = which[~self.exact[which]]
        if len(which) == 0:
            return
        # rows that may be copies of each other: zero distance within the bound
        groups: list[list[int]] = []
        pending = which.tolist()
        todo: list[int] = []
        while pending:
            i = pending.pop(0)
            near = torch.nonzero(self.D[i] <= self.E[i]).flatten().tolist()
            twins = [j for j in near if j != i and not bool(self.gram.bad[j])
                     and self._same_rows(i, j)]
            groups.append([i, *twins])
            todo.append(i)
            pending = [p for p in pending if p not in twins]
        self.passes += 1
        if len(todo) + self.refined > self.n // 4:  # most rows: one float64 Gram is cheaper
            self._all_float64()
            return
        rowsD = self.gram.exact_rows(torch.tensor(todo))
        self.refined += len(todo)
        for k, grp in enumerate(groups):
            vals = rowsD[k]
            for i in grp:
                self.D[i] = vals
                self.D[:, i] = vals
            for i in grp:
                for j in grp:
                    self.D[i, j] = 0.0
            idx = torch.tensor(grp)
            self.E[idx] = 0.0
            self.E[:, idx] = 0.0
            self.exact[idx] = True
        bad = self.gram.bad
        if bool(bad.any()):  # keep non-finite rows infinitely far from everyone
            self.D[bad] = math.inf
            self.D[:, bad] = math.inf
            self.D.diagonal()[bad] = 0.0


# ----------------------------------------------------------------------------- public helpers

def sq_norms(U: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row, accumulated in float64: [n]."""
    return row_sq_norms(U)


def _float64_gram(P: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, |x|^2) in float64 of the rows of P, centred on a central row when asked. NaN/inf rows
    give NaN entries, as plain products would."""
    if P.shape[0] == 0 or P.shape[1] == 0:
        z = torch.zeros(P.shape[0], P.shape[0], dtype=torch.float64)
        return z, z.diagonal().clone()
    g = Gram(P, center=None if center else "origin", float64=True)
    G = g.G.clone()
    if bool(g.bad[:P.shape[0]].any()):
        b = g.bad[:P.shape[0]]
        G[b] = math.nan
        G[:, b] = math.nan
    return G, G.diagonal().clone()


def pairwise_sq_dists(U: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between rows, with one matrix product.

    |a|^2 + |b|^2 - 2 a.b in float64 over column blocks (no float64 copy of U), the rows centred
    on one of them first (the Gram entries are then of the size of the distances), clamped at
    zero. [n, m]."""
    if V is None:
        G, sq = _float64_gram(U, center=True)
        D = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_(min=0.0)
        D.fill_diagonal_(0.0)
        return D
    n = U.shape[0]
    G, sq = _float64_gram(torch.cat([U.detach().double().cpu(), V.detach().double().cpu()]), center=True)
    return (sq[:n, None] + sq[None, n:] - 2.0 * G[:n, n:]).clamp_(min=0.0)


def cosine_matrix(U: torch.Tensor, V: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity between rows of U (and V), float64 [n, m] (float64 products over
    column blocks)."""
    P = U if V is None else torch.cat([U.detach().double().cpu(), V.detach().double().cpu()])
    G, sq = _float64_gram(P, center=False)
    nrm = sq.sqrt().clamp_min(eps)
    C = G / nrm[:, None] / nrm[None, :]
    return C if V is None else C[:U.shape[0], U.shape[0]:]
