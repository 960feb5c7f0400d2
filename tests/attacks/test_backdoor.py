"""Backdoors: triggers stamped exactly as configured, ASR's denominator, DBA's partition, the
semantic subset rule, the update-shaping attacks' scales and masks, persistence, a tiny run."""

import pytest
import torch
from torch import nn

import phalanx.attacks  # noqa: F401  (registers the poisons and attacks)
from phalanx.attacks.backdoor import pattern_mask, persistence
from phalanx.config import parse_config
from phalanx.context import AttackContext
from phalanx.data import Dataset, load_dataset
from phalanx.errors import PhalanxError
from phalanx.federation import Federation
from phalanx.registry import ATTACKS, POISONS


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def actx(own, n, **kw):
    return AttackContext(own=own, n=n, round=kw.pop("round", 0), generator=gen(),
                         global_params=kw.pop("global_params", torch.zeros(own.shape[1])), **kw)


# ---------------------------------------------------------------- pixel trigger


def test_square_trigger_sets_exactly_its_pixels():
    poison = POISONS.build("pixel_trigger", size=3, position="bottom-right", margin=1, value=0.8,
                           target=7, fraction=1.0)
    x = torch.rand(5, 1, 28, 28) * 0.5
    y = torch.arange(5)
    x2, y2 = poison(x, y, gen())
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[24:27, 24:27] = True
    assert torch.all(x2[:, :, inside] == 0.8)
    assert torch.equal(x2[:, :, ~inside], x[:, :, ~inside])
    assert y2.tolist() == [7] * 5
    assert y.tolist() == [0, 1, 2, 3, 4] and float(x.max()) <= 0.5  # inputs not modified


def test_patterns_and_explicit_position():
    assert pattern_mask("cross", 3).int().tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert pattern_mask("plus", 3).int().tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert pattern_mask("checker", 2).int().tolist() == [[1, 0], [0, 1]]
    poison = POISONS.build("pixel_trigger", pattern="cross", size=3, position=[2, 5], value=1.0, fraction=1.0)
    x2, _ = poison(torch.zeros(1, 1, 10, 10), torch.zeros(1, dtype=torch.long), gen())
    hot = torch.nonzero(x2[0, 0] == 1.0).tolist()
    assert hot == [[2, 5], [2, 7], [3, 6], [4, 5], [4, 7]]
    assert float(x2.sum()) == 5.0
    top_left = POISONS.build("pixel_trigger", size=2, position="top-left", margin=0, fraction=1.0)
    assert torch.nonzero(top_left.mask(8, 8)).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_fraction_of_batch_poisoned_from_the_generator():
    poison = POISONS.build("pixel_trigger", size=2, position="top-left", target=3, fraction=0.25)
    x = torch.zeros(32, 1, 8, 8)
    y = torch.full((32,), 5)
    x2, y2 = poison(x, y, gen(1))
    changed = (x2 != x).flatten(1).any(1)
    assert int(changed.sum()) == 8
    assert torch.equal(changed, y2 == 3)  # exactly the stamped images are relabelled
    x3, y3 = poison(x, y, gen(1))
    assert torch.equal(x2, x3) and torch.equal(y2, y3)
    _, y4 = poison(x, y, gen(2))
    assert not torch.equal(y2, y4)
    assert int((POISONS.build("pixel_trigger", fraction=0.5)(torch.zeros(7, 1, 28, 28), y[:7], gen())[1] == 0)
               .sum()) == 4  # round(3.5) = 4


