"""The attack contracts (docs/design.md).

* A **model-poisoning attack** maps ``(honest [h, d], ctx: AttackContext) -> [m, d]``: the rows the
  m malicious clients send. ``ctx.own`` holds what they computed on their own data. An omniscient
  attack reads ``honest``; a simple one reads only ``ctx.own``.
* A **data poison** maps ``(x, y, generator) -> (x, y)`` and is applied to every batch a malicious
  client trains on.
* A **training hook** shapes a malicious client's local training itself (Neurotoxin's per-step
  gradient mask, constrain-and-scale's anomaly-evasion loss). An attack that needs one implements
  ``training_hook(info: TrainingInfo) -> TrainingHook | None``; the simulator calls it before each
  malicious client trains in a round where the attack is active, and hands the hook to
  ``training.local_update``. Whatever the hook needs across rounds lives in ``info.history``
  (the same dict as ``AttackContext.history``, saved with checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import AttackContext


@dataclass
class TrainingInfo:
    """What a malicious client knows when its local training starts, before any update of the round.

    round: round number. client_id: the client about to train (None outside the simulator).
    global_params: the flat global parameters [d] it starts from (read only).
    history: the attack's cross-round scratch space (``AttackContext.history``).
    """

    round: int
    client_id: str | None
    global_params: torch.Tensor
    history: dict[str, Any]


class TrainingHook:
    """How one malicious client's local SGD differs from an honest client's. Override either or both:

    * ``objective(class_loss, params, global_params) -> loss``: the scalar the client minimizes
      each step, from the batch's cross-entropy, the flat differentiable parameters [d] and the
      flat global parameters [d] (the default minimizes ``class_loss``);
    * ``grad_transform(step) -> step``: maps the flat step direction [d] (the loss gradient plus
      weight decay), before momentum, every step (the default leaves it unchanged).

    Both must be pure (return new tensors) and deterministic.
    """

    objective = None
    grad_transform = None


class Attack:
    """Base class of model-poisoning attacks. Subclasses set ``name`` and implement ``__call__``."""

    name = "attack"
    omniscient = False  # True when the attack reads the honest rows

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        raise NotImplementedError

    def training_hook(self, info: TrainingInfo) -> TrainingHook | None:
        """The hook that shapes a malicious client's local training this round (None: train as usual)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DataPoison:
    """Base class of data poisons applied during the malicious clients' local training."""

    name = "poison"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}
