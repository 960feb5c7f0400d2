"""A report of plain runs (stores written by ``phalanx run``, with no grid): the runs with their
final metrics, test accuracy (and AUPRC for binary tasks) per round for every run, and per-client panels
for each run.

``write_runs_report(db, out)`` writes ``report.html`` (self-contained) and ``report.md`` into ``out``.
The client panels show, per round, each client's update norm (malicious clients in red when the
run had an attack) and the weight the defense gave each client (0: rejected).
"""

from __future__ import annotations

import datetime as dt
import html
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import PhalanxError
from ..store import RunRecord, Store
from .plots import STYLE, Figure, _png, line_styles, plt

MAX_CLIENT_PANELS = 12  # the newest runs get client panels; older ones are listed only


@dataclass
class RunsReport:
    runs: list[RunRecord]
    html: Path | None = None
    markdown: Path | None = None


def load_runs(store: Store) -> list[RunRecord]:
    """Every run of the store with its rounds, oldest first."""
    return [store.read_run(r["run_id"]) for r in store.runs()]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _label(run: RunRecord) -> str:
    return f"{run.name or 'run'} ({run.run_id[:6]})"


def _series(run: RunRecord, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"] + 1, r[key]) for r in run.rounds
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves(runs: list[RunRecord], key: str = "accuracy") -> Figure:
    """One line per run: ``key`` (accuracy, AUPRC or attack success rate) per round, in %."""
    name = {"accuracy": "Test accuracy", "auprc": "Test AUPRC", "asr": "Attack success rate"}.get(key, key)
    title = f"{name} per round"
    cap = "One line per run, at every evaluation round; the legend names each run and its id."
    drawn = [(r, *_series(r, key)) for r in runs]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return Figure(f"runs-{key}", title, cap, note=f"no run stored '{key}'")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = line_styles([_label(r) for r, _, _ in drawn])
    for r, xs, ys in drawn:
        ax.plot(xs, [100 * y for y in ys], label=_label(r), lw=1.6, **styles[_label(r)])
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"{name.lower()} (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best", ncol=1 if len(drawn) <= 8 else 2)
    fig.tight_layout()
    return Figure(f"runs-{key}", title, cap, _png(fig))


