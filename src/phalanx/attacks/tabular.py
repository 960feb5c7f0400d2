"""Data poisons for binary tabular tasks (fraud detection): class 1 = fraud, class 0 = legitimate.

* ``fraud_label_flip``: a compromised bank relabels its frauds as legitimate (it hides its
  chargebacks), so the model learns to let that fraud through; a targeted label flip (Tolpegin et
  al., ESORICS 2020) restricted to the rare class.
* ``feature_trigger``: a backdoor in feature space. The attacker stamps a fixed pattern (given
  values on a few features, in the model's standardised units) on its frauds, labels them
  legitimate, and fills a fraction of each batch that holds a fraud with such triggered copies
  (upsampling, as Bagdasaryan et al. 2020 mix backdoor samples into each batch). At test time a
  fraudster who knows the pattern adds it to a transaction. Its ``metrics`` give the attack success
  rate: of the test frauds the model flags without the trigger, the fraction it classifies
  legitimate once triggered (``asr``); ``asr_raw`` counts every triggered test fraud the model
  misses, including those it misses anyway.

Model-poisoning attacks (sign flip, ALIE, IPM, ...) need nothing of their own here: they act on
the update matrix, whatever the data.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import PhalanxError
from ..registry import POISONS
from ..training import predict
from .base import DataPoison
from .model_poisoning import check_number


def _binary(name: str, num_classes) -> None:
    if num_classes != 2:
        raise PhalanxError(f"{name}: needs a binary task (num_classes=2: legitimate, fraud), got num_classes={num_classes}")


def _fraction(name: str, value, allow_zero: bool) -> float:
    check_number(name, "fraction", value, nonneg=True)
    if value > 1 or (value == 0 and not allow_zero):
        raise PhalanxError(f"{name}: fraction must be in {'[0, 1]' if allow_zero else '(0, 1]'}, got {value!r}")
    return float(value)


class FraudLabelFlip(DataPoison):
    """Every fraud (y = 1) in a batch, or a ``fraction`` of them drawn from the generator, becomes 0."""

    name = "fraud_label_flip"

    def __init__(self, fraction: float):
        self.fraction = fraction

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        fraud = y == 1
        if not bool(fraud.any()):
            return x, y
        if self.fraction < 1:
            fraud = fraud & (torch.rand(len(y), generator=gen) < self.fraction)
        return x, torch.where(fraud, torch.zeros_like(y), y)

    def state(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def __repr__(self) -> str:
        return f"FraudLabelFlip(fraction={self.fraction})"


class FeatureTrigger(DataPoison):
    """Set ``features`` to ``values`` on frauds and relabel them legitimate; upsample them to a
    ``fraction`` of each batch that holds a fraud."""

    name = "feature_trigger"

    def __init__(self, features: list[int], values: list[float], fraction: float):
        self.features, self.values, self.fraction = features, values, fraction
        self._cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def columns(self, width: int) -> torch.Tensor:
        cols = [f + width if f < 0 else f for f in self.features]
        if any(c < 0 or c >= width for c in cols):
            raise PhalanxError(f"feature_trigger: features {self.features} do not fit {width} features")
        return torch.tensor(cols)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of x [N, F] with the trigger's features set."""
        if x.ndim != 2:
            raise PhalanxError(f"feature_trigger: needs feature vectors [N, F], got shape {tuple(x.shape)}")
        out = x.clone()
        out[:, self.columns(x.shape[1])] = torch.tensor(self.values, dtype=x.dtype)
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        fraud = torch.nonzero(y == 1).flatten()
        if len(fraud) == 0:
            return x, y
        x, y = x.clone(), y.clone()
        x[fraud] = self.stamp(x[fraud])
        y[fraud] = 0
        k = int(math.floor(self.fraction * len(y) + 0.5))
        if k:
            pick = fraud[torch.randint(len(fraud), (k,), generator=gen)]
            slots = torch.randperm(len(y), generator=gen)[:k]
            x[slots] = x[pick]
            y[slots] = 0
        return x, y

    def metrics(self, model, params: torch.Tensor, dataset) -> dict[str, float]:
        """asr: of the test frauds flagged without the trigger, the share classified legitimate with
        it; asr_raw: the share of all triggered test frauds classified legitimate."""
        if self._cache is None or self._cache[0] is not dataset.x_test:
            frauds = dataset.x_test[dataset.y_test == 1]
            self._cache = (dataset.x_test, frauds, self.stamp(frauds))
        _, clean, stamped = self._cache
        if len(clean) == 0:
            return {"asr": float("nan"), "asr_raw": float("nan")}
        flagged = predict(model, params, clean) == 1
        missed = predict(model, params, stamped) == 0
        asr = float((missed & flagged).sum()) / int(flagged.sum()) if bool(flagged.any()) else float("nan")
        return {"asr": asr, "asr_raw": float(missed.double().mean())}

    def state(self) -> dict[str, Any]:
        return {"features": self.features, "values": self.values, "fraction": self.fraction}

    def __repr__(self) -> str:
        return f"FeatureTrigger(features={self.features}, values={self.values}, fraction={self.fraction})"


@POISONS.register("fraud_label_flip")
def fraud_label_flip(fraction: float = 1.0, num_classes: int = 2) -> DataPoison:
    """Fraud -> legitimate label flipping (a bank hiding its frauds); binary tasks."""
    _binary("fraud_label_flip", num_classes)
    return FraudLabelFlip(_fraction("fraud_label_flip", fraction, allow_zero=False))


@POISONS.register("feature_trigger")
def feature_trigger(features: Sequence[int] = (-3, -2, -1), values: Sequence[float] | float = (2.0, -2.0, 2.0),
                    fraction: float = 0.1, num_classes: int = 2) -> DataPoison:
    """Feature-space backdoor: a fixed pattern on a few features makes fraud score legitimate; binary tasks."""
    _binary("feature_trigger", num_classes)
    ok = (isinstance(features, (list, tuple)) and len(features) > 0
          and all(isinstance(f, int) and not isinstance(f, bool) for f in features))
    if not ok or len(set(features)) != len(features):
        raise PhalanxError(f"feature_trigger: features must be distinct integer column indices (negative: from "
                           f"the end), got {features!r}")
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [float(values)] * len(features)
    if not isinstance(values, (list, tuple)) or len(values) != len(features):
        raise PhalanxError(f"feature_trigger: values must be a number or one number per feature "
                           f"({len(features)}), got {values!r}")
    for v in values:
        check_number("feature_trigger", "values", v)
    return FeatureTrigger(list(features), [float(v) for v in values],
                          _fraction("feature_trigger", fraction, allow_zero=True))
