"""``phalanx invert``: a gradient-inversion audit of one model, attack and leakage defense.

For each seed: build the model from the seed, draw a batch of training images, compute what the
client would share (gradient or FedAvg update, after the defense), run the attack, match the
reconstructions to the originals and score them (label accuracy, MSE, PSNR, SSIM). Writes a PNG
grid (originals above reconstructions) and a JSON file of the scores, and prints a table.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import typer

from ..attacks import inversion as inv
from ..errors import PhalanxError
from ..leakage import LeakageScores, score
from ..models import build_model

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
    from ..defenses.privacy import noise_for_epsilon

    return noise_for_epsilon(eps, DPSGD_SAMPLE_RATE, DPSGD_STEPS, DPSGD_DELTA)


def shared_target(model, x, y, defense: DefenseSpec, update_kind: str = "gradient",
                  local_steps: int = 1, lr: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The flat vector the client shares: its gradient or FedAvg update, after the defense."""
    from ..defenses import privacy as priv

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


def results_table(cases: list[Case], title: str = ""):
    from rich.table import Table

    table = Table(title=title)
    for col in ("seed", "labels", "recovered", "label acc", "MSE", "PSNR (dB)", "SSIM"):
        table.add_column(col, justify="right")
    for c in cases:
        s = c.scores.summary()
        table.add_row(str(c.seed), str(c.labels.tolist()), str(c.result.labels.tolist()),
                      f"{s['label_acc']:.2f}", f"{s['mse']:.2e}", f"{s['psnr']:.1f}", f"{s['ssim']:.3f}")
    med = statistics.median(c.scores.summary()["psnr"] for c in cases)
    table.add_row("median", "", "", "", "", f"{med:.1f}", "")
    return table


def seed_progress(console):
    """A progress bar over the audited seeds: seeds done, the seed at work, time spent and left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[seed]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                    console=console)


app = typer.Typer(add_completion=False, invoke_without_command=True)


# The command is the app's callback, so both ``root.add_typer(app, name="invert")`` and
# ``root.command("invert")(invert)`` give ``phalanx invert [OPTIONS]``.
@app.callback()
def invert(dataset: str = typer.Option("fashion-mnist", help="registered dataset"),
           model: str = typer.Option("lenet", help="registered model"),
           attack: str = typer.Option("idlg", help="dlg | idlg | ig"),
           defense: str = typer.Option("none", help="none | noise:SIGMA | laplace:SIGMA | prune:RATIO | clip:C | dpsgd:EPS"),
           batch_size: int = typer.Option(1, help="images per shared gradient"),
           seeds: str = typer.Option("3", help="a count (0..n-1) or a list such as 0,4,7"),
           steps: int = typer.Option(None, help="objective evaluations per restart (attack default)"),
           restarts: int = typer.Option(None, help="restarts (default 2)"),
           update: str = typer.Option("gradient", help="gradient | fedavg"),
           local_steps: int = typer.Option(5, help="FedAvg local steps"),
           lr: float = typer.Option(0.1, help="FedAvg local learning rate"),
           adaptive: bool = typer.Option(False, help="against pruning, match only non-zero coordinates"),
           out: Path = typer.Option(Path("runs/invert"), help="output folder"),
           plugin: list[str] = typer.Option(None, "--plugin", metavar="FILE_OR_MODULE",
                                            help="import your own module first (a dataset or model of "
                                            "yours; repeatable)")) -> None:
    """Reconstruct training images from a (defended) gradient and score the leakage."""
    from rich.console import Console

    from ..data.datasets import load_dataset

    console = Console()
    try:
        from ..plugins import command_line

        command_line(plugin)
        spec = parse_defense(defense)
        seed_list = parse_seeds(seeds)
        if attack not in inv.ATTACK_NAMES:
            raise PhalanxError(f"invert: attack must be one of {', '.join(inv.ATTACK_NAMES)}, got {attack!r}")
        ds = load_dataset(dataset)
        cases = []
        with seed_progress(console) as bar:
            task = bar.add_task(f"{attack}, defense {spec}", total=len(seed_list), seed="")
            for s in seed_list:
                bar.update(task, seed=f"seed {s}")
                cases.append(audit_case(ds, model, attack, spec, batch_size, s, update, local_steps, lr,
                                        adaptive, steps=steps, restarts=restarts))
                bar.advance(task)
    except PhalanxError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    title = f"{attack} on {model}/{dataset}, defense {spec}, batch {batch_size}, {update}"
    console.print(results_table(cases, title))
    stem = f"{attack}_{str(spec).replace(':', '-')}_bs{batch_size}_{update}"
    png = save_grid(cases, Path(out) / f"{stem}.png", title)
    (Path(out) / f"{stem}.json").write_text(json.dumps({"title": title, "cases": [c.row() for c in cases]},
                                                       indent=1))
    console.print(f"wrote {png} and {png.with_suffix('.json')}")
