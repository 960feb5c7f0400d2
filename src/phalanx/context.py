"""What a defense and an attack may see during one round.

``RoundContext`` is given to defense layers and aggregators. It deliberately has no field that
says which clients are malicious: defenses must not know (``tests/test_context.py`` checks it).
``AttackContext`` is given to model-poisoning attacks and does know who they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class RoundContext:
    """Server-side view of one round.

    round: round number (0-based). client_ids: one id per row of the update matrix.
    global_params: the current flat global parameters [d]. generator: seeded RNG for the defense.
    server_update: optional callable returning an update computed by the server on its root set
    (FLTrust). val_loss: optional callable mapping flat params [d] -> validation loss.
    num_samples: per-row sample counts (FedAvg weights). extras: free-form room for integrations.
    """

    round: int
    client_ids: list[str]
    global_params: torch.Tensor
    generator: torch.Generator
    server_update: Callable[[], torch.Tensor] | None = None
    val_loss: Callable[[torch.Tensor], float] | None = None
    num_samples: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.client_ids)


@dataclass
class AttackContext:
    """What the m malicious clients know when they craft their rows.

    own: the updates the malicious clients computed honestly on their own (possibly poisoned) data,
    [m, d]. n: total clients in the round (honest + malicious). f: declared Byzantine count (= m).
    aggregator: the server's aggregator, for aggregator-aware attacks (may be None).
    history: per-attack scratch space that persists across rounds (for example a previous direction).
    server_view: optional callable n -> RoundContext, the server's context for an n-row round
    (with its root update and validation data), so an omniscient attack can simulate the server.
    honest_ids / own_ids: the client ids of the honest rows and of the malicious rows, in order
    (None outside the simulator), so an attack can follow one client across partial participation.
    """

    own: torch.Tensor
    n: int
    round: int
    generator: torch.Generator
    global_params: torch.Tensor
    aggregator: Any = None
    history: dict[str, Any] = field(default_factory=dict)
    server_view: Callable[[int], RoundContext] | None = None
    honest_ids: list[str] | None = None
    own_ids: list[str] | None = None

    @property
    def m(self) -> int:
        return int(self.own.shape[0])


def simple_round_context(U: torch.Tensor, seed: int = 0, **kw) -> RoundContext:
    """A RoundContext for an update matrix U, with ids c0..c{n-1} and zero global params."""
    n, d = U.shape
    g = torch.Generator().manual_seed(seed)
    return RoundContext(round=kw.pop("round", 0), client_ids=[f"c{i}" for i in range(n)],
                        global_params=kw.pop("global_params", torch.zeros(d)), generator=g, **kw)
