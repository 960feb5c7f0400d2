"""``phalanx invert``: the gradient-inversion audit (:mod:`phalanx.inversion_audit`) with a progress bar,
a table of the scores, a PNG grid and a JSON file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import typer

from ..attacks import inversion as inv
from ..errors import PhalanxError
from ..inversion_audit import Case, audit_case, parse_defense, parse_seeds, save_grid


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
           out: Path = typer.Option(Path("results/invert"), help="output folder (PNG grid and JSON scores)"),
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
