"""weak_dp: Gaussian noise of the stated std on the aggregate, from the round's generator; composes
with clip and an aggregator (Sun et al. 2019's norm clipping + weak DP)."""

import pytest
import torch

import phalanx.defenses  # noqa: F401  (registers the defenses)
from phalanx.context import simple_round_context
from phalanx.defenses.base import Post
from phalanx.errors import PhalanxError
from phalanx.defenses.pipeline import build_defense
from phalanx.registry import DEFENSES


def test_noise_has_the_stated_std_and_is_seeded():
    stage = DEFENSES.build("weak_dp", sigma=0.01)
    assert isinstance(stage, Post)
    g = torch.full((200_000,), 0.5)
    U = torch.zeros(4, 200_000)
    out, report = stage(g, simple_round_context(U, seed=3))
    noise = (out - g).double()
    assert abs(float(noise.std()) - 0.01) < 0.0002 and abs(float(noise.mean())) < 0.0002
    assert report.name == "weak_dp" and report.n == 4 and not report.discarded().any()
    again, _ = stage(g, simple_round_context(U, seed=3))
    assert torch.equal(out, again)
    other, _ = stage(g, simple_round_context(U, seed=4))
    assert not torch.equal(out, other)


def test_clip_mean_weak_dp_pipeline():
    pipe = build_defense([{"clip": {"max_norm": 1.0}}, "mean", {"weak_dp": {"sigma": 1e-3}}])
    U = torch.zeros(4, 1000)
    U[0, 0] = 100.0  # a boosted update: clipped to norm 1 before the mean
    g, report = pipe(U, torch.ones(4), simple_round_context(U, seed=0))
    assert abs(float(g[0]) - 0.25) < 0.01
    assert float(g[1:].std()) == pytest.approx(1e-3, rel=0.1)
    assert report.info["stages"] == ["clip", "mean", "weak_dp"]


@pytest.mark.parametrize("sigma", [0, -0.1, "big", True])
def test_bad_sigma(sigma):
    with pytest.raises(PhalanxError, match="weak_dp: sigma must be a number > 0, got"):
        DEFENSES.build("weak_dp", sigma=sigma)
