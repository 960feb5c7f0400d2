"""The defense contracts: layers, aggregators, post-processors and their reports (docs/design.md).

* A **layer** maps ``(U [n, d], w [n], ctx) -> (U', w', report)``. ``w`` holds a non-negative
  weight per row; weight 0 means the row is rejected and later stages ignore it.
* An **aggregator** maps ``(U, w, ctx) -> (g [d], report)``. Rows with weight 0 are ignored.
* A **post** step maps ``(g, ctx) -> (g', report)`` (for example central-DP noise). A post step
  that must know what reached the aggregator (central DP calibrates its noise to it) sets
  ``needs_aggregate_info``; the pipeline then hands it an ``AggregateInfo`` in
  ``ctx.extras[AGGREGATE_INFO]`` (on a copy of ctx) and calls its ``check_pipeline`` when built.

Norm bounds: a layer that guarantees every row it accepts has L2 norm at most some C sets
``bounds_norm = True`` and reports C as ``report.info["norm_bound"]``. A layer that never grows a
row's norm and reads only that row (pruning) sets ``nonexpansive = True``; a layer known to
break any bound (additive noise) sets ``breaks_norm_bound = True``. The pipeline tracks the bound
through the layers (``AggregateInfo.norm_bound``).

Every report names, per row, why it was rejected and (optionally) a score, so monitoring can
show who was trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..context import RoundContext
from ..errors import PhalanxError


@dataclass
class Report:
    """What one defense stage saw and decided, row by row.

    scores: one float per row (meaning documented by each defense), or None.
    selected: bool per row, True when the row contributed to this stage's output.
    reasons: row index -> short machine-readable reason it was rejected (``nonfinite``, ...).
    info: any scalar the stage wants to record (a clip norm, a cluster count, ...).
    """

    name: str
    n: int
    scores: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    reasons: dict[int, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def reject(self, row: int, reason: str) -> None:
        self.reasons.setdefault(int(row), reason)

    def discarded(self) -> torch.Tensor:
        """Bool [n]: rows this stage rejected or did not select."""
        out = torch.zeros(self.n, dtype=torch.bool)
        for r in self.reasons:
            out[r] = True
        if self.selected is not None:
            out |= ~self.selected.bool()
        return out


AGGREGATE_INFO = "phalanx.aggregate_info"


@dataclass(frozen=True)
class AggregateInfo:
    """What reached a pipeline's aggregator, for the post steps that need it.

    weights: [n] the weights the aggregator was given (0 = rejected); a copy.
    norm_bound: C such that every accepted row has L2 norm <= C, or None when no layer
      guarantees one (or a later layer changed the accepted rows).
    bound_by: name of the layer that set ``norm_bound``. lost_by: name of the later layer that
      changed the accepted rows and so dropped the bound (None when it was kept).
    aggregator: the aggregator stage itself.
    """

    weights: torch.Tensor
    norm_bound: float | None
    bound_by: str | None
    lost_by: str | None
    aggregator: Any


def is_weighted_mean(aggregator) -> bool:
    """True when ``aggregator`` returns sum_i p_i U_i with p_i = w_i / sum_j w_j over the accepted
    rows: its own ``linear`` attribute when it has one, else the registered plain ``mean``."""
    linear = getattr(aggregator, "linear", None)
    if isinstance(linear, bool):
        return linear
    return getattr(aggregator, "name", None) == "mean"


class Stage:
    """Common base: a name and (empty) state for checkpointing."""

    name = "stage"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise PhalanxError(f"{self.name}: has no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Layer(Stage):
    name = "layer"
    bounds_norm = False  # every accepted row it returns has norm <= report.info["norm_bound"]
    nonexpansive = False  # each output row depends on its own input row only, never with a larger norm
    breaks_norm_bound = False  # known to return rows of unbounded norm (additive noise)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        raise NotImplementedError


class Aggregator(Stage):
    name = "aggregator"

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        raise NotImplementedError


class Post(Stage):
    name = "post"
    needs_aggregate_info = False

    def check_pipeline(self, layers: list, aggregator) -> None:
        """Raise PhalanxError when this step cannot work after these layers and aggregator."""

    def __call__(self, g: torch.Tensor, ctx: RoundContext):
        raise NotImplementedError


def active(U: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with positive weight: (U[idx], w[idx], idx)."""
    idx = torch.nonzero(w > 0).flatten()
    return U[idx], w[idx], idx


def scatter_rows(values: torch.Tensor, idx: torch.Tensor, n: int, fill: float = float("nan")):
    """Place per-active-row values back into a length-n tensor (others get ``fill``)."""
    out = torch.full((n,), fill, dtype=values.dtype)
    out[idx] = values
    return out


def selection_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[idx] = True
    return out


def require_rows(name: str, n: int, minimum: int, rule: str, f: int | None = None) -> None:
    """Raise BoundError when fewer than ``minimum`` rows are available."""
    from ..errors import BoundError

    if n < minimum:
        fs = f", f={f}" if f is not None else ""
        raise BoundError(f"{name}: needs {rule} clients, got n={n}{fs}")


def check_nonneg_int(name: str, param: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PhalanxError(f"{name}: {param} must be an integer >= 0, got {value!r}")
    return value


def check_positive(name: str, param: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise PhalanxError(f"{name}: {param} must be a number > 0, got {value!r}")
    return float(value)
