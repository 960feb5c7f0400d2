"""Leakage defenses and DP accounting: exact pruning, clipping, noise, central DP, Opacus agreement."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from phalanx.context import simple_round_context
from phalanx.data.datasets import load_dataset
from phalanx.defenses.base import Aggregator, Report
from phalanx.defenses.pipeline import Pipeline
from phalanx.defenses.privacy import (CentralDP, clip_update, dp_epsilon, dp_sgd_gradient, dp_sgd_train,
                                      grad_noise, make_private, noise_for_epsilon, prune)
from phalanx.errors import PhalanxError
from phalanx.models import build_model
from phalanx.registry import DEFENSES
from phalanx.updates import flatten_params


class Mean(Aggregator):
    name = "mean"

    def __call__(self, U, w, ctx):
        return (U * w[:, None]).sum(0) / w.sum(), Report(self.name, U.shape[0])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("d,ratio", [(1000, 0.9), (1000, 0.0), (13426, 0.9), (7, 0.5), (10, 0.99)])
def test_prune_keeps_exactly_the_requested_fraction(d, ratio):
    v = torch.randn(d, generator=torch.Generator().manual_seed(d))
    out = prune(v, ratio)
    keep = d - math.floor(ratio * d)
    kept = out != 0
    assert int(kept.sum()) == keep
    assert torch.equal(out[kept], v[kept])
    assert v[kept].abs().min() >= v[~kept].abs().max() if keep < d else True


def test_prune_with_ties_and_per_row():
    out = prune(torch.ones(20), 0.75)
    assert int((out != 0).sum()) == 5
    U = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    assert ((prune(U, 0.9) != 0).sum(1) == 10).all()


def test_clip_update():
    U = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_update(U, 1.0)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    assert torch.allclose(clip_update(torch.tensor([6.0, 8.0]), 5.0), torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_grad_noise_has_the_stated_std_and_is_seeded(kind):
    v = torch.zeros(200_000)
    a = grad_noise(v, 0.1, kind, torch.Generator().manual_seed(0))
    b = grad_noise(v, 0.1, kind, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.1, rel=0.02)
    kurt = ((a - a.mean()) ** 4).mean() / a.var() ** 2
    assert kurt.item() == pytest.approx(6.0 if kind == "laplace" else 3.0, rel=0.1)


def test_registered_layers_compose_with_central_dp():
    for name in ("grad_noise", "update_clip", "prune", "central_dp"):
        assert name in DEFENSES
    z, clip, n = 2.0, 1.0, 10
    U = torch.randn(n, 20_000, generator=torch.Generator().manual_seed(0))
    post = DEFENSES.build("central_dp", noise_multiplier=z, clip=clip, delta=1e-5, sample_rate=0.1)
    pipe = Pipeline([DEFENSES.build("update_clip", max_norm=clip)], Mean(), [post])
    g, rep = pipe(U, torch.ones(n), simple_round_context(U, seed=1))
    noise = g - clip_update(U, clip).mean(0)
    assert noise.std().item() == pytest.approx(z * 2 * clip / n, rel=0.02)  # sensitivity 2 C / n
    info = rep.info["reports"][-1].info
    assert info["epsilon"] == pytest.approx(dp_epsilon(z, 0.1, 1, 1e-5))
    for _ in range(4):
        pipe(U, torch.ones(n), simple_round_context(U, seed=2))
    assert post.epsilon == pytest.approx(dp_epsilon(z, 0.1, 5, 1e-5))
    fresh = CentralDP(z, clip, 1e-5, 0.1)
    fresh.load_state_dict(post.state_dict())
    assert fresh.epsilon == post.epsilon
    with pytest.raises(PhalanxError, match="expected \\['history'\\]"):
        fresh.load_state_dict({"bogus": 1})


def test_grad_noise_and_prune_layers():
    U = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ctx = simple_round_context(U)
    out, w, _ = DEFENSES.build("prune", ratio=0.5)(U, torch.ones(3), ctx)
    assert ((out != 0).sum(1) == 20).all()
    out, w, _ = DEFENSES.build("grad_noise", sigma=0.5)(U, torch.ones(3), ctx)
    assert not torch.equal(out, U) and torch.equal(w, torch.ones(3))


def test_dp_epsilon_agrees_with_a_manually_stepped_rdp_accountant():
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant()
    for _ in range(300):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    assert dp_epsilon(1.1, 0.02, 300, 1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    prv = PRVAccountant()
    for _ in range(300):
        prv.step(noise_multiplier=1.1, sample_rate=0.02)
    assert dp_epsilon(1.1, 0.02, 300, 1e-5, "prv") == pytest.approx(prv.get_epsilon(delta=1e-5), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_dp_epsilon_agrees_with_an_opacus_privacy_engine_run(digits):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits.x_train[:256], digits.y_train[:256]
    model = build_model("logreg", (1, 8, 8), 10, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    priv = make_private(model, opt, loader, noise_multiplier=1.3, max_grad_norm=1.0, seed=0)
    steps = 0
    for xb, yb in priv.data_loader:
        priv.optimizer.zero_grad()
        F.cross_entropy(priv.model(xb), yb).backward()
        priv.optimizer.step()
        steps += 1
    assert priv.engine.get_epsilon(1e-5) == pytest.approx(dp_epsilon(1.3, 1 / len(loader), steps, 1e-5))


def test_noise_for_epsilon_reaches_the_target():
    z = noise_for_epsilon(8.0, 0.01, 1000, 1e-5)
    eps = dp_epsilon(z, 0.01, 1000, 1e-5)
    assert eps <= 8.0 and eps == pytest.approx(8.0, abs=0.05)
    assert noise_for_epsilon(2.0, 0.01, 1000, 1e-5) > z


def test_dp_sgd_train_trains_and_reports_epsilon(digits):
    x, y = digits.x_train[:400], digits.y_train[:400]
    model = build_model("logreg", (1, 8, 8), 10, seed=0)
    twin = copy.deepcopy(model)
    loss0 = F.cross_entropy(model(x), y).item()
    eps = dp_sgd_train(model, x, y, epochs=3, batch_size=40, lr=0.5, noise_multiplier=1.0,
                       max_grad_norm=1.0, delta=1e-5, seed=0)
    assert F.cross_entropy(model(x), y).item() < loss0 - 0.3
    assert math.isfinite(eps) and eps == pytest.approx(dp_epsilon(1.0, 1 / 10, 30, 1e-5))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus cleaned up
    dp_sgd_train(twin, x, y, epochs=3, batch_size=40, lr=0.5, noise_multiplier=1.0,
                 max_grad_norm=1.0, delta=1e-5, seed=0)
    assert torch.equal(flatten_params(model), flatten_params(twin))  # deterministic by seed


def test_dp_sgd_gradient_matches_clipped_per_sample_gradients(digits):
    x, y = digits.x_train[:5], digits.y_train[:5]
    model = build_model("lenet", (1, 8, 8), 10, seed=0)
    ref = []
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        ref.append(g * min(1.0, 0.5 / g.norm().item()))
    got = dp_sgd_gradient(model, x, y, noise_multiplier=0.0, max_grad_norm=0.5)
    assert torch.allclose(got, torch.stack(ref).mean(0), atol=1e-6)
    noisy = dp_sgd_gradient(model, x, y, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert (noisy - got).std().item() == pytest.approx(1.0 * 0.5 / 5, rel=0.05)


def test_bad_parameters_name_the_problem():
    with pytest.raises(PhalanxError, match=r"prune: ratio must be a number in \[0, 1\), got 1.0"):
        prune(torch.ones(4), 1.0)
    with pytest.raises(PhalanxError, match="grad_noise: sigma must be a number > 0, got 0"):
        grad_noise(torch.ones(4), 0)
    with pytest.raises(PhalanxError, match="kind must be one of gaussian, laplace, got 'cauchy'"):
        DEFENSES.build("grad_noise", sigma=1.0, kind="cauchy")
    with pytest.raises(PhalanxError, match=r"delta must be a number in \(0, 1\), got 2"):
        dp_epsilon(1.0, 0.1, 10, 2)
    with pytest.raises(PhalanxError, match="accountant must be one of rdp, prv, gdp"):
        dp_epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")
    with pytest.raises(PhalanxError, match="steps must be an integer >= 1"):
        noise_for_epsilon(8.0, 0.1, 0, 1e-5)
    with pytest.raises(PhalanxError, match="clip_update: input must be finite"):
        clip_update(torch.tensor([float("nan")]), 1.0)


@pytest.mark.parametrize("loss", ["weighted", "focal"])
def test_dp_sgd_trains_on_the_models_own_loss(loss):
    """One full-batch DP-SGD step without noise is a step on the model's loss (weighted or focal), whose
    per-sample gradients Opacus clips: it matches those gradients by hand, and differs from plain CE."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=gen), (torch.rand(48, generator=gen) < 0.25).long()
    model = build_model("tabular_mlp", (6,), 2, seed=0, hidden=[8], loss=loss, pos_weight=10.0)
    assert hasattr(model, "loss")
    start = flatten_params(model)

    def step(max_grad_norm):
        m = copy.deepcopy(model)
        dp_sgd_train(m, x, y, epochs=1, batch_size=len(y), lr=0.5, noise_multiplier=0.0,
                     max_grad_norm=max_grad_norm, seed=0)  # sample rate 1: every row in the one batch
        return flatten_params(m) - start

    def grad(fn, m=model):
        m.zero_grad()
        fn(m(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    own = grad(model.loss)
    plain = grad(F.cross_entropy)
    assert (own - plain).norm() > 0.1 * plain.norm()  # the two losses pull apart here
    unclipped = step(1e6)
    assert torch.allclose(unclipped, -0.5 * own, atol=1e-6)
    assert not torch.allclose(unclipped, -0.5 * plain, atol=1e-3)
    clipped = step(0.05)  # the same, each row's gradient of the model's loss clipped to 0.05
    assert torch.allclose(clipped, -0.5 * dp_sgd_gradient(model, x, y, 0.0, 0.05), atol=1e-6)
    rows = torch.stack([grad(lambda out, t, i=i: model.loss(out[i:i + 1], t[i:i + 1])) for i in range(len(y))])
    assert torch.allclose(clipped, -0.5 * clip_update(rows, 0.05).mean(0), atol=1e-6)


def test_dp_sgd_with_a_weighted_loss_survives_empty_poisson_batches():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 0, 1])
    model = build_model("tabular_logreg", (3,), 2, seed=0, loss="weighted", pos_weight=5.0)
    dp_sgd_train(model, x, y, epochs=20, batch_size=1, lr=0.1, noise_multiplier=0.5, seed=0)  # q = 0.2
    assert torch.isfinite(flatten_params(model)).all()
