"""The comparative table: grid results read from a store, summarised per defense, with ticks.

Ticks come from measured numbers and fixed thresholds (``THRESHOLDS``): accuracy is *held*
within 5 points of the clean reference, *partial* within 20, *broken* below that; a backdoor is
*held* off with an attack success rate (ASR) under 10%, *partial* under 50%, *broken* otherwise.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

from ..errors import PhalanxError
from ..store import Store

THRESHOLDS = {"accuracy_held": 5.0, "accuracy_partial": 20.0, "asr_held": 0.10, "asr_partial": 0.50}
SYMBOLS = {"held": "✓", "partial": "◐", "broken": "✗", None: "?"}
COLUMNS = ("Defense", "No attack", "Random attacks", "Adaptive attacks", "Backdoors", "Malformed updates", "Overhead",
           "Privacy")  # "Malformed updates" (NaN/inf rows) only when the grid has that family


def tick(value: float | None, reference: float | None = None, kind: str = "accuracy") -> str | None:
    """'held', 'partial' or 'broken' for an accuracy (vs. its clean reference) or an ASR; None if unknown.

    Accuracies are fractions; the accuracy thresholds are in percentage points, and both bounds are
    inclusive ("within 5 points"). ASR bounds are strict: held below 10%, partial below 50%.
    """
    if kind == "accuracy":
        if value is None or reference is None:
            return None
        drop = round((reference - value) * 100, 6)
        if drop <= THRESHOLDS["accuracy_held"]:
            return "held"
        return "partial" if drop <= THRESHOLDS["accuracy_partial"] else "broken"
    if kind == "asr":
        if value is None:
            return None
        v = round(value, 9)
        return "held" if v < THRESHOLDS["asr_held"] else "partial" if v < THRESHOLDS["asr_partial"] else "broken"
    raise PhalanxError(f"tick: kind must be 'accuracy' or 'asr', got {kind!r}")


# ---------------------------------------------------------------- loading


@dataclass
class CellRun:
    dataset: str
    partition: str
    byzantine: float
    attack: str
    family: str
    defense: str
    seed: int
    cell: str
    run_id: str
    rounds: list[dict]
    error: str | None = None  # set when the cell's newest run failed
    defense_f: int | None = None  # the server's guess of f that the defense used (None: no stage uses f)

    @property
    def scenario(self) -> tuple[str, str, float]:
        return (self.dataset, self.partition, self.byzantine)

    def series(self, key: str) -> list[float | None]:
        return [r.get(key) if isinstance(r.get(key), (int, float)) else None for r in self.rounds]

    def final(self, key: str) -> float | None:
        vals = [v for v in self.series(key) if v is not None]
        return vals[-1] if vals else None

    def peak(self, key: str) -> float | None:
        vals = [v for v in self.series(key) if v is not None]
        return max(vals) if vals else None

    def agg_seconds(self) -> float | None:
        vals = [v for v in self.series("agg_seconds") if v is not None]
        return statistics.fmean(vals) if vals else None


@dataclass
class Results:
    db: str
    runs: list[CellRun]
    attacks: dict[str, str]  # label -> family, in grid order
    defenses: list[str]
    scenarios: list[tuple[str, str, float]]
    baseline: str | None
    privacy: dict[str, list[float]] = field(default_factory=dict)  # defense -> PSNR per seed
    privacy_rules: dict[str, list] = field(default_factory=dict)
    privacy_setting: dict = field(default_factory=dict)  # the grid's leakage audit: attack, dataset, steps, seeds
    failed: list[CellRun] = field(default_factory=list)  # cells whose run raised an error
    missing: int = 0  # cells in the layout with no run yet
    scores: dict[tuple, str] = field(default_factory=dict)  # scenario -> 'auprc' for binary (fraud) tasks

    def metric(self, scenario) -> str:
        """The score ticked in ``scenario``: 'auprc' where its runs are binary, imbalanced tasks (they
        record AUPRC), else 'accuracy'."""
        return self.scores.get(scenario, "accuracy")

    def group_failed(self, scenario, attack: str, defense: str) -> list[CellRun]:
        return [r for r in self.failed if r.scenario == scenario and r.attack == attack and r.defense == defense]

    def group(self, scenario, attack: str, defense: str) -> list[CellRun]:
        return [r for r in self.runs if r.scenario == scenario and r.attack == attack and r.defense == defense]

    def clean_labels(self) -> list[str]:
        return [a for a, f in self.attacks.items() if f == "none"]


def _has_table(store: Store, name: str) -> bool:
    return store.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def load_results(store: Store, grid: str | None = None) -> Results:
    """Every grid cell of ``store`` (or of one grid) with its newest run; cells whose newest run
    failed (the defense raised an error under the attack) go to ``failed``."""
    if not _has_table(store, "bench_cells"):
        raise PhalanxError(f"{store.path}: no grid results in this store; run "
                           f"`phalanx bench GRID --db {store.path}` first")
    specs = {g: json.loads(s) for g, s in store.db.execute("SELECT grid, spec FROM bench_grids ORDER BY updated")}
    if grid is not None and grid not in specs:
        raise PhalanxError(f"grid: expected one of {', '.join(specs) or 'none'} in {store.path}, got {grid!r}")
    names = [grid] if grid else list(specs)
    latest, errors = {}, {}  # per cell, its newest run: finished, or failed with its error
    for run_id, cell, status, final in store.db.execute(
            "SELECT run_id, cell, status, final FROM runs WHERE status IN ('done', 'failed') AND cell IS NOT NULL "
            "ORDER BY ended"):
        latest.pop(cell, None)
        errors.pop(cell, None)
        if status == "done":
            latest[cell] = run_id
        else:
            errors[cell] = (run_id, json.loads(final or "{}").get("error", "failed"))
    attacks: dict[str, str] = {}
    defenses: list[str] = []
    for g in names:
        for label, a in specs[g]["attacks"].items():
            attacks.setdefault(label, a["family"])
        rows = store.db.execute("SELECT DISTINCT defense FROM bench_cells WHERE grid=? ORDER BY rowid", (g,))
        defenses += [d for (d,) in rows if d not in defenses]  # row labels ('krum f=2' on an f axis)
    runs, failed, missing, cache, scenarios = [], [], 0, {}, []
    q = ("SELECT dataset, partition, byzantine, attack, family, defense, seed, cell FROM bench_cells "
         "WHERE grid=? ORDER BY rowid")
    for g in names:
        for row in store.db.execute(q, (g,)).fetchall():
            run_id = latest.get(row[7])
            if run_id is None:
                if row[7] in errors:
                    failed.append(CellRun(*row, run_id=errors[row[7]][0], rounds=[], error=errors[row[7]][1]))
                else:
                    missing += 1
                continue
            if run_id not in cache:
                rec = store.read_run(run_id)
                cache[run_id] = (rec.rounds, rec.final.get("defense_f"))
            r = CellRun(*row, run_id=run_id, rounds=cache[run_id][0], defense_f=cache[run_id][1])
            if r.scenario not in scenarios:
                scenarios.append(r.scenario)
            runs.append(r)
    spec = specs[names[-1]] if names else {}
    baseline = spec.get("baseline") or next(
        (k for k, d in spec.get("defenses", {}).items() if d.get("stages") == ["mean"]), None)
    res = Results(str(store.path), runs, attacks, defenses, scenarios, baseline, failed=failed, missing=missing)
    res.privacy_setting = spec.get("privacy") or {}
    res.scores = {r.scenario: "auprc" for r in runs if r.final("auprc") is not None}
    if _has_table(store, "bench_privacy"):
        q = ("SELECT m.defense, p.psnr, p.rule FROM bench_privacy_map m JOIN bench_privacy p ON p.probe = m.probe "
             "WHERE m.grid=? ORDER BY m.seed")
        for g in names:
            for d, psnr, rule in store.db.execute(q, (g,)):
                res.privacy.setdefault(d, []).append(psnr)
                res.privacy_rules[d] = json.loads(rule)
    return res


# ---------------------------------------------------------------- summaries


@dataclass
class Stat:
    mean: float
    std: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values) -> Stat | None:
        v = [x for x in values if x is not None and math.isfinite(x)]
        if not v:
            return None
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v), len(v))


@dataclass
class Entry:
    """One (scenario, attack, defense) over seeds: final and peak accuracy, final ASR, the tick."""

    scenario: tuple
    attack: str
    acc: Stat | None
    peak: Stat | None
    asr: Stat | None = None
    reference: float | None = None
    tick: str | None = None
    failed: list[str] = field(default_factory=list)  # the error of each seed whose run failed
    metric: str = "accuracy"  # what acc/peak/reference hold: 'accuracy', or 'auprc' for fraud tasks


@dataclass
class Summary:
    defense: str
    clean: Entry | None
    random: Entry | None
    adaptive: Entry | None
    backdoor: Entry | None
    malformed: Entry | None
    agg_ms: float | None
    ratio: float | None
    psnr: float | None
    cells: dict[tuple, Entry] = field(default_factory=dict)  # (scenario, attack) -> Entry
    epsilon: float | None = None  # the largest DP epsilon spent in the defense's runs, when tracked
    f: str | None = None  # the server's guess(es) of f in the defense's runs, when a stage uses f

    @property
    def label(self) -> str:
        """The defense's name, with the f its f-parametrised stages assumed."""
        return self.defense if self.f is None or "f=" in self.defense else f"{self.defense} (f={self.f})"


