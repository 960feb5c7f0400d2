"""Models: logistic regression, an MLP, a small CNN, and LeNet (the gradient-inversion target).

Every factory takes the input shape (C, H, W) and the number of classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import MODELS


@MODELS.register("logreg")
def logreg(in_shape=(1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Multinomial logistic regression on the flattened image."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


@MODELS.register("mlp")
def mlp(in_shape=(1, 28, 28), num_classes: int = 10, hidden: int = 128) -> nn.Module:
    """Two-layer perceptron with ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


@MODELS.register("cnn")
def cnn(in_shape=(1, 28, 28), num_classes: int = 10, width: int = 8) -> nn.Module:
    """Small CNN: two conv + max-pool blocks and two dense layers (as in McMahan et al. 2017, slimmer)."""
    c, h, w = in_shape
    flat = 2 * width * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))


class LeNetDLG(nn.Module):
    """LeNet as used by DLG (Zhu et al. 2019): three strided 5x5 convs with sigmoid, one dense layer.

    ``init_uniform`` draws every weight and bias from U(-0.5, 0.5), as in the DLG paper.
    """

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10, init_uniform: bool = True):
        super().__init__()
        c, h, w = in_shape
        act = nn.Sigmoid
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, 5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), act())
        fh, fw = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)
        self.fc = nn.Linear(12 * fh * fw, num_classes)
        if init_uniform:
            with torch.no_grad():
                for p in self.parameters():
                    p.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@MODELS.register("lenet")
def lenet(in_shape=(1, 28, 28), num_classes: int = 10, init_uniform: bool = True) -> nn.Module:
    """LeNet with sigmoid activations (the DLG target)."""
    return LeNetDLG(in_shape, num_classes, init_uniform)


def build_model(name: str, in_shape, num_classes: int, seed: int, **params) -> nn.Module:
    """Build a registered model with its initial weights drawn from ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MODELS.build(name, in_shape=tuple(in_shape), num_classes=num_classes, **params)
    finally:
        torch.random.set_rng_state(state)
