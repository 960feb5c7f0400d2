"""phalanx and ByzFL side by side, end to end, on ByzFL's own benchmark setting (issue 14, item 4).

    python benchmarks/byzfl_side_by_side.py                  # 300 rounds, both frameworks
    python benchmarks/byzfl_side_by_side.py --smoke          # 5 rounds (ByzFL too when its venv exists)
    python benchmarks/byzfl_side_by_side.py --frameworks phalanx --rounds 30

ByzFL runs from its own virtual environment (it pins its own torch and torchvision), never phalanx's:

    python3 -m venv /tmp/byzfl-venv && /tmp/byzfl-venv/bin/pip install byzfl==0.0.11

The setting (ByzFL's ``run_benchmark`` defaults unless named): Fashion-MNIST (all 60,000 training
images, the 10,000 test images), 20 honest + 5 Byzantine clients, Dirichlet(0.5) label skew, ByzFL's
``cnn_mnist`` (431,080 parameters; phalanx's ``cnn_mnist`` is the same network), DSGD: every round
each honest client sends one gradient of a batch of 25 through its persistent momentum 0.9, the
server steps lr 0.1 (weight decay 1e-4); ALIE against the coordinate-wise trimmed mean with f = 5;
test accuracy every ``--eval-every`` rounds (50, ByzFL's default) and at the end.

* ByzFL: ``byzfl.run_benchmark(nb_jobs=1)`` on a ``config.json`` written in a temporary folder, so
  ByzFL's own loop (Client, Server, ByzantineClient, DataDistributor, torchvision loaders) is what
  is timed. Its data is torchvision's ``FashionMNIST`` read offline: the installed IDX files
  (/usr/share/datasets/fashion-mnist, or ``$PHALANX_DATA``) are decompressed into the layout
  torchvision expects (``ROOT/FashionMNIST/raw``) before the clock starts; nothing is downloaded.
  ``size_train_set`` is 1.0 (ByzFL's default 0.8 would hold out 12,000 images for validation and
  evaluate them too); per-client metrics are stored, as ByzFL's default config does.
* phalanx: the same setting through ``Federation(cfg).run(store)`` with a results store (a
  temporary SQLite file), as ``phalanx run`` does; the config is ``phalanx_config`` below.

How the two settings map (the mapping is exact unless said):

* Momentum. ByzFL's client sends ``m <- 0.9 m + 0.1 g`` and its server steps ``lr = 0.1``;
  phalanx's client momentum is PyTorch's heavy ball ``m <- 0.9 m + g``, its update ``-lr * m``.
  Their m differ by the factor 1 / (1 - 0.9) = 10 from the first round on, so phalanx runs at
  ``lr = 0.1 * (1 - 0.9) = 0.01``: the same step every round.
* ALIE. ByzFL's benchmark attack is ``Optimal_ALittleIsEnough``: every round a line search (20
  aggregations) for the tau of ``mean + tau * std`` of the honest momentum gradients that moves the
  trimmed mean farthest from the honest mean. Against the plain trimmed mean it always returns
  tau = 10 (its first step: at tau >= (h - 1) / sqrt(h) = 4.25 every Byzantine row is trimmed and
  the aggregate no longer changes, so the search never improves on 10). phalanx rows are updates
  (-lr * momentum), so the same rows are ALIE with ``z = -10``. ``--alie search`` instead lets
  phalanx search its own z each round (its ``optimal`` variant, 20 aggregations, z in [0, 10]:
  the opposite direction, as phalanx's ALIE is written against updates). Both columns print the
  tau / z they used: the ByzFL driver wraps the search's last phase to append the tau it returns
  to a file (one line a round), phalanx reads ``attack.last``. The search is most of ByzFL's round
  (20 sorts of a [25, 431,080] matrix); with z = -10 phalanx does not search, so run
  ``--alie search`` too to see the speed-up when phalanx does comparable attack work.
* Weight decay 1e-4: ByzFL's server adds it to the aggregate; phalanx's clients add it to their
  gradient before the momentum (the same pull at steady state).
* Data. ByzFL partitions among its 20 honest clients only and its Byzantine clients train
  nothing; phalanx partitions among all 25 (Dirichlet with its own generator) and trains the 5
  attackers too before ALIE rewrites their rows. ByzFL's Fashion-MNIST loader flips training
  and test images horizontally at random (``RandomHorizontalFlip``); phalanx does not augment.
  Neither normalizes (pixels in [0, 1]).

Threads: both processes run with ``--threads`` torch threads (default 1: the machine is shared),
set by OMP_NUM_THREADS / MKL_NUM_THREADS in the child's environment and ``torch.set_num_threads``.
Each framework runs in a fresh process, one after the other (``--order``), with the load average
printed around each. ``wall s`` is the child process's wall time, end to end (interpreter start,
imports, data loading, training, evaluation, results); ``loop s`` is the training loop as each
reports it (ByzFL's ``train_time`` file; phalanx: ``Federation.run``), ``s/round`` is loop s per
round. The speed-up is ByzFL's wall over phalanx's. The last line is the headline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BYZFL_CNN_MNIST_PARAMS = 431_080  # sum of p.numel() over byzfl.fed_framework.models.cnn_mnist() (byzfl 0.0.11)
DEFAULT_BYZFL_PYTHON = "/tmp/byzfl-venv/bin/python"
HONEST, BYZANTINE, ALPHA, BATCH, LR, MOMENTUM, WEIGHT_DECAY = 20, 5, 0.5, 25, 0.1, 0.9, 1e-4
BYZFL_TAU = 10.0  # what Optimal_ALittleIsEnough returns against the plain trimmed mean (see above)
TARGET_GAP, TARGET_SPEEDUP = 2.0, 3.0  # points of accuracy, times faster end to end
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Runs inside ByzFL's venv (python -c BYZFL_DRIVER SETTINGS_JSON): writes config.json, runs ByzFL's
# benchmark, prints one JSON line with its test accuracies, its loop time and its model's size.
BYZFL_DRIVER = r'''
import glob, json, os, sys, time
s = json.loads(sys.argv[1])
import numpy as np
import torch
torch.set_num_threads(s["threads"])
import byzfl
from byzfl.benchmark import run_benchmark
from byzfl.fed_framework import models

os.chdir(s["workdir"])
config = {
    "benchmark_config": {
        "training_algorithm": {"name": "DSGD", "parameters": {}},
        "nb_steps": s["rounds"], "device": "cpu",
        "training_seed": s["seed"], "nb_training_seeds": 1,
        "data_distribution_seed": s["seed"], "nb_data_distribution_seeds": 1,
        "nb_honest_clients": s["honest"], "f": s["byzantine"], "size_train_set": 1.0,
        "data_distribution": [{"name": "dirichlet_niid", "distribution_parameter": s["alpha"]}],
    },
    "model": {"name": "cnn_mnist", "dataset_name": "fashionmnist", "nb_labels": 10, "loss": "NLLLoss",
              "learning_rate": s["lr"], "learning_rate_decay": 1.0, "milestones": []},
    "aggregator": [{"name": "TrMean", "parameters": {}}],
    "pre_aggregators": [],
    "honest_clients": {"momentum": s["momentum"], "weight_decay": s["weight_decay"], "batch_size": s["batch"]},
    "attack": [{"name": "Optimal_ALittleIsEnough", "parameters": {}}],
    "evaluation_and_results": {"evaluation_delta": s["eval_every"], "batch_size_evaluation": 128,
                               "evaluate_on_test": True, "store_per_client_metrics": True,
                               "store_models": False, "data_folder": s["data_root"],
                               "results_directory": "./results"},
}
with open("config.json", "w") as fh:
    json.dump(config, fh, indent=2)
# record the tau that ByzFL's line search settles on each round (one line appended per round; the
# benchmark's worker process is forked from this one, so it inherits the wrapper)
from byzfl.attacks.attacks import Optimal_ALittleIsEnough
_search = Optimal_ALittleIsEnough._contraction_phase
def _recorded(self, *args):
    tau = _search(self, *args)
    with open(os.path.join(s["workdir"], "taus.txt"), "a") as fh:
        fh.write("%r\n" % tau)
    return tau
Optimal_ALittleIsEnough._contraction_phase = _recorded
run_benchmark(nb_jobs=1)
folder, = [d for d in glob.glob("results/*/") if os.path.isfile(d + "config.json")]
tag = "tr_seed_%d_dd_seed_%d" % (s["seed"], s["seed"])
acc = np.loadtxt(folder + "test_accuracy_%s.txt" % tag, delimiter=",", ndmin=1).tolist()
loop = float(np.loadtxt(folder + "train_time_%s.txt" % tag, delimiter=",", ndmin=1)[0])
d = sum(p.numel() for p in models.cnn_mnist().parameters())
taus = open("taus.txt").read().split() if os.path.isfile("taus.txt") else []
evals = [i * s["eval_every"] for i in range(len(acc) - 1)] + [s["rounds"]]
print(json.dumps({"framework": "ByzFL", "version": getattr(byzfl, "__version__", "?"), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "d": d, "accuracy": acc[-1],
                  "curve": list(zip(evals, acc)), "loop_s": loop,
                  "alie": sorted(set(float(t) for t in taus)), "alie_rounds": len(taus)}), flush=True)
'''


def phalanx_config(rounds: int, seed: int, eval_every: int, alie: str = "byzfl") -> dict:
    """ByzFL's setting as a phalanx experiment (see the module docstring for the mapping)."""
    attack = ({"z": -BYZFL_TAU} if alie == "byzfl" else
              {"variant": "optimal", "aggregator": "trimmed_mean", "z_max": BYZFL_TAU, "steps": 20})
    return {
        "name": "byzfl-side-by-side", "seed": seed,
        "data": {"dataset": "fashion-mnist", "partition": "dirichlet", "alpha": ALPHA},
        "model": {"name": "cnn_mnist"},
        "federation": {"num_clients": HONEST + BYZANTINE, "rounds": rounds, "local_steps": 1, "batch_size": BATCH,
                       "lr": LR * (1 - MOMENTUM), "momentum": MOMENTUM, "client_momentum": True,
                       "weight_decay": WEIGHT_DECAY, "weighting": "uniform", "eval_every": eval_every},
        "attack": {"name": "alie", "params": attack, "byzantine": BYZANTINE},
        "defense": ["trimmed_mean"],
        "defense_f": BYZANTINE,
    }


