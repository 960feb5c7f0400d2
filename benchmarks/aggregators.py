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

Two more columns time the same rule from other libraries on the same matrix in the same process,
as multiples of the same floor, when they are installed:

* ``ByzFL`` (EPFL's Byzantine-robust FL library: ``pip install byzfl``; its package imports
  torchvision and seaborn, which ``pip install byzfl`` pulls in; install it into a scratch venv
  if you would rather not add those). Same hyperparameters as ours where they differ: its
  geometric median runs our rule's iteration count with our nu, its centered clipping our 5
  iterations with the tau ours ended with. It has no Bulyan.
* ``Flower`` (``flwr``, in the ``dev`` extra): the server-side functions of
  ``flwr.server.strategy.aggregate`` (``aggregate``, ``aggregate_median``,
  ``aggregate_trimmed_avg``, ``aggregate_krum``, ``aggregate_bulyan``) over lists of numpy
  arrays, one per client.

A run that would take longer than ``--budget`` seconds (Flower's per-pair distance loop; ByzFL's
NNM, which gathers an [n, n - f, d] tensor) is timed on a sample and extrapolated (``~``), or
skipped with the reason (``oom``: the memory it would need; ``err``: it raised).

The layered default pipeline gets a row of its own, ``layered`` (configs/layered.yaml's defense
list), and so does issue 14's stack, ``layered-14`` (validate, clip auto, sign_filter, nnm,
trimmed_mean, reputation).

A scaling table follows: the same rules (ours, ByzFL's, Flower's) as multiples of the floor for
n in {10, 100, 1000} at d = 100,000 (``--no-scaling`` skips it).

    python benchmarks/aggregators.py [--n 100] [--d 1000000] [--repeats 3] [--f F] [--threads T]
                                     [--budget 30] [--no-scaling] [--smoke] [--only a,b,layered]

``--threads`` sets torch's and the BLAS libraries' thread count for both sides (default: torch's
default). On a shared machine, many threads mostly measure contention.

The last line is the headline: each distance or coordinate-wise rule and the layered pipeline
as multiples of the floor, and at n = 1000 on how many rules we are faster than ByzFL.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path
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


# ----------------------------------------------------------------------------- other libraries

class Timed:
    """A time in ms, estimated (``~``) or not measured (``oom``, ``err``, ``-``)."""

    def __init__(self, ms: float | None = None, note: str = ""):
        self.ms, self.note = ms, note

    def text(self, floor: float) -> str:
        if self.ms is None:
            return self.note or "-"
        return f"{'~' if self.note == '~' else ''}{self.ms / floor:.1f}"


def _time_external(fn: Callable[[], object], repeats: int, budget_s: float) -> Timed:
    """Best of ``repeats`` runs, or of fewer when one run takes a good part of the budget."""
    times = []
    try:
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if sum(times) > budget_s / 3:
                break
    except Exception as e:  # noqa: BLE001  (a library's own limit, e.g. torch.quantile's size)
        return Timed(None, f"err:{type(e).__name__}")
    return Timed(1e3 * min(times))


def byzfl_rules(U: torch.Tensor, f: int, ours: dict) -> dict[str, Callable[[], object]] | None:
    """ByzFL's rule for each of our labels (None when ByzFL is not installed)."""
    try:
        import byzfl
    except Exception:  # noqa: BLE001
        return None
    n = U.shape[0]
    iters = int(ours.get("geomed", {}).get("iterations", 10) or 10)
    tau = float(ours.get("centered_clipping", {}).get("tau", 1.0) or 1.0)
    avg = byzfl.Average()
    rules = {
        "mean": lambda: avg(U),
        "median": lambda: byzfl.Median()(U),
        "trimmed_mean": lambda: byzfl.TrMean(f=f)(U),
        "krum": lambda: byzfl.Krum(f=f)(U),
        "multi_krum": lambda: byzfl.MultiKrum(f=f)(U),
        "geomed": lambda: byzfl.GeometricMedian(nu=1e-6, T=iters)(U),
        "centered_clipping": lambda: byzfl.CenteredClipping(L=5, tau=tau)(U),
        "bucketing": lambda: avg(byzfl.Bucketing(s=2)(U)),
    }
    need = n * (n - f) * U.shape[1] * U.element_size()  # NNM gathers vectors[indices]: [n, n - f, d]
    rules["nnm+mean"] = ((lambda: avg(byzfl.NNM(f=f)(U))) if need < _ram() / 4
                         else Timed(None, f"oom:{need / 2**30:.0f}G"))
    return rules


