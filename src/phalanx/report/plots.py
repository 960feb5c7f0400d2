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
from matplotlib.ticker import (FuncFormatter, LogLocator, MaxNLocator, NullFormatter,  # noqa: E402
                               PercentFormatter)

from ..store import Store  # noqa: E402
from .tables import THRESHOLDS, Results, Summary  # noqa: E402

NCOLS = 4


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None


STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9, "figure.titlesize": 10}  # at DPI 100: text of 12 px or more
DPI = 100
# The colours of the report's ticks (its table cells use pale versions of the same three).
TICK_COLOURS = {"held": "#91cf60", "partial": "#fee08b", "broken": "#f46d43", None: "#d9d9d9"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _panels(n: int, w: float = 3.4, h: float = 2.6):
    cols = max(1, min(n, NCOLS))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in flat[:n]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
        ax.grid(alpha=0.3)
    return fig, flat[:n]


def _ylabel(axes, label: str) -> None:
    """The y-axis label on the first panel of each row of a panel grid."""
    cols = max(1, min(len(axes), NCOLS))
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel(label)


def _percent_axis(ax) -> None:
    """A 0-100% y axis for rates stored as fractions."""
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _scale(ax, values) -> None:
    """Log scale with labelled ticks when positive values span more than a decade and a half, else linear."""
    v = [x for x in values if x is not None and math.isfinite(x) and x > 0]
    if v and max(v) / min(v) > 30:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _legend_and_layout(fig, axes) -> None:
    """One legend below the panels with every label drawn in any of them (a panel may be empty)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if not seen:
        fig.tight_layout()
        return
    ncol = min(len(seen), 6)
    lines = math.ceil(len(seen) / ncol)
    room = min(0.45, 0.3 * lines / fig.get_figheight() + 0.03)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=ncol, frameon=False)
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


def _seeds(res: Results) -> str:
    n = len({r.seed for r in res.runs})
    return "one seed" if n == 1 else f"mean over {n} seeds"


def score_name(res: Results, scenario) -> str:
    """'AUPRC' where the report ticks AUPRC in ``scenario`` (a binary, imbalanced task), else 'accuracy'."""
    return "AUPRC" if res.metric(scenario) == "auprc" else "accuracy"


def cell_ticks(rows: list[Summary], scenario, attacks: list[str], backdoor: bool):
    """(values [rows, attacks] with NaN where missing, the tick of each cell, the clean references seen):
    a heatmap cell takes the colour of the same tick as the table's cell (``TICK_COLOURS``)."""
    import numpy as np

    M = np.full((len(rows), len(attacks)), np.nan)
    ticks: list[list[str | None]] = [[None] * len(attacks) for _ in rows]
    refs = set()
    for i, s in enumerate(rows):
        for j, a in enumerate(attacks):
            e = s.cells.get((scenario, a))
            stat = (e.asr if backdoor else e.acc) if e else None
            if stat:
                M[i, j] = stat.mean
                ticks[i][j] = e.tick
                if e.reference is not None:
                    refs.add(round(e.reference, 9))
    return M, ticks, refs


def heatmap(res: Results, rows: list[Summary], scenario, metric: str) -> Figure:
    """Defense x attack, each cell coloured by its tick (the table's thresholds), its value printed in %;
    ``metric`` is 'asr' for the backdoors, else the scenario's score (accuracy or AUPRC)."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.cm import ScalarMappable

    backdoor = metric == "asr"
    attacks = [a for a, f in res.attacks.items() if (f == "backdoor") == backdoor]
    key = f"heatmap-{metric}-{'-'.join(str(x) for x in scenario)}"
    score = score_name(res, scenario)
    title = f"{'Attack success rate' if backdoor else 'Final ' + score}: defense x attack"
    if backdoor:
        cap = (f"{_scen(scenario)}; {_seeds(res)}. Colours are the table's ticks: green held off (ASR under "
               f"{100 * THRESHOLDS['asr_held']:g}%), yellow partial (under {100 * THRESHOLDS['asr_partial']:g}%), "
               "red broken.")
    else:
        cap = (f"{_scen(scenario)}; {_seeds(res)}. Colours are the table's ticks against the clean {score}: "
               f"green held (within {THRESHOLDS['accuracy_held']:g} points), yellow partial (within "
               f"{THRESHOLDS['accuracy_partial']:g}), red broken; in the clean column, each defense's own clean "
               f"{score} against the reference.")
    if not attacks:
        return Figure(key, title, cap, note="no backdoor attacks in this grid" if backdoor else "no attacks")
    kinds = ["broken", "partial", "held", None]
    M, ticks, refs = cell_ticks(rows, scenario, attacks, backdoor)
    K = np.array([[float(kinds.index(t)) for t in row] for row in ticks])
    colours = ListedColormap([TICK_COLOURS[k] for k in kinds])
    fig, ax = plt.subplots(figsize=(2.2 + 1.0 * len(attacks), 1.1 + 0.45 * len(rows)))
    ax.imshow(K, cmap=colours, vmin=-0.5, vmax=len(kinds) - 0.5, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [s.label for s in rows])
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if not np.isnan(M[i, j]):
                ax.text(j, i, f"{100 * M[i, j]:.1f}%", ha="center", va="center", fontsize=10)
    # the key: the three ticks, with their bounds in % where one clean reference sets them
    if backdoor:
        bounds = [0.0, THRESHOLDS["asr_held"], THRESHOLDS["asr_partial"], 1.0]
        bar_colours = [TICK_COLOURS["held"], TICK_COLOURS["partial"], TICK_COLOURS["broken"]]
    elif len(refs) == 1:
        ref = refs.pop()
        lo, mid = ref - THRESHOLDS["accuracy_partial"] / 100, ref - THRESHOLDS["accuracy_held"] / 100
        bounds = [max(0.0, lo - 0.1), lo, mid, min(1.0, max(ref, mid) + 0.02)]
        bar_colours = [TICK_COLOURS["broken"], TICK_COLOURS["partial"], TICK_COLOURS["held"]]
    else:  # each defense against its own clean run: no common bound to mark
        bounds = None
    if bounds is not None:
        marks = bounds if backdoor else bounds[1:3]
        bar = fig.colorbar(ScalarMappable(BoundaryNorm(bounds, 3), ListedColormap(bar_colours)), ax=ax,
                           fraction=0.05, ticks=marks, format=PercentFormatter(1.0, decimals=0 if backdoor else 1))
        bar.set_label("ASR" if backdoor else score, fontsize=9)
    ax.set_title(f"{'Attack success rate' if backdoor else score.capitalize() if score == 'accuracy' else score} (%)")
    fig.tight_layout()
    return Figure(key, title, cap, _png(fig))


def curves(res: Results, scenario, metric: str) -> Figure:
    """One panel per attack, one line per defense: ``metric`` ('accuracy', 'auprc' or 'asr') per round,
    mean over seeds."""
    backdoor = metric == "asr"
    attacks = [a for a, f in res.attacks.items() if not backdoor or f == "backdoor"]
    name = "Attack success rate" if backdoor else "Test AUPRC" if metric == "auprc" else "Test accuracy"
    cap = f"{_scen(scenario)}; {_seeds(res)}. One panel per attack, one line per defense."
    if not attacks:
        return Figure(f"curves-{metric}", f"{name} per round", cap, note="no backdoor attacks in this grid")
    styles = line_styles(res.defenses)
    fig, axes = _panels(len(attacks))
    for ax, a in zip(axes, attacks):
        for d in res.defenses:
            xs, ys = _mean_series(res.group(scenario, a, d), metric)
            if xs:
                ax.plot(xs, ys, label=d, lw=1.6, **styles[d])
        ax.set_title(a)
        _percent_axis(ax)
        ax.set_xlabel("round")
    _ylabel(axes, "attack success rate" if backdoor else "test AUPRC" if metric == "auprc" else "test accuracy")
    _legend_and_layout(fig, axes)
    return Figure(f"curves-{metric}", f"{name} per round", cap, _png(fig))


def detection(res: Results, scenario) -> Figure:
    """Detection precision and recall per round, per defense, mean over the attacked cells."""
    cap = ("Precision: the share of rejected clients that were malicious; recall: the share of malicious clients "
           f"rejected. Per round, over the attacked cells ({_scen(scenario)}; {_seeds(res)}). A defense that "
           "never rejects has no precision line.")
    title = "Detection precision and recall"
    styles = line_styles(res.defenses)
    fig, (p_ax, r_ax) = _panels(2, w=5, h=3.2)
    p_ax.sharex(r_ax)  # the same rounds on both (precision may have a single point)
    drawn = False
    for d in res.defenses:
        runs = [r for r in res.runs if r.scenario == scenario and r.defense == d and r.family != "none"]
        for ax, key in ((p_ax, "det_precision"), (r_ax, "det_recall")):
            xs, ys = _mean_series(runs, key)
            if xs:
                ax.plot(xs, ys, label=d, lw=1.6, marker="o", ms=3, **styles[d])  # a lone point shows
                drawn = True
    for ax, t in ((p_ax, "precision"), (r_ax, "recall")):
        ax.set_title(t)
        ax.set_ylabel(t)
        _percent_axis(ax)
        ax.set_xlabel("round")
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
    cap = (f"Mean reputation score of the honest (blue) and the malicious (red) clients per round, first seed "
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
            if not all(math.isnan(y) for y in ys):  # no 'malicious' line where no attacker was scored
                ax.plot([x + 1 for x in xs], ys, color=colour, label=lab, lw=1.6,
                        linestyle="--" if mal else "-")
        ax.set_title(f"{d} / {a}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("round")
    _ylabel(axes, "reputation score")
    _legend_and_layout(fig, axes)
    note = f"showing 12 of {len(panels)} panels" if len(panels) > 12 else None
    return Figure("reputation", title, cap, _png(fig), note)


def distribution(res: Results, store: Store, scenario, key: str, cache: dict) -> Figure:
    """Per round, the 10-50-90% quantiles of a client statistic, honest and malicious apart."""
    what = {"norm": "L2 norm of each update", "cosine": "cosine similarity of each update to the aggregate"}[key]
    d = res.baseline if res.baseline in res.defenses else (res.defenses[0] if res.defenses else None)
    title = f"Distribution of the {what}"
    cap = (f"Per round, the median (line) and the 10-90% band over the honest clients (blue) and, under an "
           f"attack, the malicious ones (red, dashed); defense '{d}', first seed ({_scen(scenario)}); one panel "
           "per attack. Clean panels have no attackers.")
    runs = [(a, r) for a in res.attacks if d and (r := _first_run(res, scenario, a, d))]
    if not runs:
        return Figure(f"dist-{key}", title, cap, note="no runs")
    import numpy as np

    fig, axes = _panels(len(runs))
    for ax, (a, run) in zip(axes, runs):
        rows = [c for c in _client_rows(store, run.run_id, cache) if c.get(key) is not None]
        attacked = run.family != "none"  # a clean cell's 'malicious' clients did nothing
        for mal, colour in ((False, "tab:blue"), (True, "tab:red")):
            by: dict[int, list[float]] = {}
            for c in rows:
                if (c["malicious"] and attacked) == mal:
                    by.setdefault(c["round"], []).append(c[key])
            if not by:
                continue
            xs = sorted(by)
            q = np.array([np.quantile(by[x], [0.1, 0.5, 0.9]) for x in xs])
            xs1 = [x + 1 for x in xs]
            ax.fill_between(xs1, q[:, 0], q[:, 2], color=colour, alpha=0.2, lw=0)
            ax.plot(xs1, q[:, 1], color=colour, lw=1.6, label="malicious" if mal else "honest",
                    linestyle="--" if mal else "-")
        ax.set_title(a)
        ax.set_xlabel("round")
        if key == "norm":
            _scale(ax, [c[key] for c in rows])
    _ylabel(axes, "update L2 norm" if key == "norm" else "cosine with the aggregate")
    _legend_and_layout(fig, axes)
    return Figure(f"dist-{key}", title, cap, _png(fig))


def drift(res: Results, scenario) -> Figure:
    """Distance of the global model from the previous round, per attack and defense."""
    title = "Global model drift"
    cap = (f"How far each round's step moved the global model (L2 norm, round metric 'drift'); {_seeds(res)} "
           f"({_scen(scenario)}); one panel per attack, one line per defense.")
    attacks = [a for a in res.attacks if any(r.attack == a and r.final("drift") is not None for r in res.runs)]
    if not attacks:
        return Figure("drift", title, cap, note="the runs stored no 'drift' metric")
    styles = line_styles(res.defenses)
    fig, axes = _panels(len(attacks))
    for ax, a in zip(axes, attacks):
        values = []
        for d in res.defenses:
            xs, ys = _mean_series(res.group(scenario, a, d), "drift")
            if xs:
                ax.plot(xs, ys, label=d, lw=1.6, **styles[d])
                values += ys
        ax.set_title(a)
        _scale(ax, values)
        ax.set_xlabel("round")
    _ylabel(axes, "L2 step of the model")
    _legend_and_layout(fig, axes)
    return Figure("drift", title, cap, _png(fig))


def _audit(res: Results) -> tuple[str, str]:
    """(attack, dataset) of the grid's leakage audit."""
    p = getattr(res, "privacy_setting", None) or {}
    return {"idlg": "iDLG", "dlg": "DLG", "ig": "Inverting Gradients"}.get(p.get("attack", "idlg"), "iDLG"), \
        p.get("dataset", "fashion-mnist")


def privacy_utility(res: Results, rows: list[Summary]) -> Figure:
    """Median PSNR of the leakage audit against clean accuracy (AUPRC on a fraud grid), one point per defense."""
    attack, dataset = _audit(res)
    pts = [(s.defense, s.psnr, s.clean.acc.mean) for s in rows if s.psnr is not None and s.clean and s.clean.acc]
    scores = {s.clean.metric for s in rows if s.psnr is not None and s.clean and s.clean.acc}
    score = "AUPRC" if scores == {"auprc"} else "accuracy or AUPRC" if "auprc" in scores else "accuracy"
    title = "Privacy-utility trade-off"
    cap = (f"Leakage: the median PSNR of {attack} reconstructions ({dataset} test images, batch 1) from the "
           f"update each defense lets through; lower means less leakage. Utility: the defense's final {score} "
           "without attack (its worst setting).")
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
        ax.annotate(d, (x, 100 * y), xytext=(x + dx, ly), textcoords="data", va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
    ax.set_xlim(min(xs) - 2 * dx, max(xs) + 10 * dx)
    ax.set_xlabel(f"{attack} PSNR, dB (lower = more private)")
    ax.set_ylabel(f"clean {score} (%)")
    ax.grid(alpha=0.3)
    return Figure("privacy", title, cap, _png(fig))


def all_figures(res: Results, rows: list[Summary], store: Store) -> list[Figure]:
    """Every figure of the report, in order."""
    with plt.rc_context(STYLE):
        return _all_figures(res, rows, store)


def _all_figures(res: Results, rows: list[Summary], store: Store) -> list[Figure]:
    figs: list[Figure] = []
    for s in res.scenarios:
        figs += [heatmap(res, rows, s, res.metric(s)), heatmap(res, rows, s, "asr")]
    if not res.scenarios:
        return [privacy_utility(res, rows)]
    s, cache = res.scenarios[0], {}
    figs += [curves(res, s, res.metric(s)), curves(res, s, "asr"), detection(res, s), reputation(res, store, s, cache),
             distribution(res, store, s, "norm", cache), distribution(res, store, s, "cosine", cache),
             drift(res, s), privacy_utility(res, rows)]
    return figs
