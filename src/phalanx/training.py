"""Local training of one client: SGD with momentum from the global parameters, returning the update.

The update is ``params_after - params_before`` as one flat float32 vector, so the server step is
``params += server_lr * aggregate(updates)``. A data poison, when given, rewrites every batch the
client trains on (label flipping, backdoor triggers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .updates import flatten_params, load_flat


@dataclass(frozen=True)
class LocalSpec:
    """Local training hyperparameters shared by all clients of a run."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_steps: int | None = None  # cap on SGD steps per round (None: full epochs)


Poison = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def local_update(model: nn.Module, global_params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 spec: LocalSpec, gen: torch.Generator, poison: Poison | None = None) -> tuple[torch.Tensor, float]:
    """Train ``model`` from ``global_params`` on (x, y); return (update [d], mean training loss)."""
    load_flat(model, global_params)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay)
    n = len(y)
    steps, total = 0, 0.0
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, spec.batch_size):
            idx = order[start:start + spec.batch_size]
            xb, yb = x[idx], y[idx]
            if poison is not None:
                xb, yb = poison(xb, yb, gen)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
            if spec.max_steps is not None and steps >= spec.max_steps:
                break
        if spec.max_steps is not None and steps >= spec.max_steps:
            break
    update = flatten_params(model) - global_params
    return update, total / max(steps, 1)


@torch.no_grad()
def evaluate(model: nn.Module, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of ``params`` on (x, y)."""
    load_flat(model, params)
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        out = model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / max(len(y), 1), loss / max(len(y), 1)


@torch.no_grad()
def predict(model: nn.Module, params: torch.Tensor, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Predicted labels of ``params`` on x."""
    load_flat(model, params)
    model.eval()
    return torch.cat([model(x[s:s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])
