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