def reference(res: Results, scenario, defense: str) -> float | None:
    """Clean accuracy (AUPRC for a fraud task) in ``scenario``: the baseline's without attack, else the
    defense's own."""
    key = res.metric(scenario)
    for d in (res.baseline, defense):
        for a in res.clean_labels():
            s = Stat.of(r.final(key) for r in res.group(scenario, a, d)) if d else None
            if s:
                return s.mean
    return None


def entry(res: Results, scenario, attack: str, defense: str) -> Entry | None:
    """One cell over seeds. A seed whose run failed counts as accuracy 0: the attack stopped training."""
    runs, bad = res.group(scenario, attack, defense), res.group_failed(scenario, attack, defense)
    if not runs and not bad:
        return None
    zeros, key = [0.0] * len(bad), res.metric(scenario)
    e = Entry(scenario, attack, Stat.of([r.final(key) for r in runs] + zeros),
              Stat.of([r.peak(key) for r in runs] + zeros), failed=[r.error for r in bad], metric=key)
    if res.attacks.get(attack) == "backdoor":
        e.asr = Stat.of(r.final("asr") for r in runs)
        e.tick = tick(e.asr.mean if e.asr else None, kind="asr")
    else:
        e.reference = reference(res, scenario, defense)
        e.tick = tick(e.acc.mean if e.acc else None, e.reference)
    return e


