"""The defense contracts: layers, aggregators, post-processors and their reports (DESIGN.md).

* A **layer** maps ``(U [n, d], w [n], ctx) -> (U', w', report)``. ``w`` holds a non-negative
  weight per row; weight 0 means the row is rejected and later stages ignore it.
* An **aggregator** maps ``(U, w, ctx) -> (g [d], report)``. Rows with weight 0 are ignored.
* A **post** step maps ``(g, ctx) -> (g', report)`` (for example central-DP noise).

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

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        raise NotImplementedError


class Aggregator(Stage):
    name = "aggregator"

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        raise NotImplementedError


class Post(Stage):
    name = "post"

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