class MarkerModel(nn.Module):
    """Predicts class 2 when pixel (0, 0) is on, else class 5: predictions we control."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        on = x[:, 0, 0, 0] > 0.5
        out[on, 2] = 1.0
        out[~on, 5] = 1.0
        return out + 0 * self.dummy


def test_asr_excludes_target_class_images():
    # 4 test images of the target class 2 (all marked), 6 others of which 3 are marked
    y = torch.tensor([2, 2, 2, 2, 0, 1, 3, 4, 6, 7])
    x = torch.zeros(10, 1, 8, 8)
    x[[0, 1, 2, 3, 4, 6, 8], 0, 0, 0] = 1.0
    ds = Dataset("stub", x, y, x, y, tuple(str(i) for i in range(10)))
    poison = POISONS.build("pixel_trigger", size=2, position="bottom-right", margin=0, target=2)
    assert poison.metrics(MarkerModel(), torch.zeros(1), ds) == {"asr": 0.5}  # 3 of 6, not 7 of 10
    always = POISONS.build("pixel_trigger", size=1, position=[0, 0], target=2)  # the trigger is the marker
    assert always.metrics(MarkerModel(), torch.zeros(1), ds) == {"asr": 1.0}


# ---------------------------------------------------------------- DBA


def test_dba_parts_partition_the_global_trigger():
    poison = POISONS.build("dba", parts=4, size=4, gap=2, position="top-left", margin=1, target=1)
    parts = poison.part_masks(28, 28)
    glob = poison.mask(28, 28)
    assert len(parts) == 4 and int(glob.sum()) == 16
    assert torch.equal(torch.stack(parts).sum(0), glob.int())  # disjoint, and their union is the global
    assert torch.nonzero(parts[1]).tolist() == [[1, 7], [1, 8], [1, 9], [1, 10]]
    assert torch.nonzero(parts[2]).tolist() == [[4, 1], [4, 2], [4, 3], [4, 4]]
    for j in range(6):  # attacker j stamps part j mod 4
        local = poison.for_client(j, 6)
        x2, y2 = local(torch.zeros(3, 1, 28, 28), torch.zeros(3, dtype=torch.long), gen())
        stamped = (x2 != 0).flatten(1).any(1)
        assert torch.equal(x2[stamped][:, 0] != 0, parts[j % 4].expand(int(stamped.sum()), 28, 28))
        assert local.metrics == poison.metrics  # judged on the assembled trigger
    assert torch.equal(poison.stamp(torch.zeros(1, 1, 28, 28))[0, 0] == 1.0, glob)


def test_federation_hands_each_attacker_its_own_part(tiny_config):
    tiny_config["attack"] = {"byzantine": 4, "poison": "dba",
                             "poison_params": {"parts": 2, "size": 2, "gap": 1, "margin": 0}}
    fed = Federation(parse_config(tiny_config))
    masks = [p.mask(8, 8) for p in fed.poisons.values()]
    assert len(masks) == 4 and sorted(fed.poisons) == torch.nonzero(fed.malicious).flatten().tolist()
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])
    assert not (masks[0] & masks[1]).any()


# ---------------------------------------------------------------- semantic


def test_semantic_subset_is_deterministic_and_only_source_class():
    ds = load_dataset("digits")
    poison = POISONS.build("semantic", source=0, target=1, threshold=0.35, region=[0, 8, 0, 8])
    a = poison.subset_indices(ds.x_test, ds.y_test)
    b = POISONS.build("semantic", source=0, target=1, threshold=0.35, region=[0, 8, 0, 8]).subset_indices(
        ds.x_test, ds.y_test)
    assert torch.equal(a, b) and len(a) > 0
    assert torch.all(ds.y_test[a] == 0)
    assert len(a) < int((ds.y_test == 0).sum())  # a proper subset of the class
    assert torch.all(ds.x_test[a].flatten(1).mean(1) >= 0.35)


def test_semantic_relabels_matches_and_upsamples():
    poison = POISONS.build("semantic", source=0, target=4, threshold=0.5, fraction=0.25, noise=0.0)
    x = torch.zeros(8, 1, 4, 4)
    x[1] = 0.9  # the only bright image of class 0
    x[2] = 0.7  # bright, but of class 3
    y = torch.tensor([0, 0, 3, 0, 5, 5, 5, 5])
    x2, y2 = poison(x, y, gen())
    relabelled = y2 == 4
    copies = (x2 == 0.9).flatten(1).all(1)
    assert torch.equal(relabelled, copies)  # every relabelled image is the match or a copy of it
    assert bool(relabelled[1]) or bool(copies[1])
    # round(0.25 * 8) = 2 slots overwritten by copies (one may be the match itself)
    assert int(relabelled.sum()) in (2, 3)
    rest = ~relabelled
    assert torch.equal(y2[rest], y[rest]) and torch.equal(x2[rest], x[rest])
    assert torch.equal(poison(x, y, gen())[1], y2)  # deterministic
    x3, y3 = POISONS.build("semantic", source=0, target=4, threshold=0.95, fraction=0.5)(x, y, gen())
    assert x3 is x and y3 is y  # no match: the batch passes through
    _, y4 = POISONS.build("semantic", source=0, target=4, threshold=0.5, fraction=0.0)(x, y, gen())
    assert y4.tolist() == [0, 4, 3, 0, 5, 5, 5, 5]  # relabelling only


def test_semantic_metrics_on_test_subset():
    y = torch.tensor([0, 0, 0, 1])
    x = torch.zeros(4, 1, 8, 8)
    x[[0, 1, 3]] = 0.45  # bright: images 0 and 1 of class 0 (and 3, of class 1)
    x[0, 0, 0, 0] = 1.0  # the marker model says 2 for image 0 only
    ds = Dataset("stub", x, y, x, y, tuple(str(i) for i in range(10)))
    poison = POISONS.build("semantic", source=0, target=2, threshold=0.4)
    assert poison.metrics(MarkerModel(), torch.zeros(1), ds) == {"asr": 0.5}  # subset = images 0, 1
    with pytest.raises(PhalanxError, match="semantic: no test image of class 0"):
        POISONS.build("semantic", source=0, target=2, threshold=0.99).metrics(MarkerModel(), torch.zeros(1), ds)


# ---------------------------------------------------------------- update-shaping attacks


def test_model_replacement_scales_exactly():
    own = torch.randn(2, 50, generator=gen())
    honest = torch.randn(8, 50, generator=gen(1))
    out = ATTACKS.build("model_replacement", server_lr=0.5)(honest, actx(own.clone(), n=10))
    assert torch.equal(out, own * 20.0)  # gamma = n / server_lr
    out = ATTACKS.build("model_replacement", share=True)(honest, actx(own.clone(), n=10))
    assert torch.equal(out, own * 5.0)  # divided among m = 2 attackers
    out = ATTACKS.build("model_replacement", weight_fraction=0.04)(honest, actx(own.clone(), n=10))
    assert torch.equal(out, own * (1 / 0.04))
    out = ATTACKS.build("model_replacement", boost=3.0, server_lr=0.1)(honest, actx(own.clone(), n=10))
    assert torch.equal(out, own * 3.0)


def test_constrain_scale_stays_inside_the_bound():
    own = torch.randn(4, 300, generator=gen()) * torch.tensor([[0.01], [0.5], [3.0], [0.0]])
    out = ATTACKS.build("constrain_scale", max_norm=1.0)(torch.zeros(6, 300), actx(own, n=10))
    norms = out.double().norm(dim=1)
    assert torch.all(norms[:3] <= 1.0) and torch.all(norms[:3] > 0.999)  # boosted up to the bound
    assert float(norms[3]) == 0.0
    cos = torch.nn.functional.cosine_similarity(out[:3], own[:3])
    assert torch.all(cos > 0.9999)  # same direction
    out = ATTACKS.build("constrain_scale", max_norm=2.0, boost=10.0)(torch.zeros(6, 300), actx(own, n=10))
    assert torch.allclose(out[0], own[0] * 10.0)  # 10 * 0.17 is inside the ball: untouched
    assert torch.all(out.double().norm(dim=1) <= 2.0)


def test_neurotoxin_mask_comes_from_last_rounds_reference():
    honest = torch.tensor([[5.0, 0.1, -4.0, 0.0, 0.2, 3.0, 0.0, -0.1, 0.0, 0.05]]).repeat(3, 1)
    own = torch.ones(2, 10)
    # 'honest': the honest mean of the last round the attack ran; none yet: every coordinate
    hist = {}
    attack = ATTACKS.build("neurotoxin", ratio=0.7, reference="honest", boost=2.0)
    assert attack(honest, actx(own, n=5, history=hist)).equal(torch.full((2, 10), 2.0))
    out = attack(torch.zeros(3, 10), actx(own, n=5, round=1, history=hist))
    assert out[0].tolist() == [0, 2, 0, 2, 2, 0, 2, 2, 2, 2]  # the top 30% (|5|, |-4|, |3|) are zeroed
    assert torch.equal(out[0], out[1]) and hist["neurotoxin_kept"] == 7
    # 'previous': the change of the global params since the round the attack last ran
    hist = {}
    prev = ATTACKS.build("neurotoxin", ratio=0.8)
    first = prev(honest, actx(own, n=5, global_params=torch.zeros(10), history=hist))
    assert first.equal(own)  # no history yet: nothing masked
    moved = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, 9.0, -7.0])
    second = prev(honest, actx(own, n=5, round=1, global_params=moved, history=hist))
    assert second[0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_neurotoxin_hook_masks_with_the_rounds_mask():
    from phalanx.attacks.base import TrainingInfo

    attack, hist = ATTACKS.build("neurotoxin", ratio=0.8), {}
    moved = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, 9.0, -7.0])
    hook = attack.training_hook(TrainingInfo(0, "client001", torch.zeros(10), hist))
    assert torch.equal(hook.grad_transform(torch.ones(10)), torch.ones(10))  # round 0: no reference
    hook = attack.training_hook(TrainingInfo(1, "client001", moved, hist))
    step = torch.arange(10.0)
    assert hook.grad_transform(step).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]
    assert torch.equal(step, torch.arange(10.0))  # pure
    # the rows sent in that round are projected on the very same mask
    out = attack(torch.zeros(3, 10), actx(torch.ones(2, 10), n=5, round=1, global_params=moved, history=hist))
    assert out[0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_constrain_scale_trains_with_the_anomaly_loss():
    from phalanx.attacks.base import TrainingInfo

    attack = ATTACKS.build("constrain_scale", max_norm=1.0)
    assert attack.alpha == 0.7
    hook = attack.training_hook(TrainingInfo(0, None, torch.zeros(4), {}))
    params = torch.tensor([3.0, 0.0, 4.0, 0.0], requires_grad=True)
    loss = hook.objective(torch.tensor(2.0), params, torch.zeros(4))
    assert float(loss.detach()) == pytest.approx(0.7 * 2.0 + 0.3 * 5.0)  # |params - global|_2 = 5, not squared
    loss.backward()
    assert torch.allclose(params.grad, 0.3 * torch.tensor([0.6, 0.0, 0.8, 0.0]))
    assert ATTACKS.build("constrain_scale", alpha=1.0).training_hook(TrainingInfo(0, None, torch.zeros(4), {})) is None


def test_persistence():
    asr = [0.1, 0.95, 0.97, 0.8, 0.6, 0.4, 0.2]
    assert persistence(asr, 2) == 3
    assert persistence(asr, 2, threshold=0.9) == 1
    assert persistence(asr, 6) == 0
    assert persistence([0.9, None, 0.7, 0.6], 0) is None
    assert persistence([0.9, None, 0.3], 0) == 2
    with pytest.raises(PhalanxError, match="last_poison_round must be < len"):
        persistence(asr, 7)


@pytest.mark.parametrize("kind,name,params,needle", [
    ("poison", "pixel_trigger", {"pattern": "star"}, "pattern"),
    ("poison", "pixel_trigger", {"size": 0}, "size"),
    ("poison", "pixel_trigger", {"fraction": 1.5}, "fraction"),
    ("poison", "pixel_trigger", {"fraction": 0}, "fraction"),
    ("poison", "pixel_trigger", {"target": 10}, "target"),
    ("poison", "pixel_trigger", {"position": "middle"}, "position"),
    ("poison", "pixel_trigger", {"position": [1, -1]}, "position"),
    ("poison", "dba", {"parts": 0}, "parts"),
    ("poison", "semantic", {"source": 3, "target": 3}, "source and target"),
    ("poison", "semantic", {"region": [4, 2, 0, 8]}, "region"),
    ("attack", "model_replacement", {"boost": -1}, "boost"),
    ("attack", "model_replacement", {"weight_fraction": 2.0}, "weight_fraction"),
    ("attack", "constrain_scale", {"max_norm": 0}, "max_norm"),
    ("attack", "constrain_scale", {"alpha": 0}, "alpha"),
    ("attack", "constrain_scale", {"alpha": 1.5}, "alpha"),
    ("attack", "neurotoxin", {"ratio": 1.5}, "ratio"),
    ("attack", "neurotoxin", {"reference": "future"}, "reference"),
])
def test_bad_parameters(kind, name, params, needle):
    reg = POISONS if kind == "poison" else ATTACKS
    with pytest.raises(PhalanxError, match=f"{name}: {needle}.*got"):
        reg.build(name, **params)


def test_trigger_that_does_not_fit_is_a_clear_error():
    poison = POISONS.build("pixel_trigger", size=9)
    with pytest.raises(PhalanxError, match="does not fit a 8x8 image"):
        poison(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), gen())


# ---------------------------------------------------------------- a tiny federated run


def test_tiny_federation_learns_the_backdoor(tiny_config):
    tiny_config["federation"]["rounds"] = 6
    tiny_config["model"] = {"name": "logreg"}
    tiny_config["federation"]["lr"] = 0.1
    tiny_config["attack"] = {"byzantine": 2, "poison": "pixel_trigger",
                             "poison_params": {"size": 2, "position": "top-left", "margin": 0, "target": 0,
                                               "fraction": 0.5}}
    attacked = Federation(parse_config(tiny_config)).run()
    tiny_config["attack"]["rounds"] = []  # the same poison, never applied
    clean = Federation(parse_config(tiny_config)).run()
    assert attacked["asr"] > 0.7 and clean["asr"] < 0.1
    assert attacked["accuracy"] > 0.8
