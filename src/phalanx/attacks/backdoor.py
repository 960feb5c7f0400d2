"""Backdoor data poisons, their attack success rate (ASR), and how long a backdoor persists.

* ``pixel_trigger``: BadNets (Gu et al. 2017; in FL, Bagdasaryan et al. AISTATS 2020): a small
  pixel pattern stamped into a fraction of each batch, those images relabelled to ``target``.
* ``dba``: the distributed backdoor attack (Xie et al., ICLR 2020). The global trigger is a grid
  of ``parts`` horizontal bars; attacker j stamps only bar ``j mod parts`` (``for_client``), while
  the test-time trigger is the whole grid.
* ``semantic``: no pattern at all (Bagdasaryan et al. 2020: "cars with racing stripes"). A natural
  subset of class ``source`` -- the images whose mean intensity inside ``region`` is at least
  ``threshold`` -- is relabelled to ``target``, and may be upsampled in the batches that hold it.

Every poison has ``metrics(model, params, dataset) -> {"asr": ...}``, which the federation calls
at each evaluation round. The trigger poisons measure ASR on the stamped test images whose true
label is not the target; the semantic poison on the test images of its subset.
:func:`persistence` turns an ASR curve into the number of rounds a backdoor survives.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import PhalanxError
from ..registry import POISONS
from ..training import predict
from .base import DataPoison
from .model_poisoning import check_choice, check_int, check_number

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
PATTERNS = ("square", "cross", "plus", "checker")


def pattern_mask(pattern: str, size: int) -> torch.Tensor:
    """A bool [size, size] tile: 'square' (all), 'cross' (both diagonals, an X), 'plus' (middle row
    and column) or 'checker' (pixels whose row + column is even)."""
    r = torch.arange(size)[:, None]
    c = torch.arange(size)[None, :]
    if pattern == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if pattern == "cross":
        return (r == c) | (r + c == size - 1)
    if pattern == "plus":
        mid = size // 2
        return (r == mid) | (c == mid)
    if pattern == "checker":
        return (r + c) % 2 == 0
    raise PhalanxError(f"pixel_trigger: pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")


def _check_position(name: str, position) -> str | tuple[int, int]:
    if isinstance(position, str):
        return check_choice(name, "position", position, CORNERS)
    if (isinstance(position, (list, tuple)) and len(position) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position)):
        return int(position[0]), int(position[1])
    raise PhalanxError(f"{name}: position must be a corner ({', '.join(CORNERS)}) or (row, col) "
                       f"integers >= 0, got {position!r}")


def _check_label(name: str, param: str, value, num_classes: int) -> int:
    check_int(name, param, value)
    if value >= num_classes:
        raise PhalanxError(f"{name}: {param} must be a label < num_classes={num_classes}, got {value}")
    return value


def _check_fraction(name: str, value, allow_zero: bool = False) -> float:
    check_number(name, "fraction", value, nonneg=True)
    if value > 1 or (value == 0 and not allow_zero):
        low = "[0, 1]" if allow_zero else "(0, 1]"
        raise PhalanxError(f"{name}: fraction must be in {low}, got {value!r}")
    return float(value)


class TriggerPoison(DataPoison):
    """Stamp ``tile`` (a bool [th, tw] pattern) at ``position`` with ``value`` into a fraction of each
    batch and relabel those images to ``target``.

    Exactly ``round(fraction * batch)`` images are poisoned, chosen with the client's generator.
    ``position`` is a corner (the tile sits ``margin`` pixels from both edges) or the (row, col) of
    the tile's top-left pixel. The tile must fit inside the image: checked at the first call.
    """

    name = "pixel_trigger"

    def __init__(self, tile: torch.Tensor, position, margin: int, value: float, target: int,
                 fraction: float, name: str | None = None):
        self.tile, self.position, self.margin = tile.bool(), position, margin
        self.value, self.target, self.fraction = float(value), int(target), float(fraction)
        if name is not None:
            self.name = name
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._cache: tuple[Any, torch.Tensor] | None = None

    def offset(self, h: int, w: int) -> tuple[int, int]:
        th, tw = self.tile.shape
        if isinstance(self.position, tuple):
            r, c = self.position
        else:
            m = self.margin
            r = m if self.position.startswith("top") else h - th - m
            c = m if self.position.endswith("left") else w - tw - m
        if r < 0 or c < 0 or r + th > h or c + tw > w:
            raise PhalanxError(f"{self.name}: a {th}x{tw} trigger at {self.position!r} (margin {self.margin}) "
                               f"does not fit a {h}x{w} image")
        return r, c

    def mask(self, h: int, w: int) -> torch.Tensor:
        """Bool [h, w]: the pixels this trigger sets."""
        if (h, w) not in self._masks:
            r, c = self.offset(h, w)
            full = torch.zeros(h, w, dtype=torch.bool)
            full[r:r + self.tile.shape[0], c:c + self.tile.shape[1]] = self.tile
            self._masks[(h, w)] = full
        return self._masks[(h, w)]

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of x [N, C, H, W] with the trigger set in every image (all channels)."""
        if x.ndim != 4:
            raise PhalanxError(f"{self.name}: images must be [N, C, H, W], got shape {tuple(x.shape)}")
        out = x.clone()
        out[:, :, self.mask(x.shape[2], x.shape[3])] = self.value
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        n = len(y)
        k = int(math.floor(self.fraction * n + 0.5))
        if k == 0:
            return x, y
        idx = torch.randperm(n, generator=gen)[:k]
        x, y = x.clone(), y.clone()
        x[idx] = self.stamp(x[idx])
        y[idx] = self.target
        return x, y

    def test_set(self, dataset) -> torch.Tensor:
        """The stamped test images whose true label is not the target (cached per test set)."""
        if self._cache is None or self._cache[0] is not dataset.x_test:
            keep = dataset.y_test != self.target
            self._cache = (dataset.x_test, self.stamp(dataset.x_test[keep]))
        return self._cache[1]

    def metrics(self, model, params: torch.Tensor, dataset) -> dict[str, float]:
        """ASR: the fraction of triggered non-target test images classified as ``target``."""
        x = self.test_set(dataset)
        if len(x) == 0:
            return {"asr": float("nan")}
        return {"asr": float((predict(model, params, x) == self.target).double().mean())}

    def state(self) -> dict[str, Any]:
        return {"tile": self.tile.int().tolist(), "position": self.position, "margin": self.margin,
                "value": self.value, "target": self.target, "fraction": self.fraction}

    def __repr__(self) -> str:
        th, tw = self.tile.shape
        return (f"{type(self).__name__}({th}x{tw} at {self.position!r}, value={self.value}, "
                f"target={self.target}, fraction={self.fraction})")


