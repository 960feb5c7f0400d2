"""Data poisons applied to the malicious clients' batches during local training.

``label_flip`` (Biggio et al. 2012; Tolpegin et al., ESORICS 2020): every label y becomes
``num_classes - 1 - y``, or ``mapping[y]`` for an explicit mapping (labels it does not name stay).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PhalanxError
from ..registry import POISONS
from .base import DataPoison


class LabelFlip(DataPoison):
    """y -> C-1-y, or y -> mapping.get(y, y). Inputs x pass through unchanged."""

    name = "label_flip"

    def __init__(self, num_classes: int, mapping: dict[int, int] | None):
        self.num_classes, self.mapping = num_classes, mapping
        if mapping:
            size = max(max(mapping), max(mapping.values())) + 1
            table = torch.arange(size)
            table[torch.tensor(list(mapping))] = torch.tensor(list(mapping.values()))
            self._table = table
        else:
            self._table = torch.arange(num_classes - 1, -1, -1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None = None):
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
            raise PhalanxError(f"label_flip: labels y must be an integer tensor, got dtype {y.dtype}")
        if y.numel() == 0:
            return x, y
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise PhalanxError(f"label_flip: labels must be >= 0, got {lo}")
        table = self._table
        if self.mapping is None and hi >= self.num_classes:
            raise PhalanxError(f"label_flip: labels must be < num_classes={self.num_classes}, got {hi}")
        if hi >= table.numel():  # labels beyond the mapping's range are left as they are
            table = torch.cat([table, torch.arange(table.numel(), hi + 1)])
        return x, table.to(y.device)[y.long()].to(y.dtype)

    def state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "mapping": self.mapping}

    def __repr__(self) -> str:
        if self.mapping is not None:
            return f"LabelFlip(mapping={self.mapping})"
        return f"LabelFlip(num_classes={self.num_classes})"


def _label(value, where: str) -> int:
    """An integer label >= 0; strings of digits (YAML/JSON keys) are accepted."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PhalanxError(f"label_flip: mapping {where} must be integer labels >= 0, got {value!r}")
    return value


@POISONS.register("label_flip")
def label_flip(num_classes: int = 10, mapping: dict | None = None) -> DataPoison:
    """Label flipping: y -> num_classes-1-y, or an explicit ``mapping`` {from: to}."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise PhalanxError(f"label_flip: num_classes must be an integer >= 2, got {num_classes!r}")
    if mapping is not None:
        if not isinstance(mapping, dict) or not mapping:
            raise PhalanxError(f"label_flip: mapping must be a non-empty dict {{from: to}}, got {mapping!r}")
        mapping = {_label(k, "keys"): _label(v, "values") for k, v in mapping.items()}
    return LabelFlip(num_classes, mapping)
