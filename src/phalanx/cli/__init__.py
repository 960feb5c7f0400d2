"""The ``phalanx`` command line (typer + rich), one module per group of commands.

``core`` holds the root app with run, list, show and export; ``bench`` adds bench and report,
``invert`` the gradient-inversion audit and ``keys`` the key registry. They are mounted here, so
``phalanx.cli:main`` (the console script) and ``phalanx.cli.app`` see every command.
"""

from __future__ import annotations

from . import bench, invert, keys
from .common import metric, runs_table
from .core import app, main

app.add_typer(keys.app, name="keys", help="Client key management (ECDSA P-256).")
app.add_typer(invert.app, name="invert")
bench.register(app)

__all__ = ["app", "main", "metric", "runs_table"]
