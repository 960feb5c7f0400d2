"""Local training of one client: SGD with momentum from the global parameters, returning the update.

The update is ``params_after - params_before`` as one flat float32 vector, so the server step is
``params += server_lr * aggregate(updates)``. A data poison, when given, rewrites every batch the
client trains on (label flipping, backdoor triggers). A training hook, when given, changes the
objective or the step direction of a malicious client (``phalanx.attacks.base.TrainingHook``);
only the sequential ``local_update`` takes one.

Momentum is PyTorch's heavy ball, ``m <- momentum * m + g`` and ``theta <- theta - lr * m`` (``g``
includes weight decay). By default every call starts from ``m = 0``, so momentum only acts across
the local steps of one round. *Worker momentum* (Karimireddy, He & Jaggi 2021, "Learning from
History for Byzantine Robust Optimization", ICML; Allouah et al. 2023, "Fixing by Mixing",
AISTATS) keeps each client's ``m`` across rounds, so even one local step per round (distributed
SGD) sends a momentum-based update, whose lower variance is what lets a robust aggregator tell
honest rows from ALIE's and IPM's: ``local_momentum_update`` and ``vectorized_momentum_updates``
take the client's buffer from the previous round and return it after training. The heavy-ball form
matches ByzFL's clients (PyTorch SGD, momentum 0.9, kept across steps); it is Karimireddy et al.'s
``m <- (1 - beta) g + beta m`` scaled by ``1 / (1 - beta)``, the same direction at a larger lr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PhalanxError
from .updates import flatten_params, load_flat, new_matrix


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

STEP_BYTES = 512 << 20  # the vectorized engine's gradients per call: clients are split to fit


@dataclass(frozen=True)
class Shards:
    """The clients' data without copies: client c holds rows ``parts[c]`` of (x, y)."""

    x: torch.Tensor
    y: torch.Tensor
    parts: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.parts)


def _transform_step(params: list[torch.Tensor], transform, weight_decay: float) -> None:
    """Replace every parameter's gradient by ``transform`` of the flat step direction (the gradient
    plus weight decay, computed as SGD does), so the optimizer then runs without weight decay."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    if weight_decay:
        grads = [g.add(p.detach(), alpha=weight_decay) for g, p in zip(grads, params)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    new = transform(flat)
    if not isinstance(new, torch.Tensor) or new.shape != flat.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise PhalanxError(f"training hook: grad_transform must return a vector of shape {tuple(flat.shape)}, "
                           f"got {got}")
    for p, chunk in zip(params, new.to(flat.dtype).split([p.numel() for p in params])):
        p.grad = chunk.reshape(p.shape).clone()


def _check_buffer(where: str, buffer: torch.Tensor, shape: tuple) -> None:
    if not isinstance(buffer, torch.Tensor) or tuple(buffer.shape) != shape:
        got = tuple(buffer.shape) if isinstance(buffer, torch.Tensor) else type(buffer).__name__
        raise PhalanxError(f"{where}: momentum buffer must have shape {shape}, got {got}")


def local_update(model: nn.Module, global_params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 spec: LocalSpec, gen: torch.Generator, poison: Poison | None = None,
                 hook=None) -> tuple[torch.Tensor, float]:
    """Train ``model`` from ``global_params`` on (x, y); return (update [d], mean training loss).

    Momentum starts from zero (see ``local_momentum_update`` to carry it across rounds).
    ``hook`` (a ``TrainingHook``, for malicious clients): every step minimizes
    ``hook.objective(cross_entropy, flat_params, global_params)`` instead of the cross-entropy,
    and/or moves along ``hook.grad_transform(gradient + weight_decay * params)`` (before momentum).
    The reported loss is the cross-entropy either way.
    """
    update, loss, _ = local_momentum_update(model, global_params, x, y, spec, gen, None, poison, hook)
    return update, loss


def local_momentum_update(model: nn.Module, global_params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          spec: LocalSpec, gen: torch.Generator, buffer: torch.Tensor | None,
                          poison: Poison | None = None, hook=None) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``local_update`` continuing from the client's momentum buffer: (update [d], loss, buffer [d]).

    ``buffer`` (flat, [d], or None for zeros) is the client's heavy-ball momentum ``m`` at the end
    of its previous round; the first step computes ``m <- momentum * buffer + g``. The returned
    buffer is ``m`` after the last step, a new tensor (``buffer`` is not modified). With
    ``momentum == 0`` there is no momentum state: the buffer comes back unchanged.
    """
    objective = getattr(hook, "objective", None)
    transform = getattr(hook, "grad_transform", None)
    if buffer is not None:
        _check_buffer("local_momentum_update", buffer, tuple(global_params.shape))
    load_flat(model, global_params)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                          weight_decay=0.0 if transform is not None else spec.weight_decay)
    if buffer is not None and spec.momentum:  # SGD then steps m <- momentum * m + g from this m
        for p, chunk in zip(params, buffer.detach().split([p.numel() for p in params])):
            opt.state[p]["momentum_buffer"] = chunk.reshape(p.shape).to(p.dtype).clone()
    anchor = global_params.detach().to(torch.float32)
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
            loss = getattr(model, "loss", F.cross_entropy)(model(xb), yb)  # a model may carry its own loss
            if objective is None:
                loss.backward()
            else:
                total_loss = objective(loss, torch.cat([p.reshape(-1) for p in params]), anchor)
                if not isinstance(total_loss, torch.Tensor) or total_loss.numel() != 1:
                    raise PhalanxError("training hook: objective must return a scalar tensor, got "
                                       f"{getattr(total_loss, 'shape', type(total_loss).__name__)}")
                total_loss.backward()
            if transform is not None:
                _transform_step(params, transform, spec.weight_decay)
            opt.step()
            total += float(loss.detach())
            steps += 1
            if spec.max_steps is not None and steps >= spec.max_steps:
                break
        if spec.max_steps is not None and steps >= spec.max_steps:
            break
    update = flatten_params(model) - global_params
    start_buf = torch.zeros_like(update) if buffer is None else buffer.detach().to(update.dtype).clone()
    if not spec.momentum:
        return update, total / max(steps, 1), start_buf
    starts = start_buf.split([p.numel() for p in params])  # a parameter that never had a gradient keeps its m
    new_buf = torch.cat([start if opt.state[p].get("momentum_buffer") is None
                         else opt.state[p]["momentum_buffer"].detach().reshape(-1).to(update.dtype)
                         for p, start in zip(params, starts)])
    return update, total / max(steps, 1), new_buf


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


