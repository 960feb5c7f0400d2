"""Find the layered default by measurement: candidate stacks scored by their worst case.

    python benchmarks/tune_layered.py --workers 2                # tuning grid, then the ranking
    python benchmarks/tune_layered.py --workers 2 --held-out     # the winner on held-out settings
    python benchmarks/tune_layered.py --smoke                    # digits, logreg: checks it runs

Each candidate (which layers, their order, the aggregator, their main parameters) runs on the
tuning grid: the seed-table setting (Fashion-MNIST, 20 clients of which 20% Byzantine, MLP,
20 rounds, 12,000 training images), IID and Dirichlet(0.5), against every attack family: random,
adaptive (with the defense-aware ``on_off`` and ``stealth`` attacks), backdoors and malformed
updates. The server guesses f (``defense_f: auto``); it is never told the attack's count.

Score (lower is better): the largest shortfall against the targets over both settings, in points:
  accuracy drop under the worst attack vs clean FedAvg, minus 5;  backdoor ASR minus 5%;
  clean-accuracy cost vs clean FedAvg, minus 2.
A candidate that meets every target scores <= 0. Ties (within 0.5 points) go to the smaller mean
accuracy drop over all attacks, then the smaller clean cost, then the smaller aggregation overhead. ``--held-out`` runs the winner (and FedAvg for its
reference) on settings it was not chosen on: another seed, Dirichlet(0.1), 10% and 30% Byzantine,
and the distributed-SGD preset (one local step per round). Results go to a resumable SQLite store
(``phalanx report`` shows them). Last line: the winner and its score.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import yaml

BASE = {"data": {"dataset": "fashion-mnist", "train_subset": 12000, "test_subset": 5000},
        "model": {"name": "mlp"},
        "federation": {"num_clients": 20, "rounds": 20, "batch_size": 32, "lr": 0.05, "momentum": 0.9}}

ATTACKS = {
    "clean": {"family": "none"},
    "sign_flip": {"family": "random", "name": "sign_flip"},
    "scaling": {"family": "random", "name": "scaling", "params": {"factor": 10.0}},
    "label_flip": {"family": "random", "poison": "label_flip"},
    "nonfinite": {"family": "malformed", "name": "nonfinite"},
    "alie": {"family": "adaptive", "name": "alie"},
    "ipm": {"family": "adaptive", "name": "ipm", "params": {"epsilon": 0.5}},
    "minmax": {"family": "adaptive", "name": "minmax"},
    "fang_trmean": {"family": "adaptive", "name": "fang_trmean"},
    "on_off": {"family": "adaptive", "name": "on_off"},
    "stealth": {"family": "adaptive", "name": "stealth"},
    "pixel_trigger": {"family": "backdoor", "poison": "pixel_trigger"},
    "dba": {"family": "backdoor", "poison": "dba"},
    "constrain_scale": {"family": "backdoor", "poison": "pixel_trigger", "name": "constrain_scale"},
    "neurotoxin": {"family": "backdoor", "poison": "pixel_trigger", "name": "neurotoxin"},
}

# validate without its norm-outlier test (label skew makes honest norms spread; clip bounds them)
FRONT = [{"validate": {"check_norms": False}}, {"clip": {"max_norm": "auto"}}]
CANDIDATES = {
    "mean": ["mean"],
    "current": ["validate", {"clip": {"max_norm": "auto"}}, "sign_filter", "nnm", "trimmed_mean", "reputation"],
    "tm": [*FRONT, "trimmed_mean"],
    "tm+rep": [*FRONT, "trimmed_mean", "reputation"],
    "sf+tm+rep": [*FRONT, "sign_filter", "trimmed_mean", "reputation"],
    "bucket_tm+rep": [*FRONT, {"bucketing": {"s": 2, "aggregator": "trimmed_mean"}}, "reputation"],
}

TARGETS = {"drop": 0.05, "asr": 0.05, "clean_cost": 0.02}

SMOKE = {"base": {"data": {"dataset": "digits"}, "model": {"name": "logreg"},
                  "federation": {"num_clients": 10, "rounds": 4, "batch_size": 16, "lr": 0.1}},
         "attacks": ["clean", "sign_flip", "scaling", "nonfinite", "alie", "pixel_trigger"],
         "candidates": ["mean", "tm", "sf+tm+rep"]}


def grid(name: str, base: dict, attacks: list[str], candidates: list[str], partitions: list[dict],
         byzantine: list[float], seeds: list[int]) -> dict:
    return {"name": name, "base": base, "partitions": partitions, "byzantine": byzantine, "seeds": seeds,
            "baseline": "mean", "attacks": {a: ATTACKS[a] for a in attacks},
            "defenses": {c: CANDIDATES[c] for c in dict.fromkeys(["mean", *candidates])}}


def score(res, rows) -> list[dict]:
    """Per candidate: worst drop, worst ASR, clean cost (fractions), shortfall, overhead."""
    from phalanx.report.tables import reference

    out = []
    for s in rows:
        drops, asrs, costs, where = [], [], [], {}
        for scen in res.scenarios:
            ref = reference(res, scen, res.baseline)
            for (sc, attack), e in s.cells.items():
                if sc != scen or ref is None:
                    continue
                if e.asr is not None:
                    asrs.append((e.asr.mean, attack))
                elif e.acc is not None and res.attacks[attack] == "none":
                    costs.append((ref - e.acc.mean, scen[1]))
                elif e.acc is not None:
                    drops.append((ref - e.acc.mean, f"{attack} ({scen[1]})"))
        drop, asr, cost = (max(v, default=(0.0, "-")) for v in (drops, asrs, costs))
        short = max(drop[0] - TARGETS["drop"], asr[0] - TARGETS["asr"], cost[0] - TARGETS["clean_cost"])
        mean_drop = sum(d for d, _ in drops) / len(drops) if drops else 0.0
        out.append({"candidate": s.defense, "drop": drop, "asr": asr, "cost": cost, "shortfall": short,
                    "mean_drop": mean_drop, "agg_ms": s.agg_ms or 0.0})
    return sorted(out, key=lambda r: (round(r["shortfall"] / 0.005), round(r["mean_drop"] / 0.005),
                                      r["cost"][0], r["agg_ms"]))


def print_ranking(ranked: list[dict]) -> None:
    print(f"{'candidate':<16} {'worst drop (pts)':>28} {'worst ASR':>26} {'clean cost':>11} {'mean drop':>9} "
          f"{'ms':>7} {'shortfall':>9}")
    for r in ranked:
        print(f"{r['candidate']:<16} {100 * r['drop'][0]:>6.1f} {r['drop'][1]:<21} {100 * r['asr'][0]:>5.1f}% "
              f"{r['asr'][1]:<19} {100 * r['cost'][0]:>11.1f} {100 * r['mean_drop']:>9.1f} {r['agg_ms']:>7.1f} "
              f"{100 * r['shortfall']:>9.1f}")


def run(spec_dict: dict, db: Path, workers: int):
    from phalanx.bench import parse_grid, run_grid
    from phalanx.report.tables import load_results, summarize
    from phalanx.store import Store

    spec = parse_grid(spec_dict)
    out = run_grid(spec, db, workers=workers)
    if out.interrupted:
        raise SystemExit("interrupted; rerun to resume")
    res = load_results(Store(db), spec.name)
    return res, summarize(res), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--db", default="results/tune.db")
    ap.add_argument("--candidates", default=",".join(c for c in CANDIDATES if c != "mean"))
    ap.add_argument("--held-out", action="store_true", help="check the winner on held-out settings")
    ap.add_argument("--winner", help="candidate to check with --held-out (default: the tuning winner)")
    ap.add_argument("--write", help="write the winner's stages into this experiment YAML (defense key)")
    ap.add_argument("--attacks", help="comma-separated subset of the attacks (default: all)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    import phalanx  # noqa: F401

    cands = args.candidates.split(",")
    unknown = [c for c in cands if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"--candidates: unknown {unknown}; known: {', '.join(CANDIDATES)}")
    base, attacks = BASE, list(ATTACKS)
    if args.attacks:
        attacks = args.attacks.split(",")
        bad = [a for a in attacks if a not in ATTACKS]
        if bad or "clean" not in attacks:
            raise SystemExit(f"--attacks: unknown {bad} (known: {', '.join(ATTACKS)}); include 'clean'")
    if args.smoke:
        base, cands = SMOKE["base"], SMOKE["candidates"]
        attacks = attacks if args.attacks else SMOKE["attacks"]
    parts = [{"partition": "iid"}, {"partition": "dirichlet", "alpha": 0.5}]
    db = Path(args.db)
    db.parent.mkdir(parents=True, exist_ok=True)
    ranked = []
    if not (args.held_out and args.winner):  # a named winner's held-out check needs no tuning grid
        res, rows, out = run(grid("tune", base, attacks, cands, parts, [0.2], [0]), db, args.workers)
        ranked = score(res, rows)
        print(f"tuning grid: {len(res.runs) + len(res.failed)} cells ({out.ran} run now, {len(out.failed)} failed)")
        print_ranking(ranked)
    winner = args.winner or next(r["candidate"] for r in ranked if r["candidate"] != "mean")
    if winner not in CANDIDATES:
        raise SystemExit(f"--winner: unknown {winner!r}; known: {', '.join(CANDIDATES)}")
    if args.write:
        path = Path(args.write)
        cfg = yaml.safe_load(path.read_text()) if path.exists() else {}
        cfg["defense"] = copy.deepcopy(CANDIDATES[winner])
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if args.held_out:
        held = [("seed 1", [{"partition": "dirichlet", "alpha": 0.5}], [0.2], [1], {}),
                ("dirichlet 0.1", [{"partition": "dirichlet", "alpha": 0.1}], [0.2], [0], {}),
                ("10% byzantine", [{"partition": "dirichlet", "alpha": 0.5}], [0.1], [0], {}),
                ("30% byzantine", [{"partition": "dirichlet", "alpha": 0.5}], [0.3], [0], {}),
                ("dsgd", [{"partition": "dirichlet", "alpha": 0.5}], [0.2], [0],
                 {"rounds": 200, "local_steps": 1, "lr": 0.1, "momentum": 0.9, "client_momentum": True})]
        print(f"\nheld-out settings for {winner}:")
        checked = []
        for label, p, byz, seeds, fed in held:
            b = copy.deepcopy(base)
            b["federation"].update(fed)
            if args.smoke:
                b["federation"]["rounds"] = min(b["federation"]["rounds"], 4)
            r2, rows2, _ = run(grid(f"heldout-{label.replace(' ', '_')}", b, attacks, [winner], p, byz, seeds),
                               db, args.workers)
            print(f"-- {label}")
            scored = score(r2, rows2)
            print_ranking(scored)
            checked += [(label, r) for r in scored if r["candidate"] == winner]
        if not ranked:  # no tuning grid: the headline is the held-out worst case
            label, worst = max(checked, key=lambda t: t[1]["shortfall"])
            print(f"held-out {winner}: worst shortfall {100 * worst['shortfall']:.1f} pts in '{label}' (drop "
                  f"{100 * worst['drop'][0]:.1f} pts, {worst['drop'][1]}; ASR {100 * worst['asr'][0]:.1f}%, "
                  f"{worst['asr'][1]}; clean cost {100 * worst['cost'][0]:.1f} pts)")
            return
    best = next(r for r in ranked if r["candidate"] == winner)
    print(f"winner: {winner} = {CANDIDATES[winner]}; worst drop {100 * best['drop'][0]:.1f} pts "
          f"({best['drop'][1]}), worst ASR {100 * best['asr'][0]:.1f}% ({best['asr'][1]}), clean cost "
          f"{100 * best['cost'][0]:.1f} pts, shortfall {100 * best['shortfall']:.1f} pts")

if __name__ == "__main__":
    main()
