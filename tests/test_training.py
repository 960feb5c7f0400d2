import pytest
import torch

from phalanx.config import parse_config
from phalanx.federation import Federation
from phalanx.models import build_model
from phalanx.training import (LocalSpec, local_momentum_update, local_update, vectorized_momentum_updates,
                              vectorized_updates)
from phalanx.updates import flatten_params


def flip(x, y, gen):
    keep = torch.rand(len(y), generator=gen) < 0.5
    return x, torch.where(keep, y, 9 - y)


@pytest.mark.parametrize("model", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("spec", [LocalSpec(epochs=2, batch_size=7, lr=0.05, momentum=0.9, weight_decay=1e-3),
                                  LocalSpec(epochs=3, batch_size=16, lr=0.1, momentum=0.0, max_steps=5)])
def test_vectorized_agrees_with_sequential_reference(model, spec):
    g = torch.Generator().manual_seed(0)
    m = build_model(model, (1, 8, 8), 10, seed=0)
    params = flatten_params(m)
    sizes = [5, 23, 40, 17]  # unequal clients, short last batches
    data = [(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]
    poisons = [None, flip, None, flip]
    ref = [local_update(m, params, x, y, spec, torch.Generator().manual_seed(10 + i), poisons[i])
           for i, (x, y) in enumerate(data)]
    U, losses = vectorized_updates(m, params, data, spec, [torch.Generator().manual_seed(10 + i) for i in range(4)],
                                   poisons)
    R = torch.stack([r[0] for r in ref])
    assert U.shape == R.shape
    assert torch.allclose(U, R, atol=1e-5, rtol=1e-4)
    assert losses == pytest.approx([r[1] for r in ref], rel=1e-4)


def test_engines_give_the_same_run(tiny_config):
    finals = []
    for engine in ("sequential", "vectorized"):
        tiny_config["federation"]["engine"] = engine
        finals.append(Federation(parse_config(tiny_config)).run()["accuracy"])
    assert finals[0] == pytest.approx(finals[1], abs=0.01)



# ---- worker momentum: training continues from a client's buffer -----------------------------------

def client_data(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("spec", [LocalSpec(epochs=2, batch_size=7, lr=0.05, momentum=0.9, weight_decay=1e-3),
                                  LocalSpec(epochs=1, batch_size=16, lr=0.1, momentum=0.5, max_steps=1)])
def test_vectorized_momentum_agrees_with_sequential_and_leaves_the_buffers(spec):
    m = build_model("mlp", (1, 8, 8), 10, seed=0)
    params = flatten_params(m)
    data = client_data([5, 23, 40, 17])  # clients with fewer batches sit idle: their buffer must hold
    start = 0.1 * torch.randn(4, params.numel(), generator=torch.Generator().manual_seed(1))
    kept = start.clone()
    ref = [local_momentum_update(m, params, x, y, spec, torch.Generator().manual_seed(10 + i), start[i], flip)
           for i, (x, y) in enumerate(data)]
    U, losses, B = vectorized_momentum_updates(m, params, data, spec,
                                               [torch.Generator().manual_seed(10 + i) for i in range(4)],
                                               [flip] * 4, start)
    assert torch.equal(start, kept)  # inputs are not modified
    assert torch.allclose(U, torch.stack([r[0] for r in ref]), atol=1e-5, rtol=1e-4)
    assert torch.allclose(B, torch.stack([r[2] for r in ref]), atol=1e-4, rtol=1e-4)
    assert losses == pytest.approx([r[1] for r in ref], rel=1e-4)
    assert not torch.allclose(B, start)


def test_one_step_from_a_buffer_is_beta_times_buffer_plus_the_gradient():
    m, params, x, y = hook_setup()
    spec = LocalSpec(epochs=1, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3, max_steps=1)
    buf = torch.randn(params.numel(), generator=torch.Generator().manual_seed(2))
    upd, _, new = local_momentum_update(m, params, x, y, spec, torch.Generator().manual_seed(1), buf)
    sgd, _ = local_update(m, params, x, y, LocalSpec(1, 8, 0.1, 0.0, 1e-3, 1), torch.Generator().manual_seed(1))
    grad = -sgd / 0.1
    assert torch.allclose(new, 0.9 * buf + grad, atol=1e-6)
    assert torch.allclose(upd, -0.1 * new, atol=1e-6)
    # a zero buffer (or none) is the fresh optimizer of local_update, bit for bit
    fresh, _ = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), flip)
    zero, _, _ = local_momentum_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1),
                                       torch.zeros_like(params), flip)
    assert torch.equal(fresh, zero)


def test_momentum_buffer_of_the_wrong_shape_is_a_clear_error():
    from phalanx.errors import PhalanxError

    m, params, x, y = hook_setup()
    with pytest.raises(PhalanxError, match=r"momentum buffer must have shape \(\d+,\), got \(3,\)"):
        local_momentum_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), torch.zeros(3))
    with pytest.raises(PhalanxError, match="momentum buffer must have shape"):
        vectorized_momentum_updates(m, params, [(x, y)], SPEC, [torch.Generator()], [None], torch.zeros(2, 3))

# ---- training hooks (malicious clients' local training) ----------------------------------------

class Identity:
    def objective(self, class_loss, params, global_params):
        return class_loss

    def grad_transform(self, step):
        return step.clone()


class Mask:
    def __init__(self, keep):
        self.keep = keep

    def grad_transform(self, step):
        return step * self.keep


def hook_setup(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    m = build_model("mlp", (1, 8, 8), 10, seed=0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return m, flatten_params(m), x, y


SPEC = LocalSpec(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)


def test_a_hook_that_changes_nothing_gives_the_plain_update():
    m, params, x, y = hook_setup()
    plain, loss = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), flip)
    hooked, hloss = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), flip, Identity())
    assert torch.equal(plain, hooked) and loss == hloss


def test_grad_transform_masks_every_step_not_the_finished_update():
    m, params, x, y = hook_setup()
    keep = (torch.arange(params.numel()) % 3 == 0).float()
    masked, _ = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), None, Mask(keep))
    plain, _ = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1))
    assert torch.equal(masked[keep == 0], torch.zeros(int((keep == 0).sum())))  # weight decay too
    assert (masked[keep == 1] != 0).float().mean() > 0.9
    # projecting at every step trains a different model than projecting the finished update once
    assert not torch.allclose(masked, plain * keep, atol=1e-4)


def test_objective_hook_replaces_the_loss():
    m, params, x, y = hook_setup()

    class Pull:  # strongly tied to the global model: the update shrinks
        def objective(self, class_loss, flat, global_params):
            return class_loss + 2.0 * ((flat - global_params) ** 2).sum()

    plain, loss = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1))
    pulled, ploss = local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), None, Pull())
    assert pulled.norm() < 0.5 * plain.norm()
    assert ploss > 0 and ploss != loss  # the reported loss is the cross-entropy of the run


def test_bad_hook_results_are_clear_errors():
    from phalanx.errors import PhalanxError

    m, params, x, y = hook_setup()

    class Short:
        def grad_transform(self, step):
            return step[:3]

    class Vector:
        def objective(self, class_loss, flat, global_params):
            return flat

    with pytest.raises(PhalanxError, match="grad_transform must return a vector of shape"):
        local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), None, Short())
    with pytest.raises(PhalanxError, match="objective must return a scalar tensor"):
        local_update(m, params, x, y, SPEC, torch.Generator().manual_seed(1), None, Vector())
