"""A gradient-inversion audit of one model, attack and leakage defense (``phalanx invert``).

For each seed: build the model from the seed, draw a batch of training images, compute what the
client would share (gradient or FedAvg update, after the defense), run the attack, match the
reconstructions to the originals and score them (label accuracy, MSE, PSNR, SSIM). Writes a PNG
grid (originals above reconstructions); ``phalanx invert`` adds a JSON file of the scores and a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .attacks import inversion as inv
from .errors import PhalanxError
from .leakage import LeakageScores, score
from .models import build_model

DEFENSE_KINDS = ("none", "noise", "laplace", "prune", "clip", "dpsgd")
# DP-SGD audit setting: a local set of 100 samples, batch 1 (q = 0.01), 10 epochs (1,000 steps).
DPSGD_SAMPLE_RATE = 0.01
DPSGD_STEPS = 1000
DPSGD_DELTA = 1e-5
DPSGD_CLIP = 1.0


@dataclass(frozen=True)
class DefenseSpec:
    """A leakage defense: ``none``, ``noise:SIGMA``, ``laplace:SIGMA``, ``prune:RATIO`` (fraction
    zeroed), ``clip:C`` (L2 norm) or ``dpsgd:EPS`` (per-sample clipping + noise at epsilon EPS)."""

    kind: str = "none"
    value: float = 0.0

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.value:g}"


def parse_defense(spec: str) -> DefenseSpec:
    kind, _, arg = spec.strip().partition(":")
    if kind not in DEFENSE_KINDS:
        raise PhalanxError(f"invert: defense must be one of none, noise:SIGMA, laplace:SIGMA, prune:RATIO, "
                           f"clip:C, dpsgd:EPS; got {spec!r}")
    if kind == "none":
        if arg:
            raise PhalanxError(f"invert: defense 'none' takes no value, got {spec!r}")
        return DefenseSpec()
    try:
        value = float(arg)
    except ValueError:
        raise PhalanxError(f"invert: defense {kind!r} needs a number after ':', got {spec!r}") from None
    ok = 0 <= value < 1 if kind == "prune" else value > 0 and math.isfinite(value)
    if not ok:
        want = "in [0, 1)" if kind == "prune" else "> 0"
        raise PhalanxError(f"invert: defense {kind!r} needs a value {want}, got {spec!r}")
    return DefenseSpec(kind, value)


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> seeds 0..4; ``"0,3,7"`` -> that list."""
    try:
        parts = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise PhalanxError(f"invert: seeds must be a count or a comma-separated list of integers, "
                           f"got {text!r}") from None
    if len(parts) == 1 and "," not in str(text):
        if parts[0] < 1:
            raise PhalanxError(f"invert: seeds count must be >= 1, got {text!r}")
        return list(range(parts[0]))
    if not parts or min(parts) < 0:
        raise PhalanxError(f"invert: seeds must be non-negative integers, got {text!r}")
    return parts


def dpsgd_noise(eps: float) -> float:
    """Noise multiplier for DP-SGD at ``eps`` in the audit setting (q = 0.01, 1,000 steps, delta 1e-5)."""
    from .defenses.privacy import noise_for_epsilon

    return noise_for_epsilon(eps, DPSGD_SAMPLE_RATE, DPSGD_STEPS, DPSGD_DELTA)


def shared_target(model, x, y, defense: DefenseSpec, update_kind: str = "gradient",
                  local_steps: int = 1, lr: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The flat vector the client shares: its gradient or FedAvg update, after the defense."""
    from .defenses import privacy as priv

    gen = torch.Generator().manual_seed(10_000 + seed)
    if defense.kind == "dpsgd":
        if update_kind != "gradient":
            raise PhalanxError(f"invert: defense dpsgd applies to update_kind='gradient', got {update_kind!r}")
        return priv.dp_sgd_gradient(model, x, y, dpsgd_noise(defense.value), DPSGD_CLIP, gen)
    if update_kind == "gradient":
        parts = inv.batch_gradient(model, x, y)
    else:
        parts = inv.fedavg_update(model, x, y, local_steps, lr)
    v = torch.cat([p.reshape(-1) for p in parts])
    if defense.kind in ("noise", "laplace"):
        kind = "gaussian" if defense.kind == "noise" else "laplace"
        return priv.grad_noise(v, defense.value, kind, gen)
    if defense.kind == "prune":
        return priv.prune(v, defense.value)
    if defense.kind == "clip":
        return priv.clip_update(v, defense.value)
    return v


@dataclass
class Case:
    """One audited seed: originals [B, C, H, W] and labels, the attack result and its scores."""

    seed: int
    originals: torch.Tensor
    labels: torch.Tensor
    result: inv.InversionResult
    scores: LeakageScores

    def row(self) -> dict:
        s = self.scores.summary()
        return {"seed": self.seed, "labels": self.labels.tolist(), "recovered": self.result.labels.tolist(),
                **s, "psnr_per_image": self.scores.psnr.tolist(), "loss": self.result.loss}


def audit_case(dataset, model_name: str = "lenet", attack: str = "idlg", defense: DefenseSpec = DefenseSpec(),
               batch_size: int = 1, seed: int = 0, update_kind: str = "gradient", local_steps: int = 5,
               lr: float = 0.1, adaptive: bool = False, **attack_kw) -> Case:
    """Audit one seed: model and batch drawn from ``seed``, shared vector, attack, scores.

    adaptive: against pruning, the attacker matches only the non-zero coordinates it received.
    """
    model = build_model(model_name, dataset.in_shape, dataset.num_classes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset.y_train), generator=gen)[:batch_size]
    x, y = dataset.x_train[idx], dataset.y_train[idx]
    target = shared_target(model, x, y, defense, update_kind, local_steps, lr, seed)
    res = inv.invert(model, target, attack, batch_size, in_shape=dataset.in_shape, seed=seed,
                     update_kind=update_kind, local_steps=local_steps, lr=lr,
                     ignore_zeros=adaptive and defense.kind == "prune", **attack_kw)
    return Case(seed, x, y, res, score(x, res.images, y, res.labels))


def save_grid(cases: list[Case], path: Path, title: str = "", per_row: int = 10) -> Path:
    """PNG: blocks of originals (upper row) above their matched reconstructions with PSNR/SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = []
    for c in cases:
        rec = c.result.images[c.scores.perm]
        for i in range(len(c.originals)):
            items.append((c.seed, c.originals[i], rec[i], float(c.scores.psnr[i]), float(c.scores.ssim[i])))
    cols = min(per_row, len(items))
    blocks = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(1.3 * cols, 2.9 * blocks), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (seed, orig, rec, p, s) in enumerate(items):
        b, j = divmod(k, cols)
        for r, img in ((0, orig), (1, rec)):
            ax = axes[2 * b + r, j]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2 * b, j].set_title(f"seed {seed}", fontsize=7)
        axes[2 * b + 1, j].set_title(f"{p:.1f} dB\nSSIM {s:.2f}", fontsize=7, y=-0.42)
    for b in range(blocks):
        for r, name in ((0, "original"), (1, "reconstructed")):
            axes[2 * b + r, 0].text(-0.08, 0.5, name, rotation=90, fontsize=7, ha="right", va="center",
                                    transform=axes[2 * b + r, 0].transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
