"""Leakage metrics for gradient inversion: MSE, PSNR, SSIM, best matching, label accuracy.

Images are float tensors [B, C, H, W] (or [C, H, W] / [H, W] for one image) with data range 1.
Every metric returns one value per image. SSIM follows Wang et al. 2004 ("Image quality
assessment: from error visibility to structural similarity"): an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, statistics over the 'valid' window positions, averaged over
positions and channels. Reconstructions of a batch come back in arbitrary order, so they are
matched to the originals first (Hungarian assignment on the MSE matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PhalanxError


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise PhalanxError(f"leakage: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise PhalanxError(f"leakage: {name} must have shape [B, C, H, W], got {tuple(x.shape)}")
    return x.double()


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_batch(x, "originals"), _as_batch(y, "reconstructions")
    if a.shape != b.shape:
        raise PhalanxError(f"leakage: originals and reconstructions must have the same shape, "
                           f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise PhalanxError("leakage: images must be finite, got NaN or inf values")
    return a, b


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: [B] float64."""
    a, b = _pair(x, y)
    return ((a - b) ** 2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(range^2 / MSE) in dB: [B] (inf when equal)."""
    if not data_range > 0:
        raise PhalanxError(f"psnr: data_range must be > 0, got {data_range!r}")
    m = mse(x, y)
    out = 10.0 * torch.log10(data_range ** 2 / m)
    return torch.where(m == 0, torch.full_like(m, math.inf), out)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalized 2-D Gaussian window [size, size] (float64), weights summing to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r ** 2) / (2.0 * sigma ** 2))
    w = torch.outer(g, g)
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), Gaussian window, 'valid' positions: [B].

    The window shrinks (to the largest odd size that fits) for images smaller than ``window``.
    """
    a, b = _pair(x, y)
    if window < 1 or window % 2 == 0:
        raise PhalanxError(f"ssim: window must be an odd integer >= 1, got {window!r}")
    size = min(window, a.shape[-1], a.shape[-2])
    size -= (size + 1) % 2  # keep it odd
    B, C = a.shape[:2]
    w = gaussian_window(size, sigma)[None, None]
    a = a.reshape(B * C, 1, *a.shape[2:])
    b = b.reshape(B * C, 1, *b.shape[2:])

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).reshape(B, C).mean(1)


def best_match(originals: torch.Tensor, recons: torch.Tensor, method: str = "hungarian") -> torch.Tensor:
    """perm [B] such that ``recons[perm[i]]`` is the reconstruction assigned to ``originals[i]``.

    Minimises the total MSE: ``hungarian`` (scipy's linear_sum_assignment, optimal) or ``greedy``
    (repeatedly take the closest remaining pair).
    """
    a, b = _pair(originals, recons)
    cost = ((a.flatten(1)[:, None, :] - b.flatten(1)[None, :, :]) ** 2).mean(2)
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost.numpy())
        perm = torch.empty(len(rows), dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return perm
    if method == "greedy":
        perm = torch.full((cost.shape[0],), -1, dtype=torch.long)
        c = cost.clone()
        for _ in range(cost.shape[0]):
            k = int(torch.argmin(c))
            i, j = divmod(k, c.shape[1])
            perm[i] = j
            c[i, :] = math.inf
            c[:, j] = math.inf
        return perm
    raise PhalanxError(f"best_match: method must be 'hungarian' or 'greedy', got {method!r}")


def label_accuracy(true: torch.Tensor, pred: torch.Tensor, ordered: bool = False) -> float:
    """Fraction of labels recovered.

    Unordered (default): multiset overlap, sum_c min(#true_c, #pred_c) / B, since a batch's labels
    carry no order. ``ordered=True`` compares position by position.
    """
    t, p = torch.as_tensor(true).flatten().long(), torch.as_tensor(pred).flatten().long()
    if t.numel() != p.numel():
        raise PhalanxError(f"label_accuracy: expected {t.numel()} predicted labels, got {p.numel()}")
    if t.numel() == 0:
        raise PhalanxError("label_accuracy: needs at least one label, got none")
    if ordered:
        return float((t == p).double().mean())
    k = int(max(t.max(), p.max())) + 1
    hit = torch.minimum(torch.bincount(t, minlength=k), torch.bincount(p, minlength=k)).sum()
    return float(hit) / t.numel()


@dataclass
class LeakageScores:
    """Per-image scores after matching; ``perm[i]`` is the reconstruction matched to original i."""

    mse: torch.Tensor
    psnr: torch.Tensor
    ssim: torch.Tensor
    label_acc: float
    perm: torch.Tensor

    def summary(self) -> dict[str, float]:
        return {"label_acc": self.label_acc, "mse": float(self.mse.mean()),
                "psnr": float(self.psnr.mean()), "ssim": float(self.ssim.mean())}


def score(originals: torch.Tensor, recons: torch.Tensor, true_labels=None, pred_labels=None,
          data_range: float = 1.0) -> LeakageScores:
    """Match reconstructions to originals (Hungarian), then MSE/PSNR/SSIM per image and label acc."""
    o = _as_batch(originals, "originals")
    r = _as_batch(recons, "reconstructions").clamp(0.0, data_range)
    perm = best_match(o, r)
    r = r[perm]
    acc = math.nan
    if true_labels is not None and pred_labels is not None:
        acc = label_accuracy(true_labels, pred_labels)
    return LeakageScores(mse(o, r), psnr(o, r, data_range), ssim(o, r, data_range), acc, perm)
