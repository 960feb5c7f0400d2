"""Speed of every registered aggregator on one n x d float32 update matrix.

Each row is timed next to two baselines measured in the same process:

* the memory floor, a plain ``U.sum(0)`` over the same matrix (``x floor`` = ms / floor ms);
* a straightforward reference implementation of the rule's dominant step (``x faster`` =
  reference ms / ms): per-pair Python loops for distances and cosines, a per-column
  ``torch.median`` / sort loop, per-row Python loops for weighted sums and distances, or plain
  numpy. Per-pair and per-column loops are timed on a sample and extrapolated.

NNM is a layer; it is timed as ``nnm+mean``. Layers and post steps other than NNM are skipped.

Each rule's *result* is checked too, on the same rows (the first ``--check-cols`` columns, all of
them in ``--smoke``), with a fresh instance:

* ``ref err``: the largest absolute difference, relative to the largest absolute input value,
  from a slow float64 numpy reference of the whole rule (per-pair loops for Krum, Multi-Krum,
  Bulyan and NNM; ``np.median``; a sort for the trimmed mean; Weiszfeld run to convergence for the
  geometric median; the centered-clipping and FLTrust formulas; the mean for bucketing of equal
  buckets around the mean). ``-`` where the rule is randomized or clusters (DnC, SignGuard,
  FoolsGold, FLAME): those are judged by the next two columns only.
* ``dev/mean``: the distance of the output to the mean of the honest rows, as a fraction of the
  plain mean's distance to it. The first f rows are a simple attack (``-3 x`` the honest centre);
  every rule meant to resist it ends below 1.
* ``attackers out``: how many of the f attack rows the rule's report leaves unselected (``-``
  when the rule reports no selection).

    python benchmarks/aggregators.py [--n 100] [--d 1000000] [--repeats 3] [--f F] [--threads T] [--smoke]

``--threads`` sets torch's and the BLAS libraries' thread count for both sides (default: torch's
default). On a shared machine, many threads mostly measure contention.

The last line is the headline: median and trimmed mean as multiples of the floor, and Krum's
speed-up over the per-pair reference.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import phalanx  # noqa: F401  (registers every defense)
from phalanx.context import simple_round_context
from phalanx.defenses.base import Aggregator, Layer
from phalanx.registry import DEFENSES


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


# ----------------------------------------------------------------------------- references

class Reference:
    """Straightforward implementations of the dominant steps (sampled and extrapolated where a
    full run would take minutes), each timed as the best of ``repeats`` runs and cached."""

    def __init__(self, U: torch.Tensor, f: int, repeats: int):
        self.U, self.f, self.repeats = U, f, repeats
        self.n, self.d = U.shape
        self._cache: dict[str, float] = {}

    def _once(self, key: str, fn: Callable[[], float]) -> float:
        if key not in self._cache:
            self._cache[key] = min(fn() for _ in range(self.repeats))
        return self._cache[key]

    def row_pass(self) -> float:
        """One Python loop over the rows: acc += c_i * U_i (a weighted sum or a distance pass)."""
        def run():
            acc = torch.zeros(self.d)
            t0 = time.perf_counter()
            for i in range(self.n):
                acc.add_(self.U[i], alpha=1.0 / self.n)
            return 1e3 * (time.perf_counter() - t0)
        return self._once("rows", run)

    def pairs(self) -> float:
        """Per-pair loop ((U_i - U_j)^2).sum() over all n(n-1)/2 pairs (a sample, extrapolated)."""
        def run():
            pairs = [(i, j) for i in range(self.n) for j in range(i + 1, self.n)]
            sample = pairs[:: max(1, len(pairs) // 60)]
            t0 = time.perf_counter()
            for i, j in sample:
                float(((self.U[i] - self.U[j]) ** 2).sum())
            return 1e3 * (time.perf_counter() - t0) * len(pairs) / len(sample)
        return self._once("pairs", run)

    def columns(self, kind: str, rows: int | None = None) -> float:
        """Per-column loop on a sample of columns: torch.median, or sort + trimmed/Bulyan mean."""
        def run():
            V = self.U[: rows or self.n]
            m, f = V.shape[0], self.f
            cols = range(0, self.d, max(1, self.d // 2000))
            t0 = time.perf_counter()
            for j in cols:
                c = V[:, j]
                if kind == "median":
                    torch.median(c)
                elif kind == "trim":
                    torch.sort(c).values[f:m - f].mean()
                else:  # bulyan: the m - 2f values closest to the median
                    c[torch.argsort((c - torch.median(c)).abs())[: m - 2 * f]].mean()
            return 1e3 * (time.perf_counter() - t0) * self.d / len(cols)
        return self._once(f"cols-{kind}-{rows}", run)

    def dnc_numpy(self, b: int, iterations: int) -> float:
        """DnC in plain numpy: column sample, centred SVD, scores, mean of the kept rows."""
        def run():
            A, rng = self.U.numpy(), np.random.default_rng(0)
            t0 = time.perf_counter()
            keep = np.ones(self.n, dtype=bool)
            for _ in range(iterations):
                cols = np.sort(rng.permutation(self.d)[: min(b, self.d)])
                sub = A[:, cols].astype(np.float64)
                sub -= sub.mean(0)
                v = np.linalg.svd(sub, full_matrices=False)[2][0]
                keep[np.argsort(-(sub @ v) ** 2)[: self.f]] = False
            A[keep].mean(0)
            return 1e3 * (time.perf_counter() - t0)
        return self._once("dnc", run)

    def for_rule(self, name: str, report) -> tuple[str, float] | None:
        n, f = self.n, self.f
        iters = int(report.info.get("iterations", 1) or 1) if report is not None else 1
        table: dict[str, Callable[[], tuple[str, float]]] = {
            "mean": lambda: ("per-row loop", self.row_pass()),
            "median": lambda: ("per-column torch.median", self.columns("median")),
            "trimmed_mean": lambda: ("per-column sort", self.columns("trim")),
            "krum": lambda: ("per-pair loop", self.pairs()),
            "multi_krum": lambda: ("per-pair loop", self.pairs() + self.row_pass()),
            "bulyan": lambda: ("per-pair + per-column", self.pairs() + self.columns("bulyan", n - 2 * f)),
            "nnm+mean": lambda: ("per-pair + per-row", self.pairs() + (n - f) * self.row_pass()),
            "geomed": lambda: ("per-row Weiszfeld", 2 * iters * self.row_pass()),
            "centered_clipping": lambda: ("per-row loop", 2 * iters * self.row_pass()),
            "bucketing": lambda: ("per-row loop", 2 * self.row_pass()),
            "dnc": lambda: ("numpy", self.dnc_numpy(10000, 5)),
            "fltrust": lambda: ("per-row loop", 3 * self.row_pass()),
            "signguard": lambda: ("per-row loop", 3 * self.row_pass()),
            "foolsgold": lambda: ("per-pair cosine", self.pairs() + 2 * self.row_pass()),
            "flame": lambda: ("per-pair cosine", self.pairs() + 2 * self.row_pass()),
        }
        return table[name]() if name in table else None


# ----------------------------------------------------------------------------- result checks

def _pair_dists(A: np.ndarray) -> np.ndarray:
    """Squared distances, one pair at a time (float64)."""
    n = A.shape[0]
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            D[i, j] = D[j, i] = float(((A[i] - A[j]) ** 2).sum())
    return D


def _krum_scores(D: np.ndarray, f: int) -> np.ndarray:
    n = D.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    return np.array([np.sort(np.delete(D[i], i))[:k].sum() for i in range(n)])


def _weiszfeld(A: np.ndarray, nu: float = 1e-6, iterations: int = 5000) -> np.ndarray:
    v = A.mean(0)
    for _ in range(iterations):
        b = 1.0 / np.maximum(nu, np.sqrt(((A - v) ** 2).sum(1)))
        new = (b[:, None] * A).sum(0) / b.sum()
        if np.linalg.norm(new - v) <= 1e-13 * np.linalg.norm(new):
            return new
        v = new
    return v


def _cclip(A: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Centered clipping from a zero center, tau = the median distance at each iteration (the
    lower middle one for even n, as ``torch.median``)."""
    v = np.zeros(A.shape[1])
    for _ in range(iterations):
        dist = np.sqrt(((A - v) ** 2).sum(1))
        tau = float(np.sort(dist)[(len(dist) - 1) // 2])
        v = v + np.mean([min(1.0, tau / dist[i]) * (A[i] - v) for i in range(len(A))], axis=0)
    return v


def _bulyan(A: np.ndarray, f: int) -> np.ndarray:
    n = A.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    D, remaining, chosen = _pair_dists(A), list(range(n)), []
    for _ in range(theta):
        sub = D[np.ix_(remaining, remaining)]
        best = remaining[int(np.argmin(_krum_scores(sub, f)))]
        chosen.append(best)
        remaining.remove(best)
    S = A[sorted(chosen)]
    med = np.median(S, 0)
    out = np.empty(A.shape[1])
    for j in range(A.shape[1]):  # per column: the beta values closest to the median
        out[j] = S[np.argsort(np.abs(S[:, j] - med[j]), kind="stable")[:beta], j].mean()
    return out


def _nnm_mean(A: np.ndarray, f: int) -> np.ndarray:
    D = _pair_dists(A)
    np.fill_diagonal(D, -1.0)
    return np.mean([A[np.argsort(D[i], kind="stable")[: len(A) - f]].mean(0) for i in range(len(A))], axis=0)


def _fltrust(A: np.ndarray, g0: np.ndarray) -> np.ndarray:
    n0 = np.linalg.norm(g0)
    trust = [max(0.0, float(a @ g0) / (np.linalg.norm(a) * n0)) for a in A]
    return sum(t * n0 / np.linalg.norm(a) * a for t, a in zip(trust, A)) / sum(trust)


def value_reference(label: str, A: np.ndarray, f: int, server: np.ndarray) -> np.ndarray | None:
    """A slow float64 reference of the rule's output on A (None: randomized or clustering rules)."""
    n = A.shape[0]
    if label == "mean" or (label == "bucketing" and n % 2 == 0):  # equal buckets of 2 around the mean
        return A.mean(0)
    if label == "median":
        return np.median(A, 0)
    if label == "trimmed_mean":
        return np.sort(A, 0)[f:n - f].mean(0)
    if label in ("krum", "multi_krum"):
        order = np.argsort(_krum_scores(_pair_dists(A), f), kind="stable")
        return A[order[:1 if label == "krum" else n - f]].mean(0)
    if label == "bulyan":
        return _bulyan(A, f)
    if label == "geomed":
        return _weiszfeld(A)
    if label == "centered_clipping":
        return _cclip(A)
    if label == "nnm+mean":
        return _nnm_mean(A, f)
    if label == "fltrust":
        return _fltrust(A, server)
    return None


# tolerance of ``ref err`` (relative to max |U|): float32 sums of n terms against float64 differ
# by a few float32 epsilons (1.2e-7) times n at most, far below 1e-5; geomed stops when its
# step falls under 1e-6 of |v| (slow linear convergence can leave more than the step), where the
# reference runs on to 1e-13, so it gets 1e-3
REF_TOL = {"geomed": 1e-3}
REF_TOL_DEFAULT = 1e-5


def check_result(label: str, make, U: torch.Tensor, f: int, server: torch.Tensor) -> dict:
    """Run a fresh instance once on U and compare with the references (see the module docstring)."""
    g, report = make(U, server)
    g = g.double().numpy()
    A = U.double().numpy()
    honest = A[f:].mean(0)
    base_dev = float(np.linalg.norm(A.mean(0) - honest))
    ref = value_reference(label, A, f, server.double().numpy())
    err = None if ref is None else float(np.abs(g - ref).max() / np.abs(A).max())
    sel = getattr(report, "selected", None) if report is not None else None
    out = None if sel is None else int((~sel[:f]).sum())
    return {"finite": bool(np.isfinite(g).all()) and g.shape == (A.shape[1],), "err": err,
            "tol": REF_TOL.get(label, REF_TOL_DEFAULT),
            "dev": float(np.linalg.norm(g - honest)) / base_dev if base_dev > 0 else float("nan"),
            "out": out}


# ----------------------------------------------------------------------------- main

def build(name: str, f: int):
    factory = DEFENSES.get(name)
    params = inspect.signature(factory).parameters
    if "f" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return DEFENSES.build(name, f=f)
    return DEFENSES.build(name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--f", type=int, default=None, help="Byzantine count (default min(n//5, (n-3)//4))")
    ap.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: torch's)")
    ap.add_argument("--check-cols", type=int, default=65536,
                    help="columns of the matrix on which results are checked against the references")
    ap.add_argument("--smoke", action="store_true", help="a tiny size for tests")
    a = ap.parse_args(argv)
    if a.smoke:
        a.n, a.d, a.repeats, a.threads = 12, 4096, 1, 1
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        run(a)


def run(a: argparse.Namespace) -> None:
    n, d = a.n, a.d
    f = a.f if a.f is not None else max(0, min(n // 5, (n - 3) // 4))

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=gen)
    U = base + torch.randn(n, d, generator=gen)
    U[:f] = -3.0 * base  # a simple attack, so that filters have something to find
    w = torch.ones(n)
    server = base + 0.5 * torch.randn(d, generator=gen)
    ref = Reference(U, f, a.repeats)
    floor = lambda: best_ms(lambda: U.sum(0), max(3, a.repeats))  # noqa: E731

    print(f"aggregators: n={n}, d={d:,}, f={f}, float32, torch threads={torch.get_num_threads()}, "
          f"best of {a.repeats}")
    head = (f"{'name':<20}{'ms':>10}{'x floor':>9}  {'reference':<24}{'ref ms':>11}{'x faster':>10}"
            f"{'ref err':>10}{'dev/mean':>10}{'attackers out':>15}")
    print(head)
    print("-" * len(head))
    results: dict[str, tuple[float, float, float | None]] = {}
    checks: dict[str, dict] = {}
    cols = min(d, a.check_cols)
    Uc = U[:, :cols].contiguous()
    for name in DEFENSES.names():
        try:
            obj = build(name, f)
        except Exception:  # another module's defense that needs parameters we cannot guess
            continue
        if isinstance(obj, Layer) and name == "nnm":
            def fresh(V, s, name=name):  # a new instance on (V, s): the result check
                layer, mean, ctx = build(name, f), DEFENSES.build("mean"), simple_round_context(
                    V, server_update=lambda: s)
                V2, w2, _ = layer(V, torch.ones(V.shape[0]), ctx)
                return mean(V2, w2, ctx)
            label = "nnm+mean"
        elif isinstance(obj, Aggregator):
            def fresh(V, s, name=name):
                return build(name, f)(V, torch.ones(V.shape[0]), simple_round_context(V, server_update=lambda: s))
            label = name
        else:
            continue
        if isinstance(obj, Layer):
            mean = DEFENSES.build("mean")

            def call(obj=obj, mean=mean):
                ctx = simple_round_context(U, server_update=lambda: server)
                V, w2, _ = obj(U, w, ctx)
                return mean(V, w2, ctx)
        else:
            def call(obj=obj):
                return obj(U, w, simple_round_context(U, server_update=lambda: server))
        fl = floor()
        try:
            out = []
            ms = best_ms(lambda: out.append(call()), a.repeats)
            chk = check_result(label, fresh, Uc, f, server[:cols])
        except Exception as e:  # noqa: BLE001
            print(f"{label:<20}  skipped: {type(e).__name__}: {e}")
            continue
        report = out[-1][1] if isinstance(out[-1], tuple) else None
        r = ref.for_rule(label, report)
        ref_txt, ref_ms = (r[0], r[1]) if r else ("-", None)
        results[label] = (ms, ms / fl, ref_ms)
        faster = f"{ref_ms / ms:10.1f}" if ref_ms else f"{'-':>10}"
        ref_col = f"{ref_ms:11.1f}" if ref_ms else f"{'-':>11}"
        err = "nonfinite" if not chk["finite"] else f"{chk['err']:.1e}" if chk["err"] is not None else "-"
        att = f"{chk['out']}/{f}" if chk["out"] is not None else "-"
        print(f"{label:<20}{ms:10.1f}{ms / fl:9.1f}  {ref_txt:<24}{ref_col}{faster}"
              f"{err:>10}{chk['dev']:>10.3f}{att:>15}")
        checks[label] = chk
        out.clear()

    def xf(k: str) -> str:
        return f"{results[k][1]:.1f}x floor" if k in results else "n/a"

    krum = results.get("krum")
    speed = f"{krum[2] / krum[0]:.0f}x" if krum and krum[2] else "n/a"
    bad = [k for k, c in checks.items() if not c["finite"] or (c["err"] is not None and c["err"] > c["tol"])]
    print(f"results checked on {n} x {cols:,}: {sum(c['err'] is not None for c in checks.values())} rules "
          f"against a float64 reference (tolerance {REF_TOL_DEFAULT:g} of max |U|, geomed "
          f"{REF_TOL['geomed']:g}), " + (f"MISMATCH: {', '.join(bad)}" if bad else "all within tolerance"))
    print(f"median {xf('median')}, trimmed_mean {xf('trimmed_mean')}; "
          f"krum {speed} faster than per-pair reference")


if __name__ == "__main__":
    main()
