"""Every untargeted attack against every robust aggregator on Fashion-MNIST (IID and Dirichlet 0.5).

    python benchmarks/reproduce_byzantine.py --workers 2   # 25 clients, 5 Byzantine, full grid
    python benchmarks/reproduce_byzantine.py --smoke       # digits, 1 round: checks the script runs
    python benchmarks/reproduce_byzantine.py --defenses layered --layered my.yaml   # one more row

The setting is distributed SGD, as in the papers whose shape it checks: each round every client
sends one step on a batch of 32 (no client momentum, lr 0.1, 300 rounds, MLP). Prints one
final-accuracy table per partition (aggregators as rows, attacks as columns, plus the worst case
over attacks), and a last line with the headline figures. Results are written to ``--out`` after
every run; a rerun with the same setting reuses them, so an interrupted grid resumes and a new
row costs only its own runs.

The published shape to look for (Baruch et al. 2019; Xie et al. 2020; Karimireddy et al. 2021;
Allouah et al. 2023): ALIE and IPM hurt Krum and the median far more than sign flipping does;
centered clipping and NNM-combined rules hold up best; no defense is best everywhere. ALIE and IPM
run their "optimal" variants (z and epsilon searched against the server's real pipeline, as
ByzFL's benchmark does, every 5 rounds to bound the cost). With local epochs and client momentum
(FedAvg: ``--local-steps 13 --momentum 0.9 --lr 0.05 --rounds 20``) the honest updates vary much
less and ALIE no longer hurts the median: Karimireddy et al.'s point about momentum.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import yaml

ATTACKS = {
    "none": {},
    "gaussian": {"name": "gaussian", "params": {"scale": 1.0}},
    "sign_flip": {"name": "sign_flip"},
    "scaling": {"name": "scaling", "params": {"factor": 10.0}},
    "label_flip": {"poison": "label_flip"},
    "alie": {"name": "alie", "params": {"variant": "optimal", "search_every": 5}},
    "ipm": {"name": "ipm", "params": {"variant": "optimal", "search_every": 5}},
    "minmax": {"name": "minmax"},
    "minsum": {"name": "minsum"},
    "fang_krum": {"name": "fang_krum"},
    "fang_trmean": {"name": "fang_trmean"},
    "mimic": {"name": "mimic"},
}

DEFENSES = {
    "mean": ["mean"],
    "median": ["median"],
    "trimmed_mean": ["trimmed_mean"],
    "krum": ["krum"],
    "multi_krum": ["multi_krum"],
    "bulyan": ["bulyan"],
    "geomed": ["geomed"],
    "cclip": ["centered_clipping"],
    "dnc": ["dnc"],
    "fltrust": ["fltrust"],
    "signguard": ["signguard"],
    "foolsgold": ["foolsgold"],
    "flame": [{"flame": {"noise": 0.0}}],
    "nnm+krum": ["nnm", "krum"],
    "nnm+median": ["nnm", "median"],
    "nnm+trmean": ["nnm", "trimmed_mean"],
    "nnm+cclip": ["nnm", "centered_clipping"],
    "bucketing+cclip": [{"bucketing": {"s": 2, "aggregator": "centered_clipping"}}],
}

_DATA = None


def layered_defense(path: str | None = None) -> list:
    """The defense of configs/layered.yaml (or of another experiment file)."""
    path = Path(path) if path else Path(__file__).resolve().parent.parent / "configs" / "layered.yaml"
    return yaml.safe_load(path.read_text())["defense"]


def cell_config(args, partition: str, attack: str, defense: list) -> dict:
    atk = dict(ATTACKS[attack])
    if atk:
        atk["byzantine"] = args.byzantine
    return {
        "name": f"byz-{partition}-{attack}", "seed": args.seed,
        "data": {"dataset": args.dataset, "partition": partition, "alpha": 0.5,
                 "train_subset": args.train_subset, "test_subset": args.test_subset},
        "model": {"name": args.model},
        "federation": {"num_clients": args.clients, "rounds": args.rounds, "batch_size": args.batch_size,
                       "lr": args.lr, "momentum": args.momentum, "local_steps": args.local_steps,
                       "eval_every": args.rounds, "server_data": 100},
        "attack": atk,
        "defense": defense,
    }


def setting(args) -> dict:
    """What determines a run's result, besides its (partition, attack, defense) key."""
    skip = {"workers", "partitions", "attacks", "defenses", "out", "layered", "smoke"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def previous_results(out: Path, args, defenses: dict) -> dict:
    """Runs already stored in ``out`` under the same setting and the same defense definitions."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("setting") != setting(args):
        return {}
    same = {d for d, stages in old.get("defenses", {}).items() if defenses.get(d) == stages}
    keys = (tuple(k.split("|")) for k in old.get("results", {}))
    return {k: old["results"]["|".join(k)] for k in keys if len(k) == 3 and k[2] in same}


def run_cell(job):
    """Worker: one (partition, attack, defense) run; returns its final accuracy or the error."""
    global _DATA
    import torch

    import phalanx  # noqa: F401
    from phalanx.config import parse_config
    from phalanx.data import load_dataset
    from phalanx.errors import PhalanxError
    from phalanx.federation import Federation

    torch.set_num_threads(1)
    key, cfg = job
    if _DATA is None:
        _DATA = load_dataset(cfg["data"]["dataset"])
    t0 = time.perf_counter()
    try:
        fed = Federation(parse_config(cfg), dataset=_DATA)
        final = fed.run()
        return key, {"accuracy": final.get("accuracy"), "seconds": time.perf_counter() - t0}
    except PhalanxError as e:
        return key, {"accuracy": None, "error": str(e), "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="mlp")
    p.add_argument("--clients", type=int, default=25)
    p.add_argument("--byzantine", type=int, default=5)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.0, help="client SGD momentum")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps per round (1: distributed SGD)")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", default="iid,dirichlet")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defenses", default=",".join([*DEFENSES, "layered"]))
    p.add_argument("--out", default="results/reproduce_byzantine.json")
    p.add_argument("--layered", default=None, help="experiment YAML whose defense is the 'layered' row")
    p.add_argument("--smoke", action="store_true", help="digits, logreg, 1 round")
    args = p.parse_args()
    if args.smoke:
        args.dataset, args.model, args.rounds, args.train_subset, args.test_subset = "digits", "logreg", 1, None, None
        args.workers = 1
    defenses = dict(DEFENSES, layered=layered_defense(args.layered))
    parts, attacks, names = args.partitions.split(","), args.attacks.split(","), args.defenses.split(",")
    jobs = [((pt, a, d), cell_config(args, pt, a, defenses[d])) for pt in parts for a in attacks for d in names]
    print(f"{args.dataset}, {args.model}, {args.clients} clients ({args.byzantine} Byzantine), {args.rounds} rounds, "
          f"train subset {args.train_subset}, seed {args.seed}: {len(jobs)} runs on {args.workers} worker(s)", flush=True)
    t0 = time.perf_counter()
    out = Path(args.out)
    results = previous_results(out, args, defenses)
    todo = [job for job in jobs if job[0] not in results]
    if len(todo) < len(jobs):
        print(f"  {len(jobs) - len(todo)} runs reused from {out} (same setting)", flush=True)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"setting": setting(args), "defenses": defenses,
                                   "results": {"|".join(k): v for k, v in results.items()}}, indent=1))

    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    done = pool.imap_unordered(run_cell, todo) if pool else map(run_cell, todo)
    for i, (key, res) in enumerate(done, 1):
        results[key] = res
        save()  # after every run, so an interrupted grid resumes where it stopped
        if i % 20 == 0:
            print(f"  {i}/{len(todo)} runs, {time.perf_counter() - t0:.0f}s", flush=True)
    if pool:
        pool.close()
    wall = time.perf_counter() - t0
    errors = {k: results[k]["error"] for k, _ in jobs if results[k].get("error")}
    worst_by = {}
    for pt in parts:
        print(f"\nfinal test accuracy, partition = {pt}" + (" (alpha 0.5)" if pt == "dirichlet" else ""))
        cols = [a for a in attacks]
        print(f"{'defense':<16}" + "".join(f"{a[:11]:>12}" for a in cols) + f"{'worst':>9}")
        for d in names:
            accs = [results[(pt, a, d)]["accuracy"] for a in cols]
            attacked = [x for a, x in zip(cols, accs) if a != "none"]
            worst = min((x if x is not None else 0.0) for x in attacked) if attacked else None
            worst_by[(pt, d)] = worst
            print(f"{d:<16}" + "".join(f"{x:>12.3f}" if x is not None else f"{'err':>12}" for x in accs)
                  + (f"{worst:>9.3f}" if worst is not None else ""))
    for k, e in sorted(errors.items()):
        print(f"error {k}: {e}")
    summary = []
    for pt in parts:
        ranked = sorted(((w, d) for (p2, d), w in worst_by.items() if p2 == pt and w is not None), reverse=True)
        if ranked:
            summary.append(f"{pt}: best worst-case {ranked[0][1]} {ranked[0][0]:.3f}, worst {ranked[-1][1]} {ranked[-1][0]:.3f}")
    print(f"\nsummary: {'; '.join(summary)}; {len(jobs)} runs ({len(todo)} run now, in {wall / 60:.1f} min), {len(errors)} errors")


if __name__ == "__main__":
    main()
