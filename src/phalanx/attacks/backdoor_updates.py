"""Update-shaping attacks that carry a backdoor through aggregation.

They rewrite ``ctx.own``, the updates the malicious clients trained on backdoored data (pair them
with a poison: ``attack: {name: model_replacement, poison: pixel_trigger, ...}``).

* ``model_replacement`` (Bagdasaryan et al., AISTATS 2020): send ``gamma * own`` so that the
  aggregate is dominated by the backdoored model.
* ``constrain_scale``: boost, then project onto the L2 ball of the server's (known) clipping bound,
  so the update passes norm clipping untouched (the norm-bounded attacker of Sun et al. 2019, the
  "constrain-and-scale" idea of Bagdasaryan et al. restricted to the norm constraint).
* ``neurotoxin`` (Zhang et al., ICML 2022): keep only the coordinates that benign training changes
  least, so later honest rounds do not overwrite the backdoor.
"""

from __future__ import annotations

import torch

from ..context import AttackContext
from ..errors import PhalanxError
from ..registry import ATTACKS
from .base import Attack
from .model_poisoning import check_choice, check_inputs, check_number

# a projected row ends this much inside the ball, so float32 rounding never pushes it past the bound
_INSIDE = 1.0 - 1e-6


class ModelReplacement(Attack):
    """Scale every malicious row by gamma (see :func:`model_replacement` for how gamma is chosen)."""

    name = "model_replacement"

    def __init__(self, boost: float | None, server_lr: float, weight_fraction: float | None, share: bool):
        self.boost, self.server_lr = boost, server_lr
        self.weight_fraction, self.share = weight_fraction, share

    def gamma(self, n: int, m: int) -> float:
        if self.boost is not None:
            return self.boost
        inv_weight = 1.0 / self.weight_fraction if self.weight_fraction is not None else float(n)
        return inv_weight / self.server_lr / (m if self.share else 1)

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx)
        gamma = self.gamma(ctx.n, ctx.m)
        ctx.history["model_replacement_gamma"] = gamma
        return own * gamma

    def __repr__(self) -> str:
        return (f"ModelReplacement(boost={self.boost}, server_lr={self.server_lr}, "
                f"weight_fraction={self.weight_fraction}, share={self.share})")


class ConstrainScale(Attack):
    """Boost each row, then project it onto the L2 ball of radius ``max_norm``."""

    name = "constrain_scale"

    def __init__(self, max_norm: float, boost: float | None):
        self.max_norm, self.boost = max_norm, boost

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx).double()
        norms = own.norm(dim=1, keepdim=True)
        radius = self.max_norm * _INSIDE
        if self.boost is None:  # as large as the bound allows
            scale = radius / norms.clamp_min(1e-30)
        else:
            scale = torch.clamp(radius / (self.boost * norms).clamp_min(1e-30), max=1.0) * self.boost
        scale = torch.where(norms > 0, scale, torch.zeros_like(scale))
        return (own * scale).float()

    def __repr__(self) -> str:
        return f"ConstrainScale(max_norm={self.max_norm}, boost={self.boost})"


class Neurotoxin(Attack):
    """Zero the malicious rows outside the bottom-``ratio`` coordinates of a benign reference update.

    The reference is the previous global update (``"previous"``: the change in the global params
    since this attack last ran, which every client observes; the current honest mean on the first
    call) or the current round's honest mean (``"honest"``: an omniscient attacker). Zhang et al.
    project every local SGD step; projecting the finished update is the one-shot equivalent for
    a single local round.
    """

    name = "neurotoxin"
    omniscient = True

    def __init__(self, ratio: float, boost: float, reference: str):
        self.ratio, self.boost, self.reference = ratio, boost, reference

    def keep_mask(self, ref: torch.Tensor) -> torch.Tensor:
        """Bool [d]: the ``round(ratio * d)`` coordinates where |ref| is smallest (ties: lower index)."""
        d = ref.numel()
        k = int(round(self.ratio * d))
        order = torch.sort(ref.abs().double(), stable=True).indices
        keep = torch.zeros(d, dtype=torch.bool)
        keep[order[:k]] = True
        return keep

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx)
        prev = ctx.history.get("neurotoxin_params")
        now = ctx.global_params.detach().to(torch.float32).clone()
        if self.reference == "previous" and prev is not None and prev.shape == now.shape and not torch.equal(prev, now):
            ref = now - prev
        elif len(honest):
            ref = honest.to(torch.float32).mean(0)
        else:
            ref = torch.zeros(own.shape[1])
        ctx.history["neurotoxin_params"] = now
        keep = self.keep_mask(ref)
        ctx.history["neurotoxin_kept"] = int(keep.sum())
        return own * keep.to(own.dtype) * self.boost

    def __repr__(self) -> str:
        return f"Neurotoxin(ratio={self.ratio}, boost={self.boost}, reference={self.reference!r})"


# ---------------------------------------------------------------- registered attacks


def _optional_positive(name: str, param: str, value) -> float | None:
    return None if value is None else check_number(name, param, value, positive=True)


@ATTACKS.register("model_replacement")
def model_replacement(boost: float | None = None, server_lr: float = 1.0, weight_fraction: float | None = None,
                      share: bool = False) -> Attack:
    """Model replacement (Bagdasaryan et al. 2020): send gamma * own, gamma = n / server_lr by default.

    Bagdasaryan et al. assume the server averages n updates uniformly, so gamma = n / server_lr
    makes the new global model the attacker's. Under FedAvg weighting by sample counts the
    attacker's weight is n_a / sum(n_i), not 1 / n: give that share as ``weight_fraction`` and
    gamma = 1 / (weight_fraction * server_lr). With m colluding attackers, ``share=True`` divides
    gamma by m so that their updates replace the model once, not m times. ``boost`` overrides all.
    """
    boost = _optional_positive("model_replacement", "boost", boost)
    check_number("model_replacement", "server_lr", server_lr, positive=True)
    wf = _optional_positive("model_replacement", "weight_fraction", weight_fraction)
    if wf is not None and wf > 1:
        raise PhalanxError(f"model_replacement: weight_fraction must be in (0, 1], got {weight_fraction!r}")
    if not isinstance(share, bool):
        raise PhalanxError(f"model_replacement: share must be true or false, got {share!r}")
    return ModelReplacement(boost, float(server_lr), wf, share)


@ATTACKS.register("constrain_scale")
def constrain_scale(max_norm: float = 1.0, boost: float | None = None) -> Attack:
    """Norm-bounded boosting: boost * own projected onto the L2 ball of max_norm (the clip bound).

    ``boost`` None scales every row to the bound itself (the largest update clipping lets through).
    """
    check_number("constrain_scale", "max_norm", max_norm, positive=True)
    return ConstrainScale(float(max_norm), _optional_positive("constrain_scale", "boost", boost))


@ATTACKS.register("neurotoxin")
def neurotoxin(ratio: float = 0.95, boost: float = 1.0, reference: str = "previous") -> Attack:
    """Neurotoxin (Zhang et al., ICML 2022): keep own only on the bottom-ratio coordinates of the
    benign update (by magnitude); ``reference`` 'previous' (last global update) or 'honest'."""
    check_number("neurotoxin", "ratio", ratio, positive=True)
    if ratio > 1:
        raise PhalanxError(f"neurotoxin: ratio must be in (0, 1], got {ratio!r}")
    check_number("neurotoxin", "boost", boost, positive=True)
    check_choice("neurotoxin", "reference", reference, ("previous", "honest"))
    return Neurotoxin(float(ratio), float(boost), reference)
