"""Pipeline: layers, then an aggregator, then post steps, composed into one aggregator.

Like optax's chains, each stage is small and the pipeline just threads (U, w) through them.

Before any layer runs, a row whose client id already appeared earlier in the round (in
``ctx.client_ids``) gets weight 0 and the reason ``duplicate_client``: one client, one vote.
Post steps that need to know what reached the aggregator (central DP) get an ``AggregateInfo``
(the weights and the norm bound the layers guarantee) and check the pipeline when it is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import torch

from ..config import defense_item
from ..context import RoundContext
from ..errors import ConfigError, PhalanxError
from ..registry import DEFENSES
from .base import AGGREGATE_INFO, AggregateInfo, Aggregator, Layer, Post, Report


class Pipeline(Aggregator):
    name = "pipeline"

    def __init__(self, layers: Sequence[Layer], aggregator: Aggregator, post: Sequence[Post] = ()):
        if not isinstance(aggregator, Aggregator):
            raise PhalanxError(f"pipeline: aggregator must be an Aggregator, got {type(aggregator).__name__}")
        for layer in layers:
            if not isinstance(layer, Layer):
                raise PhalanxError(f"pipeline: every layer must be a Layer, got {type(layer).__name__}")
        for step in post:
            if not isinstance(step, Post):
                raise PhalanxError(f"pipeline: every post step must be a Post, got {type(step).__name__}")
        self.layers = list(layers)
        self.aggregator = aggregator
        self.post = list(post)
        for step in self.post:  # a bad combination (central DP after a median) fails before training
            step.check_pipeline(self.layers, aggregator)

    @property
    def stages(self) -> list:
        return [*self.layers, self.aggregator, *self.post]

    def as_attackers_see_it(self) -> "Pipeline":
        """The pipeline an omniscient attacker simulates: without the layers that judge who sent a
        row (signature checks), which the Byzantine clients' own valid keys pass anyway."""
        layers = [layer for layer in self.layers if not getattr(layer, "judges_identity", False)]
        return self if len(layers) == len(self.layers) else Pipeline(layers, self.aggregator, self.post)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        reports: list[Report] = []
        seen: list[tuple[Layer, torch.Tensor, torch.Tensor, int]] = []
        duplicates = duplicate_rows(ctx.client_ids[:U.shape[0]])
        if duplicates:
            w = w.clone()
            w[duplicates] = 0
        track = any(step.needs_aggregate_info for step in self.post)
        bound, bound_by, lost_by, bounded = None, None, None, None
        for layer in self.layers:
            if not bool((w > 0).any()):
                break  # an earlier layer rejected every row: the later ones have nothing to judge
            if hasattr(layer, "observe"):
                seen.append((layer, U, w, len(reports)))
            U_in = U
            U, w, rep = layer(U, w, ctx)
            reports.append(rep)
            if track:
                if getattr(layer, "bounds_norm", False) and rep.info.get("norm_bound") is not None:
                    bound, bound_by, lost_by, bounded = float(rep.info["norm_bound"]), layer.name, None, w > 0
                elif bound is not None and not _keeps_bound(layer, U_in, U, w, bounded):
                    bound, lost_by = None, layer.name
        skipped = not bool((w > 0).any())
        if skipped:  # nobody left: the round makes no step, and says so
            g = torch.zeros(U.shape[1], dtype=U.dtype)
        else:
            g, rep = self.aggregator(U, w, ctx)
            reports.append(rep)
            post_ctx = ctx
            if track:  # a copy of ctx (same generator), so the caller's ctx is left as it was
                info = AggregateInfo(w.detach().clone(), bound, bound_by, lost_by, self.aggregator)
                post_ctx = dataclasses.replace(ctx, extras={**ctx.extras, AGGREGATE_INFO: info})
            for step in self.post:
                g, rep = step(g, post_ctx)
                reports.append(rep)
        summary = Report(self.name, n=U.shape[0], info={"stages": [r.name for r in reports], "skipped": skipped})
        summary.info["reports"] = reports
        if duplicates:
            summary.info["duplicates"] = duplicates
        for row in duplicates:
            summary.reject(row, "duplicate_client")
        for rep in reports:
            for row, why in rep.reasons.items():
                summary.reject(row, f"{rep.name}:{why}")
        discarded = [r.discarded() for r in reports if r.n == U.shape[0]]
        dup = torch.zeros(U.shape[0], dtype=torch.bool)
        dup[duplicates] = True
        summary.selected = ~torch.stack([dup, *discarded]).any(0)
        for layer, U_in, w_in, own in seen:  # feedback: stateful layers learn from the aggregate
            rejected = dup.clone()
            why: dict[int, list[str]] = {int(r): ["pipeline:duplicate_client"] for r in duplicates}
            for k, rep in enumerate(reports):
                if k != own:
                    for row, reason in rep.reasons.items():
                        rejected[row] = True
                        why.setdefault(row, []).append(f"{rep.name}:{reason}")
            if "reasons" in inspect.signature(layer.observe).parameters:  # why others rejected each row
                layer.observe(U_in, w_in, g, ctx, rejected, reasons=why)
            else:
                layer.observe(U_in, w_in, g, ctx, rejected)
        return g, summary

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{s.name}": s.state_dict() for i, s in enumerate(self.stages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in enumerate(self.stages):
            s.load_state_dict(state.get(f"{i}:{s.name}", {}))

    def __repr__(self) -> str:
        return " -> ".join(repr(s) for s in self.stages)


