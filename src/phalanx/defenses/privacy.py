"""Leakage defenses: gradient noise, update clipping, pruning, central DP, and DP-SGD via Opacus.

* ``grad_noise``: Gaussian or Laplacian noise on the shared gradient (Zhu et al. 2019, sec. 5).
* ``clip_update``: L2 clipping of each update (registered as ``update_clip``).
* ``prune``: gradient pruning / sparsification, zeroing the smallest entries (Zhu et al. 2019).
* ``central_dp``: DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent
  language models"): with every accepted update clipped to L2 norm C (an ``update_clip`` or
  ``clip`` layer) and combined by a weighted mean, Gaussian noise of std ``z * 2 C max_i p_i`` is
  added to the mean (``CentralDP`` derives this sensitivity), and the privacy loss over rounds is
  tracked with Opacus' RDP accountant (Mironov 2017) at noise multiplier z.
* DP-SGD (Abadi et al. 2016): per-sample clipping plus Gaussian noise, with Opacus doing the
  training (``make_private``, ``dp_sgd_train``) and the accounting (``dp_epsilon``,
  ``noise_for_epsilon``); ``dp_sgd_gradient`` privatises one gradient step for leakage audits.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from .base import AGGREGATE_INFO, Layer, Post, Report, check_positive, is_weighted_mean

NOISE_KINDS = ("gaussian", "laplace")
ACCOUNTANTS = ("rdp", "prv", "gdp")


# ---------------------------------------------------------------- functions on vectors / [n, d]


def _tensor(fn: str, v) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise PhalanxError(f"{fn}: expected a vector [d] or a matrix [n, d], got {got}")
    if not torch.isfinite(v).all():
        raise PhalanxError(f"{fn}: input must be finite, got NaN or inf values")
    return v


def _ratio(fn: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise PhalanxError(f"{fn}: ratio must be a number in [0, 1), got {value!r}")
    return float(value)


def _kind(fn: str, kind: str) -> str:
    if kind not in NOISE_KINDS:
        raise PhalanxError(f"{fn}: kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
    return kind


def grad_noise(v: torch.Tensor, sigma: float, kind: str = "gaussian",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """v plus i.i.d. noise of standard deviation ``sigma`` (Gaussian, or Laplace of scale sigma/sqrt 2)."""
    v = _tensor("grad_noise", v)
    sigma = check_positive("grad_noise", "sigma", sigma)
    _kind("grad_noise", kind)
    if kind == "gaussian":
        z = torch.randn(v.shape, generator=generator, dtype=v.dtype)
    else:  # inverse CDF of Laplace(0, b) from uniforms, b = 1 / sqrt 2 for unit std
        u = torch.rand(v.shape, generator=generator, dtype=torch.float64) - 0.5
        u = u.clamp(-0.5 + 1e-12, 0.5 - 1e-12)
        z = (-torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)).to(v.dtype)
    return v + sigma * z


def clip_update(v: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale v (or each row of [n, d]) to L2 norm at most ``max_norm``."""
    v = _tensor("clip_update", v)
    max_norm = check_positive("clip_update", "max_norm", max_norm)
    norms = v.double().norm(dim=-1, keepdim=True)
    return (v.double() * (max_norm / norms.clamp_min(1e-300)).clamp(max=1.0)).to(v.dtype)


