"""Pipeline: one client, one vote (duplicate client ids in a round)."""

import torch

from phalanx.context import simple_round_context
from phalanx.defenses.base import Layer, Report
from phalanx.defenses.pipeline import Pipeline, build_defense
from phalanx.registry import DEFENSES


class Spy(Layer):
    """Records the weights it is given."""

    name = "spy"

    def __init__(self):
        self.seen = []

    def __call__(self, U, w, ctx):
        self.seen.append(w.clone())
        return U, w, Report(self.name, U.shape[0])


def test_a_repeated_client_id_is_rejected_before_any_layer():
    U = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    U[2] = 100.0  # the second row of client "a" would drag the mean
    ctx = simple_round_context(U)
    ctx.client_ids = ["a", "b", "a", "c", "b"]
    w = torch.tensor([1.0, 2.0, 50.0, 3.0, 4.0])
    U0, w0 = U.clone(), w.clone()
    spy = Spy()
    g, rep = Pipeline([spy], DEFENSES.build("mean"))(U, w, ctx)
    assert spy.seen[0].tolist() == [1.0, 2.0, 0.0, 3.0, 0.0]
    assert rep.reasons == {2: "duplicate_client", 4: "duplicate_client"}
    assert rep.selected.tolist() == [True, True, False, True, False]
    assert rep.info["duplicates"] == [2, 4]
    keep = [0, 1, 3]
    ref, _ = Pipeline([], DEFENSES.build("mean"))(U[keep], w[keep], simple_round_context(U[keep]))
    assert torch.allclose(g, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(U, U0) and torch.equal(w, w0)  # the inputs are left as they were


def test_plain_mean_pipeline_from_config_drops_the_duplicate():
    U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    ctx = simple_round_context(U)
    ctx.client_ids = ["x", "y", "x"]
    g, rep = build_defense(["mean"])(U, torch.ones(3), ctx)
    assert torch.allclose(g, torch.tensor([0.5, 0.5]))
    assert rep.reasons == {2: "duplicate_client"}


def test_distinct_ids_change_nothing():
    from phalanx.defenses.pipeline import duplicate_rows

    U = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    g, rep = build_defense(["mean"])(U, torch.ones(4), simple_round_context(U))
    assert rep.reasons == {} and "duplicates" not in rep.info
    assert torch.allclose(g, U.mean(0))
    assert duplicate_rows(["a", "b", "a", "a"]) == [2, 3] and duplicate_rows([]) == []
