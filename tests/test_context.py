"""Defenses must never learn which clients are malicious."""

import dataclasses

import torch

from phalanx.config import parse_config
from phalanx.context import RoundContext
from phalanx.defenses.base import Aggregator, Report
from phalanx.federation import Federation
from phalanx.registry import DEFENSES

SEEN = []


class Spy(Aggregator):
    name = "spy"

    def __call__(self, U, w, ctx):
        SEEN.append((U.clone(), w.clone(), ctx))
        return (U * w[:, None]).sum(0) / w.sum(), Report(self.name, U.shape[0])


if "spy_for_tests" not in DEFENSES:
    def spy_for_tests():
        """A mean that records what it is given (test only)."""
        return Spy()

    DEFENSES.register("spy_for_tests")(spy_for_tests)


def test_round_context_has_no_malicious_field():
    names = {f.name for f in dataclasses.fields(RoundContext)}
    assert not any(word in n for n in names for word in ("malic", "byzant", "attack", "honest"))


def test_defense_never_receives_the_mask(tiny_config):
    tiny_config["attack"] = {"name": "sign_flip", "byzantine": 2}
    tiny_config["defense"] = ["spy_for_tests"]
    tiny_config["federation"]["rounds"] = 1
    fed = Federation(parse_config(tiny_config))
    SEEN.clear()
    fed.run()
    (U, w, ctx), = SEEN
    mask = fed.malicious
    assert int(mask.sum()) == 2
    for value in [w, *vars(ctx).values(), *ctx.extras.values()]:
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            assert not torch.equal(value, mask)
    assert torch.equal(w, ctx.num_samples)  # the weights are sample counts, nothing more
