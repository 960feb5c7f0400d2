"""``phalanx bench GRID`` and ``phalanx report DB``; ``register(app)`` adds them to the main CLI."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand

from ..errors import PhalanxError
from .common import console, fail, runs_table


class RichProgress:
    """A rich progress bar over the grid's rounds, with cells done and the time left."""

    def __init__(self, console: Console):
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("left"),
                            TimeRemainingColumn(), console=console)
        self.seen: dict[str, int] = {}
        self.cells = self.probes = None

    def start(self, cells, probes: int) -> None:
        self.rounds = {c.key: c.rounds for c in cells}
        self.n, self.done = len(cells), 0
        self.bar.start()
        self.cells = self.bar.add_task("cells", total=max(1, sum(self.rounds.values())), info=f"0/{self.n} cells")
        if probes:
            self.probes = self.bar.add_task("leakage audit", total=probes, info="")

    def advance(self, key: str) -> None:
        self.seen[key] = self.seen.get(key, 0) + 1
        self.bar.advance(self.cells, 1)

    def cell_done(self, cell, result: dict) -> None:
        self.done += 1
        rest = self.rounds.get(cell.key, 0) - self.seen.get(cell.key, 0)
        self.bar.update(self.cells, advance=max(0, rest), info=f"{self.done}/{self.n} cells")
        if result["status"] not in ("done", "elsewhere"):
            self.bar.console.print(f"[red]failed[/] {cell.label}: {result.get('error', '')}", highlight=False)

    def probe_done(self) -> None:
        self.bar.advance(self.probes, 1)

    def stop(self) -> None:
        if self.cells is not None:
            self.bar.stop()


def bench(grid: Path = typer.Argument(..., help="grid YAML (attacks x defenses x seeds)"),
          db: Optional[Path] = typer.Option(None, help="SQLite results store (default: results/<grid name>.db)"),
          workers: Optional[int] = typer.Option(None, min=1,
                                                help="parallel worker processes (default: the grid's workers); with "
                                                "--ray, cells in flight (default: the cluster's CPUs)"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override a grid field: key.sub=value"),
          limit: Optional[int] = typer.Option(None, min=1, help="run at most N pending cells, then stop"),
          redo: Optional[List[str]] = typer.Option(None, help="run ATTACK/DEFENSE cells again even when done "
                                                   "(a glob such as 'fang_krum/*'; repeatable)"),
          out: Optional[Path] = typer.Option(None, help="also write the HTML report into this folder"),
          ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                            help="run the cells as Ray tasks on the cluster at ADDRESS (host:port, "
                                            "ray://host:10001, auto; none: RAY_ADDRESS, else the cluster `ray start` "
                                            "made here, else a new local one); results land in --db here"),
          plugin: Optional[List[str]] = typer.Option(None, "--plugin", metavar="FILE_OR_MODULE",
                                                     help="import your own module first: a .py file or a dotted "
                                                     "module name (repeatable); grid workers import it too")):
    """Run an attack x defense grid: parallel, stored, resumable (cells already done are skipped)."""
    ran: list = []  # the grid's outcome, once it ran
    try:
        _bench(grid, db, workers, set_, limit, redo, out, ray, plugin, ran)
    except click.exceptions.Exit as e:  # fail(), its message printed
        _leave_if_ray_hangs(ran, e.exit_code)
        raise
    _leave_if_ray_hangs(ran, 0)


