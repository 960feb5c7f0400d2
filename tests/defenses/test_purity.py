"""Pure stages: no registered defense stage modifies the tensors it is given (docs/design.md).

Every entry of the DEFENSES registry is built and called on U of shape (n, 1), on a column-major
U and on an ordinary row-major U; afterwards U, w (and g for post steps) must be bit-identical to
copies taken before the call. A column block of a (n, 1) or column-major U is already contiguous,
which is where an in-place sort of the caller's memory used to slip through. Post steps run
after ``update_clip`` and a mean inside a Pipeline (central DP needs what reached the aggregator),
and the aggregate they receive must be left as it was.
"""

import inspect

import pytest
import torch

import phalanx.defenses  # noqa: F401  (registers the defenses)
from phalanx.context import simple_round_context
from phalanx.defenses.base import Aggregator, Layer, Post
from phalanx.defenses.pipeline import Pipeline
from phalanx.defenses.signing import ClientSigner, KeyRegistry, sign_updates
from phalanx.registry import DEFENSES

N, F, RUN = 12, 2, "run-purity"

# sensible hyperparameters for the entries whose defaults are not enough; every other entry gets
# f=F when it takes an f, else nothing. ``verify`` gets its key registry from the test itself.
PARAMS = {
    "bucketing": {"s": 2, "aggregator": "median", "f": 1},
    "dnc": {"f": F, "b": 5},
    "clip": {"max_norm": "auto"},
    "grad_noise": {"sigma": 0.1},
    "update_clip": {"max_norm": 1.0},
    "prune": {"ratio": 0.5},
    "central_dp": {"noise_multiplier": 1.0, "clip": 1.0},
    "weak_dp": {"sigma": 0.01},
}


class RecordingMean(Aggregator):
    """The registered mean, keeping the aggregate it returned and its bits at that moment."""

    name, linear = "mean", True

    def __init__(self):
        self.inner = DEFENSES.build("mean")

    def __call__(self, U, w, ctx):
        self.g, rep = self.inner(U, w, ctx)
        self.g_bits = _bits(self.g)
        return self.g, rep


def _params(name):
    if name in PARAMS:
        return dict(PARAMS[name])
    sig = inspect.signature(DEFENSES.get(name)).parameters
    return {"f": F} if "f" in sig else {}


def _matrix(shape: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(17)
    if shape == "n_by_1":
        U = torch.randn(N, 1, generator=gen)
    else:
        U = torch.randn(N, 7, generator=gen)
    U[0] *= 20.0  # one far row, so filters and clipping have something to do
    if shape == "column_major":
        U = U.t().contiguous().t()
        assert not U.is_contiguous() and U.stride() == (1, N)
    return U


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _world(U, ids):
    reg = KeyRegistry()
    signers = {c: ClientSigner(c, reg.generate(c)) for c in ids}
    return reg, sign_updates(U, signers, ids, RUN, 0)


@pytest.mark.parametrize("shape", ["n_by_1", "column_major", "row_major"])
@pytest.mark.parametrize("weights", ["positive", "one_zero"])
@pytest.mark.parametrize("name", DEFENSES.names())
def test_no_stage_modifies_its_inputs(name, shape, weights):
    U = _matrix(shape)
    w = 1.0 + torch.rand(N, generator=torch.Generator().manual_seed(3))
    if weights == "one_zero":
        w[5] = 0.0
    ctx = simple_round_context(U, seed=5)
    g0 = torch.linspace(-1.0, 1.0, U.shape[1])
    ctx.server_update = lambda: g0.clone()  # FLTrust's root-set update
    params = _params(name)
    if name == "verify":
        params["registry"], envs = _world(U, ctx.client_ids)
        params["run_id"] = RUN
        ctx.extras["envelopes"] = envs
    stage = DEFENSES.build(name, **params)
    U_bits, w_bits, stride = _bits(U), _bits(w), U.stride()

    if isinstance(stage, Post):  # post steps run where they belong: after clip and a mean
        agg = RecordingMean()
        Pipeline([DEFENSES.build("update_clip", max_norm=1.0)], agg, [stage])(U, w, ctx)
        assert _bits(agg.g) == agg.g_bits, f"{name} modified g"
    elif isinstance(stage, Aggregator):
        out, _ = stage(U, w, ctx)
        assert out.shape == (U.shape[1],)
    else:
        assert isinstance(stage, Layer), name
        V, w2, _ = stage(U, w, ctx)
        assert V.shape == U.shape and w2.shape == w.shape
        if hasattr(stage, "observe"):  # reputation learns from the aggregate afterwards
            stage.observe(U, w, U[w > 0].mean(0), ctx, torch.zeros(N, dtype=torch.bool))
    assert _bits(U) == U_bits, f"{name} modified U ({shape})"
    assert U.stride() == stride
    assert _bits(w) == w_bits, f"{name} modified w ({shape})"


def test_every_registered_stage_is_covered():
    # a new registry entry is exercised above automatically; it must build with these params
    for name in DEFENSES.names():
        if name == "verify":
            continue
        assert isinstance(DEFENSES.build(name, **_params(name)), (Aggregator, Layer, Post)), name
