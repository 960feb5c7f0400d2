"""Split a labelled training set among clients: IID, Dirichlet(alpha) over labels, or shards.

Every partitioner is seeded, places every sample with exactly one client, and leaves no client
empty. Each returns a list of int64 index tensors, one per client.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import PhalanxError


def _check(num_clients: int, num_samples: int, name: str) -> None:
    if num_clients < 1:
        raise PhalanxError(f"{name}: num_clients must be >= 1, got {num_clients}")
    if num_samples < num_clients:
        raise PhalanxError(f"{name}: needs at least one sample per client, got {num_samples} samples "
                           f"for {num_clients} clients")


def iid(labels: torch.Tensor, num_clients: int, seed: int) -> list[torch.Tensor]:
    """Shuffle and cut into near-equal parts."""
    _check(num_clients, len(labels), "iid")
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [torch.from_numpy(np.sort(p)) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: torch.Tensor, num_clients: int, seed: int, alpha: float = 0.5,
              min_size: int = 10) -> list[torch.Tensor]:
    """Label skew (Hsu et al. 2019): each class is split among clients by a Dirichlet(alpha) draw.

    Smaller alpha means stronger skew. Draws repeat (seeded) until every client holds at least
    ``min_size`` samples (lowered when the data is too small for it); after 100 tries the
    largest clients give samples to the empty ones.
    """
    if not alpha > 0:
        raise PhalanxError(f"dirichlet: alpha must be > 0, got {alpha}")
    y = np.asarray(labels)
    _check(num_clients, len(y), "dirichlet")
    rng = np.random.default_rng(seed)
    min_size = max(1, min(min_size, len(y) // (2 * num_clients)))
    classes = np.unique(y)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.nonzero(y == c)[0])
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:  # give the smallest clients samples from the largest ones
        for k in range(num_clients):
            while len(parts[k]) < 1:
                donor = max(range(num_clients), key=lambda j: len(parts[j]))
                parts[k].append(parts[donor].pop())
    return [torch.from_numpy(np.sort(np.asarray(p, dtype=np.int64))) for p in parts]


def shards(labels: torch.Tensor, num_clients: int, seed: int, shards_per_client: int = 2) -> list[torch.Tensor]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut into
    ``num_clients * shards_per_client`` shards, deal ``shards_per_client`` to each client."""
    y = np.asarray(labels)
    total = num_clients * shards_per_client
    _check(total, len(y), "shards")
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")
    pieces = np.array_split(order, total)
    deal = rng.permutation(total).reshape(num_clients, shards_per_client)
    return [torch.from_numpy(np.sort(np.concatenate([pieces[j] for j in row]))) for row in deal]


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards}


def partition(labels: torch.Tensor, num_clients: int, scheme: str = "iid", seed: int = 0,
              **params) -> list[torch.Tensor]:
    """Dispatch to a partitioner by name."""
    if scheme not in PARTITIONERS:
        raise PhalanxError(f"partition: unknown scheme {scheme!r}; known: {', '.join(PARTITIONERS)}")
    return PARTITIONERS[scheme](labels, num_clients, seed, **params)