def _leave_if_ray_hangs(ran: list, code: int) -> None:
    """When Ray's shutdown hung on the head and was left running (phalanx.bench_ray.shutdown), end
    the process now with ``code``: finalizing the interpreter under it can crash, or wait for it."""
    if not (ran and ran[0].ray_left):
        return
    import os

    console.file.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _bench(grid, db, workers, set_, limit, redo, out, ray, plugin, ran: list) -> None:
    import phalanx  # noqa: F401  (registers everything)
    from ..bench import load_grid, run_grid
    from ..plugins import command_line

    try:
        spec = load_grid(grid, set_ or [], plugins=command_line(plugin))
        db = db or Path("results") / f"{spec.name}.db"
        bar = RichProgress(console)
        try:
            outcome = run_grid(spec, db, workers=workers, limit=limit, progress=bar, redo=redo or [], ray=ray)
            ran.append(outcome)
        finally:
            bar.stop()
        console.print(f"{spec.name}: {outcome.total} cells, {outcome.skipped} already done (or taken by another process), {outcome.ran} run, "
                      f"{len(outcome.failed)} failed, {outcome.probes} leakage probes, "
                      f"{outcome.seconds:.1f} s; stored in {db}", highlight=False)
        if outcome.interrupted:
            fail(f"interrupted; rerun the same command to resume ({db} keeps the finished cells)")
        try:
            _print_table(db, spec.name)
            if out is not None:
                _write(db, out, spec.name)
        except PhalanxError as e:
            if not outcome.failed:
                raise
            console.print(f"no table: {e}", highlight=False)
        if outcome.failed:
            label, err = outcome.failed[0]
            fail(f"{len(outcome.failed)} cell(s) failed (stored with their error; the report counts each as "
                  f"accuracy 0 and lists them; a rerun tries them again); first: {label}: {err}")
    except PhalanxError as e:
        fail(str(e))


def report(db: Path = typer.Argument(..., help="SQLite results store (of `phalanx bench` or `phalanx run`)"),
           out: Path = typer.Option(Path("results/report"), help="folder for report.html and report.md"),
           grid: Optional[str] = typer.Option(None, help="only this grid (default: every grid in the store)"),
           plugin: Optional[List[str]] = typer.Option(None, "--plugin", metavar="FILE_OR_MODULE",
                                                      help="import your own module first (repeatable)")):
    """A grid's comparison table and HTML report with plots; for plain runs, accuracy curves and client panels."""
    from ..plugins import command_line
    from ..report import is_grid_store

    try:
        command_line(plugin)
        if grid is None and not is_grid_store(db):
            _runs_report(db, out)
            return
        _print_table(db, grid)
        _write(db, out, grid)
    except PhalanxError as e:
        fail(str(e))


def _print_table(db: Path, grid: str | None) -> None:
    from ..report import build, terminal_table

    rep = build(db, grid)
    console.print(terminal_table(rep.results, rep.rows))
    if rep.results.failed:
        console.print(f"({len(rep.results.failed)} runs failed and count as accuracy 0; the report lists them)",
                      highlight=False)
    if rep.results.missing:
        console.print(f"({rep.results.missing} cells not run yet)", highlight=False)


def _write(db: Path, out: Path, grid: str | None) -> None:
    from ..report import write_report

    rep = write_report(db, out, grid)
    console.print(f"report: {rep.html} and {rep.markdown}", highlight=False)


def _runs_report(db: Path, out: Path) -> None:
    from ..report.runs import write_runs_report
    from ..store import Store

    rep = write_runs_report(db, out)
    with Store(db) as store:
        console.print(runs_table(store.runs(), f"{len(rep.runs)} run(s) in {db} (no grid)"))
    console.print(f"report: {rep.html} and {rep.markdown}", highlight=False)


class _BenchCommand(TyperCommand):
    """``bench``, whose ``--ray`` takes an optional value (typer has no such option): alone, it
    means Ray's default cluster ('')."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for i, p in enumerate(self.params):
            if p.name == "ray":
                self.params[i] = click.Option(p.opts, is_flag=False, flag_value="", default=None,
                                              metavar="[ADDRESS]", help=p.help)


def register(app: typer.Typer) -> None:
    """Add ``bench`` and ``report`` to a typer app."""
    app.command(cls=_BenchCommand)(bench)
    app.command()(report)


if __name__ == "__main__":  # python -m phalanx.cli.bench bench GRID ...
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    sys.exit(_app())