def _worst(entries: list[Entry], backdoor: bool) -> Entry | None:
    if backdoor:
        ok = [e for e in entries if e.asr]
        return max(ok, key=lambda e: e.asr.mean) if ok else None
    ok = [e for e in entries if e.acc]
    return max(ok, key=lambda e: (e.reference or 0) - e.acc.mean) if ok else None


def summarize(res: Results) -> list[Summary]:
    """One row per defense: worst case per attack family, overhead vs. the baseline, leakage."""
    agg = {}
    for d in res.defenses:
        vals = [v for r in res.runs if r.defense == d and (v := r.agg_seconds()) is not None]
        agg[d] = statistics.median(vals) * 1000 if vals else None
    base_ms = agg.get(res.baseline) if res.baseline else None
    out = []
    for d in res.defenses:
        cells = {(s, a): e for s in res.scenarios for a in res.attacks if (e := entry(res, s, a, d))}
        fam = {f: [e for (s, a), e in cells.items() if res.attacks[a] == f]
               for f in ("none", "random", "adaptive", "backdoor", "malformed")}
        psnr = res.privacy.get(d)
        eps = [v for r in res.runs if r.defense == d for k in ("epsilon", "epsilon_central")
               if (v := r.final(k)) is not None]
        fs = sorted({r.defense_f for r in res.runs if r.defense == d and r.defense_f is not None})
        out.append(Summary(d, _worst(fam["none"], False), _worst(fam["random"], False), _worst(fam["adaptive"], False),
                           _worst(fam["backdoor"], True), _worst(fam["malformed"], False), agg[d],
                           agg[d] / base_ms if agg[d] is not None and base_ms else None,
                           statistics.median(psnr) if psnr else None, cells, max(eps) if eps else None,
                           "/".join(map(str, fs)) or None))
    return out


