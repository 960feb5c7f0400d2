"""The attack contracts (DESIGN.md).

* A **model-poisoning attack** maps ``(honest [h, d], ctx: AttackContext) -> [m, d]``: the rows the
  m malicious clients send. ``ctx.own`` holds what they computed on their own data. An omniscient
  attack reads ``honest``; a simple one reads only ``ctx.own``.
* A **data poison** maps ``(x, y, generator) -> (x, y)`` and is applied to every batch a malicious
  client trains on.
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import AttackContext


class Attack:
    """Base class of model-poisoning attacks. Subclasses set ``name`` and implement ``__call__``."""

    name = "attack"
    omniscient = False  # True when the attack reads the honest rows

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DataPoison:
    """Base class of data poisons applied during the malicious clients' local training."""

    name = "poison"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}