def vectorized_updates(model: nn.Module, global_params: torch.Tensor,
                       data: "list[tuple[torch.Tensor, torch.Tensor]] | Shards", spec: LocalSpec, gens: list[torch.Generator], poisons: list[Poison | None]) -> tuple[torch.Tensor, list[float]]:
    """Local training of k clients at once with ``torch.func.vmap``: the fast path.

    It runs the same SGD as ``local_update`` (same shuffles and poison draws from each client's
    generator, same momentum rule, the last short batch included), with every client's step
    batched into one call; clients with fewer batches sit idle once they are done. ``data``: each
    client's (x, y), or ``Shards`` (row indices into shared tensors: no copy). Results
    agree with the sequential reference up to floating-point rounding.
    Returns (U [k, d], mean training loss per client).
    """
    U, losses, _ = _vectorized_sgd(model, global_params, data, spec, gens, poisons, None, keep_buffers=False)
    return U, losses


def vectorized_momentum_updates(model: nn.Module, global_params: torch.Tensor,
                                data: "list[tuple[torch.Tensor, torch.Tensor]] | Shards", spec: LocalSpec,
                                gens: list[torch.Generator], poisons: list[Poison | None],
                                buffers: torch.Tensor | None) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """``vectorized_updates`` continuing from each client's momentum buffer (worker momentum).

    ``buffers`` [k, d] (or None for zeros) holds row by row what ``local_momentum_update`` takes
    as ``buffer``; it is not modified. Returns (U [k, d], mean training loss per client,
    buffers after training [k, d]); with ``momentum == 0`` the buffers come back unchanged.
    """
    return _vectorized_sgd(model, global_params, data, spec, gens, poisons, buffers, keep_buffers=True)


