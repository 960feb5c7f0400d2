"""The leakage audit of a grid: how much a single client's update leaks through each defense.

The rule: the attacker (the server, or anyone on the wire) runs iDLG on LeNet with sigmoid
activations, batch size 1, one test image per seed (Fashion-MNIST by default), against the
update one client sends *after* the defense's transforms that touch an individual update,
applied in stage order: ``clip``/``update_clip`` with a fixed bound clip it (data-dependent
bounds, 'auto' and 'quantile', leave it as is), ``grad_noise`` adds its noise, ``prune`` prunes,
``central_dp`` clips to its bound and adds its aggregate noise seen at the scale of one update
(n * sigma = 2 * z * C with C the clip layer's bound, see CentralDP), and ``weak_dp`` adds n * sigma. Every other stage (robust aggregators,
validation, reputation, signatures) lets a selected update through unchanged. The shared update
is the image's gradient (one local step at learning rate 1), and the defense's numbers are used
as configured, in update units. Identical rules share their probes, which are stored once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from typing import Any

from .bench_spec import GridSpec, PrivacySpec
from .config import defense_item, parse_config
from .store import Store


def audit_rule(stages: list, clients_per_round: int, dp_sgd: tuple[float, float] | None = None) -> list[list]:
    """The transforms a single client's update goes through, as [op, value] pairs (see the module doc).

    dp_sgd: (noise_multiplier, max_grad_norm) when clients train with DP-SGD: for one sample the
    private gradient is the gradient clipped to max_grad_norm plus N(0, (z * max_grad_norm)^2).
    """
    from .registry import DEFENSES

    rule: list[list] = []
    if dp_sgd is not None:
        z, c = dp_sgd
        rule += [["clip", float(c)], ["noise", float(z) * float(c), "gaussian"]]
    for item in stages:
        name, params = defense_item(item)
        sig = inspect.signature(DEFENSES.get(name)).parameters
        p = {k: v.default for k, v in sig.items() if v.default is not inspect.Parameter.empty} | params
        if name in ("clip", "update_clip") and isinstance(p.get("max_norm"), (int, float)):
            rule.append(["clip", float(p["max_norm"])])
        elif name == "grad_noise":
            rule.append(["noise", float(p["sigma"]), p.get("kind", "gaussian")])
        elif name == "prune":
            rule.append(["prune", float(p["ratio"])])
        elif name == "central_dp":  # noise z * 2C * max share; at one update's scale (equal shares) 2zC
            bounds = [r[1] for r in rule if r[0] == "clip"] + ([float(p["clip"])] if p.get("clip") else [])
            if bounds:
                rule.append(["noise", 2 * float(p["noise_multiplier"]) * min(bounds), "gaussian"])
        elif name == "weak_dp":
            bound = next((p[k] for k in ("max_norm", "clip", "norm_bound") if isinstance(p.get(k), (int, float))), None)
            sigma = next((p[k] for k in ("sigma", "std", "noise") if isinstance(p.get(k), (int, float))), None)
            rule += ([["clip", float(bound)]] if bound else []) + (
                [["noise", float(sigma) * clients_per_round, "gaussian"]] if sigma else [])
    return rule


def privacy_probe(rule: list[list], seed: int, steps: int, attack: str = "idlg",
                  dataset: str = "fashion-mnist") -> dict[str, Any]:
    """iDLG (LeNet, sigmoid, batch 1) on one test image's gradient after ``rule``: PSNR, SSIM, label accuracy."""
    import numpy as np
    import torch

    from .attacks.inversion import batch_gradient, invert
    from .data import load_dataset
    from .defenses.privacy import clip_update, grad_noise, prune
    from .leakage import score
    from .models import build_model

    t0 = time.perf_counter()
    ds = load_dataset(dataset)
    i = int(np.random.default_rng([seed, 23]).integers(len(ds.y_test)))
    x, y = ds.x_test[i:i + 1], ds.y_test[i:i + 1]
    model = build_model("lenet", ds.in_shape, ds.num_classes, seed)
    g = torch.cat([t.flatten() for t in batch_gradient(model, x, y)])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 29]).integers(2**62)))
    for op, value, *rest in rule:
        if op == "clip":
            g = clip_update(g, value)
        elif op == "noise":
            g = grad_noise(g, value, rest[0] if rest else "gaussian", gen)
        elif op == "prune":
            g = prune(g, value)
    res = invert(model, g, attack=attack, batch_size=1, in_shape=ds.in_shape, steps=steps, restarts=1, seed=seed)
    s = score(x, res.images, y, res.labels)
    return {"psnr": min(float(s.psnr[0]), 99.0), "ssim": float(s.ssim[0]),  # a perfect copy is capped at 99 dB
            "label_acc": s.label_acc, "seconds": time.perf_counter() - t0}


def probe_key(rule: list, seed: int, p: PrivacySpec) -> str:
    body = json.dumps([rule, seed, p.steps, p.attack, p.dataset, 1])
    return "p" + hashlib.sha256(body.encode()).hexdigest()[:16]


def plan_privacy(store: Store, spec: GridSpec) -> list[tuple[str, list, int]]:
    """Map each defense label to its audit probes; return the probes not yet stored."""
    if spec.privacy is None:
        return []
    rows, todo, stored = [], {}, {r[0] for r in store.db.execute("SELECT probe FROM bench_privacy")}
    for label, d in spec.defenses.items():
        raw = {k: v for k, v in spec.base.items() if k not in ("attack", "defense")}
        raw["federation"] = {**raw.get("federation", {}), **d.federation}
        fed = parse_config(raw).federation
        rule = audit_rule(d.stages, fed.clients_per_round or fed.num_clients, _dp_sgd(raw, fed))
        for seed in range(spec.privacy.seeds):
            key = probe_key(rule, seed, spec.privacy)
            rows.append((spec.name, label, seed, key))
            if key not in stored:
                todo[key] = (key, rule, seed)
    store.db.execute("DELETE FROM bench_privacy_map WHERE grid=?", (spec.name,))
    store.db.executemany("INSERT OR REPLACE INTO bench_privacy_map VALUES (?,?,?,?)", rows)
    return list(todo.values())


def _dp_sgd(raw: dict, fed) -> tuple[float, float] | None:
    """(noise multiplier, clip) of the configured DP-SGD; a target epsilon is turned into its noise as the
    federation does it."""
    dp = getattr(fed, "dp_sgd", None)
    if dp is None:
        return None
    z = dp.noise_multiplier
    if z is None:
        from .federation import Federation

        z = Federation(parse_config({**raw, "attack": {}, "defense": ["mean"]})).dp_noise
    return float(z), float(dp.max_grad_norm)


def run_probe(probe: str, rule: list, seed: int, p: dict) -> dict[str, Any]:
    import phalanx  # noqa: F401

    try:
        return {"probe": probe, "status": "done", **privacy_probe(rule, seed, p["steps"], p["attack"], p["dataset"])}
    except Exception as e:
        return {"probe": probe, "status": "failed", "error": f"{type(e).__name__}: {e}"}


def store_probe(store: Store, rule: list, seed: int, res: dict) -> str | None:
    """Store a probe's result (from :func:`run_probe`); return its error when it failed, else None."""
    if res["status"] != "done":
        return res["error"]
    store.db.execute("INSERT OR REPLACE INTO bench_privacy VALUES (?,?,?,?,?,?,?,?)",
                     (res["probe"], json.dumps(rule), seed, res["psnr"], res["ssim"],
                      None if math.isnan(res["label_acc"]) else res["label_acc"], res["seconds"], time.time()))
    return None