def client_panels(store: Store, run: RunRecord) -> Figure:
    """Two panels for one run: each client's update norm per round, and the weight it was given."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    key = f"clients-{run.run_id}"
    title = f"Clients of {_label(run)}"
    rows = store.client_rows(run.run_id)
    if not rows:
        return Figure(key, title, "", note="this run stored no client rows")
    clients = sorted({c["client_id"] for c in rows})
    rounds = sorted({c["round"] for c in rows})
    bad = {c["client_id"] for c in rows if c["malicious"]}
    attacked = bool(bad) and bool(run.config.get("attack", {}).get("name") or run.config.get("attack", {}).get("poison"))
    ci, ri = {c: i for i, c in enumerate(clients)}, {r: j for j, r in enumerate(rounds)}
    norms = np.full((len(clients), len(rounds)), np.nan)
    weights = np.full((len(clients), len(rounds)), np.nan)
    for c in rows:
        if c["norm"] is not None:
            norms[ci[c["client_id"]], ri[c["round"]]] = c["norm"]
        if c["weight"] is not None:
            weights[ci[c["client_id"]], ri[c["round"]]] = c["weight"]
    fig, (ax_n, ax_w) = plt.subplots(1, 2, figsize=(11, 3.2 + 0.12 * min(len(clients), 40)))
    xs = [r + 1 for r in rounds]
    for c in clients:
        mal = attacked and c in bad
        ax_n.plot(xs, norms[ci[c]], color="tab:red" if mal else "tab:blue", lw=1.2 if mal else 0.8,
                  alpha=0.9 if mal else 0.55, label="malicious" if mal else "honest")
    if np.nanmax(norms, initial=0) > 0 and np.nanmax(norms) / max(np.nanmin(norms[norms > 0]), 1e-12) > 100:
        ax_n.set_yscale("log")
    ax_n.set_xlabel("round")
    ax_n.set_ylabel("update L2 norm")
    ax_n.set_title("update norm per client", fontsize=10)
    ax_n.grid(alpha=0.3)
    handles = {lab: h for h, lab in zip(*ax_n.get_legend_handles_labels())}
    ax_n.legend(handles.values(), handles.keys(), fontsize=9)
    top = np.nanmax(np.where(np.isnan(weights), 0, weights), axis=0)
    share = np.where(weights > 0, weights / np.where(top > 0, top, 1), np.nan)  # accepted rows only
    rejected = np.where(weights == 0, 1.0, np.nan)
    extent = (xs[0] - 0.5, xs[-1] + 0.5, len(clients) - 0.5, -0.5)
    ax_w.set_facecolor("#e6e6e6")  # not sampled that round
    im = ax_w.imshow(np.ma.masked_invalid(share), aspect="auto", cmap="Greens", vmin=0, vmax=1,
                     interpolation="nearest", extent=extent)
    ax_w.imshow(np.ma.masked_invalid(rejected), aspect="auto", cmap=ListedColormap(["#d62728"]), vmin=0, vmax=1,
                interpolation="nearest", extent=extent)
    if len(clients) <= 40:
        ax_w.set_yticks(range(len(clients)), [f"{c}{' *' if attacked and c in bad else ''}" for c in clients],
                        fontsize=9)
        for lab, c in zip(ax_w.get_yticklabels(), clients):
            if attacked and c in bad:
                lab.set_color("tab:red")
    ax_w.set_xlabel("round")
    ax_w.set_ylabel("client")
    ax_w.set_title("weight given (red: rejected, grey: not sampled)", fontsize=10)
    bar = fig.colorbar(im, ax=ax_w, fraction=0.04, format=PercentFormatter(1.0))
    bar.set_label("share of the round's largest weight", fontsize=9)
    for ax in (ax_n, ax_w):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    cap = ("Left: the L2 norm of each client's update per round" + (", malicious clients in red" if attacked else "")
           + ". Right: the weight the defense gave each client per round, as a share of the round's largest"
           + (" (malicious clients marked * in red)" if attacked else "") + ".")
    return Figure(key, title, cap, _png(fig))


def runs_markdown(runs: list[RunRecord]) -> str:
    lines = ["# phalanx: runs", "", "| run | name | seed | status | rounds | accuracy | other final metrics |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.run_id} | {r.name} | {r.seed} | {r.status} | {len(r.rounds)} | "
                     f"{_pct(r.final.get('accuracy'))} | {_other(r)} |")
    return "\n".join(lines) + "\n"


def _other(r: RunRecord) -> str:
    from ..cli import metric

    return ", ".join(f"{k} {metric(k, v)}" for k, v in r.final.items() if k not in ("accuracy", "loss"))


def render_runs(db: str, runs: list[RunRecord], figures: list[Figure]) -> str:
    from .html import CSS, _figure, _table

    title = "phalanx: runs"
    body = [[r.run_id, r.name or "-", str(r.seed), r.status,
             dt.datetime.fromtimestamp(r.started).strftime("%Y-%m-%d %H:%M") if r.started else "-",
             str(len(r.rounds)), _pct(r.final.get("accuracy")), _other(r)] for r in runs]
    cols = ["Run", "Name", "Seed", "Status", "Started", "Rounds", "Final accuracy", "Other final metrics"]
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
             f"<style>{CSS}</style></head><body>", f"<h1>{title}</h1>",
             f'<p class="meta">Store: {html.escape(db)} &middot; {len(runs)} run(s)</p>',
             "<h2>Runs</h2>", _table(cols, body, [[None] * len(cols) for _ in body], "runs-table"),
             "<h2>Figures</h2>", *(_figure(f) for f in figures), "</body></html>"]
    return "\n".join(parts)


def write_runs_report(db: str | Path, out: str | Path) -> RunsReport:
    """Write ``report.html`` and ``report.md`` for the plain runs of the store at ``db``."""
    if not Path(db).is_file():
        raise PhalanxError(f"db: expected a results store, got a missing file {db}")
    store = Store(db)
    try:
        runs = load_runs(store)
        if not runs:
            raise PhalanxError(f"{db}: no runs in this store yet; run `phalanx run CONFIG --db {db}` first")
        with plt.rc_context(STYLE):
            figures = [curves(runs, "accuracy")]
            for key in ("auprc", "asr"):  # AUPRC: runs of binary, imbalanced (fraud) tasks
                if any(_series(r, key)[0] for r in runs):
                    figures.append(curves(runs, key))
            newest = runs[-MAX_CLIENT_PANELS:]
            figures += [client_panels(store, r) for r in reversed(newest)]
    finally:
        store.close()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = RunsReport(runs, out / "report.html", out / "report.md")
    rep.html.write_text(render_runs(str(db), runs, figures), encoding="utf-8")
    rep.markdown.write_text(runs_markdown(runs), encoding="utf-8")
    return rep
