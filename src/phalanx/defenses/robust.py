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

The rules live by family in ``coordinate.py``, ``distance.py`` and ``iterative.py`` (shared checks
in ``common.py``); this module holds the mean and the registry, and re-exports the rest.
"""

from __future__ import annotations

from ..context import RoundContext
from ..registry import DEFENSES
from ..updates import combine
from .base import Aggregator, check_nonneg_int
from .common import (_check, check_int, finite_or_raise, honest_majority, make_report,  # noqa: F401
                     prepare, prepare_rows, row_norms)
from .coordinate import (Median, TrimmedMean, bulyan_kernel, median_kernel,  # noqa: F401
                         sorted_column_map, sorting_network)
from .distance import Bulyan, Krum, iterated_krum, krum_choice, nearest_sets  # noqa: F401
from .iterative import CenteredClipping, GeoMed, use_gram  # noqa: F401


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
