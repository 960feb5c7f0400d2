"""Figures of a grid (matplotlib, Agg backend), each rendered to PNG bytes with a caption.

A figure whose data is missing comes back with ``png=None`` and a ``note`` saying why, so the
report can say what it skipped instead of failing.
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..store import Store  # noqa: E402
from .tables import Results, Summary  # noqa: E402

NCOLS = 4


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _panels(n: int, w: float = 3.4, h: float = 2.5):
    cols = max(1, min(n, NCOLS))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in flat[:n]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    return fig, flat[:n]


def _legend_and_layout(fig, axes) -> None:
    """One legend below the panels with every label drawn in any of them (a panel may be empty)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if not seen:
        fig.tight_layout()
        return
    ncol = min(len(seen), 8)
    lines = math.ceil(len(seen) / ncol)
    room = min(0.4, 0.25 * lines / fig.get_figheight() + 0.02)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, room, 1, 1))


def _colours(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {d: cmap(i % cmap.N) for i, d in enumerate(labels)}


def line_styles(labels: list[str]) -> dict[str, dict]:
    """A colour and a line style per label that stay distinguishable past ten lines: the ten tab10
    colours solid, then the same colours dashed, dotted and dash-dotted."""
    cmap = plt.get_cmap("tab10")
    dashes = ("-", "--", ":", "-.")
    return {lab: {"color": cmap(i % 10), "linestyle": dashes[(i // 10) % len(dashes)]} for i, lab in enumerate(labels)}


def _scen(s) -> str:
    return f"{s[0]}, {s[1]}, byzantine {s[2]:g}"


def _mean_series(runs, key: str) -> tuple[list[int], list[float]]:
    """Per-round mean over runs of a numeric metric (rounds with no value skipped)."""
    by_round: dict[int, list[float]] = {}
    for r in runs:
        for i, v in enumerate(r.series(key)):
            if v is not None and math.isfinite(v):
                by_round.setdefault(i, []).append(v)
    xs = sorted(by_round)
    return [x + 1 for x in xs], [statistics.fmean(by_round[x]) for x in xs]


def heatmap(res: Results, rows: list[Summary], scenario, metric: str) -> Figure:
    """Defense x attack, coloured by final accuracy (non-backdoor attacks) or ASR (backdoors)."""
    backdoor = metric == "asr"
    attacks = [a for a, f in res.attacks.items() if (f == "backdoor") == backdoor]
    key = f"heatmap-{metric}-{'-'.join(str(x) for x in scenario)}"
    title = f"{'Attack success rate' if backdoor else 'Final accuracy'}: defense x attack"
    cap = (f"{title} ({_scen(scenario)}), mean over seeds, in %. "
           + ("Green: backdoor held off (low ASR)." if backdoor else
              "Colour scale from the best cell (green) to 30 points below it (red)."))
    if not attacks:
        return Figure(key, title, cap, note="no backdoor attacks in this grid" if backdoor else "no attacks")
    import numpy as np

    M = np.full((len(rows), len(attacks)), np.nan)
    for i, s in enumerate(rows):
        for j, a in enumerate(attacks):
            e = s.cells.get((scenario, a))
            stat = (e.asr if backdoor else e.acc) if e else None
            if stat:
                M[i, j] = stat.mean
    lo, hi = 0.0, 1.0
    if not backdoor and not np.isnan(M).all():  # colour the band from 30 points below the best to the best
        hi = float(np.nanmax(M))
        lo = max(0.0, hi - 0.3)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(attacks), 0.9 + 0.42 * len(rows)))
    im = ax.imshow(M, cmap="RdYlGn_r" if backdoor else "RdYlGn", vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), [s.label for s in rows])
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if not np.isnan(M[i, j]):
                ax.text(j, i, f"{100 * M[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=10)
    return Figure(key, title, cap, _png(fig))


def curves(res: Results, scenario, metric: str) -> Figure:
    """One panel per attack, one line per defense: ``metric`` per round, mean over seeds."""
    backdoor = metric == "asr"
    attacks = [a for a, f in res.attacks.items() if not backdoor or f == "backdoor"]
    name = "Attack success rate" if backdoor else "Test accuracy"
    cap = f"{name} per round, mean over seeds ({_scen(scenario)}); one panel per attack, one line per defense."
    if not attacks:
        return Figure(f"curves-{metric}", f"{name} per round", cap, note="no backdoor attacks in this grid")
    colours = _colours(res.defenses)
    fig, axes = _panels(len(attacks))
    for ax, a in zip(axes, attacks):
        for d in res.defenses:
            xs, ys = _mean_series(res.group(scenario, a, d), metric)
            if xs:
                ax.plot(xs, ys, color=colours[d], label=d, lw=1.4)
        ax.set_title(a, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("round", fontsize=8)
    _legend_and_layout(fig, axes)
    return Figure(f"curves-{metric}", f"{name} per round", cap, _png(fig))


def detection(res: Results, scenario) -> Figure:
    """Detection precision and recall per round, per defense, mean over the attacked cells."""
    cap = ("Detection precision (rejected clients that were malicious) and recall (malicious clients "
           f"rejected) per round, mean over attacked cells and seeds ({_scen(scenario)}). Defenses that "
           "never reject have no precision line.")
    title = "Detection precision and recall"
    colours = _colours(res.defenses)
    fig, (p_ax, r_ax) = _panels(2, w=5, h=3.2)
    p_ax.sharex(r_ax)  # the same rounds on both (precision may have a single point)
    drawn = False
    for d in res.defenses:
        runs = [r for r in res.runs if r.scenario == scenario and r.defense == d and r.family != "none"]
        for ax, key in ((p_ax, "det_precision"), (r_ax, "det_recall")):
            xs, ys = _mean_series(runs, key)
            if xs:
                ax.plot(xs, ys, color=colours[d], label=d, lw=1.4, marker="o", ms=2.5)  # a lone point shows
                drawn = True
    for ax, t in ((p_ax, "precision"), (r_ax, "recall")):
        ax.set_title(t, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("round", fontsize=8)
    if not drawn:
        plt.close(fig)
        return Figure("detection", title, cap, note="no attacked cells with detection metrics")
    _legend_and_layout(fig, (p_ax, r_ax))
    return Figure("detection", title, cap, _png(fig))


def _client_rows(store: Store, run_id: str, cache: dict) -> list[dict]:
    if run_id not in cache:
        cache[run_id] = store.client_rows(run_id)
    return cache[run_id]


def _first_run(res: Results, scenario, attack: str, defense: str):
    runs = sorted(res.group(scenario, attack, defense), key=lambda r: r.seed)
    return runs[0] if runs else None


def reputation(res: Results, store: Store, scenario, cache: dict) -> Figure:
    """Mean reputation of honest and of malicious clients per round (the client rows' reputation_score)."""
    title = "Reputation over rounds"
    cap = (f"Mean reputation of honest (blue) and malicious (red) clients per round, first seed "
           f"({_scen(scenario)}); one panel per defense that keeps a reputation and per attack.")
    panels = []
    for d in res.defenses:
        for a, f in res.attacks.items():
            run = _first_run(res, scenario, a, d) if f != "none" else None
            if run is None:
                continue
            rows = _client_rows(store, run.run_id, cache)
            bad = {c["client_id"] for c in rows if c["malicious"]}
            per = {}  # round -> {client: score}
            for c in rows:  # what the reputation layer held that round
                if c.get("reputation_score") is not None:
                    per.setdefault(c["round"], {})[c["client_id"]] = c["reputation_score"]
            if per:
                panels.append((d, a, per, bad))
    if not panels:
        return Figure("reputation", title, cap, note="no run stored reputation scores (no reputation layer in the grid)")
    fig, axes = _panels(len(panels[:12]))
    for ax, (d, a, per, bad) in zip(axes, panels[:12]):
        xs = sorted(per)
        for mal, colour, lab in ((False, "tab:blue", "honest"), (True, "tab:red", "malicious")):
            ys = [statistics.fmean(v) if (v := [s for c, s in per[x].items() if (c in bad) == mal]) else math.nan
                  for x in xs]
            ax.plot([x + 1 for x in xs], ys, color=colour, label=lab, lw=1.4)
        ax.set_title(f"{d} / {a}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("round", fontsize=8)
    _legend_and_layout(fig, axes)
    note = f"showing 12 of {len(panels)} panels" if len(panels) > 12 else None
    return Figure("reputation", title, cap, _png(fig), note)


def distribution(res: Results, store: Store, scenario, key: str, cache: dict) -> Figure:
    """Per round, the 10-50-90% quantiles of a client statistic, honest and malicious apart."""
    what = {"norm": "L2 norm of each update", "cosine": "cosine similarity of each update to the aggregate"}[key]
    d = res.baseline if res.baseline in res.defenses else (res.defenses[0] if res.defenses else None)
    title = f"Distribution of the {what}"
    cap = (f"{what[0].upper() + what[1:]} per round: median line and 10-90% band, honest (blue) and malicious "
           f"(red) clients apart, under defense '{d}', first seed ({_scen(scenario)}); one panel per attack.")
    runs = [(a, r) for a in res.attacks if d and (r := _first_run(res, scenario, a, d))]
    if not runs:
        return Figure(f"dist-{key}", title, cap, note="no runs")
    import numpy as np

    fig, axes = _panels(len(runs))
    for ax, (a, run) in zip(axes, runs):
        rows = [c for c in _client_rows(store, run.run_id, cache) if c.get(key) is not None]
        for mal, colour in ((False, "tab:blue"), (True, "tab:red")):
            by: dict[int, list[float]] = {}
            for c in rows:
                if c["malicious"] == mal:
                    by.setdefault(c["round"], []).append(c[key])
            if not by:
                continue
            xs = sorted(by)
            q = np.array([np.quantile(by[x], [0.1, 0.5, 0.9]) for x in xs])
            xs1 = [x + 1 for x in xs]
            ax.fill_between(xs1, q[:, 0], q[:, 2], color=colour, alpha=0.2, lw=0)
            ax.plot(xs1, q[:, 1], color=colour, lw=1.4, label="malicious" if mal else "honest")
        ax.set_title(a, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        if key == "norm":
            ax.set_yscale("symlog", linthresh=1e-3)
    _legend_and_layout(fig, axes)
    return Figure(f"dist-{key}", title, cap, _png(fig))


def drift(res: Results, scenario) -> Figure:
    """Distance of the global model from the previous round, per attack and defense."""
    title = "Global model drift"
    cap = (f"L2 distance of the global model from the previous round (round metric 'drift'), mean over seeds "
           f"({_scen(scenario)}); one panel per attack, one line per defense, log scale.")
    attacks = [a for a in res.attacks if any(r.attack == a and r.final("drift") is not None for r in res.runs)]
    if not attacks:
        return Figure("drift", title, cap, note="the runs stored no 'drift' metric")
    colours = _colours(res.defenses)
    fig, axes = _panels(len(attacks))
    for ax, a in zip(axes, attacks):
        for d in res.defenses:
            xs, ys = _mean_series(res.group(scenario, a, d), "drift")
            if xs:
                ax.plot(xs, ys, color=colours[d], label=d, lw=1.4)
        ax.set_title(a, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("round", fontsize=8)
    _legend_and_layout(fig, axes)
    return Figure("drift", title, cap, _png(fig))


def privacy_utility(res: Results, rows: list[Summary]) -> Figure:
    """Median iDLG PSNR (leakage) against clean accuracy, one point per defense."""
    title = "Privacy-utility trade-off"
    cap = ("Median PSNR of iDLG reconstructions from the update each defense lets through (lower: less "
           "leakage) against the defense's final accuracy without attack (worst setting).")
    pts = [(s.defense, s.psnr, s.clean.acc.mean) for s in rows if s.psnr is not None and s.clean and s.clean.acc]
    if not pts:
        return Figure("privacy", title, cap, note="no leakage audit stored: add `privacy: {seeds: 3, steps: 200}` "
                                                  "to the grid")
    colours = _colours(res.defenses)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs, ys = [p[1] for p in pts], [100 * p[2] for p in pts]
    dx, dy = 0.03 * ((max(xs) - min(xs)) or 10), 0.075 * ((max(ys) - min(ys)) or 2)
    placed: list[tuple[float, float]] = []
    for d, x, y in sorted(pts, key=lambda p: p[2]):
        ax.scatter([x], [100 * y], color=colours[d], s=40)
        ly = 100 * y
        while any(abs(ly - py) < dy and abs(x - px) < 4 * dx for px, py in placed):  # no overlapping labels
            ly += dy
        placed.append((x, ly))
        ax.annotate(d, (x, 100 * y), xytext=(x + dx, ly), textcoords="data", fontsize=8, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
    ax.set_xlim(min(xs) - 2 * dx, max(xs) + 10 * dx)
    ax.set_xlabel("iDLG PSNR, dB (lower = more private)")
    ax.set_ylabel("clean accuracy, %")
    ax.grid(alpha=0.3)
    return Figure("privacy", title, cap, _png(fig))


def all_figures(res: Results, rows: list[Summary], store: Store) -> list[Figure]:
    """Every figure of the report, in order."""
    figs: list[Figure] = []
    for s in res.scenarios:
        figs += [heatmap(res, rows, s, "accuracy"), heatmap(res, rows, s, "asr")]
    if not res.scenarios:
        return [privacy_utility(res, rows)]
    s, cache = res.scenarios[0], {}
    figs += [curves(res, s, "accuracy"), curves(res, s, "asr"), detection(res, s), reputation(res, store, s, cache),
             distribution(res, store, s, "norm", cache), distribution(res, store, s, "cosine", cache),
             drift(res, s), privacy_utility(res, rows)]
    return figs
