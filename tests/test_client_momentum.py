"""Worker momentum (``federation.client_momentum``): each client keeps its heavy-ball buffer
``m <- momentum * m + g`` across rounds (Karimireddy, He & Jaggi 2021), so momentum acts even with
one local step per round; the buffers survive a checkpoint and resume bit for bit."""

import pytest
import torch

from phalanx.checkpoint import load_checkpoint
from phalanx.config import parse_config
from phalanx.errors import ConfigError
from phalanx.federation import Federation


class Killed(Exception):
    pass


def dsgd(cfg, **fed):
    """Distributed SGD: one local step per round, with worker momentum."""
    cfg["federation"].update(local_steps=1, momentum=0.9, client_momentum=True, **fed)
    return cfg


def snapshot(fed):
    return {c: b.clone() for c, b in fed.momentum_buffers.items()}


# ---- the recursion, worked by hand -------------------------------------------------------------

def heavy_ball_by_hand(fed, rounds, lr, beta, wd):
    """Full-batch gradients of multinomial logistic regression, in float64, and the heavy-ball
    recursion m_i <- beta m_i + g_i, update_i = -lr m_i, params += mean_i(update_i)."""
    p = fed.params.double().clone()
    k = fed.data.num_classes
    xs = [fed.data.x_train[idx].reshape(len(idx), -1).double() for idx in fed.parts]
    ys = [torch.nn.functional.one_hot(fed.data.y_train[idx], k).double() for idx in fed.parts]
    d_in = xs[0].shape[1]
    m = [torch.zeros_like(p) for _ in xs]
    for _ in range(rounds):
        W, b = p[:k * d_in].view(k, d_in), p[k * d_in:]
        ups = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            G = (torch.softmax(x @ W.T + b, 1) - y) / len(x)
            g = torch.cat([(G.T @ x).reshape(-1), G.sum(0)]) + wd * p
            m[i] = beta * m[i] + g
            ups.append(-lr * m[i])
        p = p + torch.stack(ups).mean(0)
    return p, m


def test_one_local_step_follows_the_heavy_ball_recursion(tiny_config):
    cfg = dsgd(tiny_config, num_clients=2, rounds=3, batch_size=64, weight_decay=0.01, weighting="uniform",
               engine="sequential")
    cfg["data"]["train_subset"] = 40  # 20 samples a client: one step is one full batch
    fed = Federation(parse_config(cfg))
    want, bufs = heavy_ball_by_hand(fed, 3, lr=0.1, beta=0.9, wd=0.01)
    fed.run()
    assert torch.allclose(fed.params.double(), want, atol=1e-5)
    for c in (0, 1):
        assert torch.allclose(fed.momentum_buffers[c].double(), bufs[c], atol=1e-5)
    # the same run without kept momentum (momentum 0: it would do nothing anyway) is plain SGD
    plain_cfg = {**cfg, "federation": {**cfg["federation"], "momentum": 0.0, "client_momentum": False}}
    plain = Federation(parse_config(plain_cfg))
    want0, _ = heavy_ball_by_hand(plain, 3, lr=0.1, beta=0.0, wd=0.01)
    plain.run()
    assert torch.allclose(plain.params.double(), want0, atol=1e-5)
    assert (fed.params - plain.params).abs().max() > 1e-3


def test_client_momentum_changes_the_updates_from_round_two(tiny_config):
    cfg = dsgd(tiny_config)
    fed = Federation(parse_config(cfg))
    plain = Federation(parse_config({**cfg, "federation": {**cfg["federation"], "momentum": 0.0,
                                                          "client_momentum": False}}))
    chosen = fed.sample(0)
    U0, _ = fed.train_clients(0, chosen, True)
    P0, _ = plain.train_clients(0, chosen, True)
    assert torch.equal(U0, P0)  # from a zero buffer, the first step is plain SGD
    U1, _ = fed.train_clients(1, chosen, True)
    P1, _ = plain.train_clients(1, chosen, True)
    assert torch.allclose(U1 - P1, 0.9 * U0, atol=1e-6)  # same params: -lr (beta m + g) + lr g = beta update0
    assert not torch.allclose(U1, P1, atol=1e-4)


