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


def test_central_dp_config_is_refused_before_training(tiny_config):
    from phalanx.errors import PhalanxError

    tiny_config["defense"] = [{"update_clip": {"max_norm": 1.0}}, "median", {"central_dp": {"noise_multiplier": 1.0}}]
    with pytest.raises(PhalanxError, match=r"central_dp: needs a \(weighted\) mean aggregator.*got 'median'"):
        Federation(parse_config(tiny_config))
    tiny_config["defense"] = ["mean", {"central_dp": {"noise_multiplier": 1.0}}]
    with pytest.raises(PhalanxError, match="central_dp: needs a layer bounding each update's norm"):
        Federation(parse_config(tiny_config))


def test_central_dp_noise_follows_the_sample_weights(tiny_config):
    tiny_config["federation"]["rounds"] = 1
    tiny_config["data"] = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.3}
    tiny_config["defense"] = [{"update_clip": {"max_norm": 1.0}}, "mean", {"central_dp": {"noise_multiplier": 1.0}}]
    fed = Federation(parse_config(tiny_config))
    result = fed.run_round(0)
    info = result.report.info["reports"][-1].info
    share = float(fed.num_samples.max() / fed.num_samples.sum())  # every client takes part
    assert share > 1.2 / 6  # non-iid: the largest client holds well over 1/n of the data
    assert info["sensitivity"] == pytest.approx(2 * 1.0 * share, rel=1e-6)
    assert info["sigma"] == pytest.approx(info["sensitivity"])


def test_central_dp_accounts_with_the_client_sampling_rate(tiny_config):
    from phalanx.defenses.privacy import dp_epsilon

    tiny_config["federation"].update(rounds=3, clients_per_round=3)
    tiny_config["defense"] = [{"update_clip": {"max_norm": 1.0}}, "mean", {"central_dp": {"noise_multiplier": 1.0}}]
    fed = Federation(parse_config(tiny_config))
    assert fed.defense.post[0].sample_rate == 0.5
    final = fed.run()
    assert final["epsilon_central"] == pytest.approx(dp_epsilon(1.0, 3 / 6, 3, 1e-5), rel=1e-12)
