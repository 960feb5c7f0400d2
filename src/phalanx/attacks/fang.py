"""Fang et al. (USENIX Security 2020), full knowledge: the attacks on Krum and on trimmed mean.

Both search against the server they face: ``ctx.aggregator`` when the federation provides it --
the whole defense pipeline as attackers see it, layers (validate, clip, sign filter, nnm,
reputation) included -- else the single aggregator named in their parameters (see
``adaptive.py`` for the simulation, which never changes a stateful stage's state).

* ``fang_krum``: rows ``-lambda * s`` (s = sign of the honest mean), lambda halved from the
  paper's upper bound until the simulated server *selects* a crafted row (then, if none was, a
  grid over (0, upper bound]: a norm test may accept only a window of lambdas that halving
  skips). "Selected" is read from the server's report: a crafted row that no stage discarded
  (``report.discarded()``: rejected by a layer, or left out by a selecting rule such as Krum).
  When every row survives (a mean, a coordinate-wise rule) the crafted rows count as selected,
  so lambda stays as large as the layers let through; only a report with no per-row verdict
  falls back to "is the row nearest the aggregate a crafted one".
* ``fang_trmean``: per coordinate, values beyond the honest extreme against the benign direction
  (the paper's interval). ``variant="optimal"`` then shrinks the rows toward the benign mean,
  ``mu + t * (row - mu)`` with t in [0, 1], choosing the t whose rows push the simulated server's
  aggregate farthest: the paper's rows are norm outliers that a validate layer rejects.
"""

from __future__ import annotations

import math

import torch

from ..context import AttackContext
from ..errors import PhalanxError
from ..registry import ATTACKS, DEFENSES
from ..updates import pairwise_sq_dists
from .adaptive import _benign, _EverySoOften, _farthest, _server, _Simulator, check_search
from .base import Attack
from .model_poisoning import check_int, check_number


class FangKrum(Attack):
    """Fang et al. 2020, attack on Krum: rows -lambda * s, s = sign(honest mean); lambda starts at
    the paper's upper bound and halves until the server selects a crafted row or lambda < threshold.
    When halving finds none, the largest of ``steps`` evenly spaced values in (0, upper bound]
    that the server selects (else the last halved lambda). Rows 2..m lie within ``eps`` of the
    first (eps = 0: identical copies)."""

    name, omniscient = "fang_krum", True

    def __init__(self, aggregator, f, threshold, eps, steps=50):
        self.aggregator, self.f, self.threshold, self.eps, self.steps = aggregator, f, threshold, eps, steps
        self.last: dict = {}

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx)
        h, m, d = honest.shape[0], ctx.m, B.shape[1]
        n = h + m
        if m == 0:
            return torch.zeros(0, d)
        if n - 2 * m - 1 < 1 or h < 2:
            raise PhalanxError(f"fang_krum: needs n > 2f + 1 clients and 2 honest rows, got n={n}, f={m}")
        s = torch.sign(B.mean(0))
        dist = pairwise_sq_dists(B).sqrt()
        k = min(n - m - 2, h - 1)
        near = dist.sort(1).values[:, 1:k + 1].sum(1)  # column 0 is the row itself
        lam = float(near.min()) / ((n - 2 * m - 1) * math.sqrt(d)) + float(B.norm(dim=1).max()) / math.sqrt(d)
        offsets = torch.randn(m, d, generator=ctx.generator)
        radius = self.eps * torch.rand(m, 1, generator=ctx.generator)
        offsets *= radius / offsets.norm(dim=1, keepdim=True).clamp_min(1e-30)
        offsets[0] = 0
        sim = _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), m, ctx)

        def selected(value: float) -> bool:
            g, rep = sim(-value * s + offsets)
            return picks_crafted(rep, g, torch.cat([honest.float(), -value * s + offsets]), h)

        top = lam
        while not (picked := selected(lam)) and lam / 2 >= self.threshold:
            lam /= 2
        if not picked:  # a layer (validate's norm test) may pass only a window that halving skips
            grid = torch.linspace(top, top / self.steps, self.steps, dtype=torch.float64).tolist()
            lam, picked = next(((v, True) for v in grid if selected(v)), (lam, False))
        self.last = {"lambda": lam, "selected": picked}
        return (-lam * s + offsets).to(torch.float32)

    def __repr__(self) -> str:
        return f"FangKrum(aggregator={self.aggregator!r}, eps={self.eps})"


