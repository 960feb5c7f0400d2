"""Speed of every registered aggregator on one n x d float32 update matrix.

Each row is timed next to two baselines measured in the same process:

* the memory floor, a plain ``U.sum(0)`` over the same matrix (``x floor`` = ms / floor ms);
* a straightforward reference implementation of the rule's dominant step (``x faster`` =
  reference ms / ms): per-pair Python loops for distances and cosines, a per-column
  ``torch.median`` / sort loop, per-row Python loops for weighted sums and distances, or plain
  numpy. Per-pair and per-column loops are timed on a sample and extrapolated.

NNM is a layer; it is timed as ``nnm+mean``. Layers and post steps other than NNM are skipped.

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
    head = f"{'name':<20}{'ms':>10}{'x floor':>9}  {'reference':<24}{'ref ms':>11}{'x faster':>10}"
    print(head)
    print("-" * len(head))
    results: dict[str, tuple[float, float, float | None]] = {}
    for name in DEFENSES.names():
        try:
            obj = build(name, f)
        except Exception:  # another module's defense that needs parameters we cannot guess
            continue
        if isinstance(obj, Layer) and name == "nnm":
            mean = DEFENSES.build("mean")

            def call(obj=obj, mean=mean):
                ctx = simple_round_context(U, server_update=lambda: server)
                V, w2, _ = obj(U, w, ctx)
                return mean(V, w2, ctx)
            label = "nnm+mean"
        elif isinstance(obj, Aggregator):
            def call(obj=obj):
                return obj(U, w, simple_round_context(U, server_update=lambda: server))
            label = name
        else:
            continue
        fl = floor()
        try:
            out = []
            ms = best_ms(lambda: out.append(call()), a.repeats)
        except Exception as e:  # noqa: BLE001
            print(f"{label:<20}  skipped: {type(e).__name__}: {e}")
            continue
        report = out[-1][1] if isinstance(out[-1], tuple) else None
        r = ref.for_rule(label, report)
        ref_txt, ref_ms = (r[0], r[1]) if r else ("-", None)
        results[label] = (ms, ms / fl, ref_ms)
        faster = f"{ref_ms / ms:10.1f}" if ref_ms else f"{'-':>10}"
        ref_col = f"{ref_ms:11.1f}" if ref_ms else f"{'-':>11}"
        print(f"{label:<20}{ms:10.1f}{ms / fl:9.1f}  {ref_txt:<24}{ref_col}{faster}")
        out.clear()

    def xf(k: str) -> str:
        return f"{results[k][1]:.1f}x floor" if k in results else "n/a"

    krum = results.get("krum")
    speed = f"{krum[2] / krum[0]:.0f}x" if krum and krum[2] else "n/a"
    print(f"median {xf('median')}, trimmed_mean {xf('trimmed_mean')}; "
          f"krum {speed} faster than per-pair reference")


if __name__ == "__main__":
    main()
