"""The ``phalanx`` command line: run, list, show (and, from later modules, keys, invert, bench, report)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import PhalanxError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="phalanx: federated learning under Byzantine attack.")
console = Console()


def fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(1)


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


@app.command()
def run(config: Path = typer.Argument(..., help="experiment YAML"),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="override a field: key.sub=value"),
        db: Path = typer.Option(Path("results/phalanx.db"), help="SQLite results store"),
        quiet: bool = typer.Option(False, "--quiet", help="no per-round lines"),
        checkpoint: Optional[Path] = typer.Option(
            None, help="checkpoint file, saved every round (default: checkpoints/RUN_ID.pt beside the store)"),
        resume: bool = typer.Option(False, "--resume", help="continue the newest interrupted run of this "
                                    "config from its checkpoint")):
    """Run one experiment, with a progress bar and a final summary table."""
    import phalanx  # noqa: F401  (registers everything)
    from .checkpoint import load_checkpoint
    from .config import load_config
    from .federation import Federation
    from .store import Store

    try:
        cfg = load_config(config, set_ or [])
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
                    bar.update(task, acc=f"acc {m['accuracy']:.4f}")
                    if not quiet:
                        extra = "".join(f"  {k} {m[k]:.3f}" for k in sorted(m) if k.startswith("asr"))
                        bar.console.print(f"round {res.round + 1:>3}/{rounds}  accuracy {m['accuracy']:.4f}  "
                                          f"loss {m['loss']:.4f}  rejected {m['rejected']}{extra}  "
                                          f"({m['seconds']:.1f}s)", highlight=False)
                bar.advance(task)

            try:
                final = fedn.run(store, run_id=run_id, on_round=on_round, checkpoint=checkpoint)
            except KeyboardInterrupt:
                bar.stop()
                console.print(f"[bold yellow]interrupted[/] after round {fedn.round}; run {run_id} is marked "
                              f"'interrupted'. Resume with: phalanx run {config} --db {db} --resume"
                              + "".join(f" --set {s}" for s in set_ or []), highlight=False)
                raise typer.Exit(130)
        summary(cfg, final, fedn.run_id, db)
    except PhalanxError as e:
        fail(str(e))


def checkpoint_path(db: Path, run_id: str) -> Path:
    return db.parent / "checkpoints" / f"{run_id}.pt"


def resumable_run(store, cfg, db: Path, checkpoint: Path | None) -> tuple[str, Path]:
    """The newest unfinished run of this exact config that has a checkpoint: (run id, checkpoint)."""
    from .checkpoint import load_checkpoint
    from .store import dumps

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
    rows += [(k, fmt(v)) for k, v in final.items()]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    console.print(f"stored in {db}")


@app.command("list")
def list_():
    """What is registered: datasets, models, attacks, data poisons and defenses."""
    import phalanx  # noqa: F401
    from .registry import ATTACKS, DATASETS, DEFENSES, MODELS, POISONS

    for reg in (DATASETS, MODELS, ATTACKS, POISONS, DEFENSES):
        t = Table(title=f"{reg.kind}s", title_justify="left")
        t.add_column("name", style="bold")
        t.add_column("parameters")
        t.add_column("description")
        for name, params, doc in reg.describe():
            t.add_row(name, params, doc)
        console.print(t)


@app.command()
def show(db: Path = typer.Argument(..., help="SQLite results store")):
    """The runs in a store with their final metrics."""
    from .store import Store

    if not db.is_file():
        fail(f"no results store at {db}")
    try:
        runs = Store(db).runs()
    except PhalanxError as e:
        fail(str(e))
    t = Table(title=f"runs in {db}")
    for col in ("run id", "name", "seed", "status", "started", "minutes", "accuracy", "other final metrics"):
        t.add_column(col, no_wrap=col in ("run id", "name"))
    for r in runs:
        started = dt.datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M")
        minutes = f"{(r['ended'] - r['started']) / 60:.1f}" if r["ended"] else "-"
        other = ", ".join(f"{k} {fmt(v, 3)}" for k, v in r["final"].items() if k not in ("accuracy", "loss"))
        t.add_row(r["run_id"], r["name"], str(r["seed"]), r["status"], started, minutes,
                  fmt(r["final"].get("accuracy")), other)
    console.print(t)


def _mount_subcommands() -> None:
    """Attach the sub-commands that live in their own modules."""
    from .bench_cli import register as register_bench
    from .invert_cli import app as invert_app
    from .keys_cli import app as keys_app

    app.add_typer(keys_app, name="keys", help="Client key management (ECDSA P-256).")
    app.add_typer(invert_app, name="invert")
    register_bench(app)


_mount_subcommands()


def main() -> None:
    try:
        app()
    except PhalanxError as e:  # a last resort: no traceback for bad input
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