def phalanx_worker(s: dict) -> None:
    """The phalanx column, in its own process: one JSON line like the ByzFL driver's."""
    import torch

    torch.set_num_threads(s["threads"])
    import phalanx
    from phalanx.config import parse_config
    from phalanx.federation import Federation
    from phalanx.store import Store

    cfg = parse_config(phalanx_config(s["rounds"], s["seed"], s["eval_every"], s["alie"]))
    curve, zs = [], []

    def on_round(res):
        if (fed.attack.last or {}).get("z") is not None:
            zs.append(float(fed.attack.last["z"]))
        if "accuracy" in res.metrics:
            curve.append((res.round + 1, res.metrics["accuracy"]))

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "phalanx.db")
        fed = Federation(cfg)
        t0 = time.perf_counter()
        final = fed.run(store=store, on_round=on_round)
        loop = time.perf_counter() - t0
        store.close()
    print(json.dumps({"framework": "phalanx", "version": getattr(phalanx, "__version__", "?"),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "d": int(fed.params.numel()), "accuracy": final["accuracy"], "curve": curve,
                      "loop_s": loop, "alie": sorted(set(zs)), "alie_rounds": len(zs)}), flush=True)


def find_idx_folder() -> Path | None:
    """The folder of the Fashion-MNIST IDX files, where phalanx finds them ($PHALANX_DATA, Debian's, the cache)."""
    from phalanx.data.datasets import IDX_FILES, find_files

    return find_files("fashion-mnist", IDX_FILES)