def prune(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the fraction ``ratio`` of smallest-magnitude entries (per row); keep exactly
    ``d - floor(ratio * d)`` entries, the largest in magnitude (ties broken by index)."""
    v = _tensor("prune", v)
    ratio = _ratio("prune", ratio)
    d = v.shape[-1]
    keep = d - math.floor(ratio * d + 1e-9)
    idx = torch.topk(v.abs(), keep, dim=-1, sorted=False).indices
    out = torch.zeros_like(v)
    return out.scatter(-1, idx, v.gather(-1, idx))


def model_loss(model: nn.Module):
    """The model's own training loss (``model.loss``: class-weighted, focal), else cross-entropy;
    called as ``loss(logits, y, reduction='none')`` for per-sample values."""
    return getattr(model, "loss", F.cross_entropy)


def dp_sgd_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_multiplier: float,
                    max_grad_norm: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One DP-SGD gradient (Abadi et al. 2016), flat [d]: each per-sample gradient clipped to
    ``max_grad_norm``, summed, Gaussian noise of std ``noise_multiplier * max_grad_norm`` added,
    divided by the batch size (the same estimator as Opacus' DPOptimizer)."""
    check_positive("dp_sgd_gradient", "max_grad_norm", max_grad_norm)
    if not noise_multiplier >= 0:
        raise PhalanxError(f"dp_sgd_gradient: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    criterion = model_loss(model)

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return criterion(out, yi[None], reduction="none").sum()

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([per[n].reshape(len(x), -1) for n in names], 1)
    G = clip_update(G, max_grad_norm)
    noise = torch.randn(G.shape[1], generator=generator) * (noise_multiplier * max_grad_norm)
    return (G.sum(0) + noise) / len(x)


# ---------------------------------------------------------------- registered layers and post step


class GradNoise(Layer):
    """Adds noise to every update row (what noisy clients would send)."""

    name = "grad_noise"
    breaks_norm_bound = True

    def __init__(self, sigma: float, kind: str = "gaussian"):
        self.sigma = check_positive(self.name, "sigma", sigma)
        self.kind = _kind(self.name, kind)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        out = grad_noise(U, self.sigma, self.kind, ctx.generator)
        return out, w, Report(self.name, U.shape[0], info={"sigma": self.sigma, "kind": self.kind})

    def __repr__(self) -> str:
        return f"GradNoise(sigma={self.sigma}, kind={self.kind!r})"


class UpdateClip(Layer):
    """Clips each update row to L2 norm ``max_norm``; scores are the norms before clipping."""

    name = "update_clip"
    bounds_norm = True

    def __init__(self, max_norm: float):
        self.max_norm = check_positive(self.name, "max_norm", max_norm)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        norms = U.double().norm(dim=1)
        rep = Report(self.name, U.shape[0], scores=norms.float(),
                     info={"max_norm": self.max_norm, "norm_bound": self.max_norm,
                           "clipped": int((norms > self.max_norm).sum())})
        return clip_update(U, self.max_norm), w, rep

    def __repr__(self) -> str:
        return f"UpdateClip(max_norm={self.max_norm})"


class Prune(Layer):
    """Zeroes the smallest ``ratio`` of each update row's entries."""

    name = "prune"
    nonexpansive = True  # zeroing entries of a row never grows its norm

    def __init__(self, ratio: float):
        self.ratio = _ratio(self.name, ratio)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        return prune(U, self.ratio), w, Report(self.name, U.shape[0], info={"ratio": self.ratio})

    def __repr__(self) -> str:
        return f"Prune(ratio={self.ratio})"


class CentralDP(Post):
    """DP-FedAvg's server noise (McMahan et al. 2018) and its accounting over rounds.

    What is released. The aggregate g = sum_i p_i u_i, with p_i = w_i / sum_j w_j over the rows
    still accepted (w_i > 0) when the aggregator runs, and every accepted row of norm at most C,
    the bound guaranteed by the last bounding layer (``update_clip``, or ``clip`` with this
    round's bound). The pipeline hands both to this step (``AggregateInfo``).

    Sensitivity. Neighbouring rounds differ by one client (add/remove, the notion of the sampled
    Gaussian mechanism that Opacus' accountants analyse). Removing accepted row k gives

        g - g_{-k} = p_k (u_k - g_{-k}),  g_{-k} = the weighted mean of the other accepted rows,

    since g = p_k u_k + (1 - p_k) g_{-k}. Both u_k and g_{-k} have norm at most C, so
    ||g - g_{-k}|| <= 2 C p_k, with equality when u_k = -g_{-k} at norm C. Adding a client whose
    weight is at most the largest present one is the same step read backwards (its share is at
    most max_i p_i); replacing one client's update at an unchanged weight gives p_k (u_k - u'_k),
    also at most 2 C p_k. Hence

        sensitivity = 2 * C * max_i p_i   (2 C / n for n equally weighted rows),

    the factor 2 being the price of the mean's data-dependent denominator (McMahan et al. 2018,
    Lemma 1: 2S / (q W_min) for their f~_c; their S / (q W) holds only for a fixed denominator).
    The noise is N(0, sigma^2) per coordinate with sigma = z * sensitivity, so whatever the
    round's weights, the noise multiplier (sigma / sensitivity) is z and the accountant takes
    (z, sample_rate) each round.

    sample_rate is the client sampling rate q = clients_per_round / num_clients. Left at None
    it is taken as 1 (every client every round), which is exact for full participation and
    overstates epsilon otherwise; the simulator passes it. The accountant assumes Poisson
    sampling of clients, the simulator samples a fixed number: the usual approximation.

    What is not accounted for: the choice of accepted rows and their weights is taken as given
    (layers that reject or reweight on the data, such as validate or reputation, are outside
    the analysis), and ``clip``'s tracked 'quantile' bound moves with past rounds' norms without
    the noise Andrew et al. (2021) add to it. Refused when built: no layer bounding norms before
    the aggregator, ``clip`` with max_norm='auto' (the round's own median norm, which one client
    can move), a noise layer after the clip, an aggregator other than a weighted mean (a median
    or Krum has another sensitivity), or a fixed clip bound above ``clip`` when ``clip`` is set.

    clip: optional declared bound; when set, the rows' guaranteed bound must not exceed it. The
    noise always follows the bound the layers guarantee.
    """

    name = "central_dp"
    needs_aggregate_info = True

    def __init__(self, noise_multiplier: float, clip: float | None = None, delta: float = 1e-5,
                 sample_rate: float | None = None, accountant: str = "rdp"):
        self.z = check_positive(self.name, "noise_multiplier", noise_multiplier)
        self.clip = None if clip is None else check_positive(self.name, "clip", clip)
        self.delta = _delta(self.name, delta)
        self.sample_rate = 1.0 if sample_rate is None else _rate(self.name, sample_rate)
        self.accountant = _accountant(self.name, accountant)

    def check_pipeline(self, layers: list, aggregator) -> None:
        from .clip import Clip

        if not is_weighted_mean(aggregator):
            raise PhalanxError(f"central_dp: needs a (weighted) mean aggregator, whose sensitivity is "
                               f"2 * clip * max weight share; got {getattr(aggregator, 'name', aggregator)!r}")
        last = max((i for i, layer in enumerate(layers) if getattr(layer, "bounds_norm", False)), default=None)
        if last is None:
            got = ", ".join(layer.name for layer in layers) or "no layers"
            raise PhalanxError(f"central_dp: needs a layer bounding each update's norm before the aggregator "
                               f"(update_clip or clip), got {got}")
        bounder = layers[last]
        if isinstance(bounder, Clip) and bounder.mode == "auto":
            raise PhalanxError("central_dp: needs a clip bound that one client cannot move; clip with "
                               "max_norm='auto' uses the round's median norm: give a number or 'quantile'")
        noisy = [layer.name for layer in layers[last + 1:] if getattr(layer, "breaks_norm_bound", False)]
        if noisy:
            raise PhalanxError(f"central_dp: needs the clipped rows to reach the aggregator unchanged, "
                               f"got {', '.join(noisy)} after {bounder.name}")
        fixed = getattr(bounder, "max_norm", None)
        if self.clip is not None and isinstance(fixed, (int, float)) and fixed > self.clip:
            raise PhalanxError(f"central_dp: clip={self.clip} but {bounder.name} bounds norms by {fixed}; "
                               f"expected a bound <= clip")

    def sensitivity(self, weights: torch.Tensor, norm_bound: float) -> float:
        """2 * C * max_i p_i over the accepted rows (see the class docstring)."""
        w = weights.double()
        w = w[w > 0]
        return 2.0 * float(norm_bound) * float((w / w.sum()).max())

    @property
    def epsilon(self) -> float:
        return _epsilon(self.accountant, self.delta)

    @property
    def rounds(self) -> int:
        return int(sum(h[2] for h in self.accountant.history))

    def __call__(self, g: torch.Tensor, ctx: RoundContext):
        info = ctx.extras.get(AGGREGATE_INFO)
        if info is None:
            raise PhalanxError("central_dp: needs the weights and norm bound a Pipeline records for its post "
                               "steps, got a context without them; use it as a post step of a Pipeline")
        if not is_weighted_mean(info.aggregator):
            raise PhalanxError(f"central_dp: needs a (weighted) mean aggregator, got {info.aggregator.name!r}")
        if info.norm_bound is None:
            why = (f"{info.lost_by} changed the rows after {info.bound_by}" if info.lost_by
                   else "no layer reported one")
            raise PhalanxError(f"central_dp: needs a norm bound on the rows reaching the aggregator, got none "
                               f"({why})")
        if self.clip is not None and info.norm_bound > self.clip * (1 + 1e-9):
            raise PhalanxError(f"central_dp: clip={self.clip} but {info.bound_by} bounded norms by "
                               f"{info.norm_bound}; expected a bound <= clip")
        if not bool((info.weights > 0).any()):
            raise PhalanxError("central_dp: every row has weight 0; nothing was aggregated")
        sens = self.sensitivity(info.weights, info.norm_bound)
        sigma = self.z * sens
        out = g + sigma * torch.randn(g.shape, generator=ctx.generator, dtype=g.dtype)
        self.accountant.step(noise_multiplier=self.z, sample_rate=self.sample_rate)
        rep = {"sigma": sigma, "sensitivity": sens, "norm_bound": info.norm_bound, "noise_multiplier": self.z,
               "sample_rate": self.sample_rate, "epsilon": self.epsilon, "delta": self.delta,
               "rounds": self.rounds}
        return out, Report(self.name, ctx.n, info=rep)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) - {"history"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PhalanxError(f"{self.name}: state has keys {got}, expected ['history']")
        history = state.get("history", [])
        ok = isinstance(history, (list, tuple)) and all(
            isinstance(h, (list, tuple)) and len(h) == 3 and all(isinstance(x, (int, float)) for x in h)
            and h[0] > 0 and 0 < h[1] <= 1 and isinstance(h[2], int) and h[2] >= 1 for h in history)
        if not ok:
            raise PhalanxError(f"{self.name}: state 'history' must be a list of [noise_multiplier, sample_rate, "
                               f"steps] entries, got {history!r}")
        self.accountant.history = [(float(h[0]), float(h[1]), int(h[2])) for h in history]

    def __repr__(self) -> str:
        return f"CentralDP(noise_multiplier={self.z}, clip={self.clip}, delta={self.delta})"


DEFENSES.register("grad_noise")(GradNoise)
DEFENSES.register("update_clip")(UpdateClip)
DEFENSES.register("prune")(Prune)
DEFENSES.register("central_dp")(CentralDP)


# ---------------------------------------------------------------- DP-SGD with Opacus


def _delta(fn: str, delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PhalanxError(f"{fn}: delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _rate(fn: str, q) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise PhalanxError(f"{fn}: sample_rate must be a number in (0, 1], got {q!r}")
    return float(q)


def _steps(fn: str, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PhalanxError(f"{fn}: steps must be an integer >= 1, got {steps!r}")
    return steps


def _accountant(fn: str, name: str):
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise PhalanxError(f"{fn}: accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return create_accountant(mechanism=name)


def _epsilon(acc, delta: float) -> float:
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha" is informational
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` sampled Gaussian mechanisms (Opacus' ``rdp``, ``prv`` or ``gdp`` accountant)."""
    z = check_positive("dp_epsilon", "noise_multiplier", noise_multiplier)
    acc = _accountant("dp_epsilon", accountant)
    acc.history = [(z, _rate("dp_epsilon", sample_rate), _steps("dp_epsilon", steps))]
    return _epsilon(acc, _delta("dp_epsilon", delta))


def noise_for_epsilon(target_eps: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "rdp") -> float:
    """The noise multiplier reaching ``target_eps`` (Opacus' get_noise_multiplier, tolerance 0.01)."""
    from opacus.accountants.utils import get_noise_multiplier

    check_positive("noise_for_epsilon", "target_eps", target_eps)
    _accountant("noise_for_epsilon", accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(
            target_epsilon=float(target_eps), target_delta=_delta("noise_for_epsilon", delta),
            sample_rate=_rate("noise_for_epsilon", sample_rate),
            steps=_steps("noise_for_epsilon", steps), accountant=accountant))


class PrivateTraining(NamedTuple):
    """Opacus' wrapped objects; ``engine.get_epsilon(delta)`` reports the privacy spent."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: torch.utils.data.DataLoader
    engine: Any


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader, noise_multiplier: float,
                 max_grad_norm: float, *, poisson_sampling: bool = True, seed: int | None = None,
                 accountant: str = "rdp") -> PrivateTraining:
    """Wrap (model, optimizer, loader) for DP-SGD with Opacus' PrivacyEngine (Poisson sampling)."""
    from opacus import PrivacyEngine

    if not noise_multiplier >= 0:
        raise PhalanxError(f"make_private: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    check_positive("make_private", "max_grad_norm", max_grad_norm)
    _accountant("make_private", accountant)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # secure-RNG advice
        engine = PrivacyEngine(accountant=accountant)
        m, opt, dl = engine.make_private(module=model, optimizer=optimizer, data_loader=data_loader,
                                         noise_multiplier=float(noise_multiplier),
                                         max_grad_norm=float(max_grad_norm),
                                         poisson_sampling=poisson_sampling, noise_generator=gen)
    return PrivateTraining(m, opt, dl, engine)


def dp_sgd_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 1, batch_size: int = 32,
                 lr: float = 0.1, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                 delta: float = 1e-5, seed: int = 0) -> float:
    """Train ``model`` in place with DP-SGD (Opacus, Poisson sampling at rate batch_size / N) on its
    own loss (``model_loss``); returns the epsilon spent (RDP accountant) at ``delta``.

    The loss is the plain mean of the per-sample losses over the batch's rows: Opacus (loss_reduction
    'mean') rebuilds each row's gradient by multiplying by the batch's length, so a mean divided by
    anything else (the summed class weights of ``F.cross_entropy(weight=...)``) would be mis-scaled."""
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise PhalanxError(f"dp_sgd_train: epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(y):
        raise PhalanxError(f"dp_sgd_train: batch_size must be an integer in [1, {len(y)}], got {batch_size!r}")
    if len(x) != len(y):
        raise PhalanxError(f"dp_sgd_train: x and y must have the same length, got {len(x)} and {len(y)}")
    check_positive("dp_sgd_train", "lr", lr)
    delta = _delta("dp_sgd_train", delta)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = model_loss(model)
    priv = make_private(model, opt, loader, noise_multiplier, max_grad_norm, seed=seed + 1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            for _ in range(epochs):
                for xb, yb in priv.data_loader:
                    priv.optimizer.zero_grad()
                    # an empty Poisson batch gives empty per-sample gradients: a pure-noise step
                    criterion(priv.model(xb), yb, reduction="none").mean().backward()
                    priv.optimizer.step()
        return _epsilon(priv.engine.accountant, delta)
    finally:
        priv.model._close()  # remove Opacus' hooks; the parameters were updated in place
