"""FedAvg on Fashion-MNIST: final test accuracy and seconds per round, IID and Dirichlet(0.5).

    python benchmarks/fedavg_fmnist.py            # CNN, 20 clients, 30 rounds (targets 88% / 85%)
    python benchmarks/fedavg_fmnist.py --smoke    # digits, 2 rounds: checks the script runs

Prints one row per partition and a last line with the headline figures.
"""

from __future__ import annotations

import argparse
import time

import torch

import phalanx  # noqa: F401
from phalanx.config import parse_config
from phalanx.federation import Federation

TARGETS = {"iid": 0.88, "dirichlet": 0.85}


def config(partition: str, args) -> dict:
    return {
        "name": f"fedavg-{partition}", "seed": args.seed,
        "data": {"dataset": args.dataset, "partition": partition, "alpha": 0.5},
        "model": {"name": args.model, "params": {"width": args.width} if args.model == "cnn" else {}},
        "federation": {"num_clients": args.clients, "rounds": args.rounds, "batch_size": 32, "lr": args.lr,
                       "momentum": 0.9, "local_epochs": 1, "eval_every": args.eval_every},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--smoke", action="store_true", help="digits, 2 rounds, logreg")
    args = p.parse_args()
    if args.smoke:
        args.dataset, args.rounds, args.model, args.clients, args.eval_every = "digits", 2, "logreg", 5, 1
    torch.set_num_threads(args.threads)
    print(f"FedAvg, {args.dataset}, {args.model} (width {args.width}), {args.clients} clients, "
          f"{args.rounds} rounds, lr {args.lr}, batch 32, 1 local epoch, seed {args.seed}")
    print(f"{'partition':<12}{'final acc':>10}{'best acc':>10}{'target':>8}{'s/round':>9}  curve (every {args.eval_every})")
    results = {}
    for partition in ("iid", "dirichlet"):
        fed = Federation(parse_config(config(partition, args)))
        curve = []
        t0 = time.perf_counter()
        final = fed.run(on_round=lambda r: curve.append(r.metrics["accuracy"]) if "accuracy" in r.metrics else None)
        per_round = (time.perf_counter() - t0) / args.rounds
        results[partition] = (final["accuracy"], per_round)
        ok = "met" if final["accuracy"] >= TARGETS[partition] else "MISSED"
        print(f"{partition:<12}{final['accuracy']:>10.4f}{max(curve):>10.4f}{TARGETS[partition]:>8.2f}"
              f"{per_round:>9.2f}  {' '.join(f'{a:.3f}' for a in curve)}  [{ok}]", flush=True)
    (ia, it), (da, dt) = results["iid"], results["dirichlet"]
    print(f"summary: IID {ia:.2%} (target 88%), Dirichlet(0.5) {da:.2%} (target 85%) after {args.rounds} rounds; "
          f"{(it + dt) / 2:.1f} s/round")


if __name__ == "__main__":
    main()