def _vectorized_sgd(model, global_params, data, spec, gens, poisons, buffers, keep_buffers: bool):
    """The engine; without ``keep_buffers`` the third result is None and, with ``momentum == 0``,
    no [k, d] momentum state is allocated."""
    from torch.func import functional_call, grad_and_value, vmap

    k, B = len(data), spec.batch_size
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss_fn(flat, xb, yb, mb):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        ce = getattr(model, "loss", F.cross_entropy)(functional_call(model, params, (xb,)), yb, reduction="none")
        return (ce * mb).sum() / mb.sum().clamp_min(1.0)

    step_fn = vmap(grad_and_value(loss_fn))
    # theta becomes U: a recycled buffer (updates.new_matrix) saves the page faults of a fresh [k, d]
    rows0 = global_params.detach().expand(k, -1)
    theta = (new_matrix(k, rows0.shape[1], rows0.dtype).copy_(rows0) if rows0.device.type == "cpu"
             else rows0.clone())
    if buffers is not None:
        _check_buffer("vectorized_momentum_updates", buffers, tuple(theta.shape))
    start = None if buffers is None else buffers.detach().to(theta.dtype).clone()
    buf = (torch.zeros_like(theta) if start is None else start.clone()) if spec.momentum else None
    counts = ([p.shape[0] if hasattr(p, "shape") else len(p) for p in data.parts] if isinstance(data, Shards)
              else [len(y) for _, y in data])  # shape[0]: a tensor's len() is a Python call
    per_epoch = [-(-n // B) for n in counts]
    budget = [min(spec.epochs * s, spec.max_steps or 10**12) for s in per_epoch]
    done = [0] * k
    losses = torch.zeros(k, dtype=torch.float64)
    # every client's samples as rows of one tensor (client c's: rows flat[offsets[c]:][:counts[c]] of X);
    # a step gathers all live clients' batches at once
    if isinstance(data, Shards):
        X, Y = data.x, data.y
        flat = torch.cat([p if isinstance(p, torch.Tensor) and p.dtype == torch.long
                          else torch.as_tensor(p, dtype=torch.long) for p in data.parts])
    else:
        X, Y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
        flat = torch.arange(len(Y))
    sizes_t = torch.tensor(counts, dtype=torch.long)
    offsets = sizes_t.cumsum(0) - sizes_t
    width = max(per_epoch) * B
    short = max(counts) < B
    chunk = max(1, STEP_BYTES // (theta.shape[1] * theta.element_size()))
    model.train()
    for _ in range(spec.epochs):
        orders = [torch.randperm(n, generator=g) if done[c] < budget[c] else None
                  for c, (n, g) in enumerate(zip(counts, gens))]
        index = torch.zeros(k, width, dtype=torch.long)  # row c: client c's shuffled samples, padded
        valid = torch.zeros(k, width)
        going = [c for c in range(k) if orders[c] is not None]
        if going:  # index[c, j] = flat[offsets[c] + orders[c][j]] for every client at once
            who = torch.tensor(going, dtype=torch.long)
            lens = sizes_t[who]
            owner = torch.repeat_interleave(who, lens)
            first = torch.repeat_interleave(lens.cumsum(0) - lens, lens)
            slot = torch.arange(len(owner)) - first
            index[owner, slot] = flat[torch.cat([orders[c] for c in going]) + offsets[owner]]
            valid[owner, slot] = 1.0
        for s in range(max(per_epoch)):
            live = [c for c in range(k) if orders[c] is not None and s < per_epoch[c] and done[c] < budget[c]]
            if not live:
                break
            # only the clients still training take part in the step (Dirichlet parts differ in size);
            # padded slots point at sample 0 with weight 0
            m = len(live)
            rows = None if m == k else torch.tensor(live)
            # when every client holds fewer samples than a batch (cross-device), the step's batch is
            # only as wide as the largest client, not B (unless a poison may return more rows)
            cut = short and not any(poisons[c] is not None for c in live)
            cols = slice(s * B, s * B + (max(counts) if cut else B))
            idx = index[:, cols] if rows is None else index[rows, cols]
            xb, yb = X[idx], Y[idx]
            mb = (valid[:, cols] if rows is None else valid[rows, cols]).clone()
            for j, c in enumerate(live):
                if poisons[c] is not None:
                    n = int(mb[j].sum())
                    x, y = poisons[c](xb[j, :n], yb[j, :n], gens[c])
                    xb[j, :len(y)], yb[j, :len(y)] = x, y
                    mb[j] = 0.0
                    mb[j, :len(y)] = 1.0
            # the gradients of at most `chunk` clients at a time: the transients of the backward pass
            # (about two [chunk, d] matrices) stay small however many clients train
            for a in range(0, m, chunk):
                b = min(a + chunk, m)
                sel = (slice(a, b) if m > chunk else slice(None)) if rows is None else rows[a:b]
                th = theta[sel]  # rows is None: a view, updated in place; else a copy, written back
                grads, vals = step_fn(th, xb[a:b], yb[a:b], mb[a:b])
                if spec.weight_decay:
                    grads = grads.add_(th, alpha=spec.weight_decay)
                step = buf[sel].mul_(spec.momentum).add_(grads) if spec.momentum else grads
                if rows is None:  # views: updated in place
                    th.sub_(step, alpha=spec.lr)
                else:  # copies: written back
                    if spec.momentum:
                        buf[sel] = step
                    theta[sel] = th.sub_(step, alpha=spec.lr)
                losses[live[a:b]] += vals.double()
                del grads, step
            for c in live:
                done[c] += 1
    U = theta.sub_(global_params)  # in place: no second [k, d] matrix
    per_client = losses.tolist()
    mean_losses = [per_client[c] / max(done[c], 1) for c in range(k)]
    if not keep_buffers:
        return U, mean_losses, None
    return U, mean_losses, buf if spec.momentum else (torch.zeros_like(U) if start is None else start)
