"""Privacy options inside full FL runs: DP-SGD clients and central DP, with epsilon stored."""

import math

import pytest

from phalanx.config import parse_config
from phalanx.errors import ConfigError
from phalanx.federation import Federation
from phalanx.store import Store


def test_dp_sgd_clients_train_and_store_epsilon(tiny_config, tmp_path):
    tiny_config["federation"].update(rounds=3, dp_sgd={"noise_multiplier": 0.8, "max_grad_norm": 1.0})
    fed = Federation(parse_config(tiny_config))
    store = Store(tmp_path / "r.db")
    final = fed.run(store)
    rounds = store.read_run(fed.run_id).rounds
    eps = [r["epsilon"] for r in rounds]
    assert all(math.isfinite(e) and e > 0 for e in eps) and eps == sorted(eps)  # privacy spent grows
    assert final["epsilon"] == eps[-1] and final["accuracy"] > 0.3


def test_dp_sgd_target_epsilon_is_respected(tiny_config):
    tiny_config["federation"].update(rounds=2, dp_sgd={"target_epsilon": 4.0})
    final = Federation(parse_config(tiny_config)).run()
    assert 3.0 < final["epsilon"] <= 4.0 + 0.05


def test_dp_sgd_config_needs_exactly_one_noise_setting(tiny_config):
    tiny_config["federation"]["dp_sgd"] = {"max_grad_norm": 1.0}
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        parse_config(tiny_config)


def test_central_dp_reports_epsilon(tiny_config):
    tiny_config["federation"]["rounds"] = 3
    tiny_config["defense"] = [{"update_clip": {"max_norm": 1.0}}, "mean", {"central_dp": {"noise_multiplier": 1.0, "clip": 1.0}}]
    final = Federation(parse_config(tiny_config)).run()
    assert final["epsilon_central"] > 0
