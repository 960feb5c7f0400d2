"""The layered default against issue 13's targets, read from a stored grid (no training here).

    python benchmarks/layered_targets.py results/seed_table.db            # grid 'seed_table', row 'layered'
    python benchmarks/layered_targets.py results/tune.db --grid tune --defense tm+rep

For every setting of the grid (IID, Dirichlet, ...) it prints, beside every defense row: the clean
accuracy, the worst accuracy drop against clean FedAvg over every attack (and which attack), the
worst backdoor ASR, and the clean-accuracy cost. Then the targets of the chosen row: worst drop
<= 5 points, ASR <= 5% for pixel trigger, DBA, constrain-and-scale and Neurotoxin, clean cost <= 2
points, and for a row with reputation, quarantine precision and recall >= 0.95 by round 10 against
persistent attackers and no honest client quarantined in the clean run. Each missed target says by
how much and which attack does it. Last line: the headline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_layered import TARGETS, print_ranking, score  # noqa: E402

BACKDOORS = ("pixel_trigger", "dba", "constrain_scale", "neurotoxin")
# attacks that do not attack every round: quarantine is not expected to hold them by round 10
NOT_PERSISTENT = ("clean", "on_off", "model_replacement")
QUARANTINE_ROUND, QUARANTINE_TARGET = 10, 0.95


def quarantine_rows(res, defense: str, by_round: int = QUARANTINE_ROUND) -> list[dict]:
    """Per (setting, attack) of ``defense``: precision and recall of quarantine at ``by_round`` and
    the honest clients quarantined at any round of the run."""
    out = []
    for run in res.runs:
        if run.defense != defense:
            continue
        m = next((r for r in run.rounds if r.get("round") == by_round), {})
        honest = max((r.get("honest_quarantined") or 0 for r in run.rounds), default=0)
        out.append({"setting": run.partition, "attack": run.attack, "precision": m.get("quarantine_precision"),
                    "recall": m.get("quarantine_recall"), "honest_max": honest})
    return out


def per_attack_table(res) -> list[str]:
    """Markdown: one row per (setting, defense), one column per attack; final accuracy in %, the
    backdoors' ASR as 'x%'; a failed cell shows 'failed', a missing one '-'."""
    from phalanx.report.tables import summarize

    attacks = list(res.attacks)
    out = ["| setting | defense | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for scen in res.scenarios:
        for s in summarize(res):
            vals = []
            for a in attacks:
                e = s.cells.get((scen, a))
                if e is None or (e.acc is None and e.asr is None):
                    vals.append("failed" if e is not None and e.failed else "-")
                elif e.asr is not None:
                    vals.append(f"{100 * e.asr.mean:.1f}%")
                else:
                    vals.append(f"{100 * e.acc.mean:.1f}")
            out.append(f"| {scen[1]} | {s.defense} | " + " | ".join(vals) + " |")
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def check(res, defense: str) -> list[str]:
    """The target lines for ``defense``; each names the shortfall and the attack behind it."""
    from phalanx.report.tables import reference, summarize

    rows = {s.defense: s for s in summarize(res)}
    if defense not in rows:
        raise SystemExit(f"no defense row {defense!r} in grid {res.defenses}")
    s, lines = rows[defense], []
    for scen in res.scenarios:
        ref = reference(res, scen, res.baseline)
        drops, asrs, clean = [], {}, None
        for (sc, attack), e in s.cells.items():
            if sc != scen:
                continue
            if e.asr is not None:
                asrs[attack] = e.asr.mean
            elif e.acc is not None and res.attacks[attack] == "none":
                clean = e.acc.mean
            elif e.acc is not None and ref is not None:
                drops.append((ref - e.acc.mean, attack))
        name = scen[1]
        if ref is None or clean is None:
            lines.append(f"{name}: no clean FedAvg or clean {defense} run yet")
            continue
        drop, who = max(drops, default=(0.0, "-"))
        lines.append(_line(f"{name}: worst drop vs clean FedAvg ({100 * ref:.1f})", drop, TARGETS["drop"], who))
        for b in BACKDOORS:
            if b in asrs:
                lines.append(_line(f"{name}: ASR {b}", asrs[b], TARGETS["asr"], b, unit="%"))
        lines.append(_line(f"{name}: clean cost", ref - clean, TARGETS["clean_cost"], "clean"))
    q = quarantine_rows(res, defense)
    if any(r["precision"] is not None or r["recall"] is not None for r in q):
        for r in sorted(q, key=lambda r: (r["setting"], r["attack"])):
            if r["attack"] == "clean":
                ok = r["honest_max"] == 0
                lines.append(f"{r['setting']}: honest clients quarantined in the clean run: {r['honest_max']}"
                             f"  {'met' if ok else 'MISSED'}")
            elif r["attack"] not in NOT_PERSISTENT:
                p, rc = r["precision"], r["recall"]
                ok = (p or 0) >= QUARANTINE_TARGET and (rc or 0) >= QUARANTINE_TARGET
                lines.append(f"{r['setting']}: quarantine at round {QUARANTINE_ROUND} vs {r['attack']}: precision "
                             f"{_fmt(p)}, recall {_fmt(rc)}  {'met' if ok else 'MISSED'}")
    return lines


def _line(label: str, value: float, target: float, who: str, unit: str = " pts") -> str:
    shown = f"{100 * value:.1f}{unit}"
    if value <= target:
        return f"{label}: {shown} (target {100 * target:.0f}{unit.strip() or ''}) met"
    return f"{label}: {shown} (target {100 * target:.0f}{unit.strip()}) MISSED by {100 * (value - target):.1f} ({who})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    ap.add_argument("--grid", default="seed_table")
    ap.add_argument("--defense", default="layered")
    ap.add_argument("--table", action="store_true", help="also print the per-attack markdown table")
    args = ap.parse_args()
    from phalanx.report.tables import load_results, summarize
    from phalanx.store import Store

    res = load_results(Store(args.db), args.grid)
    print(f"grid {args.grid}: {len(res.runs)} runs, {len(res.failed)} failed, {res.missing} missing")
    print_ranking(score(res, summarize(res)))
    if args.table:
        print("\n" + "\n".join(per_attack_table(res)))
    print()
    lines = check(res, args.defense)
    print("\n".join(lines))
    missed = [line for line in lines if "MISSED" in line]
    print(f"{args.defense}: {len(lines) - len(missed)} of {len(lines)} targets met"
          + (f"; {len(missed)} missed, first: {missed[0]}" if missed else ""))

if __name__ == "__main__":
    main()
