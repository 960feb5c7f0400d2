"""Gradient inversion: reconstruct a client's training images from its gradient or FedAvg update.

* **DLG** (Zhu et al. 2019, "Deep Leakage from Gradients"): a dummy input and a dummy soft label
  are optimised with L-BFGS so that their gradient matches the shared one in squared L2.
* **iDLG** (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"): the label is read
  off the last layer's gradient (for cross-entropy only the true class has a negative bias
  gradient, and a negative fc-weight row when the features are non-negative); then DLG on the
  input alone.
* **Inverting Gradients** (Geiping et al. 2020): cosine distance between gradients plus a
  total-variation prior, Adam on the signed gradient, images boxed to [0, 1], step decay at
  3/8, 5/8 and 7/8 of the budget, several restarts keeping the best.
* **Batches**: labels recovered from the last-layer gradient (Wainakh et al. 2022, "User-level
  label leakage from gradients"): classes with a negative entry are present, and the remaining
  counts follow ``B * (mean softmax - gradient)``, the mean softmax estimated on random inputs.
* **FedAvg updates** of K local steps: the attacker simulates the K full-batch SGD steps through
  the dummy data (Geiping et al.'s multi-step attack) and matches the update theta_K - theta_0;
  or, with ``simulate=False``, treats the update as -lr*K times one averaged gradient.

All of these are exposed as functions; ``invert`` is the single entry point. They are not
model-poisoning attacks, so they are not in ``ATTACKS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PhalanxError

ATTACK_NAMES = ("dlg", "idlg", "ig")
UPDATE_KINDS = ("gradient", "fedavg")


@dataclass
class InversionResult:
    """images [B, C, H, W] clamped to [0, 1]; labels [B] (recovered, or argmax of DLG's soft labels);
    history: matching loss at each evaluation of the kept restart; loss: its best matching loss;
    restart_losses: the best matching loss of every restart."""

    images: torch.Tensor
    labels: torch.Tensor
    history: list[float] = field(default_factory=list)
    loss: float = math.inf
    restart_losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- gradients and updates


def soft_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for hard labels [B] (int) or soft label distributions [B, K]."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, y.long())
    return -(y * F.log_softmax(logits, dim=1)).sum(1).mean()


def _functional_grads(model: nn.Module, theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      create_graph: bool) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, theta)), (x,))
    return list(torch.autograd.grad(soft_cross_entropy(out, y), theta, create_graph=create_graph))


def _observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, local_steps: int,
             lr: float, create_graph: bool) -> list[torch.Tensor]:
    """What the client shares: the batch gradient, or the FedAvg update theta_K - theta_0."""
    theta0 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    if kind == "gradient":
        return _functional_grads(model, theta0, x, y, create_graph)
    theta = theta0
    for _ in range(local_steps):
        g = _functional_grads(model, theta, x, y, create_graph)
        theta = [t - lr * gi for t, gi in zip(theta, g)]
    return [t - t0 for t, t0 in zip(theta, theta0)]


def batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy of (x, y) w.r.t. every parameter (the model is unchanged)."""
    return [g.detach() for g in _observe(model, x, y, "gradient", 1, 0.0, False)]


def fedavg_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, local_steps: int,
                  lr: float) -> list[torch.Tensor]:
    """The FedAvg update theta_K - theta_0 after K full-batch SGD steps on (x, y); model unchanged."""
    _check_int("fedavg_update", "local_steps", local_steps, 1)
    _check_pos("fedavg_update", "lr", lr)
    return [u.detach() for u in _observe(model, x, y, "fedavg", local_steps, lr, False)]


def as_param_list(model: nn.Module, target) -> list[torch.Tensor]:
    """``target`` (a flat vector [d] or one tensor per parameter) as detached per-parameter tensors."""
    shapes = [p.shape for p in model.parameters()]
    d = sum(math.prod(s) for s in shapes)
    if isinstance(target, torch.Tensor):
        if target.ndim != 1 or target.numel() != d:
            raise PhalanxError(f"invert: target must be a flat vector of {d} values or a list of "
                               f"{len(shapes)} tensors, got a tensor of shape {tuple(target.shape)}")
        parts = list(torch.split(target, [math.prod(s) for s in shapes]))
        out = [t.reshape(s) for t, s in zip(parts, shapes)]
    elif isinstance(target, (list, tuple)):
        if len(target) != len(shapes):
            raise PhalanxError(f"invert: target must hold {len(shapes)} tensors (one per parameter), "
                               f"got {len(target)}")
        for i, (t, s) in enumerate(zip(target, shapes)):
            if not isinstance(t, torch.Tensor) or t.shape != s:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise PhalanxError(f"invert: target[{i}] must have shape {tuple(s)}, got {got}")
        out = list(target)
    else:
        raise PhalanxError(f"invert: target must be a tensor or a list of tensors, got {type(target).__name__}")
    out = [t.detach().float() for t in out]
    if not all(torch.isfinite(t).all() for t in out):
        raise PhalanxError("invert: target must be finite, got NaN or inf values")
    return out


