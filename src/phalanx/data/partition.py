"""Split a labelled training set among clients: IID, Dirichlet(alpha) over labels, shards, or by silo.

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


def silo(labels: torch.Tensor, num_clients: int, seed: int, silos: torch.Tensor | None = None,
         names: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """Cross-silo: client k holds every row of silo k (``silos``: int64 [N], silo ids 0..S-1; ``names``
    their names for errors). ``seed`` is unused: the data decides the split. num_clients must equal
    the number of silos, and every silo must hold a row."""
    if silos is None:
        raise PhalanxError("partition 'silo': this dataset has no silo column (which bank holds each row); "
                           "use a tabular dataset with data.silo, or partition iid / dirichlet")
    s = np.asarray(silos)
    if len(s) != len(labels):
        raise PhalanxError(f"partition 'silo': {len(s)} silo ids for {len(labels)} rows")
    count = len(names) if names else (int(s.max()) + 1 if len(s) else 0)
    if num_clients != count:
        raise PhalanxError(f"partition 'silo': federation.num_clients must equal the number of silos ({count}), "
                           f"got {num_clients}")
    sizes = np.bincount(s, minlength=count) if len(s) else np.zeros(count, dtype=int)
    if (sizes == 0).any():
        k = int(np.argmin(sizes))
        raise PhalanxError(f"partition 'silo': silo {names[k] if names else k!r} has no training rows")
    return [torch.from_numpy(np.nonzero(s == k)[0].astype(np.int64)) for k in range(count)]


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards, "silo": silo}


def partition(labels: torch.Tensor, num_clients: int, scheme: str = "iid", seed: int = 0,
              **params) -> list[torch.Tensor]:
    """Dispatch to a partitioner by name."""
    if scheme not in PARTITIONERS:
        raise PhalanxError(f"partition: unknown scheme {scheme!r}; known: {', '.join(PARTITIONERS)}")
    return PARTITIONERS[scheme](labels, num_clients, seed, **params)
