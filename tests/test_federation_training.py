"""Federation.train_clients: who trains how. Malicious clients follow an attack's training hook
(Neurotoxin's per-step mask, constrain-and-scale's anomaly loss) only when attacking, on either
engine; with DP-SGD, a malicious client that is not attacking trains exactly like an honest one."""

import numpy as np
import pytest
import torch

from phalanx.config import parse_config
from phalanx.federation import Federation
from phalanx.training import local_update

TRIGGER = {"size": 2, "position": "top-left", "margin": 0, "target": 0, "fraction": 0.5}


def build(cfg, **attack):
    cfg["attack"] = attack
    return Federation(parse_config(cfg))


def train(fed, rnd, attacking=True):
    chosen = fed.sample(rnd)
    U, _ = fed.train_clients(rnd, chosen, attacking)
    return U, fed.malicious[torch.from_numpy(chosen)]


# ---- DP-SGD ---------------------------------------------------------------------------------------

def dp_config(tiny_config):
    tiny_config["federation"].update(num_clients=10, rounds=2, dp_sgd={"noise_multiplier": 0.8})
    return tiny_config


def test_dp_sgd_malicious_clients_without_an_attack_train_like_honest_ones(tiny_config):
    cfg = dp_config(tiny_config)
    clean = build(cfg, byzantine=0)
    marked = build(cfg, byzantine=0.2)  # a clean cell with byzantine > 0: nobody attacks
    assert int(marked.malicious.sum()) == 2
    U0, _ = train(clean, 0)
    U1, _ = train(marked, 0)
    assert torch.equal(U0, U1)  # every row is the DP-SGD row
    clean.run(), marked.run()
    assert torch.equal(clean.params, marked.params)
    assert marked.dp_steps == clean.dp_steps  # the malicious clients' steps are counted
    assert all(marked.dp_steps[c] > 0 for c in torch.nonzero(marked.malicious).flatten().tolist())


def test_dp_sgd_malicious_clients_skip_dp_only_in_attacking_rounds(tiny_config):
    cfg = dp_config(tiny_config)
    clean = build(cfg, byzantine=0)
    poisoned = build(cfg, byzantine=0.2, poison="label_flip", rounds=[1])
    assert not poisoned.cfg.attack.active(0)
    U0, _ = train(clean, 0)
    U1, mal = train(poisoned, 0, attacking=poisoned.cfg.attack.active(0))
    assert torch.equal(U0, U1)  # round 0 is not an attacking round: DP-SGD for everyone
    V0, _ = train(clean, 1)
    V1, mal = train(poisoned, 1, attacking=True)
    assert torch.equal(V0[~mal], V1[~mal])
    assert not torch.allclose(V0[mal], V1[mal])  # the attackers trained on flipped labels, without DP


# ---- Neurotoxin: the mask holds at every local step ----------------------------------------------

@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_neurotoxin_malicious_clients_train_inside_the_mask(tiny_config, engine):
    tiny_config["federation"].update(engine=engine, weight_decay=1e-3)
    fed = build(tiny_config, name="neurotoxin", params={"ratio": 0.5}, byzantine=2,
                poison="pixel_trigger", poison_params=TRIGGER)
    fed.run_round(0)  # round 0 has no reference yet; it records the global params
    U, mal = train(fed, 1)
    keep = fed.attack_history["neurotoxin_mask"]
    assert 0 < int(keep.sum()) < keep.numel() and fed.attack_history["neurotoxin_round"] == 1
    assert torch.equal(U[mal][:, ~keep], torch.zeros(int(mal.sum()), int((~keep).sum())))
    assert (U[mal][:, keep] != 0).float().mean() > 0.5
    assert (U[~mal][:, ~keep] != 0).float().mean() > 0.5  # honest clients are not masked
    # the malicious rows are those of local training with the mask applied each step, which is
    # not the plain local update projected once
    c = int(fed.sample(1)[mal.numpy()][0])
    idx = fed.parts[c]
    hook = fed.attack.training_hook(_info(fed, 1, c))
    x, y = fed.data.x_train[idx], fed.data.y_train[idx]
    ref, _ = local_update(fed.model, fed.params, x, y, fed.spec, fed.client_generator(1, c), fed.poisons[c], hook)
    plain, _ = local_update(fed.model, fed.params, x, y, fed.spec, fed.client_generator(1, c), fed.poisons[c])
    assert torch.equal(U[mal][0], ref)
    assert not torch.allclose(ref, plain * keep, atol=1e-6)


def _info(fed, rnd, c):
    from phalanx.attacks.base import TrainingInfo

    return TrainingInfo(rnd, fed.client_ids[c], fed.params, fed.attack_history)


# ---- constrain-and-scale: the anomaly loss shapes local training ---------------------------------

@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_constrain_scale_malicious_clients_train_with_the_anomaly_loss(tiny_config, engine):
    from phalanx.attacks.backdoor_updates import _AnomalyLoss

    same = torch.equal if engine == "sequential" else lambda a, b: torch.allclose(a, b, atol=1e-6)
    tiny_config["federation"]["engine"] = engine
    attack = dict(name="constrain_scale", params={"max_norm": 5.0, "alpha": 0.5}, byzantine=2,
                  poison="pixel_trigger", poison_params=TRIGGER)
    fed = build(tiny_config, **attack)
    U, mal = train(fed, 0)
    plain_fed = build(tiny_config, **{**attack, "params": {"max_norm": 5.0, "alpha": 1.0}})
    P, _ = train(plain_fed, 0)
    assert same(U[~mal], P[~mal])
    for row, plain, c in zip(U[mal], P[mal], fed.sample(0)[mal.numpy()]):
        idx = fed.parts[c]
        ref, _ = local_update(fed.model, fed.params, fed.data.x_train[idx], fed.data.y_train[idx], fed.spec,
                              fed.client_generator(0, int(c)), fed.poisons[int(c)], _AnomalyLoss(0.5))
        assert torch.equal(row, ref)
        assert row.norm() < plain.norm()  # pulled towards the global model
    # outside attacking rounds nobody gets a hook
    V, mal = train(fed, 0, attacking=False)
    W, _ = train(build(tiny_config, byzantine=2), 0, attacking=False)
    assert same(V, W)


def test_attacks_without_a_hook_train_as_before(tiny_config):
    fed = build(tiny_config, name="alie", byzantine=2)
    U, mal = train(fed, 0)
    W, _ = train(build(tiny_config, byzantine=2), 0)
    assert torch.equal(U, W) and np.isfinite(U.numpy()).all()