def picks_crafted(rep, g: torch.Tensor, U: torch.Tensor, h: int) -> bool:
    """Did the server select a crafted row (index >= h)? True when some crafted row survives every
    stage (not in ``report.discarded()``). A report without a per-row verdict (no ``selected``
    and no reasons, or sized for other rows) falls back to: is the row nearest the aggregate a
    crafted one?"""
    discarded = getattr(rep, "discarded", None)
    informative = (getattr(rep, "n", None) == U.shape[0]
                   and (getattr(rep, "selected", None) is not None or bool(getattr(rep, "reasons", None))))
    if callable(discarded) and informative:
        return bool((~discarded()[h:]).any())
    return int(((U.double() - g.double()) ** 2).sum(1).argmin()) >= h


class FangTrmean(Attack):
    """Fang et al. 2020, attack on trimmed mean / median (full knowledge). With s_j the sign of the
    honest mean, a coordinate that would rise (s_j > 0) gets values below the honest minimum, one
    that would fall gets values above the honest maximum; each value is drawn uniformly from the
    paper's interval between that extreme e and e*b or e/b (whichever lies further out).
    ``variant="optimal"``: the rows shrunk toward the benign mean by the t in [0, 1] that moves
    the simulated server farthest (``last["t"]``)."""

    name, omniscient = "fang_trmean", True

    def __init__(self, b, variant="paper", aggregator="trimmed_mean", f=None, steps=21, search_every=1):
        self.b, self.variant, self.aggregator, self.f, self.steps = b, variant, aggregator, f, steps
        self.search = _EverySoOften(search_every)
        self.last: dict = {}

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx)
        mu = B.mean(0)
        down = mu >= 0  # push against the estimated change direction
        e = torch.where(down, B.min(0).values, B.max(0).values)
        far = torch.where((e > 0) == down, e / self.b, e * self.b)
        u = torch.rand(ctx.m, B.shape[1], generator=ctx.generator)
        rows = (e + u * (far - e)).to(torch.float32)
        if self.variant != "optimal":
            self.last = {"t": 1.0}
            return rows
        make = lambda t: (mu + t * (rows - mu)).to(torch.float32)  # noqa: E731
        t = self.search(ctx.round, lambda: _farthest(
            _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), ctx.m, ctx),
            make, 1.0, self.steps, mu))
        self.last = {"t": t}
        return make(t)

    def __repr__(self) -> str:
        return f"FangTrmean(b={self.b}, variant={self.variant!r})"


@ATTACKS.register("fang_krum")
def fang_krum(aggregator: str = "krum", f: int | None = None, threshold: float = 1e-5,
              eps: float = 0.0, steps: int = 50) -> Attack:
    """Fang et al. (2020) attack on Krum, searched against the server's whole pipeline.
    The server simulated is ctx.aggregator when given, else DEFENSES.build(aggregator, f)."""
    if not isinstance(aggregator, str):
        raise PhalanxError(f"fang_krum: aggregator must be a registered defense name, got {aggregator!r}")
    if f is not None:
        check_int("fang_krum", "f", f)
    check_number("fang_krum", "threshold", threshold, positive=True)
    check_number("fang_krum", "eps", eps, nonneg=True)
    check_int("fang_krum", "steps", steps, minimum=1)
    DEFENSES.get(aggregator)  # unknown names fail now, listing what exists
    return FangKrum(aggregator, f, float(threshold), float(eps), steps)


@ATTACKS.register("fang_trmean")
def fang_trmean(b: float = 2.0, variant: str = "paper", aggregator: str = "trimmed_mean",
                f: int | None = None, steps: int = 21, search_every: int = 1) -> Attack:
    """Fang et al. (2020) attack on trimmed mean and median; b > 1 bounds how far out values go.
    variant "optimal": shrink toward the mean by the factor that moves the simulated server most."""
    check_number("fang_trmean", "b", b, positive=True)
    if b <= 1:
        raise PhalanxError(f"fang_trmean: b must be a number > 1, got {b!r}")
    check_search("fang_trmean", variant, aggregator, f, steps, search_every)
    return FangTrmean(float(b), variant, aggregator, f, steps, search_every)