class DBA(TriggerPoison):
    """The global trigger of a distributed backdoor; ``for_client(j, m)`` hands out local part j.

    Bars are laid out in two columns: bar i starts at row ``(i // 2) * (thickness + gap)`` and
    column ``(i % 2) * (size + gap)`` of the trigger's bounding box. Test-time ASR uses the union.
    """

    name = "dba"

    def __init__(self, parts: Sequence[torch.Tensor], position, margin, value, target, fraction):
        self.parts = [p.bool() for p in parts]
        union = torch.stack(self.parts).any(0)
        super().__init__(union, position, margin, value, target, fraction)

    def for_client(self, j: int, m: int) -> TriggerPoison:
        """Attacker j of m stamps local part ``j mod parts``; its metrics still use the global trigger."""
        local = TriggerPoison(self.parts[j % len(self.parts)], self.position, self.margin, self.value,
                              self.target, self.fraction, name=f"dba[{j % len(self.parts)}]")
        local.metrics = self.metrics  # the backdoor is judged on the assembled trigger
        return local

    def part_masks(self, h: int, w: int) -> list[torch.Tensor]:
        """Bool [h, w] per local part; together they partition ``mask(h, w)``."""
        return [TriggerPoison(p, self.position, self.margin, self.value, self.target, self.fraction,
                              name=self.name).mask(h, w) for p in self.parts]


