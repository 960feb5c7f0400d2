"""Backdoor-specific defense stages.

``weak_dp``: the "norm clipping + weak differential privacy" defense of Sun et al. 2019 ("Can you
really backdoor federated learning?"). Gaussian noise of std ``sigma`` is added to the aggregate
update; combine it with the ``clip`` layer, which bounds every client's contribution::

    defense: [{clip: {max_norm: 1.0}}, mean, {weak_dp: {sigma: 0.002}}]

Sun et al. add the noise to the global model; here it is added to the aggregate ``g`` before
``params += server_lr * g``, so the model receives noise of std ``server_lr * sigma``. The noise is
"weak": far below what a formal (epsilon, delta) guarantee would need, yet it blunts backdoors.
"""

from __future__ import annotations

import torch

from ..context import RoundContext
from ..registry import DEFENSES
from .base import Post, Report, check_positive


class WeakDP(Post):
    """Add N(0, sigma^2 I) to the aggregate, drawn from the round's generator."""

    name = "weak_dp"

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, g: torch.Tensor, ctx: RoundContext):
        noise = torch.randn(g.shape, generator=ctx.generator, dtype=torch.float32) * self.sigma
        report = Report(self.name, n=ctx.n, info={"sigma": self.sigma})
        return g + noise.to(g.dtype), report

    def __repr__(self) -> str:
        return f"WeakDP(sigma={self.sigma})"


@DEFENSES.register("weak_dp")
def weak_dp(sigma: float = 0.002) -> WeakDP:
    """Weak DP (Sun et al. 2019): Gaussian noise of std sigma on the aggregate; pair with clip."""
    return WeakDP(check_positive("weak_dp", "sigma", sigma))
