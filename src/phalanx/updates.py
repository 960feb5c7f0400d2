"""Model parameters <-> flat vectors, and pairwise distances over the [n, d] update matrix."""

from __future__ import annotations

import torch
from torch import nn


def flatten_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters of ``model`` as one float32 vector [d] (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().clone()


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Write the flat vector ``flat`` [d] into ``model``'s parameters, in place."""
    d = num_params(model)
    if flat.ndim != 1 or flat.numel() != d:
        from .errors import PhalanxError

        raise PhalanxError(f"load_flat: expected a vector of {d} values, got shape {tuple(flat.shape)}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            k = p.numel()
            p.copy_(flat[offset:offset + k].view_as(p))
            offset += k


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sq_norms(U: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row, accumulated in float64: [n]."""
    U64 = U.double()
    return (U64 * U64).sum(1)


def pairwise_sq_dists(U: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between rows, with one matrix product.

    |a|^2 + |b|^2 - 2 a.b, computed in float64 (cancellation) and clamped at zero. [n, m].
    """
    A = U.double()
    B = A if V is None else V.double()
    na = (A * A).sum(1)
    nb = na if V is None else (B * B).sum(1)
    D = na[:, None] + nb[None, :] - 2.0 * (A @ B.T)
    D.clamp_(min=0.0)
    if V is None:
        D.fill_diagonal_(0.0)
    return D


def cosine_matrix(U: torch.Tensor, V: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity between rows of U (and V), float64 [n, m]."""
    A = U.double()
    A = A / A.norm(dim=1, keepdim=True).clamp_min(eps)
    if V is None:
        return A @ A.T
    B = V.double()
    B = B / B.norm(dim=1, keepdim=True).clamp_min(eps)
    return A @ B.T