class Semantic(DataPoison):
    """Relabel a natural subset of class ``source`` to ``target``, and optionally upsample it.

    The subset (a fixed, documented rule): images of class ``source`` whose mean pixel intensity
    inside ``region`` = (row0, row1, col0, col1) (half-open; None: the whole image) is at least
    ``threshold``. It is decided image by image, so the training batches, the test subset and any
    re-run pick exactly the same images. In a batch holding k >= 1 such images, every one is
    relabelled, and ``round(fraction * batch)`` slots (drawn from the generator) are overwritten by
    copies of them (drawn with replacement) plus Gaussian ``noise`` clamped to [0, 1], as in
    Bagdasaryan et al.'s mixing of backdoor images into each batch.
    """

    name = "semantic"

    def __init__(self, source: int, target: int, threshold: float, region, fraction: float, noise: float):
        self.source, self.target, self.threshold = source, target, threshold
        self.region, self.fraction, self.noise = region, fraction, noise

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Mean intensity of each image inside the region, [N]."""
        if x.ndim != 4:
            raise PhalanxError(f"semantic: images must be [N, C, H, W], got shape {tuple(x.shape)}")
        if self.region is None:
            return x.flatten(1).mean(1)
        r0, r1, c0, c1 = self.region
        if r1 > x.shape[2] or c1 > x.shape[3]:
            raise PhalanxError(f"semantic: region {self.region} does not fit {x.shape[2]}x{x.shape[3]} images")
        return x[:, :, r0:r1, c0:c1].flatten(1).mean(1)

    def matches(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bool [N]: the images that belong to the semantic subset."""
        return (y == self.source) & (self.scores(x) >= self.threshold)

    def subset_indices(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the subset in (x, y)."""
        return torch.nonzero(self.matches(x, y)).flatten()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        hit = self.matches(x, y)
        if not bool(hit.any()):
            return x, y
        x, y = x.clone(), y.clone()
        y[hit] = self.target
        k = int(math.floor(self.fraction * len(y) + 0.5))
        if k:
            pool = torch.nonzero(hit).flatten()
            pick = pool[torch.randint(len(pool), (k,), generator=gen)]
            slots = torch.randperm(len(y), generator=gen)[:k]
            copies = x[pick]
            if self.noise > 0:
                copies = (copies + self.noise * torch.randn(copies.shape, generator=gen, dtype=copies.dtype)).clamp(0, 1)
            x[slots] = copies
            y[slots] = self.target
        return x, y

    def metrics(self, model, params: torch.Tensor, dataset) -> dict[str, float]:
        """ASR: the fraction of the semantic test subset classified as ``target``."""
        idx = self.subset_indices(dataset.x_test, dataset.y_test)
        if len(idx) == 0:
            raise PhalanxError(f"semantic: no test image of class {self.source} reaches threshold "
                               f"{self.threshold} in region {self.region}; lower the threshold")
        return {"asr": float((predict(model, params, dataset.x_test[idx]) == self.target).double().mean())}

    def state(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "threshold": self.threshold,
                "region": self.region, "fraction": self.fraction, "noise": self.noise}

    def __repr__(self) -> str:
        return (f"Semantic(source={self.source}, target={self.target}, threshold={self.threshold}, "
                f"region={self.region}, fraction={self.fraction}, noise={self.noise})")


# ---------------------------------------------------------------- registered poisons


def _common(name: str, value, target, fraction, margin, position, num_classes):
    check_number(name, "value", value)
    _check_label(name, "target", target, num_classes)
    check_int(name, "margin", margin)
    return _check_position(name, position), _check_fraction(name, fraction)


@POISONS.register("pixel_trigger")
def pixel_trigger(pattern: str = "square", size: int = 3, position="bottom-right", value: float = 1.0,
                  target: int = 0, fraction: float = 0.3, margin: int = 1, num_classes: int = 10) -> DataPoison:
    """BadNets pixel trigger (Gu et al. 2017): stamp a size x size pattern, relabel to target."""
    check_choice("pixel_trigger", "pattern", pattern, PATTERNS)
    check_int("pixel_trigger", "size", size, minimum=1)
    pos, frac = _common("pixel_trigger", value, target, fraction, margin, position, num_classes)
    return TriggerPoison(pattern_mask(pattern, size), pos, margin, value, target, frac)


@POISONS.register("dba")
def dba(parts: int = 4, size: int = 4, thickness: int = 1, gap: int = 1, position="top-left",
        value: float = 1.0, target: int = 0, fraction: float = 0.3, margin: int = 1,
        num_classes: int = 10) -> DataPoison:
    """Distributed backdoor (Xie et al., ICLR 2020): attacker j stamps bar j mod parts of the trigger."""
    check_int("dba", "parts", parts, minimum=1)
    check_int("dba", "size", size, minimum=1)
    check_int("dba", "thickness", thickness, minimum=1)
    check_int("dba", "gap", gap)
    pos, frac = _common("dba", value, target, fraction, margin, position, num_classes)
    cols = min(parts, 2)
    rows = math.ceil(parts / cols)
    h, w = rows * thickness + (rows - 1) * gap, cols * size + (cols - 1) * gap
    tiles = []
    for i in range(parts):
        t = torch.zeros(h, w, dtype=torch.bool)
        r, c = (i // cols) * (thickness + gap), (i % cols) * (size + gap)
        t[r:r + thickness, c:c + size] = True
        tiles.append(t)
    return DBA(tiles, pos, margin, value, target, frac)


@POISONS.register("semantic")
def semantic(source: int = 0, target: int = 9, threshold: float = 0.46, region: Sequence[int] | None = None,
             fraction: float = 0.25, noise: float = 0.05, num_classes: int = 10) -> DataPoison:
    """Semantic backdoor (Bagdasaryan et al. 2020): bright images of class source -> target.

    Defaults suit Fashion-MNIST: T-shirts/tops whose mean intensity is >= 0.46 (about the
    brightest 10% of the class) become 'Ankle boot'.
    """
    _check_label("semantic", "source", source, num_classes)
    _check_label("semantic", "target", target, num_classes)
    if source == target:
        raise PhalanxError(f"semantic: source and target must differ, got {source} for both")
    check_number("semantic", "threshold", threshold)
    if region is not None:
        ok = (isinstance(region, (list, tuple)) and len(region) == 4
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in region)
              and region[0] < region[1] and region[2] < region[3])
        if not ok:
            raise PhalanxError(f"semantic: region must be (row0, row1, col0, col1) integers with "
                               f"row0 < row1 and col0 < col1, got {region!r}")
        region = tuple(int(v) for v in region)
    frac = _check_fraction("semantic", fraction, allow_zero=True)
    check_number("semantic", "noise", noise, nonneg=True)
    return Semantic(source, target, float(threshold), region, frac, float(noise))


# ---------------------------------------------------------------- persistence


def persistence(asr_by_round: Sequence[float | None], last_poison_round: int, threshold: float = 0.5) -> int | None:
    """Rounds after ``last_poison_round`` until the ASR first falls below ``threshold``.

    ``asr_by_round[r]`` is the ASR measured after round r (None where no evaluation ran). Returns 0
    when it is already below at the last poisoned round, and None when it never falls below within
    the run (the backdoor outlived it). Durability as measured by Neurotoxin (Zhang et al. 2022).
    """
    check_int("persistence", "last_poison_round", last_poison_round)
    check_number("persistence", "threshold", threshold)
    if last_poison_round >= len(asr_by_round):
        raise PhalanxError(f"persistence: last_poison_round must be < len(asr_by_round)="
                           f"{len(asr_by_round)}, got {last_poison_round}")
    for r in range(last_poison_round, len(asr_by_round)):
        a = asr_by_round[r]
        if a is not None and not math.isnan(a) and a < threshold:
            return r - last_poison_round
    return None
