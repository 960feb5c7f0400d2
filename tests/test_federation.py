import torch

from phalanx.config import parse_config
from phalanx.defenses.pipeline import build_defense
from phalanx.federation import Federation
from phalanx.errors import ConfigError

import pytest


def run(cfg_dict):
    fed = Federation(parse_config(cfg_dict))
    hist = []
    final = fed.run(on_round=lambda r: hist.append(r.metrics))
    return fed, hist, final


def strip_time(metrics):
    return [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics]


def test_same_seed_same_numbers(tiny_config):
    fa, ha, a = run(tiny_config)
    fb, hb, b = run(tiny_config)
    assert a == b and strip_time(ha) == strip_time(hb)
    assert torch.equal(fa.params, fb.params)
    tiny_config["seed"] = 4
    fc, _, _ = run(tiny_config)
    assert not torch.equal(fa.params, fc.params)


def test_fedavg_learns_digits(tiny_config):
    tiny_config["federation"]["rounds"] = 8
    _, hist, final = run(tiny_config)
    assert final["accuracy"] > 0.85
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_client_sampling_and_eval_every(tiny_config):
    tiny_config["federation"].update(clients_per_round=3, eval_every=2, rounds=4)
    fed = Federation(parse_config(tiny_config))
    seen = []
    fed.run(on_round=lambda r: seen.append(r))
    assert all(len(r.clients) == 3 for r in seen)
    assert ["accuracy" in r.metrics for r in seen] == [False, True, False, True]
    assert len({tuple(c["client_id"] for c in r.clients) for r in seen}) > 1


def test_fedavg_weights_by_samples(tiny_config):
    tiny_config["data"]["partition"] = "dirichlet"
    fed = Federation(parse_config(tiny_config))
    res = fed.run_round(0)
    weights = torch.tensor([c["weight"] for c in res.clients])
    assert torch.equal(weights, fed.num_samples)


def test_build_defense_order_errors():
    with pytest.raises(ConfigError, match="exactly one aggregator"):
        build_defense(["mean", "mean"])