def torchvision_root(src: Path, dst: Path) -> Path:
    """Lay the IDX files out as torchvision's FashionMNIST expects (ROOT/FashionMNIST/raw, uncompressed)."""
    raw = dst / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX:  # phalanx keeps them gzipped (IDX_FILES); torchvision reads them uncompressed
        with gzip.open(src / f"{name}.gz", "rb") as fin, open(raw / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return dst


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_child(cmd: list[str], threads: int, cwd: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    before = load()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-5:]
        return {"error": f"exit {res.returncode}: " + " | ".join(tail), "wall_s": wall}
    out = json.loads(lines[-1])
    out.update(wall_s=wall, load_before=before, load_after=load())
    return out


def settings(a, **extra) -> dict:
    return {"rounds": a.rounds, "seed": a.seed, "eval_every": a.eval_every, "threads": a.threads,
            "honest": HONEST, "byzantine": BYZANTINE, "alpha": ALPHA, "batch": BATCH, "lr": LR,
            "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "alie": a.alie, **extra}


def run_phalanx(a) -> dict:
    return run_child([sys.executable, __file__, "--worker", json.dumps(settings(a))], a.threads)


def run_byzfl(a, idx: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="byzfl-side-by-side-") as tmp:
        root = torchvision_root(idx, Path(tmp) / "data")
        work = Path(tmp) / "work"
        work.mkdir()
        s = settings(a, data_root=str(root), workdir=str(work))
        return run_child([a.byzfl_python, "-c", BYZFL_DRIVER, json.dumps(s)], a.threads, cwd=str(work))


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50, help="test accuracy every N rounds (ByzFL's default 50)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each framework's process")
    ap.add_argument("--byzfl-python", default=DEFAULT_BYZFL_PYTHON, help="python of a venv with byzfl==0.0.11")
    ap.add_argument("--frameworks", default="phalanx,byzfl", help="which columns to run (comma-separated)")
    ap.add_argument("--order", choices=("phalanx-first", "byzfl-first"), default="phalanx-first")
    ap.add_argument("--alie", choices=("byzfl", "search"), default="byzfl",
                    help="phalanx's ALIE z: ByzFL's choice (z = -10) or phalanx's own search each round")
    ap.add_argument("--smoke", action="store_true", help="5 rounds (ByzFL too only when its venv exists)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        phalanx_worker(json.loads(a.worker))
        return 0
    if a.smoke:
        a.rounds = 5
    a.eval_every = min(a.eval_every, a.rounds)
    wanted = [f.strip().lower() for f in a.frameworks.split(",") if f.strip()]
    bad = sorted(set(wanted) - {"phalanx", "byzfl"})
    if bad:
        ap.error(f"--frameworks: phalanx and/or byzfl, got {', '.join(bad)}")
    from phalanx.models import build_model

    d = sum(p.numel() for p in build_model("cnn_mnist", (1, 28, 28), 10, seed=0).parameters())
    print(f"phalanx vs ByzFL: Fashion-MNIST, {HONEST} honest + {BYZANTINE} Byzantine, Dirichlet({ALPHA}), cnn_mnist "
          f"(phalanx d = {d:,}, ByzFL's {BYZFL_CNN_MNIST_PARAMS:,}), DSGD {a.rounds} rounds of one step "
          f"(batch {BATCH}, lr {LR}, client momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}), "
          f"ALIE ({'z = -10, ByzFL' if a.alie == 'byzfl' else 'z searched by phalanx'}) vs trimmed mean f = {BYZANTINE}; "
          f"test accuracy every {a.eval_every} rounds; seed {a.seed}, {a.threads} thread(s) each; "
          f"{os.cpu_count()} cores, load average {load()}", flush=True)
    if d != BYZFL_CNN_MNIST_PARAMS:
        print(f"MISMATCH: phalanx's cnn_mnist has {d:,} parameters, ByzFL's {BYZFL_CNN_MNIST_PARAMS:,}")
    idx = find_idx_folder()
    if idx is None:
        print("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or set PHALANX_DATA)")
        return 1
    results: dict[str, dict] = {}
    todo = [f for f in (("phalanx", "byzfl") if a.order == "phalanx-first" else ("byzfl", "phalanx")) if f in wanted]
    for fw in todo:
        if fw == "byzfl":
            if not Path(a.byzfl_python).is_file():
                print(f"ByzFL skipped: no {a.byzfl_python}. Create its venv with\n"
                      f"    python3 -m venv /tmp/byzfl-venv && /tmp/byzfl-venv/bin/pip install byzfl==0.0.11\n"
                      f"or pass --byzfl-python PATH", flush=True)
                continue
            results["ByzFL"] = run_byzfl(a, idx)
        else:
            results["phalanx"] = run_phalanx(a)
        name = "ByzFL" if fw == "byzfl" else "phalanx"
        r = results[name]
        if "error" in r:
            print(f"{name} failed after {r['wall_s']:.1f} s: {r['error']}", flush=True)
        else:
            curve = ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["curve"])
            what = "tau (ByzFL's gradient rows)" if name == "ByzFL" else "z (phalanx's update rows)"
            seen = ", ".join(f"{v:g}" for v in r["alie"][:8]) + (" ..." if len(r["alie"]) > 8 else "")
            print(f"{name} done: wall {r['wall_s']:.1f} s, load {r['load_before']} -> {r['load_after']}; "
                  f"torch {r['torch']}, {r['threads']} thread(s), d = {r['d']:,}; accuracy by round: {curve}; "
                  f"ALIE {what} over {r['alie_rounds']} rounds: {seen or 'not recorded'}", flush=True)
    print()
    print(f"{'framework':<10}{'rounds':>7}{'final acc':>11}{'wall s':>9}{'loop s':>9}{'s/round':>9}{'d':>10}")
    for name in ("phalanx", "ByzFL"):
        r = results.get(name)
        if r is None or "error" in r:
            print(f"{name:<10}{a.rounds:>7}{'-':>11}{'-':>9}{'-':>9}{'-':>9}{'-':>10}")
            continue
        print(f"{name:<10}{a.rounds:>7}{pct(r['accuracy']):>11}{r['wall_s']:>9.1f}{r['loop_s']:>9.1f}"
              f"{r['loop_s'] / a.rounds:>9.3f}{r['d']:>10,}")
    p, b = results.get("phalanx", {}), results.get("ByzFL", {})
    both = "accuracy" in p and "accuracy" in b
    acc_p, acc_b = p.get("accuracy"), b.get("accuracy")
    if both:
        gap, speed, loop_speed = 100 * (acc_p - acc_b), b["wall_s"] / p["wall_s"], b["loop_s"] / p["loop_s"]
        print(f"accuracy gap (phalanx - ByzFL): {gap:+.1f} pts (target within +-{TARGET_GAP:.0f}); speed-up: "
              f"{speed:.2f}x end to end, {loop_speed:.2f}x training loop (target >= {TARGET_SPEEDUP:.0f}x): "
              f"{'met' if abs(gap) <= TARGET_GAP and speed >= TARGET_SPEEDUP else 'MISSED'}")
        tail = (f"accuracy {pct(acc_p)} vs {pct(acc_b)} (gap {gap:+.1f} pts), wall {p['wall_s']:.1f} s vs "
                f"{b['wall_s']:.1f} s (speed-up {speed:.2f}x)")
    else:
        wall_p = f"{p['wall_s']:.1f} s" if "accuracy" in p else "n/a"
        wall_b = f"{b['wall_s']:.1f} s" if "accuracy" in b else "n/a"
        tail = (f"accuracy {pct(acc_p)} vs {pct(acc_b)} (gap n/a), wall {wall_p} vs {wall_b} "
                f"(speed-up n/a: {'ByzFL' if 'accuracy' in p else 'phalanx'} not run)")
    print(f"phalanx vs ByzFL (cnn_mnist, ALIE vs trimmed mean, {a.rounds} rounds): {tail}")
    failed = any("error" in r for r in results.values())
    return 1 if failed or d != BYZFL_CNN_MNIST_PARAMS else 0


if __name__ == "__main__":
    sys.exit(main())
