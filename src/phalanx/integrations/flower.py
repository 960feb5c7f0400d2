"""phalanx as the aggregation layer of a Flower server (``pip install phalanx[flower]``).

``PhalanxStrategy`` is Flower's Message-API ``FedAvg`` (``flwr.serverapp.strategy``) with the
weighted average replaced by a phalanx ``Pipeline``::

    strategy = PhalanxStrategy(defense=["validate", "nnm", "trimmed_mean", "reputation"], f=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=10)

Each round, every reply's arrays minus the current global arrays become one row of the update
matrix U (arrays flattened in the global ArrayRecord's key order). Malformed replies (an error
reply, missing or extra arrays, a wrong shape, an integer dtype, bytes that do not decode, NaN)
become recorded rejections, not a crashed round: the reasons go to ``ctx.extras[INGEST_KEY]``
and the ``validate`` layer (added in front when the defense lacks one) zeroes their weight. The
pipeline's aggregate g is applied as ``global + server_lr * g``. Rows are keyed by the Flower
node id (``str(node_id)``), so stateful layers such as reputation follow a node across rounds.

Per-round, per-node decisions land in ``strategy.history`` (and in a phalanx ``Store`` if one
is given). Clients can lie about ``num-examples``, so rows are weighted equally unless
``weighted=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore import log
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError("phalanx.integrations.flower needs Flower: pip install 'phalanx[flower]' "
                      f"(flwr>=1.42,<1.43); import failed with: {e}") from None

from ..context import RoundContext
from ..defenses.base import Aggregator
from ..defenses.pipeline import Pipeline, build_defense
from ..defenses.validate import INGEST_KEY, Validate, collect_updates
from ..errors import PhalanxError

__all__ = ["PhalanxStrategy"]


class _Tap(Aggregator):
    """Wraps the pipeline's aggregator to record the weights it received (the final weights)."""

    def __init__(self, inner: Aggregator):
        self.inner = inner
        self.name = inner.name
        self.last_w: torch.Tensor | None = None

    def __call__(self, U, w, ctx):
        self.last_w = w.detach().clone()
        return self.inner(U, w, ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self.inner)


