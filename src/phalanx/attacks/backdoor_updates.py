"""Update-shaping attacks that carry a backdoor through aggregation.

They rewrite ``ctx.own``, the updates the malicious clients trained on backdoored data (pair them
with a poison: ``attack: {name: model_replacement, poison: pixel_trigger, ...}``).

* ``model_replacement`` (Bagdasaryan et al., AISTATS 2020): send ``gamma * own`` so that the
  aggregate is dominated by the backdoored model.
* ``constrain_scale`` (Bagdasaryan et al. 2020, constrain-and-scale): local training minimizes
  ``alpha * L_class + (1 - alpha) * L_ano`` with ``L_ano`` the distance to the global model, then
  the update is boosted and projected onto the L2 ball of the server's (known) clipping bound, so
  it passes norm clipping untouched (the norm-bounded attacker of Sun et al. 2019).
* ``neurotoxin`` (Zhang et al., ICML 2022): every local SGD step moves only along the coordinates
  that benign training changes least, so later honest rounds do not overwrite the backdoor.

The last two shape the malicious clients' local training through a training hook
(``Attack.training_hook``, see ``base.py``), which the simulator passes to ``local_update``.
"""

from __future__ import annotations

import torch

from ..context import AttackContext
from ..errors import PhalanxError
from ..registry import ATTACKS
from .base import Attack, TrainingHook, TrainingInfo
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


class _AnomalyLoss(TrainingHook):
    """alpha * L_class + (1 - alpha) * |params - global|_2 (Bagdasaryan et al.'s L_ano)."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def objective(self, class_loss, params, global_params):
        return self.alpha * class_loss + (1.0 - self.alpha) * torch.linalg.vector_norm(params - global_params)


class ConstrainScale(Attack):
    """Train with the anomaly-evasion loss, then boost each row and project it onto the L2 ball of
    radius ``max_norm``.

    Local training (through :meth:`training_hook`) minimizes ``alpha * L_class + (1 - alpha) * L_ano``
    with ``L_ano = |x - G|_2``, the (not squared) L2 distance between the local and the global
    flat parameters: the ``model_dist_norm_var`` term of the authors' code
    (ebagdasa/backdoor_federated_learning, ``training.py``), which the paper names L_ano with a
    Euclidean-distance anomaly detector. ``alpha = 1`` trains on the classification loss alone.
    """

    name = "constrain_scale"

    def __init__(self, max_norm: float, boost: float | None, alpha: float):
        self.max_norm, self.boost, self.alpha = max_norm, boost, alpha

    def training_hook(self, info: TrainingInfo) -> TrainingHook | None:
        return _AnomalyLoss(self.alpha) if self.alpha < 1 else None

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
        return f"ConstrainScale(max_norm={self.max_norm}, boost={self.boost}, alpha={self.alpha})"


class _GradMask(TrainingHook):
    """Zero the step direction outside ``keep`` (Neurotoxin's projection, every SGD step)."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def grad_transform(self, step):
        return step * self.keep.to(step.dtype)


class Neurotoxin(Attack):
    """Train the malicious clients only on the bottom-``ratio`` coordinates of a benign reference.

    Zhang et al. mask the attacker's gradient to those coordinates at every step of its local
    training; here :meth:`training_hook` hands ``local_update`` that mask, so momentum and later
    steps never leave it. The mask must be known before local training, so the reference is one
    round old: ``"previous"``, the last global update (the change in the global params since the
    round the attack last trained, which every client observes); ``"honest"``, the honest mean
    of the last round the attack ran (an omniscient attacker). Without a reference yet (the first
    attacking round) every coordinate is allowed. The mask is computed once per round and kept in
    ``ctx.history`` (``neurotoxin_mask``; ``neurotoxin_kept`` counts its coordinates).

    The rows sent are ``boost * own`` projected onto that same mask: a no-op on rows trained with
    the hook (their other coordinates never moved), and the one-shot approximation on rows
    trained without it (an attack called outside the simulator).
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

    def round_mask(self, rnd: int, global_params: torch.Tensor, history: dict) -> torch.Tensor:
        """This round's mask, from last round's reference (computed on the round's first call)."""
        if history.get("neurotoxin_round") == rnd and history.get("neurotoxin_mask") is not None \
                and history["neurotoxin_mask"].numel() == global_params.numel():
            return history["neurotoxin_mask"]
        now = global_params.detach().to(torch.float32).clone()
        if self.reference == "previous":
            prev = history.get("neurotoxin_params")
            ok = prev is not None and prev.shape == now.shape and not torch.equal(prev, now)
            ref = now - prev if ok else None
        else:
            ref = history.get("neurotoxin_honest")
            ref = ref if ref is not None and ref.shape == now.shape else None
        keep = torch.ones(now.numel(), dtype=torch.bool) if ref is None else self.keep_mask(ref)
        history.update(neurotoxin_round=rnd, neurotoxin_mask=keep, neurotoxin_params=now,
                       neurotoxin_kept=int(keep.sum()))
        return keep

    def training_hook(self, info: TrainingInfo) -> TrainingHook | None:
        return _GradMask(self.round_mask(info.round, info.global_params, info.history))

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx)
        keep = self.round_mask(ctx.round, ctx.global_params, ctx.history)
        if len(honest):  # next round's reference for reference="honest"
            ctx.history["neurotoxin_honest"] = honest.to(torch.float32).mean(0)
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
def constrain_scale(max_norm: float = 1.0, boost: float | None = None, alpha: float = 0.7) -> Attack:
    """Constrain-and-scale: train on alpha * L_class + (1 - alpha) * |x - G|_2, then send
    boost * own projected onto the L2 ball of max_norm (the clip bound).

    ``boost`` None scales every row to the bound itself (the largest update clipping lets through).
    ``alpha`` in (0, 1]: 1 drops the anomaly-evasion term (plain training on the poisoned data).
    """
    check_number("constrain_scale", "max_norm", max_norm, positive=True)
    check_number("constrain_scale", "alpha", alpha, positive=True)
    if alpha > 1:
        raise PhalanxError(f"constrain_scale: alpha must be in (0, 1], got {alpha!r}")
    return ConstrainScale(float(max_norm), _optional_positive("constrain_scale", "boost", boost), float(alpha))


@ATTACKS.register("neurotoxin")
def neurotoxin(ratio: float = 0.95, boost: float = 1.0, reference: str = "previous") -> Attack:
    """Neurotoxin (Zhang et al., ICML 2022): local SGD moves only on the bottom-ratio coordinates
    (by magnitude) of last round's benign reference; ``reference`` 'previous' (last global update)
    or 'honest' (last honest mean)."""
    check_number("neurotoxin", "ratio", ratio, positive=True)
    if ratio > 1:
        raise PhalanxError(f"neurotoxin: ratio must be in (0, 1], got {ratio!r}")
    check_number("neurotoxin", "boost", boost, positive=True)
    check_choice("neurotoxin", "reference", reference, ("previous", "honest"))
    return Neurotoxin(float(ratio), float(boost), reference)