def _ram() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def flower_rules(U: torch.Tensor, f: int, budget_s: float) -> dict[str, Callable[[], object] | Timed] | None:
    """Flower's server-side function for each of our labels (None when flwr is missing). Krum and
    Bulyan compare every pair of clients in a Python loop: past the budget they are timed on a
    few rows and extrapolated (n^2 pairs; Bulyan's n - 2f Krum rounds on shrinking sets)."""
    try:
        from flwr.server.strategy import aggregate as fa
    except Exception:  # noqa: BLE001
        return None
    A = U.numpy()
    n = A.shape[0]
    res = [([A[i]], 1) for i in range(n)]
    theta = n - 2 * f
    rules: dict[str, Callable[[], object] | Timed] = {
        "mean": lambda: fa.aggregate(res),
        "median": lambda: fa.aggregate_median(res),
        "trimmed_mean": lambda: fa.aggregate_trimmed_avg(res, proportiontocut=f / n),
    }
    m = min(n, 6)
    t0 = time.perf_counter()
    fa._compute_distances([w for w, _ in res[:m]])
    pair = (time.perf_counter() - t0) / (m * m)
    krum_s = pair * n * n
    bulyan_s = pair * sum(r * r for r in range(n - theta + 1, n + 1))
    for label, to_keep in (("krum", 0), ("multi_krum", n - f)):
        rules[label] = ((lambda k=to_keep: fa.aggregate_krum(list(res), f, k)) if krum_s < budget_s
                        else Timed(1e3 * krum_s, "~"))
    if 4 * f + 3 <= n:
        rules["bulyan"] = ((lambda: fa.aggregate_bulyan(list(res), f, fa.aggregate_krum, to_keep=0))
                           if bulyan_s < budget_s else Timed(1e3 * bulyan_s, "~"))
    return rules


def run_external(rules: dict | None, label: str, repeats: int, budget_s: float) -> Timed:
    if rules is None or label not in rules:
        return Timed(None, "-")
    r = rules[label]
    return r if isinstance(r, Timed) else _time_external(r, repeats, budget_s)


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
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds past which another library's run is estimated from a sample")
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    ap.add_argument("--smoke", action="store_true", help="a tiny size for tests")
    ap.add_argument("--only", default=None,
                    help="comma-separated row labels to time (e.g. trimmed_mean,krum,layered); default all")
    a = ap.parse_args(argv)
    a.only = None if a.only is None else {x.strip() for x in a.only.split(",") if x.strip()}
    a.scaling_n, a.scaling_d = (10, 100, 1000), 100_000
    if a.smoke:
        a.n, a.d, a.repeats, a.threads = 12, 4096, 1, 1
        a.scaling_n, a.scaling_d, a.budget = (10, 20), 2048, 2.0
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        run(a)


# issue 14's stack (the layered default when it was filed); the ``layered`` row reads the current
# default from configs/layered.yaml
LAYERED_14 = ["validate", {"clip": {"max_norm": "auto"}}, "sign_filter", "nnm", "trimmed_mean", "reputation"]
LAYERED_YAML = Path(__file__).resolve().parents[1] / "configs" / "layered.yaml"


def layered_default() -> list:
    import yaml

    try:
        return list(yaml.safe_load(LAYERED_YAML.read_text())["defense"])
    except Exception:  # noqa: BLE001  (a checkout without configs/: issue 14's stack)
        return LAYERED_14
HEADLINE = ("median", "trimmed_mean", "krum", "multi_krum", "geomed", "centered_clipping", "bulyan",
            "nnm+mean", "layered", "layered-14")
SCALING = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed", "centered_clipping",
           "bulyan", "nnm+mean", "bucketing")


