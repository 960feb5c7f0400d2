"""Detection-style aggregators: FLTrust, SignGuard, FoolsGold and FLAME; and SignGuard's sign
filter as a layer (``sign_filter``) to put in front of another aggregator.

Each scores or clusters the rows, keeps the ones it trusts and averages them. ``f`` (the
server's assumed Byzantine count) is accepted by every factory so that a grid can pass it to
every defense. The rules that keep "the largest cluster" only work when the honest clients are
the majority, so they check n > 2f on the active rows at each call (``BoundError``), with the
same f whatever earlier layers rejected (see ``robust``):

* signguard and sign_filter: Xu et al. 2022 assume fewer than half of the clients malicious;
* flame: Nguyen et al. 2022 assume fewer than n/2 malicious clients (HDBSCAN's minimum cluster
  size n/2 + 1 encodes it).

FLTrust (Cao et al. 2021: its root data set lets it tolerate a malicious majority) and FoolsGold
(Fung et al. 2020: no bound on the number of sybils) need no bound, and do not use f.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import column_tasks, cosine_matrix, readable, row_sq_norms, run_chunks
from .base import Aggregator, Layer, Report, check_nonneg_int, check_positive
from .robust import (combine, finite_or_raise, honest_majority, make_report, prepare, prepare_rows,
                     row_norms)


def _median(x: torch.Tensor) -> float:
    return float(np.median(x.detach().cpu().double().numpy()))


class FLTrust(Aggregator):
    """FLTrust (Cao et al., NDSS 2021): trust score ReLU(cos(U_i, g0)) against the server's update
    g0 = ctx.server_update() on its root set; each row is rescaled to |g0| and the trust-weighted
    mean is returned (zero when no row is trusted). Report scores: the trust scores."""

    name = "fltrust"

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        if ctx.server_update is None:
            raise PhalanxError("fltrust: needs ctx.server_update (the server's update on its root "
                               "data set), got None")
        g0 = ctx.server_update()
        d = U.shape[1]
        if not isinstance(g0, torch.Tensor) or g0.numel() != d:
            got = tuple(g0.shape) if isinstance(g0, torch.Tensor) else type(g0).__name__
            raise PhalanxError(f"fltrust: ctx.server_update() must return a tensor of {d} values, got {got}")
        g0 = g0.detach().reshape(-1).to(device=U.device, dtype=U.dtype)
        n0 = float(torch.linalg.vector_norm(g0.double()))
        if not np.isfinite(n0) or n0 == 0.0:
            raise PhalanxError(f"fltrust: the server update must be finite and non-zero, got norm {n0}")
        # a NaN/inf row (its squared norm is not finite) earns no trust, and is never read again
        norms = row_sq_norms(U)[idx].sqrt()
        finite = torch.isfinite(norms)
        dots = (U @ g0).double().cpu()[idx]
        cos = dots / (norms.clamp_min(1e-300) * n0)
        trust = torch.where(finite, torch.relu(cos), 0.0)
        total = float(trust.sum())
        if total > 0:
            coef = torch.where(finite, trust * (n0 / norms.clamp_min(1e-300)) / total, 0.0)
            g = combine(coef, U, idx)
        else:
            g = torch.zeros(d, dtype=U.dtype, device=U.device)
        rep = make_report(self.name, U.shape[0], idx, trust, trust > 0, "negative_cosine", server_norm=n0,
                          all_untrusted=total == 0)
        for row in idx[~finite.cpu()].tolist():
            rep.reasons[row] = "nonfinite"
        return finite_or_raise(self.name, g), rep


def _check_sign_params(name: str, coords, clustering: str) -> float:
    if not isinstance(coords, (int, float)) or isinstance(coords, bool) or not 0 < coords <= 1:
        raise PhalanxError(f"{name}: coords must be a fraction in (0, 1], got {coords!r}")
    if clustering not in ("meanshift", "kmeans"):
        raise PhalanxError(f"{name}: clustering must be 'meanshift' or 'kmeans', got {clustering!r}")
    return float(coords)


def sign_statistics(U: torch.Tensor, coords: float, generator: torch.Generator,
                    rows: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
    """Each row's (of ``rows`` when given) fractions of positive, zero and negative values on a
    random ``coords`` fraction of the coordinates (SignGuard's features), and the number of
    coordinates sampled. Counted in column chunks on worker threads (no copy of U)."""
    d = U.shape[1]
    k = max(1, int(round(coords * d)))
    cols = torch.randperm(d, generator=generator)[:k].sort().values.numpy()
    A = readable(U)
    r = None if rows is None else rows.cpu().numpy()
    n = A.shape[0] if r is None else len(r)
    tasks, _ = column_tasks(d, n, A.itemsize)
    cuts = np.searchsorted(cols, [t[0] for t in tasks] + [d])

    def work(i):
        c = cols[cuts[i]:cuts[i + 1]]
        sub = A[:, c] if r is None else A[np.ix_(r, c)]
        return np.count_nonzero(sub > 0, axis=1), np.count_nonzero(sub < 0, axis=1)

    pos = np.zeros(n, dtype=np.int64)
    neg = np.zeros(n, dtype=np.int64)
    for p_, n_ in run_chunks(list(range(len(tasks))), work):
        pos += p_
        neg += n_
    feats = np.stack([pos / k, (k - pos - neg) / k, neg / k], 1)
    return feats, k


def _pair_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(A), len(B)], from coordinate differences (no cancellation)."""
    return np.sqrt(((A[:, None, :] - B[None, :, :]) ** 2).sum(-1))


def estimate_bandwidth(X: np.ndarray, quantile: float = 0.5) -> float:
    """scikit-learn's ``estimate_bandwidth``: the mean over points of the distance to their
    int(n * quantile)-th nearest point (the point itself counting as the first)."""
    k = max(1, int(X.shape[0] * quantile))
    return float(np.sort(_pair_dist(X, X), axis=1)[:, k - 1].mean())


def mean_shift_labels(X: np.ndarray, bandwidth: float, max_iter: int = 300) -> np.ndarray:
    """scikit-learn's ``MeanShift(bandwidth, bin_seeding=True, cluster_all=False)`` labels, for
    the few low-dimensional points SignGuard clusters, without its thread pools (after torch's
    parallel regions its nearest-neighbour searches took 356 ms a call, against well under one
    here). Flat kernel: seeds (the occupied cells of a grid of side ``bandwidth``, or the points
    when every point has a cell of its own) move to the mean of the points within
    ``bandwidth`` until they move less than 1e-3 ``bandwidth``; centres closer than
    ``bandwidth`` to a centre holding more points are dropped; each point takes its nearest
    centre, or -1 when that is farther than ``bandwidth``."""
    cells: dict[tuple, int] = {}
    for cell in map(tuple, np.round(X / bandwidth)):
        cells[cell] = cells.get(cell, 0) + 1
    seeds = (np.array(list(cells), dtype=np.float32) * bandwidth if len(cells) < len(X)
             else X.astype(np.float64).copy())
    stop = 1e-3 * bandwidth
    means = seeds.astype(np.float64)
    counts = np.zeros(len(seeds), dtype=np.int64)
    live = np.ones(len(seeds), dtype=bool)
    it = np.zeros(len(seeds), dtype=np.int64)
    while live.any():
        idx = np.flatnonzero(live)
        within = _pair_dist(means[idx], X) <= bandwidth
        cnt = within.sum(1)
        empty = cnt == 0
        new = (within.astype(np.float64) @ X) / np.maximum(cnt, 1)[:, None]
        shift = np.linalg.norm(new - means[idx], axis=1)
        counts[idx] = cnt
        done = empty | (shift <= stop) | (it[idx] == max_iter)
        means[idx[~empty]] = new[~empty]
        it[idx] += 1
        live[idx[done]] = False
    centers: dict[tuple, int] = {}
    for mu, c in zip(map(tuple, means), counts):
        if c:
            centers[mu] = int(c)
    ranked = sorted(centers.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    C = np.array([mu for mu, _ in ranked])
    unique = np.ones(len(C), dtype=bool)
    near = _pair_dist(C, C) <= bandwidth
    for i in range(len(C)):
        if unique[i]:
            unique[near[i]] = False
            unique[i] = True
    C = C[unique]
    dist = _pair_dist(X.astype(np.float64), C)
    labels = dist.argmin(1)
    labels[dist[np.arange(len(X)), labels] > bandwidth] = -1
    return labels


def largest_cluster(feats: np.ndarray, clustering: str, seed: int) -> np.ndarray:
    """Mask of the rows in the largest cluster of ``feats`` (MeanShift or 2-means); all rows when
    there is nothing to separate."""
    n = feats.shape[0]
    if n < 3 or np.ptp(feats, axis=0).max() == 0:
        return np.ones(n, dtype=bool)
    if clustering == "kmeans":
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(feats).labels_
    else:
        bw = estimate_bandwidth(feats, quantile=0.5)
        if not bw > 0:
            return np.ones(n, dtype=bool)
        labels = mean_shift_labels(feats, bw)
    valid = labels[labels >= 0]
    if valid.size == 0:
        return np.ones(n, dtype=bool)
    return labels == np.bincount(valid).argmax()


class SignGuard(Aggregator):
    """SignGuard (Xu et al. 2022). Norm filter: keep rows with lower <= |U_i| / median|U| <= upper.
    Sign filter: on a random ``coords`` fraction of coordinates (``ctx.generator``), each row's
    fractions of positive, zero and negative values are clustered (sklearn MeanShift with
    estimated bandwidth, or KMeans with 2 clusters) and the largest cluster is kept. The rows
    passing both filters are clipped to the median norm and averaged (if none passes both, the
    norm filter alone decides: ``info['fallback']``). Report scores: |U_i| / median norm.
    f is only checked: the largest cluster is the honest one only when n > 2f."""

    name = "signguard"

    def __init__(self, lower: float, upper: float, coords: float, clustering: str, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)
        self.lower = check_positive(self.name, "lower", lower)
        self.upper = check_positive(self.name, "upper", upper)
        if self.upper <= self.lower:
            raise PhalanxError(f"signguard: upper must be > lower, got lower={lower}, upper={upper}")
        self.coords, self.clustering = _check_sign_params(self.name, coords, clustering), clustering

    def __call__(self, U, w, ctx: RoundContext):
        U, _, idx, rows = prepare_rows(self.name, U, w)
        n = len(idx)
        honest_majority(self.name, n, self.f)
        norms = row_sq_norms(U)[idx].sqrt()
        med = _median(norms)
        ratio = norms / med if med > 0 else torch.ones(n, dtype=torch.float64, device=norms.device)
        norm_ok = ((ratio >= self.lower) & (ratio <= self.upper)).cpu()
        feats, k = sign_statistics(U, self.coords, ctx.generator, rows)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        sign_ok = torch.from_numpy(largest_cluster(feats, self.clustering, seed))
        keep = norm_ok & sign_ok
        fallback = not bool(keep.any())
        if fallback:
            keep = norm_ok
        clip = torch.clamp(med / norms.clamp_min(1e-300), max=1.0) if med > 0 else torch.ones_like(norms)
        coef = keep.to(norms.device).double() * clip / int(keep.sum())
        g = finite_or_raise(self.name, combine(coef, U, idx))
        rep = make_report(self.name, U.shape[0], idx, ratio, keep, None, median_norm=med,
                          fallback=fallback, coords=k)
        for i, row in enumerate(idx.cpu().tolist()):
            if not bool(norm_ok[i]):
                rep.reject(row, "norm_outlier")
            elif not bool(keep[i]):
                rep.reject(row, "sign_cluster")
        return g, rep

    def __repr__(self):
        return (f"SignGuard(lower={self.lower}, upper={self.upper}, coords={self.coords}, "
                f"clustering={self.clustering!r}, f={self.f})")


class SignFilter(Layer):
    """SignGuard's sign-statistics filter as a layer (Xu et al. 2022), to put in front of any
    aggregator: rows outside the largest cluster of sign statistics get weight 0 (reason
    ``sign_cluster``). Under an honest majority the honest rows form the largest cluster, so when
    that cluster holds fewer than ``min_keep`` of the rows the filter rejects nothing
    (``info['inconclusive']``). With f > 0 (a pipeline passes the server's f) it rejects at most f
    rows, those whose statistics lie farthest from the cluster's median (``info['capped']``), so
    non-IID honest rows outside the cluster cannot leave the aggregator too few rows. With f > 0
    it needs n > 2f active rows (Xu et al. 2022: the malicious clients are a minority)."""

    name = "sign_filter"

    def __init__(self, coords: float, clustering: str, min_keep: float, f: int):
        self.f = check_nonneg_int(self.name, "f", f)
        self.coords, self.clustering = _check_sign_params(self.name, coords, clustering), clustering
        if not isinstance(min_keep, (int, float)) or isinstance(min_keep, bool) or not 0 <= min_keep <= 1:
            raise PhalanxError(f"sign_filter: min_keep must be a fraction in [0, 1], got {min_keep!r}")
        self.min_keep = float(min_keep)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        n = U.shape[0]
        if self.f > 0:
            honest_majority(self.name, int((w > 0).sum()), self.f)
        report = Report(self.name, n=n)
        finite = torch.isfinite(row_sq_norms(U)) if U.is_floating_point() else torch.zeros(n, dtype=torch.bool)
        live = torch.nonzero((w.cpu() > 0) & finite).flatten()
        feats, k = sign_statistics(U, self.coords, ctx.generator, live)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        keep = torch.from_numpy(largest_cluster(feats, self.clustering, seed))
        inconclusive = int(keep.sum()) < self.min_keep * len(live)
        out = np.flatnonzero(~keep.numpy()) if not inconclusive else np.zeros(0, dtype=np.int64)
        capped = 0 < self.f < len(out)
        if capped:  # the f rows farthest from the cluster's median statistics
            dist = np.linalg.norm(feats[out] - np.median(feats[keep.numpy()], axis=0), axis=1)
            out = out[np.argsort(-dist, kind="stable")[:self.f]]
        w = w.clone()
        scores = torch.zeros(n, dtype=torch.float64)
        scores[live] = torch.from_numpy(feats[:, 0])
        for row in live[torch.from_numpy(out)].tolist():
            w[row] = 0.0
            report.reject(row, "sign_cluster")
        report.scores, report.selected = scores, w > 0
        report.info.update(coords=k, inconclusive=inconclusive, capped=capped)
        return U, w, report

    def __repr__(self):
        return (f"SignFilter(coords={self.coords}, clustering={self.clustering!r}, "
                f"min_keep={self.min_keep}, f={self.f})")


class FoolsGold(Aggregator):
    """FoolsGold (Fung et al. 2020): keeps, per client id, the sum of its updates; clients whose
    histories are too similar (pairwise cosine) get low weights. Pardoning rescales cs_ij by
    v_i / v_j when v_i < v_j (v: each client's largest similarity); weights 1 - max_j cs_ij are
    normalised by their maximum and passed through kappa * logit + 0.5, clipped to [0, 1]. The
    result is the weighted mean of this round's updates. Stateful (``state_dict``). Report
    scores: the weights."""

    name = "foolsgold"

    def __init__(self, kappa: float):
        self.kappa = check_positive(self.name, "kappa", kappa)
        self.ids: list[str] = []
        self.history: torch.Tensor | None = None

    def _rows_for(self, ids: list[str], d: int, like: torch.Tensor) -> torch.Tensor:
        if self.history is not None and self.history.shape[1] != d:
            raise PhalanxError(f"{self.name}: the stored history has d={self.history.shape[1]}, "
                               f"got updates with d={d}")
        if self.history is not None:
            self.history = self.history.to(like.device)
        pos = {c: i for i, c in enumerate(self.ids)}
        new = [c for c in dict.fromkeys(ids) if c not in pos]
        if new:
            grow = torch.zeros(len(new), d, dtype=like.dtype, device=like.device)
            self.history = grow if self.history is None else torch.cat([self.history, grow])
            for c in new:
                pos[c] = len(self.ids)
                self.ids.append(c)
        return torch.tensor([pos[c] for c in ids], device=like.device)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w)
        if len(ctx.client_ids) != U.shape[0]:
            raise PhalanxError(f"{self.name}: ctx.client_ids must name every row, got "
                               f"{len(ctx.client_ids)} ids for {U.shape[0]} rows")
        ids = [str(ctx.client_ids[i]) for i in idx.cpu().tolist()]
        if len(set(ids)) != len(ids):
            raise PhalanxError(f"{self.name}: client ids must be distinct within a round, got {ids}")
        n, d = Ua.shape
        rows = self._rows_for(ids, d, Ua)
        self.history.index_add_(0, rows, Ua.to(self.history.dtype))
        cs = cosine_matrix(self.history[rows]).cpu() - torch.eye(n, dtype=torch.float64)
        v = cs.max(1).values
        pardon = v[:, None] < v[None, :]
        cs = torch.where(pardon, cs * v[:, None] / torch.where(pardon, v[None, :], 1.0), cs)
        cs = torch.nan_to_num(cs, nan=0.0, posinf=1.0, neginf=-1.0)
        wv = (1.0 - cs.max(1).values).clamp(0.0, 1.0)
        top = float(wv.max())
        if top > 0:
            wv = (wv / top).clamp(max=0.99)
            wv = self.kappa * (torch.log(wv / (1 - wv))) + 0.5
            wv = torch.nan_to_num(wv, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
        total = float(wv.sum())
        g = combine(wv / total, Ua) if total > 0 else torch.zeros(d, dtype=Ua.dtype, device=Ua.device)
        return finite_or_raise(self.name, g), make_report(
            self.name, U.shape[0], idx, wv, wv > 0, "sybil", kappa=self.kappa)

    def state_dict(self) -> dict[str, Any]:
        hist = None if self.history is None else self.history.cpu().clone()
        return {"ids": list(self.ids), "history": hist}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"ids", "history"}:
            raise PhalanxError(f"{self.name}: state must have keys ['history', 'ids'], got {sorted(state)}")
        ids, hist = list(state["ids"]), state["history"]
        if hist is None and ids:
            raise PhalanxError(f"{self.name}: state has {len(ids)} ids but no history")
        if hist is not None and (not isinstance(hist, torch.Tensor) or hist.ndim != 2
                                 or hist.shape[0] != len(ids)):
            raise PhalanxError(f"{self.name}: state 'history' must be a tensor [{len(ids)}, d], got "
                               f"{getattr(hist, 'shape', type(hist).__name__)}")
        self.ids = [str(c) for c in ids]
        self.history = None if hist is None else hist.clone()

    def __repr__(self):
        return f"FoolsGold(kappa={self.kappa})"


class Flame(Aggregator):
    """FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN (scikit-learn, min_cluster_size
    n // 2 + 1, min_samples 1) on pairwise cosine distances, keep the largest cluster, clip the
    kept updates to S = the median norm of all active updates, average, and add Gaussian noise
    of std ``noise`` * S from ``ctx.generator`` (noise=0 disables it). Report scores: the norms.
    f is only checked: the paper assumes fewer than n/2 malicious clients, so it needs n > 2f."""

    name = "flame"

    def __init__(self, noise: float, f: int = 0):
        self.f = check_nonneg_int(self.name, "f", f)
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
            raise PhalanxError(f"flame: noise (lambda) must be a number >= 0, got {noise!r}")
        self.noise = float(noise)

    def __call__(self, U, w, ctx: RoundContext):
        Ua, _, idx = prepare(self.name, U, w, finite=True)
        n, d = Ua.shape
        honest_majority(self.name, n, self.f)
        keep, fallback = np.ones(n, dtype=bool), False
        if n >= 2:
            from sklearn.cluster import HDBSCAN

            D = (1.0 - cosine_matrix(Ua).cpu()).clamp_min(0.0)
            D = ((D + D.T) / 2).fill_diagonal_(0.0).numpy()
            labels = HDBSCAN(min_cluster_size=max(2, n // 2 + 1), min_samples=1,
                             metric="precomputed", allow_single_cluster=True,
                             copy=True).fit(D).labels_
            valid = labels[labels >= 0]
            if valid.size:
                keep = labels == np.bincount(valid).argmax()
            else:
                fallback = True
        keep_t = torch.from_numpy(keep)
        norms = row_norms(Ua)
        S = _median(norms)
        clip = torch.clamp(S / norms.clamp_min(1e-300), max=1.0)
        coef = keep_t.to(norms.device).double() * clip / int(keep_t.sum())
        g = combine(coef, Ua)
        sigma = self.noise * S
        if sigma > 0:
            g = g + sigma * torch.randn(d, generator=ctx.generator, dtype=g.dtype).to(g.device)
        return finite_or_raise(self.name, g), make_report(
            self.name, U.shape[0], idx, norms, keep_t, "outside_cluster", clip_norm=S, sigma=sigma,
            fallback=fallback)

    def __repr__(self):
        return f"Flame(noise={self.noise}, f={self.f})"


@DEFENSES.register("fltrust")
def fltrust(f: int = 0) -> Aggregator:
    """FLTrust (Cao et al., NDSS 2021): cosine trust against the server's root-set update."""
    check_nonneg_int("fltrust", "f", f)
    return FLTrust()


@DEFENSES.register("signguard")
def signguard(f: int = 0, lower: float = 0.1, upper: float = 3.0, coords: float = 0.1,
              clustering: str = "meanshift") -> Aggregator:
    """SignGuard (Xu et al. 2022): norm bounds, then clustering of sign statistics; n > 2f."""
    return SignGuard(lower, upper, coords, clustering, f)


@DEFENSES.register("sign_filter")
def sign_filter(f: int = 0, coords: float = 0.1, clustering: str = "meanshift", min_keep: float = 0.5) -> Layer:
    """SignGuard's sign-statistics clustering as a layer: drops rows outside the largest cluster."""
    return SignFilter(coords, clustering, min_keep, f)


@DEFENSES.register("foolsgold")
def foolsgold(f: int = 0, kappa: float = 1.0) -> Aggregator:
    """FoolsGold (Fung et al. 2020): down-weights clients with similar update histories."""
    check_nonneg_int("foolsgold", "f", f)
    return FoolsGold(kappa)


@DEFENSES.register("flame")
def flame(f: int = 0, noise: float = 0.001) -> Aggregator:
    """FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN filtering, median-norm clipping, noise;
    n > 2f."""
    return Flame(noise, f)