def duplicate_rows(client_ids) -> list[int]:
    """Rows whose client id already appeared at an earlier row (the first one is kept)."""
    first: set = set()
    out = []
    for i, cid in enumerate(client_ids):
        if cid in first:
            out.append(i)
        else:
            first.add(cid)
    return out


def _keeps_bound(layer: Layer, U_in: torch.Tensor, U_out: torch.Tensor, w: torch.Tensor,
                 bounded: torch.Tensor) -> bool:
    """Whether every row ``layer`` accepts still has the norm bound set earlier: it accepts no
    row the bounding layer had rejected, and it left the accepted rows as they were (or it is
    declared non-expansive row by row)."""
    if getattr(layer, "breaks_norm_bound", False) or U_out.shape != U_in.shape:
        return False
    keep = w > 0
    if bool((keep & ~bounded).any()):
        return False
    if U_out is U_in or getattr(layer, "nonexpansive", False):
        return True
    return bool(torch.equal(U_out[keep], U_in[keep]))


def build_defense(items: list, f: int = 0, **inject: Any) -> Pipeline:
    """A Pipeline from config entries: layers first, exactly one aggregator, then post steps.

    A layer marked ``anywhere`` (reputation) may also be listed after the aggregator; it still
    runs before it and learns from its output.

    ``f`` (the configured Byzantine count) is passed to every stage that takes an ``f``
    parameter and was not given one: the usual assumption that the server knows f. Other
    ``inject`` values (the simulator's key registry and run id) are passed the same way.
    """
    layers, aggs, posts = [], [], []
    for item in items:
        name, params = defense_item(item)
        sig = inspect.signature(DEFENSES.get(name)).parameters
        for key, value in {"f": f, **inject}.items():
            if key in sig and key not in params:
                params[key] = value
        stage = DEFENSES.build(name, **params)
        if isinstance(stage, Aggregator):
            if posts:
                raise ConfigError(f"defense: aggregator {name!r} must come before the post steps")
            aggs.append(stage)
        elif isinstance(stage, Layer):
            if aggs and not getattr(stage, "anywhere", False):
                raise ConfigError(f"defense: layer {name!r} must come before the aggregator")
            layers.append(stage)
        elif isinstance(stage, Post):
            posts.append(stage)
        else:
            raise ConfigError(f"defense: {name!r} built a {type(stage).__name__}, not a stage")
    if len(aggs) != 1:
        got = ", ".join(a.name for a in aggs) or "none"
        raise ConfigError(f"defense: needs exactly one aggregator, got {len(aggs)} ({got})")
    return Pipeline(layers, aggs[0], posts)
