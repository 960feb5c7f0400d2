"""Reports: the comparison of attack x defense grids (table in the terminal, Markdown, HTML, plots),
and for stores of plain runs the runs with their accuracy curves and per-client panels.

``write_report(db, out)`` reads a results store written by ``phalanx bench`` and writes
``report.html`` (self-contained) and ``report.md`` into ``out``; ``write_runs_report(db, out)``
(in :mod:`phalanx.report.runs`) does the same for a store written by ``phalanx run``;
``is_grid_store(db)`` tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PhalanxError
from ..store import Store
from .tables import (THRESHOLDS, Results, Summary, detail, failures, headline, legend, load_results, markdown_table,
                     rich_table, summarize, tick)


@dataclass
class Report:
    results: Results
    rows: list[Summary]
    html: Path | None = None
    markdown: Path | None = None


def markdown(res: Results, rows: list[Summary]) -> str:
    """The comparative table and the per-attack tables as Markdown."""
    cols, text, _ = headline(res, rows)
    out = ["# phalanx: attacks x defenses", "", markdown_table(cols, text), "", legend(res), ""]
    for s in res.scenarios:
        c, t, _ = detail(res, rows, s)
        out += [f"## Per attack: {s[0]}, {s[1]}, byzantine {s[2]:g}", "", markdown_table(c, t), ""]
    if res.failed:
        c, t = failures(res)
        out += ["## Failed runs (each counts as accuracy 0)", "", markdown_table(c, t), ""]
    return "\n".join(out)


def terminal_table(res: Results, rows: list[Summary]):
    """The comparative table as a rich Table (ticks coloured)."""
    cols, text, ticks = headline(res, rows)
    return rich_table(cols, text, ticks, title="Which defense holds against which attack")


def build(db: str | Path, grid: str | None = None) -> Report:
    """Read and summarise a store's grid results (raises PhalanxError when there are none)."""
    if not Path(db).is_file():
        raise PhalanxError(f"db: expected a results store written by `phalanx bench`, got a missing file {db}")
    store = Store(db)
    try:
        res = load_results(store, grid)
    finally:
        store.close()
    if not res.runs:
        raise PhalanxError(f"{db}: the grid has no finished cells yet; run `phalanx bench GRID --db {db}`")
    return Report(res, summarize(res))


def is_grid_store(db: str | Path) -> bool:
    """Does the store at ``db`` hold grid results (written by ``phalanx bench``)?"""
    import sqlite3

    if not Path(db).is_file():
        raise PhalanxError(f"db: expected a results store, got a missing file {db}")
    try:
        con = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='bench_cells'").fetchone()
            return row is not None and con.execute("SELECT 1 FROM bench_cells LIMIT 1").fetchone() is not None
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise PhalanxError(f"{db}: not a phalanx results store ({e})") from None


def write_report(db: str | Path, out: str | Path, grid: str | None = None) -> Report:
    """Write ``report.html`` (figures inlined) and ``report.md`` into ``out``; return what was written."""
    from .html import render
    from .plots import all_figures

    rep = build(db, grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(db)
    try:
        figures = all_figures(rep.results, rep.rows, store)
    finally:
        store.close()
    rep.html = out / "report.html"
    rep.html.write_text(render(rep.results, rep.rows, figures), encoding="utf-8")
    rep.markdown = out / "report.md"
    rep.markdown.write_text(markdown(rep.results, rep.rows), encoding="utf-8")
    return rep


__all__ = ["THRESHOLDS", "Report", "Results", "Summary", "build", "is_grid_store", "load_results", "markdown",
           "summarize", "terminal_table", "tick", "write_report"]
