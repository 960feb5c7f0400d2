"""What the commands share: the console, one-line errors, ``--plugin``, and metrics formatted for people."""

from __future__ import annotations

import datetime as dt
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import PhalanxError

console = Console()


def fail(msg: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


PLUGIN_HELP = "import your own module first: a .py file or a dotted module name (repeatable)"


def plugin_option():
    return typer.Option(None, "--plugin", metavar="FILE_OR_MODULE", help=PLUGIN_HELP)


def use_plugins(specs: Optional[List[str]]) -> list[str]:
    """Import the command's ``--plugin`` entries (and those given before the command); all of them,
    resolved. A plug-in that cannot be imported is one error line."""
    from ..plugins import command_line

    try:
        return command_line(specs)
    except PhalanxError as e:
        fail(str(e))


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def is_fraction(key: str) -> bool:
    """Is this metric a fraction in [0, 1], shown as a percentage (accuracy, attack success, AUPRC, ...)?"""
    return key == "accuracy" or key.startswith(("asr", "auprc", "roc_auc", "recall", "precision", "best_f1",
                                                "det_precision", "det_recall", "quarantine_precision",
                                                "quarantine_recall"))


def metric(key: str, value) -> str:
    """A metric for people: fractions as percentages (87.3%), other numbers to 3 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if is_fraction(key):
        return f"{100 * value:.1f}%"
    return str(value) if isinstance(value, int) else f"{value:.3g}"


def runs_table(runs: list[dict], title: str) -> Table:
    """Runs with their final metrics, readable at 80 columns: the other final metrics go under the name."""
    from rich import box
    from rich.text import Text

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("run", no_wrap=True)
    t.add_column("name", overflow="fold", ratio=1, min_width=12)
    t.add_column("seed", justify="right")
    t.add_column("status")
    t.add_column("started", no_wrap=True)
    t.add_column("min", justify="right")
    t.add_column("accuracy", justify="right")
    for r in runs:
        started = dt.datetime.fromtimestamp(r["started"]).strftime("%m-%d %H:%M") if r["started"] else "-"
        minutes = f"{(r['ended'] - r['started']) / 60:.1f}" if r["ended"] and r["started"] else "-"
        final = r["final"]
        other = [f"{k} {metric(k, v)}" for k, v in final.items() if k not in ("accuracy", "loss", "error")]
        if final.get("error"):
            other.append(f"error: {final['error']}")
        cell = Text(r["name"] or "-")
        if other:
            cell.append("\n" + ", ".join(other), style="dim")
        t.add_row(r["run_id"], cell, str(r["seed"]), r["status"], started, minutes,
                  metric("accuracy", final.get("accuracy")))
    return t