class PhalanxStrategy(FedAvg):
    """Flower FedAvg whose aggregation is a phalanx defense pipeline.

    defense: config entries for ``build_defense`` or a built ``Pipeline``. f: the Byzantine
    count passed to stages that take one. server_lr: step size on the aggregate (> 0).
    store / run_name: optional phalanx ``Store`` to log every round to. seed: seeds the
    per-round ``torch.Generator``. weighted: weight rows by the replies' ``num-examples``.
    Other keyword arguments go to Flower's ``FedAvg`` (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, defense: Sequence[Any] | Pipeline = ("validate", "median"), f: int = 0,
                 server_lr: float = 1.0, store: Any = None, run_name: str = "flower", seed: int = 0,
                 weighted: bool = False, **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not server_lr > 0:
            raise PhalanxError(f"PhalanxStrategy: server_lr must be a number > 0, got {server_lr!r}")
        if isinstance(defense, Pipeline):
            pipe = defense
        elif isinstance(defense, (list, tuple)):
            pipe = build_defense(list(defense), f=f)
        else:
            raise PhalanxError("PhalanxStrategy: defense must be a list of defense entries or a "
                               f"Pipeline, got {type(defense).__name__}")
        layers = list(pipe.layers)
        if not any(isinstance(layer, Validate) for layer in layers):
            layers.insert(0, Validate(check_norms=False))  # so ingest rejections are applied
        self._tap = _Tap(pipe.aggregator)
        self.pipeline = Pipeline(layers, self._tap, pipe.post)
        self.server_lr = float(server_lr)
        self.seed = int(seed)
        self.weighted = bool(weighted)
        self.history: list[dict[str, Any]] = []
        self.store = store
        self.run_id: str | None = None
        if store is not None:
            config = {"integration": "flower", "defense": repr(self.pipeline), "f": f,
                      "server_lr": self.server_lr, "weighted": self.weighted}
            self.run_id = store.start_run(config, name=run_name, seed=self.seed)
        self._global: ArrayRecord | None = None

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays  # the parameters this round's updates are relative to
        return super().configure_train(server_round, arrays, config, grid)

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Set the current global arrays (``configure_train`` does this during a run)."""
        self._global = arrays

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise PhalanxError("PhalanxStrategy: aggregate_train called before configure_train "
                               "(or set_global_arrays): the global arrays are unknown")
        replies = list(replies)
        layout = [(k, tuple(a.shape), np.dtype(a.numpy().dtype)) for k, a in self._global.items()]
        glob = np.concatenate([self._global[k].numpy().astype(np.float64).ravel() for k, _, _ in layout]) \
            if layout else np.zeros(0)
        d = glob.size
        node_ids, raw, reasons, examples = [], [], {}, []
        for i, msg in enumerate(replies):
            nid = int(msg.metadata.src_node_id)
            vec, why, num = self._read_reply(msg, layout, glob)
            if nid in node_ids:
                why = why or "duplicate_node"
            if why is None and self.weighted and not (num is not None and math.isfinite(num) and num > 0):
                why = "bad_num_examples"
            node_ids.append(nid)
            raw.append(vec if why is None else None)
            examples.append(num)
            if why is not None:
                reasons[i] = why
        entry: dict[str, Any] = {"round": server_round, "skipped": True, "error": None,
                                 "step_norm": 0.0, "clients": []}
        if not replies:
            entry["error"] = "no replies"
            self._record(entry)
            return None, None
        U, collect_reasons = collect_updates(raw, d)
        reasons = {**collect_reasons, **reasons}
        nums = torch.tensor([x if x is not None and math.isfinite(x) else float("nan") for x in examples],
                            dtype=torch.float64)
        w = nums.clone().float() if self.weighted else torch.ones(len(replies))
        for row in reasons:
            w[row] = 0.0
        ctx = RoundContext(round=server_round - 1, client_ids=[str(n) for n in node_ids],
                           global_params=torch.from_numpy(glob).float(),
                           generator=torch.Generator().manual_seed(self.seed + server_round),
                           num_samples=nums, extras={INGEST_KEY: reasons, "flower_round": server_round})
        self._tap.last_w = None
        try:
            g, summary = self.pipeline(U, w, ctx)
        except PhalanxError as e:  # a bound the round cannot meet: no step, recorded
            log(WARNING, "phalanx: round %s skipped: %s", server_round, e)
            entry["error"] = str(e)
            entry["clients"] = self._rows(node_ids, examples, U, None, {r: [f"ingest:{y}"] for r, y in reasons.items()})
            self._record(entry)
            return None, None
        why_all: dict[int, list[str]] = {}
        for rep in summary.info["reports"]:
            for row, why in rep.reasons.items():
                why_all.setdefault(row, []).append(f"{rep.name}:{why}")
        final_w = self._tap.last_w if self._tap.last_w is not None else torch.zeros(len(replies))
        entry["clients"] = self._rows(node_ids, examples, U, final_w, why_all, summary.selected)
        entry["skipped"] = bool(summary.info["skipped"])
        step = self.server_lr * g.double().numpy()
        entry["step_norm"] = float(np.linalg.norm(step))
        accepted = [m for i, m in enumerate(replies) if bool(summary.selected[i]) and i not in reasons]
        metrics = self._metrics(accepted)
        metrics["phalanx-accepted"] = int(summary.selected.sum())
        metrics["phalanx-rejected"] = len(replies) - int(summary.selected.sum())
        self._record(entry)
        log(INFO, "phalanx: round %s kept %s of %s replies", server_round,
            metrics["phalanx-accepted"], len(replies))
        if entry["skipped"]:
            return None, metrics
        return self._unflatten(glob + step, layout), metrics

    # ------------------------------------------------------------------ helpers
    def _read_reply(self, msg: Message, layout, glob: np.ndarray):
        """(flat update or None, rejection reason or None, num-examples or None)."""
        if msg.has_error():
            return None, "reply_error", None
        content = msg.content
        num = None
        for rec in content.metric_records.values():
            value = rec.get(self.weighted_by_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                num = float(value)
                break
        record = content.get(self.arrayrecord_key)
        if not isinstance(record, ArrayRecord):
            found = list(content.array_records.values())
            if len(found) != 1:
                return None, "missing_arrays", num
            record = found[0]
        if list(record.keys()) != [k for k, _, _ in layout]:
            return None, "wrong_keys", num
        parts = []
        for key, shape, dtype in layout:
            try:
                a = record[key].numpy()
            except Exception:  # noqa: BLE001 - any undecodable payload is the client's fault
                return None, "undecodable", num
            if a.dtype.kind != "f" and a.dtype != dtype:  # integer buffers only where the model has them
                return None, "bad_dtype", num
            if tuple(a.shape) != shape:
                return None, "wrong_size", num
            parts.append(a.astype(np.float64).ravel())
        flat = np.concatenate(parts) if parts else np.zeros(0)
        with np.errstate(over="ignore", invalid="ignore"):
            return (flat - glob).astype(np.float32), None, num

    @staticmethod
    def _unflatten(flat: np.ndarray, layout) -> ArrayRecord:
        out, offset = {}, 0
        for key, shape, dtype in layout:
            k = int(np.prod(shape, dtype=np.int64))
            out[key] = Array(np.ascontiguousarray(flat[offset:offset + k].reshape(shape).astype(dtype)))
            offset += k
        return ArrayRecord(out)

    def _metrics(self, accepted: list[Message]) -> MetricRecord:
        if not accepted:
            return MetricRecord()
        try:
            return self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        except Exception as e:  # noqa: BLE001 - client metrics are advisory; never fail the round
            log(WARNING, "phalanx: could not aggregate client metrics: %s", e)
            return MetricRecord()

    @staticmethod
    def _rows(node_ids, examples, U, w, why, selected=None) -> list[dict[str, Any]]:
        norms = U.double().norm(dim=1)
        rows = []
        seen: set[int] = set()
        for i, nid in enumerate(node_ids):
            cid = str(nid) if nid not in seen else f"{nid}#{i}"  # a repeated reply keeps its own row
            seen.add(nid)
            rows.append({"client_id": cid, "node_id": nid,
                         "weight": float(w[i]) if w is not None else 0.0,
                         "selected": bool(selected[i]) if selected is not None else False,
                         "reasons": list(why.get(i, [])), "num_examples": examples[i],
                         "norm": float(norms[i]) if math.isfinite(float(norms[i])) else None})
        return rows

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.store is None:
            return
        rows = [{"client_id": r["client_id"], "weight": r["weight"], "norm": r["norm"], "flags": r["reasons"],
                 "selected": r["selected"], "node_id": r["node_id"]} for r in entry["clients"]]
        self.store.log_clients(self.run_id, entry["round"], rows)
        self.store.log_round(self.run_id, entry["round"],
                             {"accepted": sum(r["selected"] for r in entry["clients"]),
                              "rejected": sum(not r["selected"] for r in entry["clients"]),
                              "skipped": entry["skipped"], "step_norm": entry["step_norm"],
                              "error": entry["error"]})

    def finish(self, final: dict[str, Any] | None = None, status: str = "done") -> None:
        """Close the run in the store (if any)."""
        if self.store is not None:
            self.store.finish_run(self.run_id, final or {"rounds": len(self.history)}, status)

    def state_dict(self) -> dict[str, Any]:
        """The pipeline's state (reputation scores, ...) for checkpointing."""
        return self.pipeline.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state)
