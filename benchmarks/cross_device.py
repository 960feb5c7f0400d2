"""Cross-device federations: thousands of clients per round, one local step each.

    python benchmarks/cross_device.py             # 1,000 and 10,000 clients x logreg, mlp x trimmed mean, layered
    python benchmarks/cross_device.py --smoke     # 100 and 200 clients, 2 rounds: checks it runs

Fashion-MNIST (the full 60,000 training images, IID: 6 images a client at 10,000 clients), every
client sampled every round, one local SGD step (``federation.local_steps: 1``, batch 32, momentum
0), no attack. Defenses: ``trimmed_mean`` alone and the layered default (configs/layered.yaml's
``defense``: validate, clip auto, trimmed mean, reputation). Rounds run through
``Federation.run`` with a results store (a temporary SQLite file), as ``phalanx run`` does.

Each combination runs in a fresh process (``--in-process`` or ``--smoke``: one process for all),
so its peak memory is its own: ``peak MB`` is the process's resident-set high-water mark
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: tensors, the dataset and the interpreter).
Before starting one, the free memory (``MemAvailable``) is checked against an estimate of what it
needs; a combination that would not fit runs with the largest client count that does (halving),
and says so; a watchdog ends a run whose resident set passes the budget.

Timing: round 0 is a warm-up; ``rounds/s`` is over the rounds after it, wall clock and per
CPU-second of the process (``process_time``: on a busy machine the wall clock mostly measures
the other processes; with one thread, CPU time approximates the wall time of an idle machine).
The phase columns split the timed rounds' CPU time: local training (``train``), the defense
pipeline (``defense``), the store's writes (``store``), the test-set evaluation (``eval``, at the
last round only, averaged over the timed rounds) and the rest (sampling, per-client statistics
and rows); ``gc`` is the part of them Python's garbage collector took, in whichever phase it ran.
The machine's load average is printed before and after each row.

The last line is the headline: 10,000 logistic-regression clients per round with the trimmed mean,
rounds per second against the target of 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET = 1.0  # rounds per second: 10,000 logreg clients, trimmed mean
PARAMS = {"logreg": 7_850, "mlp": 101_770}  # d on Fashion-MNIST
# extra memory per combination, in copies of the [k, d] float32 update matrix (measured, rounded up)
COPIES = {"trimmed_mean": 4.0, "layered": 5.0}
BASE_GB = 1.5  # interpreter, torch, the dataset
LAYERED_YAML = Path(__file__).resolve().parents[1] / "configs" / "layered.yaml"


def layered_defense() -> list:
    import yaml

    return list(yaml.safe_load(LAYERED_YAML.read_text())["defense"])


def config(clients: int, model: str, defense: str, rounds: int, seed: int, lr: float) -> dict:
    return {
        "name": f"cross-device-{clients}-{model}-{defense}", "seed": seed,
        "data": {"dataset": "fashion-mnist", "partition": "iid"},
        "model": {"name": model},
        "federation": {"num_clients": clients, "rounds": rounds, "local_steps": 1, "batch_size": 32, "lr": lr,
                       "momentum": 0.0, "eval_every": rounds},
        "defense": ["trimmed_mean"] if defense == "trimmed_mean" else layered_defense(),
    }


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def estimate_gb(clients: int, model: str, defense: str) -> float:
    return BASE_GB + COPIES[defense] * clients * PARAMS[model] * 4 / 2**30


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def watchdog(budget_gb: float) -> None:
    """End the process when its resident set passes ``budget_gb`` (rather than the machine's memory)."""
    def watch():
        while True:
            if rss_gb() > budget_gb:
                print(json.dumps({"error": f"memory: resident set passed the {budget_gb:.1f} GB budget"}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


class Clock:
    """CPU seconds of the process spent inside wrapped calls, by phase."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.on = False

    def add(self, phase: str, since: float) -> None:
        if self.on:
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - since

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, t0)
        return timed

    def gc_callback(self):
        start = [0.0]

        def cb(phase, info):
            if phase == "start":
                start[0] = time.process_time()
            else:
                self.add("gc", start[0])
        return cb


class TimedDefense:
    """The federation's pipeline with its calls timed; everything else passes through."""

    def __init__(self, inner, clock: Clock):
        self._inner, self._call = inner, clock.wrap("defense", inner)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def run_one(clients: int, model: str, defense: str, args, dataset=None) -> dict:
    """One combination in this process: timings, peak memory and final accuracy."""
    import torch

    import phalanx  # noqa: F401
    from phalanx.config import parse_config
    from phalanx.data import load_configured
    from phalanx.federation import Federation
    from phalanx.store import Store

    torch.set_num_threads(args.threads)
    cfg = parse_config(config(clients, model, defense, args.rounds, args.seed, args.lr))
    ds = dataset if dataset is not None else load_configured(cfg.data)
    t0 = time.perf_counter()
    fed = Federation(cfg, dataset=ds)
    build = time.perf_counter() - t0
    clock = Clock()
    fed.train_clients = clock.wrap("train", fed.train_clients)
    fed.evaluate = clock.wrap("eval", fed.evaluate)
    fed.defense = TimedDefense(fed.defense, clock)
    gc.callbacks.append(clock.gc_callback())
    marks: list[tuple[float, float]] = []

    def on_round(res):
        marks.append((time.perf_counter(), time.process_time()))
        clock.on = True  # phases count from the first round after the warm-up

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "cross_device.db")
        store.log_round = clock.wrap("store", store.log_round)
        store.log_clients = clock.wrap("store", store.log_clients)
        final = fed.run(store=store, on_round=on_round)
        store.close()
    gc.callbacks.pop()
    timed = len(marks) - 1
    wall, cpu = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    return {"clients": clients, "model": model, "defense": defense, "d": int(fed.params.numel()),
            "build_s": build, "rounds_timed": timed, "wall_s": wall, "cpu_s": cpu,
            "rounds_per_s": timed / wall, "rounds_per_cpu_s": timed / cpu,
            "phases": {k: v / timed for k, v in clock.cpu.items()}, "accuracy": final.get("accuracy"),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": args.threads}


def child(args) -> None:
    watchdog(args.budget_gb)
    out = run_one(args.one_clients, args.one_model, args.one_defense, args)
    print(json.dumps(out), flush=True)


def run_isolated(clients: int, model: str, defense: str, args, budget_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--one", str(clients), model, defense, "--rounds", str(args.rounds),
           "--threads", str(args.threads), "--seed", str(args.seed), "--lr", str(args.lr),
           "--budget-gb", f"{budget_gb:.2f}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {res.returncode}: {res.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def fit(clients: int, model: str, defense: str, margin_gb: float) -> tuple[int, float, float]:
    """The largest client count (halving from ``clients``) whose estimate fits in free memory."""
    free = mem_available_gb()
    budget = free - margin_gb
    k = clients
    while k > 1 and estimate_gb(k, model, defense) > budget:
        k //= 2
    return k, free, budget


def row_text(r: dict) -> str:
    ph = r["phases"]
    rest = r["cpu_s"] / r["rounds_timed"] - sum(ph.get(p, 0.0) for p in ("train", "defense", "store", "eval"))
    acc = "nan" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
    return (f"{r['clients']:>8,} {r['model']:<7}{r['defense']:<13}{r['d']:>8,}{r['rounds_per_s']:>9.3f}"
            f"{r['rounds_per_cpu_s']:>9.3f}{r['cpu_s'] / r['rounds_timed']:>8.2f}"
            f"{ph.get('train', 0):>7.2f}{ph.get('defense', 0):>8.2f}{ph.get('store', 0):>7.2f}"
            f"{ph.get('eval', 0):>6.2f}{rest:>6.2f}{ph.get('gc', 0):>6.2f}{r['peak_mb']:>9,.0f}{acc:>8}")


HEADER = (f"{'clients':>8} {'model':<7}{'defense':<13}{'d':>8}{'rounds/s':>9}{'r/cpu-s':>9}{'cpu-s/r':>8}"
          f"{'train':>7}{'defense':>8}{'store':>7}{'eval':>6}{'rest':>6}{'gc':>6}{'peak MB':>9}{'acc':>8}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1000,10000", help="comma-separated clients per round")
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument("--defenses", default="trimmed_mean,layered")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run, the first a warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--margin-gb", type=float, default=3.0, help="free memory left to the machine")
    ap.add_argument("--in-process", action="store_true", help="every combination in this process")
    ap.add_argument("--smoke", action="store_true", help="100 and 200 clients, 2 rounds, in one process")
    ap.add_argument("--one", nargs=3, metavar=("CLIENTS", "MODEL", "DEFENSE"), help=argparse.SUPPRESS)
    ap.add_argument("--budget-gb", type=float, default=float("inf"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        a.one_clients, a.one_model, a.one_defense = int(a.one[0]), a.one[1], a.one[2]
        return child(a)
    if a.smoke:
        a.clients, a.rounds, a.in_process = "100,200", 2, True
    sizes = [int(x) for x in a.clients.split(",")]
    models, defenses = a.models.split(","), a.defenses.split(",")
    print(f"cross-device: Fashion-MNIST (60,000 training images, IID), every client every round, 1 local step "
          f"(batch 32, lr {a.lr}, momentum 0), {a.rounds} rounds (round 0 a warm-up), {a.threads} thread(s), "
          f"seed {a.seed}; {os.cpu_count()} cores, load average {load()}")
    print("rounds/s: wall clock; r/cpu-s: rounds per CPU-second of the process; cpu-s/r and the phases: CPU seconds "
          "per round; "
          "peak MB: ru_maxrss" + (" of the one process so far" if a.in_process else " of the combination's process"))
    print(HEADER, flush=True)
    dataset = None
    if a.in_process:
        from phalanx.config import parse_config
        from phalanx.data import load_configured

        dataset = load_configured(parse_config(config(sizes[0], models[0], defenses[0], 2, a.seed, a.lr)).data)
    results = []
    for clients in sizes:
        for model in models:
            for defense in defenses:
                k, free, budget = fit(clients, model, defense, a.margin_gb)
                before = load()
                if k < 1:
                    print(f"{clients:>8,} {model:<7}{defense:<13} skipped: {free:.1f} GB free", flush=True)
                    continue
                r = (run_one(k, model, defense, a, dataset) if a.in_process
                     else run_isolated(k, model, defense, a, budget))
                if "error" in r:
                    print(f"{k:>8,} {model:<7}{defense:<13} failed: {r['error']} (load {before})", flush=True)
                    results.append({"clients": k, "model": model, "defense": defense, **r})
                    continue
                note = "" if k == clients else (f"  [{clients:,} need ~{estimate_gb(clients, model, defense):.1f} GB, "
                                                f"{free:.1f} GB free: ran {k:,}]")
                print(f"{row_text(r)}  load {before} -> {load()}{note}", flush=True)
                results.append(r | {"asked": clients})
    head = next((r for r in results if r.get("clients") == 10_000 and r.get("model") == "logreg"
                 and r.get("defense") == "trimmed_mean" and "error" not in r), None)
    if head is None:
        print("summary: no 10,000-client logreg trimmed-mean run in this grid (target 1 round/s)")
        return
    verdict = "met" if head["rounds_per_s"] >= TARGET else "missed"
    print(f"summary: 10,000 logreg clients per round with trimmed mean: {head['rounds_per_s']:.2f} rounds/s wall "
          f"({head['rounds_per_cpu_s']:.2f} per CPU-second, {head['threads']} thread) against the "
          f"{TARGET:.0f} round/s target: {verdict} at load {load()}; peak {head['peak_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
