import pytest
import torch

from phalanx.config import parse_config
from phalanx.federation import Federation
from phalanx.models import build_model
from phalanx.training import LocalSpec, local_update, vectorized_updates
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
