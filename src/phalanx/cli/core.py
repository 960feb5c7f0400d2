"""The root ``phalanx`` app and its commands run, list, show and export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import PhalanxError
from .common import console, fail, fmt, is_fraction, metric, plugin_option, runs_table, use_plugins

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="phalanx: federated learning under Byzantine attack.")


@app.callback()
def _root(plugin: Optional[List[str]] = plugin_option()) -> None:
    """phalanx: federated learning under Byzantine attack."""
    from ..plugins import set_command_line

    try:
        set_command_line(plugin)
    except PhalanxError as e:
        fail(str(e))


@app.command()
def run(config: Path = typer.Argument(..., help="experiment YAML"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field: key.sub=value"),
        db: Path = typer.Option(Path("results/phalanx.db"), help="SQLite results store"),
        quiet: bool = typer.Option(False, "--quiet", help="no per-round lines"),
        checkpoint: Optional[Path] = typer.Option(
            None, help="checkpoint file, saved every round (default: checkpoints/RUN_ID.pt beside the store)"),
        resume: bool = typer.Option(False, "--resume", help="continue the newest interrupted run of this "
                                    "config from its checkpoint"),
        plugin: Optional[List[str]] = plugin_option()):
    """Run one experiment, with a progress bar and a final summary table."""
    import phalanx  # noqa: F401  (registers everything)
    from ..checkpoint import load_checkpoint
    from ..config import load_config
    from ..federation import Federation
    from ..store import Store

    plugins = use_plugins(plugin)
    try:
        cfg = load_config(config, set_ or [], plugins=plugins)
        fedn = Federation(cfg)
        store = Store(db)
        if resume:
            run_id, checkpoint = resumable_run(store, cfg, db, checkpoint)
            console.print(f"resuming run {run_id} from {checkpoint}", highlight=False)
        else:  # a fresh run id, and a checkpoint path of its own: two runs of one config never share one
            run_id = store.start_run(cfg.model_dump(), cfg.name, cfg.seed)
            checkpoint = checkpoint or checkpoint_path(db, run_id)
            if checkpoint.exists():
                checkpoint.unlink()
        console.print(f"run {run_id}", highlight=False)
        rounds = cfg.federation.rounds
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            start = load_checkpoint(checkpoint)["round"] if resume else 0
            task = bar.add_task(cfg.name, total=rounds, acc="", completed=start)

            def on_round(res):
                m = res.metrics
                if "accuracy" in m:
                    bar.update(task, acc=f"accuracy {metric('accuracy', m['accuracy'])}")
                    if not quiet:
                        extra = "".join(f"  {k} {metric(k, m[k])}" for k in sorted(m)
                                        if k.startswith("asr") and m[k] is not None)
                        bar.console.print(f"round {res.round + 1:>3}/{rounds}  accuracy {metric('accuracy', m['accuracy'])}  "
                                          f"loss {m['loss']:.4f}  rejected {m['rejected']}{extra}  "
                                          f"({m['seconds']:.1f}s)", highlight=False)
                bar.advance(task)

            from ..bench import sigterm_interrupts

            restore = sigterm_interrupts()  # `kill` marks the run interrupted, like Ctrl-C
            try:
                final = fedn.run(store, run_id=run_id, on_round=on_round, checkpoint=checkpoint)
            except KeyboardInterrupt:
                bar.stop()
                console.print(f"[bold yellow]interrupted[/] after round {fedn.round}; run {run_id} is marked "
                              f"'interrupted'. Resume with: phalanx run {config} --db {db} --resume"
                              + "".join(f" --set {s}" for s in set_ or [])
                              + "".join(f" --plugin {p}" for p in plugins), highlight=False)
                raise typer.Exit(130)
            finally:
                restore()
        summary(cfg, final, fedn.run_id, db)
    except PhalanxError as e:
        fail(str(e))


def checkpoint_path(db: Path, run_id: str) -> Path:
    return db.parent / "checkpoints" / f"{run_id}.pt"


def resumable_run(store, cfg, db: Path, checkpoint: Path | None) -> tuple[str, Path]:
    """The newest unfinished run of this exact config that has a checkpoint: (run id, checkpoint)."""
    from ..checkpoint import load_checkpoint
    from ..store import dumps

    if checkpoint is not None:
        if not checkpoint.exists():
            fail(f"--resume: no checkpoint at {checkpoint}")
        return load_checkpoint(checkpoint)["run_id"], checkpoint
    want = cfg.model_dump()
    for r in reversed(store.runs()):
        if r["status"] in ("running", "interrupted", "failed") and checkpoint_path(db, r["run_id"]).exists():
            if store.read_run(r["run_id"]).config == json.loads(dumps(want)):
                return r["run_id"], checkpoint_path(db, r["run_id"])
    fail(f"--resume: no unfinished run of this config with a checkpoint in {db.parent / 'checkpoints'}")


def summary(cfg, final: dict, run_id: str, db: Path) -> None:
    t = Table(title=f"{cfg.name}: final metrics")
    t.add_column("field")
    t.add_column("value", justify="right")
    rows = [("run id", run_id), ("dataset", f"{cfg.data.dataset} ({cfg.data.partition})"),
            ("model", cfg.model.name), ("clients", str(cfg.federation.num_clients)),
            ("byzantine", str(cfg.num_byzantine())), ("attack", cfg.attack.name or cfg.attack.poison or "none"),
            ("defense", " -> ".join(str(d) if isinstance(d, str) else next(iter(d)) for d in cfg.defense)),
            ("rounds", str(cfg.federation.rounds))]
    rows += [(k, metric(k, v) if is_fraction(k) else fmt(v)) for k, v in final.items()]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    console.print(f"stored in {db}")


@app.command("list")
def list_(kind: Optional[str] = typer.Argument(None, metavar="[KIND]", help="only one kind: datasets, models, "
                                              "attacks, poisons, layers, aggregators or post"),
          plugin: Optional[List[str]] = plugin_option()):
    """What a config can name: datasets, models, attacks and data poisons by family, defense stages by kind."""
    import phalanx  # noqa: F401
    from ..catalog import FOOTNOTE, KEYS, tables

    use_plugins(plugin)
    if kind is not None and kind not in KEYS:
        fail(f"list: KIND must be one of {', '.join(KEYS)}, got {kind!r}")
    for t in tables(kind):
        console.print(t)
        console.print()
    console.print(FOOTNOTE, style="dim", highlight=False)


@app.command()
def show(db: Path = typer.Argument(..., help="SQLite results store"),
         plugin: Optional[List[str]] = plugin_option()):
    """The runs in a store with their final metrics (accuracy and other rates in %)."""
    from ..store import Store

    use_plugins(plugin)
    if not db.is_file():
        fail(f"no results store at {db}")
    try:
        runs = Store(db).runs()
    except PhalanxError as e:
        fail(str(e))
    console.print(runs_table(runs, f"{len(runs)} run(s) in {db}"))


@app.command()
def export(db: Path = typer.Argument(..., help="SQLite results store"),
           format: str = typer.Option("csv", "--format", help="csv or json"),
           out: Path = typer.Option(Path("results/export"), help="folder for runs, rounds, clients and events files"),
           plugin: Optional[List[str]] = plugin_option()):
    """Write a store's runs, rounds, clients and events tables as CSV or JSON files."""
    from ..export import export_store

    use_plugins(plugin)
    try:
        written = export_store(db, out, format)
    except PhalanxError as e:
        fail(str(e))
    for table, (path, n) in written.items():
        console.print(f"{table:8} {n:>8} rows  {path}", highlight=False)


def main() -> None:
    try:
        app()
    except PhalanxError as e:  # a last resort: no traceback for bad input
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
