"""Models: logistic regression, an MLP, a small CNN, ByzFL's ``cnn_mnist``, LeNet (the
gradient-inversion target), and models for feature vectors (``tabular_mlp``, ``tabular_logreg``) with an imbalance-aware loss.

Every factory takes the input shape ((C, H, W) for images, (F,) for tabular data) and the number
of classes. ``logreg`` and ``mlp`` flatten their input, so they also take feature vectors [N, F].
A model that trains on something other than cross-entropy carries it as ``model.loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
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


@MODELS.register("cnn_mnist")
def cnn_mnist(in_shape=(1, 28, 28), num_classes: int = 10) -> nn.Module:
    """ByzFL's cnn_mnist: conv 20 and 50 (5x5, ReLU, 2x2 max-pool), dense 500, ReLU, dense (431,080 params on 28x28)."""
    c, h, w = in_shape
    side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731  (two valid 5x5 convs, each then a 2x2 pool)
    flat = 50 * side(h) * side(w)
    return nn.Sequential(  # logits: ByzFL ends in log_softmax with NLLLoss, the same loss as cross-entropy
        nn.Conv2d(c, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 500), nn.ReLU(), nn.Linear(500, num_classes))


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


# ---------------------------------------------------------------- tabular models, imbalance-aware losses

LOSSES = ("ce", "weighted", "focal")


class ImbalanceLoss:
    """A per-sample training loss for imbalanced classes: ``loss(logits, y, reduction='mean')``.

    'weighted': cross-entropy times ``weights[y]`` (class weighting, e.g. [1, 10]: a missed fraud
    costs ten false alarms). 'focal': ``(1 - p_y) ** gamma`` times the (weighted) cross-entropy,
    which down-weights the many easy negatives (Lin et al., ICCV 2017). 'mean' is the plain mean
    over the batch (not divided by the summed weights), so a padded batch's masked sum over its
    true rows gives the same value: local training's engines agree.
    """

    def __init__(self, kind: str, weights: list[float] | None = None, gamma: float = 2.0):
        self.kind, self.gamma = kind, float(gamma)
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = F.cross_entropy(logits, y, reduction="none")
        if self.kind == "focal":
            loss = (1 - torch.exp(-loss)).pow(self.gamma) * loss
        if self.weights is not None:
            loss = loss * self.weights.to(loss.dtype)[y]
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.mean()

    def __repr__(self) -> str:
        w = None if self.weights is None else self.weights.tolist()
        return f"ImbalanceLoss({self.kind!r}, weights={w}, gamma={self.gamma})"


def with_loss(model: nn.Module, num_classes: int, loss: str, pos_weight: float | None,
              class_weights: list[float] | None, gamma: float, where: str) -> nn.Module:
    """Attach the training loss as ``model.loss`` (read by local training; plain cross-entropy leaves none)."""
    if loss not in LOSSES:
        raise ConfigError(f"{where}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if pos_weight is not None and class_weights is not None:
        raise ConfigError(f"{where}: give pos_weight or class_weights, not both")
    if pos_weight is not None:
        if num_classes != 2:
            raise ConfigError(f"{where}: pos_weight is for binary tasks, got num_classes={num_classes}")
        if isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or not pos_weight > 0:
            raise ConfigError(f"{where}: pos_weight must be a number > 0, got {pos_weight!r}")
        class_weights = [1.0, float(pos_weight)]
    if class_weights is not None:
        ok = (isinstance(class_weights, (list, tuple)) and len(class_weights) == num_classes
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in class_weights))
        if not ok:
            raise ConfigError(f"{where}: class_weights must be {num_classes} numbers > 0, got {class_weights!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ConfigError(f"{where}: gamma must be a number >= 0, got {gamma!r}")
    if loss == "weighted" and class_weights is None:
        raise ConfigError(f"{where}: loss 'weighted' needs pos_weight or class_weights")
    if loss != "ce" or class_weights is not None:
        model.loss = ImbalanceLoss("focal" if loss == "focal" else "weighted",
                                   None if class_weights is None else list(map(float, class_weights)), gamma)
    return model


@MODELS.register("tabular_mlp")
def tabular_mlp(in_shape=(30,), num_classes: int = 2, hidden: list[int] | int = (64, 32), loss: str = "ce",
                pos_weight: float | None = None, class_weights: list[float] | None = None,
                gamma: float = 2.0) -> nn.Module:
    """MLP on feature vectors [N, F] (ReLU hidden layers); loss 'ce', 'weighted' (pos_weight) or 'focal'."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not widths or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in widths):
        raise ConfigError(f"tabular_mlp: hidden must be widths >= 1, got {hidden!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    prev = math.prod(in_shape)
    for h in widths:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    model = nn.Sequential(*layers, nn.Linear(prev, num_classes))
    return with_loss(model, num_classes, loss, pos_weight, class_weights, gamma, "tabular_mlp")


@MODELS.register("tabular_logreg")
def tabular_logreg(in_shape=(30,), num_classes: int = 2, loss: str = "ce", pos_weight: float | None = None,
                   class_weights: list[float] | None = None, gamma: float = 2.0) -> nn.Module:
    """Logistic regression on feature vectors [N, F]; loss 'ce', 'weighted' (pos_weight) or 'focal'."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))
    return with_loss(model, num_classes, loss, pos_weight, class_weights, gamma, "tabular_logreg")


def build_model(name: str, in_shape, num_classes: int, seed: int, **params) -> nn.Module:
    """Build a registered model with its initial weights drawn from ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MODELS.build(name, in_shape=tuple(in_shape), num_classes=num_classes, **params)
    finally:
        torch.random.set_rng_state(state)
