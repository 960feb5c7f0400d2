"""Mimic (Karimireddy, He & Jaggi, ICLR 2022): every attacker sends a copy of one honest client.

Copying one client over-weights it without sending anything a distance- or score-based defense
can tell from an honest row. The paper's attacker picks the client along the top principal
direction of the centered honest updates and keeps copying *that client*.

Following a client. When the simulator names the rows (``ctx.honest_ids``), the choice is a
client id, kept in ``ctx.history["mimic_target_id"]``:

* rounds ``< warmup``, or the first call: the heuristic picks among this round's honest rows
  (refining the direction z across those rounds) and the pick becomes the target id;
* afterwards the target stays fixed: a round where it is among the honest rows copies its row,
  wherever that row sits;
* a round where it is absent (partial participation) copies a stand-in: the present honest row
  with the largest |<z, x_i - mean>| for the stored direction z. The target id is not changed, so
  the attackers copy it again as soon as it reappears.

Without ids (``ctx.honest_ids`` None, outside the simulator) the choice is an index into the
round's honest rows, as the paper's simulation (full participation) has it.
"""

from __future__ import annotations

import torch

from ..context import AttackContext
from ..errors import PhalanxError
from ..registry import ATTACKS
from .base import Attack
from .model_poisoning import check_inputs, check_int


def _repeat(row: torch.Tensor, m: int) -> torch.Tensor:
    return row.to(torch.float32).unsqueeze(0).expand(m, -1).clone()


class Mimic(Attack):
    """Every attacker sends a copy of one honest row (see the module docstring for the rule).

    ``target``: an index into the round's honest rows (int) or a client id (str), else the
    heuristic's choice. After each call ``last`` holds ``target`` (the row index copied) and, when
    the round has ids, ``target_id`` (the client copied) and ``stand_in`` (True when the chosen
    client was absent and another row was copied)."""

    name, omniscient = "mimic", True

    def __init__(self, target, warmup, iters=20):
        self.target, self.warmup, self.iters, self.last = target, warmup, iters, {}

    def _direction(self, C: torch.Tensor, ctx: AttackContext, refine: bool) -> torch.Tensor:
        """The top principal direction of C, by power iteration from the stored one (refine=True
        stores the result; False only reads it, refining a copy when none fits)."""
        z = ctx.history.get("mimic_z")
        if z is not None and z.numel() == C.shape[1] and not refine:
            return z
        if z is None or z.numel() != C.shape[1]:
            z = torch.randn(C.shape[1], generator=ctx.generator, dtype=torch.float64)
        for _ in range(self.iters):
            z = C.T @ (C @ z)
            z = z / z.norm().clamp_min(1e-300)
        if refine:
            ctx.history["mimic_z"] = z
        return z

    def _pick(self, honest: torch.Tensor, ctx: AttackContext, refine: bool) -> int:
        C = honest.double() - honest.double().mean(0)
        return int((C @ self._direction(C, ctx, refine)).abs().argmax())

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        check_inputs(self.name, honest, ctx)
        h = honest.shape[0]
        if h == 0:
            raise PhalanxError("mimic: needs at least one honest row to copy, got h=0")
        ids = ctx.honest_ids
        if ids is not None and len(ids) != h:
            raise PhalanxError(f"mimic: ctx.honest_ids must name the {h} honest rows, got {len(ids)} ids")
        hist, stand_in = ctx.history, False
        if isinstance(self.target, int):
            if self.target >= h:
                raise PhalanxError(f"mimic: target must be < h={h} honest rows, got {self.target}")
            i = self.target
        elif self.target is not None:  # a client id
            if ids is None:
                raise PhalanxError(f"mimic: target {self.target!r} is a client id, but the round has no ids "
                                   "(ctx.honest_ids is None); give a row index instead")
            stand_in = self.target not in ids
            i = self._pick(honest, ctx, refine=False) if stand_in else ids.index(self.target)
        elif ids is None:  # rows without names: follow an index
            i = hist.get("mimic_target")
            if i is None or i >= h or ctx.round < self.warmup:
                i = self._pick(honest, ctx, refine=True)
                hist["mimic_target"] = i
        else:
            tid = hist.get("mimic_target_id")
            if tid is None or ctx.round < self.warmup:
                i = self._pick(honest, ctx, refine=True)
                hist["mimic_target_id"] = ids[i]
            elif tid in ids:
                i = ids.index(tid)
            else:
                i, stand_in = self._pick(honest, ctx, refine=False), True
        self.last = {"target": i} if ids is None else {"target": i, "target_id": ids[i], "stand_in": stand_in}
        return _repeat(honest[i], ctx.m)

    def __repr__(self) -> str:
        return f"Mimic(target={self.target!r}, warmup={self.warmup})"


@ATTACKS.register("mimic")
def mimic(target: int | str | None = None, warmup: int = 1) -> Attack:
    """Mimic (Karimireddy et al. 2022): copy honest row ``target`` (an index, or a client id), or
    the heuristic's choice, a client followed across rounds (see ``phalanx.attacks.mimic``)."""
    ok = target is None or (isinstance(target, str) and target != "") or (
        isinstance(target, int) and not isinstance(target, bool) and target >= 0)
    if not ok:
        raise PhalanxError(f"mimic: target must be a row index >= 0 or a client id, got {target!r}")
    check_int("mimic", "warmup", warmup)
    return Mimic(target, warmup)
