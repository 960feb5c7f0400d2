"""The model registry's networks: ByzFL's cnn_mnist, layer for layer."""

import torch

from phalanx.models import build_model


def test_cnn_mnist_matches_byzfl():
    """conv 1->20 5x5, pool, conv 20->50 5x5, pool, dense 800->500, dense 500->10: 431,080 parameters,
    as byzfl.fed_framework.models.cnn_mnist (byzfl 0.0.11); logits of shape [B, 10]."""
    model = build_model("cnn_mnist", (1, 28, 28), 10, seed=0)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,), (10, 500), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert build_model("cnn_mnist", (3, 32, 32), 10, seed=0)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