# ---------------------------------------------------------------- label recovery


def _last_linear(model: nn.Module) -> tuple[nn.Linear, int, int | None]:
    """The last nn.Linear (the logits layer) and the indices of its weight and bias parameters."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise PhalanxError(f"recover_labels: the model needs a final nn.Linear layer, found none in "
                           f"{type(model).__name__}")
    ids = [id(p) for p in model.parameters()]
    wi = ids.index(id(last.weight))
    bi = ids.index(id(last.bias)) if last.bias is not None else None
    return last, wi, bi


def recover_labels(model: nn.Module, target, batch_size: int = 1, in_shape=(1, 28, 28),
                   update_kind: str = "gradient", local_steps: int = 1, lr: float = 0.1,
                   seed: int = 0, probes: int = 64) -> torch.Tensor:
    """Labels [B] read off the last layer's gradient (iDLG for B = 1; Wainakh et al. for B > 1).

    For cross-entropy, d loss / d bias_c = mean_b(p_bc) - n_c / B, negative for every present
    class when the model is not confident; without a bias, the fc-weight row sums play its role
    (features after a sigmoid/ReLU are non-negative). For B = 1 the label is the argmin (exact).
    For B > 1: classes with a negative entry get one sample each, then the remaining samples go,
    one at a time, to the class with the largest estimated count B * (p_c - s_c / scale) not yet
    allocated; p is the mean softmax on ``probes`` uniform random inputs.
    """
    _check_int("recover_labels", "batch_size", batch_size, 1)
    grads = as_param_list(model, target)
    last, wi, bi = _last_linear(model)
    sign = -1.0 if update_kind == "fedavg" else 1.0  # an update points against the gradient
    s = sign * (grads[bi] if bi is not None else grads[wi].sum(1))
    if batch_size == 1:
        return torch.argmin(s).reshape(1)
    feats: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            p = F.softmax(model(torch.rand(probes, *in_shape, generator=gen)), dim=1).mean(0)
    finally:
        hook.remove()
    scale = 1.0 if bi is not None else float(feats[0].sum(1).mean())
    if update_kind == "fedavg":
        scale *= lr * local_steps
    est = batch_size * (p - s / scale)
    counts = torch.zeros_like(s, dtype=torch.long)
    present = torch.argsort(s)[: int((s < 0).sum())][:batch_size]
    counts[present] = 1
    for _ in range(batch_size - int(counts.sum())):
        counts[int(torch.argmax(est - counts))] += 1
    return torch.repeat_interleave(torch.arange(len(s)), counts)


# ---------------------------------------------------------------- matching losses and optimisers


def _match_fn(target: list[torch.Tensor], cost: str, ignore_zeros: bool) -> Callable:
    masks = [t != 0 for t in target] if ignore_zeros else None

    def sel(ts):
        return ts if masks is None else [t[m] for t, m in zip(ts, masks)]

    tgt = sel(target)
    tnorm2 = sum((t * t).sum() for t in tgt)
    if cost == "l2":
        return lambda out: sum(((o - t) ** 2).sum() for o, t in zip(sel(out), tgt))

    def cosine(out):
        o = sel(out)
        dot = sum((a * b).sum() for a, b in zip(o, tgt))
        onorm2 = sum((a * a).sum() for a in o)
        return 1.0 - dot / (onorm2.clamp_min(1e-30).sqrt() * tnorm2.clamp_min(1e-30).sqrt())

    return cosine


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class _Tracker:
    """Keeps the best (lowest matching loss) copy of the optimised variables."""

    def __init__(self, variables: Sequence[torch.Tensor]):
        self.variables = variables
        self.best = math.inf
        self.state = [v.detach().clone() for v in variables]
        self.history: list[float] = []

    def see(self, match: float) -> None:
        self.history.append(match)
        if math.isfinite(match) and match < self.best:
            self.best = match
            self.state = [v.detach().clone() for v in self.variables]


def _lbfgs(objective: Callable, variables: list[torch.Tensor], steps: int, tracker: _Tracker) -> None:
    """L-BFGS (lr 1, as in DLG) for at most ``steps`` objective evaluations."""
    opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=20, history_size=100,
                            tolerance_grad=1e-12, tolerance_change=1e-14)
    evals = [0]

    def closure():
        evals[0] += 1
        loss, match = objective()
        grads = torch.autograd.grad(loss, variables)
        for v, g in zip(variables, grads):
            v.grad = g
        tracker.see(float(match))
        return loss.detach()

    while evals[0] < steps:
        before = evals[0]
        budget = max(1, min(20, steps - evals[0]))
        opt.param_groups[0].update(max_iter=budget, max_eval=budget * 5 // 4)
        loss = opt.step(closure)
        if not torch.isfinite(loss) or evals[0] - before <= 1 or tracker.best < 1e-14:
            break


def _adam_signed(objective: Callable, x: torch.Tensor, steps: int, step_size: float,
                 tracker: _Tracker) -> None:
    """Adam on the signed gradient, boxed to [0, 1], lr decay x0.1 at 3/8, 5/8, 7/8 (Geiping et al.)."""
    opt = torch.optim.Adam([x], lr=step_size)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
    for _ in range(steps):
        loss, match = objective()
        if not torch.isfinite(loss):
            break
        tracker.see(float(match))  # the score of x before this step
        (g,) = torch.autograd.grad(loss, [x])
        x.grad = g.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)


# ---------------------------------------------------------------- the entry point


def invert(model: nn.Module, target, attack: str = "idlg", batch_size: int = 1, *,
           in_shape=(1, 28, 28), steps: int | None = None, restarts: int | None = None, seed: int = 0,
           update_kind: str = "gradient", local_steps: int = 1, lr: float = 0.1,
           simulate: bool = True, labels: torch.Tensor | None = None, tv: float = 1e-4,
           step_size: float = 0.1, ignore_zeros: bool = False, stop_below: float = 1e-6) -> InversionResult:
    """Reconstruct ``batch_size`` inputs of shape ``in_shape`` from ``target``.

    target: the shared gradient (``update_kind="gradient"``) or FedAvg update theta_K - theta_0 of
    ``local_steps`` full-batch SGD steps at ``lr`` (``"fedavg"``), as a flat vector or one tensor per
    parameter. attack: ``dlg``, ``idlg`` or ``ig``. steps: objective evaluations per restart
    (default 300 for DLG/iDLG, 600 for IG). restarts: default 2; restarts stop early once the
    relative matching loss (L2 / |target|^2, or cosine distance) is below ``stop_below``.
    labels: known labels for idlg/ig (skip recovery). ignore_zeros: match only the non-zero
    coordinates of the target (an adaptive attacker against pruning). tv, step_size: IG's prior
    weight and Adam step.
    """
    if attack not in ATTACK_NAMES:
        raise PhalanxError(f"invert: attack must be one of {', '.join(ATTACK_NAMES)}, got {attack!r}")
    if update_kind not in UPDATE_KINDS:
        raise PhalanxError(f"invert: update_kind must be one of {', '.join(UPDATE_KINDS)}, got {update_kind!r}")
    _check_int("invert", "batch_size", batch_size, 1)
    _check_int("invert", "local_steps", local_steps, 1)
    _check_pos("invert", "lr", lr)
    steps = _check_int("invert", "steps", steps if steps is not None else (600 if attack == "ig" else 300), 1)
    restarts = _check_int("invert", "restarts", restarts if restarts is not None else 2, 1)
    in_shape = tuple(int(s) for s in in_shape)
    tgt = as_param_list(model, target)
    num_classes = _last_linear(model)[0].out_features
    kind = update_kind
    if kind == "fedavg" and not simulate:  # the update as -lr*K times one averaged gradient
        tgt, kind = [-t / (lr * local_steps) for t in tgt], "gradient"
    if labels is not None:
        if attack == "dlg":
            raise PhalanxError("invert: labels must be None for attack 'dlg', which optimises soft labels; "
                               "use 'idlg' or 'ig' with known labels")
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != batch_size or labels.min() < 0 or labels.max() >= num_classes:
            raise PhalanxError(f"invert: labels must be {batch_size} class indices in [0, {num_classes}), "
                               f"got {labels.tolist()}")
    elif attack != "dlg":
        labels = recover_labels(model, tgt, batch_size, in_shape, kind, local_steps, lr, seed)
    cost = "cosine" if attack == "ig" else "l2"
    match_fn = _match_fn(tgt, cost, ignore_zeros)
    scale = 1.0 if cost == "cosine" else float(sum((t * t).sum() for t in tgt)) or 1.0
    gen = torch.Generator().manual_seed(seed)
    best: _Tracker | None = None
    losses = []
    for _ in range(restarts):
        x = torch.randn(batch_size, *in_shape, generator=gen).requires_grad_(True)
        if attack == "ig":
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        soft = torch.randn(batch_size, num_classes, generator=gen).requires_grad_(True)
        variables = [x, soft] if attack == "dlg" else [x]

        def objective():
            y = F.softmax(soft, dim=1) if attack == "dlg" else labels
            out = _observe(model, x, y, kind, local_steps, lr, create_graph=True)
            match = match_fn(out)
            loss = match + tv * total_variation(x) if attack == "ig" else match
            return loss, match.detach() / scale

        tracker = _Tracker(variables)
        if attack == "ig":
            _adam_signed(objective, x, steps, step_size, tracker)
        else:
            _lbfgs(objective, variables, steps, tracker)
        losses.append(tracker.best)
        if best is None or tracker.best < best.best:
            best = tracker
        if best.best < stop_below:
            break
    images = best.state[0].clamp(0.0, 1.0)
    out_labels = best.state[1].argmax(1) if attack == "dlg" else labels
    return InversionResult(images, out_labels, best.history, best.best, losses)


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PhalanxError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_pos(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PhalanxError(f"{fn}: {name} must be a number > 0, got {value!r}")
    return float(value)