# ---- engines, partial participation, malicious clients ----------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_sequential_and_vectorized_engines_agree(tiny_config, steps):
    runs = []
    for engine in ("sequential", "vectorized"):
        cfg = dsgd(tiny_config, engine=engine, clients_per_round=4, rounds=4, weight_decay=1e-3)
        cfg["federation"]["local_steps"] = steps
        fed = Federation(parse_config(cfg))
        fed.run()
        runs.append(fed)
    seq, vec = runs
    assert torch.allclose(seq.params, vec.params, atol=1e-5)
    assert seq.momentum_buffers.keys() == vec.momentum_buffers.keys()
    for c in seq.momentum_buffers:
        assert torch.allclose(seq.momentum_buffers[c], vec.momentum_buffers[c], atol=1e-4)


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_unsampled_clients_keep_their_buffers(tiny_config, engine):
    fed = Federation(parse_config(dsgd(tiny_config, clients_per_round=3, engine=engine)))
    fed.run_round(0)
    assert sorted(fed.momentum_buffers) == fed.sample(0).tolist()  # only who trained has a buffer
    for rnd in (1, 2):
        before = snapshot(fed)
        chosen = set(fed.sample(rnd).tolist())
        assert set(before) - chosen  # someone with a buffer sits this round out
        fed.run_round(rnd)
        for c in range(6):
            if c in chosen:
                assert c in fed.momentum_buffers and (c not in before or
                                                      not torch.equal(fed.momentum_buffers[c], before[c]))
            elif c in before:
                assert torch.equal(fed.momentum_buffers[c], before[c])
            else:
                assert c not in fed.momentum_buffers


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_malicious_clients_keep_their_honest_buffers(tiny_config, engine):
    cfg = dsgd(tiny_config, engine=engine)
    attacked = Federation(parse_config({**cfg, "attack": {"name": "sign_flip", "byzantine": 2}}))
    clean = Federation(parse_config({**cfg, "attack": {"byzantine": 2}}))  # marked, not attacking
    attacked.run_round(0)
    clean.run_round(0)
    assert torch.equal(attacked.malicious, clean.malicious)
    for c in range(6):  # the attack rewrote the rows sent, not the clients' own momentum
        assert torch.equal(attacked.momentum_buffers[c], clean.momentum_buffers[c])


def test_a_hooked_attacker_continues_from_its_buffer(tiny_config):
    from phalanx.attacks.backdoor_updates import _AnomalyLoss
    from phalanx.training import local_momentum_update

    trigger = {"size": 2, "position": "top-left", "margin": 0, "target": 0, "fraction": 0.5}
    cfg = dsgd(tiny_config, engine="vectorized")
    cfg["attack"] = dict(name="constrain_scale", params={"max_norm": 5.0, "alpha": 0.5}, byzantine=2,
                         poison="pixel_trigger", poison_params=trigger)
    fed = Federation(parse_config(cfg))
    fed.run_round(0)
    before = snapshot(fed)
    chosen = fed.sample(1)
    U, _ = fed.train_clients(1, chosen, True)
    for i, c in enumerate(chosen.tolist()):
        if fed.malicious[c]:
            idx = fed.parts[c]
            row, _, buf = local_momentum_update(fed.model, fed.params, fed.data.x_train[idx], fed.data.y_train[idx],
                                                fed.spec, fed.client_generator(1, c), before[c], fed.poisons[c],
                                                _AnomalyLoss(0.5))
            assert torch.equal(U[i], row) and torch.equal(fed.momentum_buffers[c], buf)


# ---- checkpoint and resume ----------------------------------------------------------------------

def test_resume_with_client_momentum_is_bit_identical(tiny_config, tmp_path):
    cfg = parse_config(dsgd(tiny_config, rounds=5, clients_per_round=4, engine="sequential"))
    whole = Federation(cfg)
    whole.run()

    def die(res):
        if res.round == 2:
            raise Killed

    ck = tmp_path / "ck.pt"
    with pytest.raises(Killed):
        Federation(cfg).run(on_round=die, checkpoint=ck)
    state = load_checkpoint(ck)
    assert state["round"] == 3 and len(state["momentum_buffers"]) > 0
    resumed = Federation(cfg)
    resumed.run(checkpoint=ck)
    assert torch.equal(resumed.params, whole.params)
    assert resumed.momentum_buffers.keys() == whole.momentum_buffers.keys()
    assert all(torch.equal(resumed.momentum_buffers[c], whole.momentum_buffers[c]) for c in whole.momentum_buffers)

    # the buffers in the checkpoint are what makes it identical: without them the run differs
    state["round"], state["momentum_buffers"] = 3, {}
    torch.save(state, ck)
    forgetful = Federation(cfg)
    forgetful.run(checkpoint=ck)
    assert not torch.equal(forgetful.params, whole.params)


# ---- settings that would do nothing --------------------------------------------------------------

def test_momentum_with_one_local_step_and_no_kept_buffer_is_refused(tiny_config):
    tiny_config["federation"].update(local_steps=1, momentum=0.9)
    with pytest.raises(ConfigError, match="momentum=0.9 has no effect with local_steps=1.*client_momentum: true"):
        parse_config(tiny_config)
    tiny_config["federation"]["momentum"] = 0.0
    parse_config(tiny_config)  # plain distributed SGD
    tiny_config["federation"].update(momentum=0.9, local_steps=3)
    parse_config(tiny_config)  # momentum acts within the round (FedAvg)
    tiny_config["federation"].update(local_steps=1, client_momentum=True)
    parse_config(tiny_config)


def test_client_momentum_without_momentum_or_with_dp_sgd_is_refused(tiny_config):
    tiny_config["federation"].update(client_momentum=True, momentum=0.0)
    with pytest.raises(ConfigError, match="client_momentum needs momentum > 0, got momentum=0"):
        parse_config(tiny_config)
    tiny_config["federation"].update(momentum=0.9, dp_sgd={"noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="client_momentum is not supported with dp_sgd"):
        parse_config(tiny_config)