# ---------------------------------------------------------------- formatting


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _pm(s: Stat) -> str:
    """' ±std' over seeds (nothing for a single seed)."""
    return f" ±{_pts(s.std)}" if s.n > 1 else ""


def _range(s: Stat) -> str:
    """' [min–max]' over seeds (nothing for a single seed)."""
    return f" [{_pts(s.lo)}–{_pts(s.hi)}]" if s.n > 1 else ""


def _where(res: Results, e: Entry, show_attack: bool = True) -> str:
    parts = [e.attack] if show_attack else []
    if len(res.scenarios) > 1:
        ds, part, byz = e.scenario
        parts.append(f"{ds}, {part}, byz {byz:g}")
    return f" · {'; '.join(parts)}" if parts else ""


def _failed(e: Entry) -> str:
    return f", {len(e.failed)} of {e.acc.n} runs failed" if e.failed else ""


def fmt_accuracy(res: Results, e: Entry | None, show_attack: bool = True, symbol: bool = True) -> str:
    if e is None or e.acc is None:
        return "-"
    s = f"{SYMBOLS[e.tick]} " if symbol else ""
    s += "AUPRC " if e.metric == "auprc" else ""
    return f"{s}{_pts(e.acc.mean)}{_pm(e.acc)}, peak {_pts(e.peak.mean)}{_failed(e)}{_where(res, e, show_attack)}"


def fmt_backdoor(res: Results, e: Entry | None, show_attack: bool = True) -> str:
    if e is None or e.asr is None:
        return "-"
    acc = f", {'AUPRC' if e.metric == 'auprc' else 'acc'} {_pts(e.acc.mean)}" if e.acc else ""
    return f"{SYMBOLS[e.tick]} ASR {_pts(e.asr.mean)}%{_pm(e.asr)}{acc}{_where(res, e, show_attack)}"


def headline(res: Results, rows: list[Summary]) -> tuple[list[str], list[list[str]], list[list[str | None]]]:
    """(columns, text rows, tick per cell) of the comparative table."""
    malformed = "malformed" in res.attacks.values()
    text, ticks = [], []
    for s in rows:
        over = "-" if s.agg_ms is None else f"{s.agg_ms:.2f} ms" + (f" ({s.ratio:.1f}x)" if s.ratio else "")
        priv = ", ".join(([f"{s.psnr:.1f} dB"] if s.psnr is not None else [])
                         + ([f"ε {s.epsilon:.3g}"] if s.epsilon is not None else [])) or "-"
        cells = [fmt_accuracy(res, s.random), fmt_accuracy(res, s.adaptive), fmt_backdoor(res, s.backdoor)]
        families = [s.random, s.adaptive, s.backdoor]
        if malformed:
            cells.append(fmt_accuracy(res, s.malformed))
            families.append(s.malformed)
        text.append([s.label, fmt_accuracy(res, s.clean, False, False), *cells, over, priv])
        ticks.append([None, None, *(e.tick if e else None for e in families), None, None])
    cols = [c for c in COLUMNS if malformed or c != "Malformed updates"]
    return cols, text, ticks


def detail(res: Results, rows: list[Summary], scenario) -> tuple[list[str], list[list[str]], list[list[str | None]]]:
    """Defense x attack for one scenario: final accuracy ± std [min-max] (peak), or ASR for backdoors."""
    cols = ["Defense"] + [f"{a} ({f})" for a, f in res.attacks.items()]
    text, ticks = [], []
    for s in rows:
        t_row, k_row = [s.label], [None]
        for a in res.attacks:
            e = s.cells.get((scenario, a))
            if e is None:
                t_row.append("-")
            elif e.asr is not None:
                t_row.append(f"{SYMBOLS[e.tick]} ASR {_pts(e.asr.mean)}%{_range(e.asr)}, "
                             f"{'AUPRC' if e.metric == 'auprc' else 'acc'} {_pts(e.acc.mean) if e.acc else '-'}")
            elif e.acc is not None:
                sym = f"{SYMBOLS[e.tick]} " if res.attacks[a] != "none" else ""
                sym += "AUPRC " if e.metric == "auprc" else ""
                t_row.append(f"{sym}{_pts(e.acc.mean)}{_pm(e.acc)}{_range(e.acc)} "
                             f"peak {_pts(e.peak.mean)}{_failed(e)}")
            else:
                t_row.append("-")
            k_row.append(e.tick if e is not None and res.attacks[a] != "none" else None)
        text.append(t_row)
        ticks.append(k_row)
    return cols, text, ticks


