"""How long a backdoor survives once its attackers stop: Neurotoxin against a plain pixel trigger.

    python benchmarks/neurotoxin_durability.py            # Fashion-MNIST, MLP, 20 clients, 40 rounds
    python benchmarks/neurotoxin_durability.py --smoke    # digits, logreg: checks the script runs

Zhang et al. (ICML 2022) claim that Neurotoxin's backdoor is more durable than a plain one: the
attackers move only the coordinates the benign clients change least, so later benign rounds do not
wash the trigger out. Setting (the IID backdoor setting of ``reproduce_backdoor.py``): 20 clients of
which 2 attack with a 4x4 trigger on half their images (target class 0) from round 5 to round 19,
FedAvg (plain mean), then 20 clean rounds. Prints, per attack and seed, the ASR at the last attacked
round, the ASR at the end, and the persistence: rounds after the last poisoned round until the ASR
first falls under 50% ("> k" when it never does). Last line: the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ATTACKS = {"pixel": {}, "neurotoxin": {"name": "neurotoxin", "params": {"ratio": 0.95}}}


def settings(smoke: bool) -> dict:
    if smoke:
        return dict(dataset="digits", subset=None, model="logreg", clients=10, byzantine=2, start=2, stop=12,
                    rounds=20, lr=0.1, batch=16, trigger=dict(size=2, position="top-left", margin=0))
    return dict(dataset="fashion-mnist", subset=30000, model="mlp", clients=20, byzantine=2, start=5, stop=20,
                rounds=40, lr=0.05, batch=32, trigger=dict(size=4, position="top-left", margin=1))


def config(attack: str, s: dict, seed: int, defense: str) -> dict:
    data = {"dataset": s["dataset"], "partition": "iid"}
    if s["subset"]:
        data["train_subset"] = s["subset"]
    atk = {"byzantine": s["byzantine"], "poison": "pixel_trigger", "rounds": f"{s['start']}:{s['stop']}",
           "poison_params": {**s["trigger"], "target": 0, "fraction": 0.5}, **ATTACKS[attack]}
    return {"name": f"durability-{attack}-{defense}", "seed": seed, "data": data, "model": {"name": s["model"]},
            "federation": {"num_clients": s["clients"], "rounds": s["rounds"], "lr": s["lr"],
                           "batch_size": s["batch"], "momentum": 0.9},
            "attack": atk, "defense": [defense]}


def persistence(asr: list[float], last_poisoned: int, threshold: float = 0.5) -> int | None:
    """Rounds after ``last_poisoned`` until the ASR first drops under ``threshold`` (None: never)."""
    for k, a in enumerate(asr[last_poisoned + 1:], start=1):
        if a < threshold:
            return k
    return None


def run(attack: str, s: dict, seed: int, defense: str) -> dict:
    import phalanx  # noqa: F401
    from phalanx.config import parse_config
    from phalanx.federation import Federation

    asr: list[float] = []
    t0 = time.perf_counter()
    fed = Federation(parse_config(config(attack, s, seed, defense)))
    fed.run(on_round=lambda r: asr.append(r.metrics["asr"]))
    return {"attack": attack, "seed": seed, "defense": defense, "asr": asr, "accuracy": fed.evaluate()["accuracy"],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--defense", default="mean")
    ap.add_argument("--out", default="results/neurotoxin_durability.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    s = settings(args.smoke)
    last = s["stop"] - 1
    print(f"{s['dataset']}, {s['model']}, {s['clients']} clients ({s['byzantine']} attack in rounds "
          f"{s['start']}-{last}), {s['rounds']} rounds, defense {args.defense}")
    results = [run(a, s, seed, args.defense) for a in ATTACKS for seed in range(args.seeds)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setting": s, "results": results}, indent=1))
    print(f"{'attack':<11} {'seed':>4} {'ASR end of attack':>18} {'ASR final':>10} {'persistence':>12} {'acc':>6}")
    head = {}
    for r in results:
        p = persistence(r["asr"], last)
        ptxt = f"> {len(r['asr']) - 1 - last}" if p is None else str(p)
        print(f"{r['attack']:<11} {r['seed']:>4} {100 * r['asr'][last]:>17.1f}% {100 * r['asr'][-1]:>9.1f}% "
              f"{ptxt:>12} {100 * r['accuracy']:>6.1f}")
        head.setdefault(r["attack"], []).append((r["asr"][last], r["asr"][-1], p))
    parts = []
    for a, vals in head.items():
        parts.append(f"{a} ASR {100 * statistics.fmean(v[0] for v in vals):.1f}% at the last attacked round, "
                     f"{100 * statistics.fmean(v[1] for v in vals):.1f}% {s['rounds'] - 1 - last} rounds later")
    print("headline: " + "; ".join(parts))


if __name__ == "__main__":
    main()