def attacked_matrix(n: int, d: int, f: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    U = base + torch.randn(n, d, generator=gen)
    U[:f] = -3.0 * base  # a simple attack, so that filters have something to find
    server = base + 0.5 * torch.randn(d, generator=gen)
    return U, server


def default_f(n: int) -> int:
    return max(0, min(n // 5, (n - 3) // 4))


def our_calls(U: torch.Tensor, f: int, server: torch.Tensor, names=None):
    """label -> (call, fresh): timed call on U, and a fresh instance's run on another matrix."""
    w = torch.ones(U.shape[0])
    out = {}
    for name in DEFENSES.names() if names is None else names:
        if name == "nnm+mean":
            name = "nnm"
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

            mean = DEFENSES.build("mean")
            ctx = simple_round_context(U, server_update=lambda: server)  # built once, not timed

            def call(obj=obj, mean=mean, ctx=ctx):
                V, w2, _ = obj(U, w, ctx)
                return mean(V, w2, ctx)
            out["nnm+mean"] = (call, fresh)
        elif isinstance(obj, Aggregator):
            def fresh(V, s, name=name):
                return build(name, f)(V, torch.ones(V.shape[0]), simple_round_context(V, server_update=lambda: s))

            ctx = simple_round_context(U, server_update=lambda: server)

            def call(obj=obj, ctx=ctx):
                return obj(U, w, ctx)
            out[name] = (call, fresh)
    return out


def layered_call(U: torch.Tensor, f: int, items: list):
    from phalanx.defenses.pipeline import build_defense

    pipe = build_defense(items, f=f)
    w = torch.ones(U.shape[0])
    ctx = simple_round_context(U)
    return lambda: pipe(U, w, ctx)


def run(a: argparse.Namespace) -> None:
    n, d = a.n, a.d
    f = a.f if a.f is not None else default_f(n)
    U, server = attacked_matrix(n, d, f)
    ref = Reference(U, f, a.repeats)
    floor = lambda: best_ms(lambda: U.sum(0), max(5, a.repeats))  # noqa: E731

    print(f"aggregators: n={n}, d={d:,}, f={f}, float32, torch threads={torch.get_num_threads()}, "
          f"best of {a.repeats}")
    head = (f"{'name':<20}{'ms':>10}{'x floor':>9}  {'reference':<24}{'ref ms':>11}{'x faster':>10}"
            f"{'ByzFL x':>9}{'Flower x':>10}{'ref err':>10}{'dev/mean':>10}{'attackers out':>15}")
    print(head)
    print("-" * len(head))
    results: dict[str, tuple[float, float, float | None]] = {}
    checks: dict[str, dict] = {}
    infos: dict[str, dict] = {}
    cols = min(d, a.check_cols)
    Uc = U[:, :cols].contiguous()
    names = None if a.only is None else ["nnm" if x == "nnm+mean" else x for x in a.only
                                         if x not in ("layered", "layered-14")]
    calls = our_calls(U, f, server, names)
    byz = flw = None
    for label, (call, fresh) in calls.items():
        fl = floor()
        try:
            out = []
            ms = best_ms(lambda: out.append(call()), a.repeats)
            chk = check_result(label, fresh, Uc, f, server[:cols])
        except Exception as e:  # noqa: BLE001
            print(f"{label:<20}  skipped: {type(e).__name__}: {e}")
            continue
        report = out[-1][1] if isinstance(out[-1], tuple) else None
        infos[label] = dict(report.info) if report is not None else {}
        out.clear()
        # the other libraries right after ours, on the same matrix (ByzFL takes our iteration
        # count and tau, so it is built once our first rules have run)
        byz = byzfl_rules(U, f, infos)
        flw = flw if flw is not None else flower_rules(U, f, a.budget)
        bz = run_external(byz, label, a.repeats, a.budget).text(fl)
        fw = run_external(flw, label, a.repeats, a.budget).text(fl)
        r = ref.for_rule(label, report)
        ref_txt, ref_ms = (r[0], r[1]) if r else ("-", None)
        results[label] = (ms, ms / fl, ref_ms)
        faster = f"{ref_ms / ms:10.1f}" if ref_ms else f"{'-':>10}"
        ref_col = f"{ref_ms:11.1f}" if ref_ms else f"{'-':>11}"
        err = "nonfinite" if not chk["finite"] else f"{chk['err']:.1e}" if chk["err"] is not None else "-"
        att = f"{chk['out']}/{f}" if chk["out"] is not None else "-"
        print(f"{label:<20}{ms:10.1f}{ms / fl:9.1f}  {ref_txt:<24}{ref_col}{faster}{bz:>9}{fw:>10}"
              f"{err:>10}{chk['dev']:>10.3f}{att:>15}", flush=True)
        checks[label] = chk
    for label, items, note in (("layered", layered_default(), "configs/layered.yaml"),
                                ("layered-14", LAYERED_14, "+sign_filter+nnm (#14)")):
        if a.only is not None and label not in a.only:
            continue
        fl = floor()
        ms = best_ms(layered_call(U, f, items), a.repeats)
        results[label] = (ms, ms / fl, None)
        print(f"{label:<20}{ms:10.1f}{ms / fl:9.1f}  {note:<24}")
    bad = [k for k, c in checks.items() if not c["finite"] or (c["err"] is not None and c["err"] > c["tol"])]
    print(f"results checked on {n} x {cols:,}: {sum(c['err'] is not None for c in checks.values())} rules "
          f"against a float64 reference (tolerance {REF_TOL_DEFAULT:g} of max |U|, geomed "
          f"{REF_TOL['geomed']:g}), " + (f"MISMATCH: {', '.join(bad)}" if bad else "all within tolerance"))
    libs = [name for name, r in (("ByzFL", byz), ("Flower", flw)) if r is None] if calls else []
    if libs:
        print(f"not installed: {', '.join(libs)} (see the module docstring)")

    beats = "ByzFL not installed"
    if not a.no_scaling:
        beats = scaling(a)
    head_x = ", ".join(f"{k} {results[k][1]:.1f}" for k in HEADLINE if k in results)
    print(f"x floor at n={n}, d={d:,}: {head_x}; {beats}")


def scaling(a: argparse.Namespace) -> str:
    """The scaling table; returns the headline's comparison with ByzFL at the largest n."""
    ns, d = (a.scaling_n, a.scaling_d)
    print()
    print(f"scaling at d={d:,}: ms as a multiple of U.sum(0) on the same matrix "
          f"(ours / ByzFL / Flower; ~ estimated, - not available)")
    head = f"{'name':<20}" + "".join(f"{'n=' + str(n):>24}" for n in ns)
    print(head)
    print("-" * len(head))
    labels = [k for k in SCALING if a.only is None or k in a.only]
    table: dict[str, list[str]] = {k: [] for k in labels}
    wins = total = 0
    for n in ns:
        f = default_f(n)
        U, server = attacked_matrix(n, d, f, seed=1)
        calls = our_calls(U, f, server, labels)
        infos: dict[str, dict] = {}
        flw = flower_rules(U, f, a.budget)
        small = U.numel() * U.element_size() < (64 << 20)  # the floor is noisier on small U
        for label in labels:
            if label not in calls:
                table[label].append(f"{'-':>24}")
                continue
            fl = best_ms(lambda: U.sum(0), 20 if small else max(5, a.repeats))
            try:
                out = []
                ms = best_ms(lambda: out.append(calls[label][0]()), a.repeats)
                rep = out[-1][1] if isinstance(out[-1], tuple) else None
                infos[label] = dict(rep.info) if rep is not None else {}
            except Exception:  # noqa: BLE001  (a bound the rule refuses at this n)
                table[label].append(f"{'-':>24}")
                continue
            byz = byzfl_rules(U, f, infos)  # right after ours, with our iteration count and tau
            tb = run_external(byz, label, a.repeats, a.budget)
            tf = run_external(flw, label, a.repeats, a.budget)
            if n == ns[-1] and byz is not None and label in byz:
                total += 1
                wins += int(tb.ms is None and tb.note.startswith("oom") or (tb.ms is not None and ms < tb.ms))
            cell = f"{ms / fl:.1f} / {tb.text(fl)} / {tf.text(fl)}"
            table[label].append(f"{cell:>24}")
    for label in labels:
        print(f"{label:<20}" + "".join(table[label]))
    if total == 0:
        return "ByzFL not installed"
    return f"n={ns[-1]}, d={d:,}: faster than ByzFL on {wins}/{total} rules"


if __name__ == "__main__":
    main()