def failures(res: Results) -> tuple[list[str], list[list[str]]]:
    """The failed runs, one row per (setting, attack, defense, error) with the seeds it hit."""
    groups: dict[tuple, list[int]] = {}
    for r in res.failed:
        groups.setdefault((r.scenario, r.attack, r.defense, r.error), []).append(r.seed)
    rows = [[d, a, f"{ds}, {part}, byz {byz:g}", ", ".join(map(str, sorted(seeds))), err or "-"]
            for ((ds, part, byz), a, d, err), seeds in groups.items()]
    return ["Defense", "Attack", "Setting", "Seeds", "Error"], rows


def legend(res: Results) -> str:
    base = f"'{res.baseline}' (no attack)" if res.baseline else "the same defense without attack"
    seeds = sorted({r.seed for r in res.runs})
    return (f"Numbers are test accuracy in % at the last round, mean over {len(seeds)} seed(s) (± standard "
            f"deviation over seeds when there are several), with the peak over rounds; worst case over the "
            f"attacks of each family (malformed updates: NaN/inf values). A run that failed (the defense raised an error under the attack, "
            f"such as a non-finite aggregate) counts as accuracy 0; the report lists these runs. "
            f"Accuracy ticks compare with the clean accuracy of {base} in the same setting: "
            f"✓ held = within {THRESHOLDS['accuracy_held']:g} points, ◐ partial = within "
            f"{THRESHOLDS['accuracy_partial']:g} points, ✗ broken = further below. Backdoors: attack success "
            f"rate (ASR), ✓ held < {100 * THRESHOLDS['asr_held']:g}%, "
            f"◐ partial < {100 * THRESHOLDS['asr_partial']:g}%, "
            f"✗ broken otherwise, with the main accuracy beside it. Overhead: aggregation time per round "
            f"(median over the defense's cells) and its ratio to '{res.baseline or '-'}'. Privacy: median PSNR "
            f"of {_audit_name(res)} reconstructions from the single update the defense lets "
            f"through; lower means less leakage; ε: the differential-privacy budget spent (δ as configured), "
            f"where a DP mechanism tracks it. (f=k) after a defense: the number of Byzantine clients its "
            f"f-parametrised stages assumed, the server's own guess (defense_f), not the attack's true count."
            + (" Binary, imbalanced (fraud) tasks show and tick AUPRC (average precision, in %) instead of "
               "accuracy, against the clean run's AUPRC with the same point thresholds; their backdoor ASR is "
               "the share of flagged test frauds that the trigger makes pass as legitimate."
               if "auprc" in res.scores.values() else ""))


def _audit_name(res: Results) -> str:
    """'iDLG (LeNet, batch 1, digits)': the leakage audit's attack and its setting, as the grid ran it."""
    p = res.privacy_setting
    attack = {"idlg": "iDLG", "dlg": "DLG", "ig": "Inverting Gradients"}.get(p.get("attack", "idlg"), "iDLG")
    return f"{attack} ({p.get('dataset', 'fashion-mnist')}, batch 1, the audit's sigmoid LeNet)"


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def rich_table(cols: list[str], rows: list[list[str]], ticks: list[list[str | None]], title: str = ""):
    from rich.table import Table
    from rich.text import Text

    colour = {"held": "green", "partial": "yellow", "broken": "red"}
    t = Table(title=title, show_lines=False)
    for c in cols:
        t.add_column(c, overflow="fold")
    for r, k in zip(rows, ticks):
        t.add_row(*(Text(v, style=colour.get(x, "")) for v, x in zip(r, k)))
    return t
