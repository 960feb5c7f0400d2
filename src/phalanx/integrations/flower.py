"""phalanx as the aggregation layer of a Flower server (``pip install phalanx[flower]``).

``PhalanxStrategy`` is Flower's Message-API ``FedAvg`` (``flwr.serverapp.strategy``) with the
weighted average replaced by a phalanx ``Pipeline``::

    strategy = PhalanxStrategy(defense=["verify", "validate", "nnm", "trimmed_mean", "reputation"], f=2,
                               registry="registry/")   # public keys only
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=10)

Each round, every reply's arrays minus the current global arrays become one row of the update
matrix U (arrays flattened in the global ArrayRecord's key order). Malformed replies (an error
reply, missing or extra arrays, a wrong shape, an integer dtype, bytes that do not decode, NaN)
become recorded rejections, not a crashed round: the reasons go to ``ctx.extras[INGEST_KEY]``
and the ``validate`` layer (added in front when the defense lacks one) zeroes their weight. The
pipeline's aggregate g is applied as ``global + server_lr * g``.

**Signed replies.** With a ``verify`` stage the strategy needs a key registry of client public
keys (``registry=``: a ``KeyRegistry`` or its path); the server never holds a private key. Each
train instruction carries the run id (``phalanx-run-id``, fresh and random per strategy unless
given) and the round (``phalanx-round``); each client signs its reply with its own key
(``phalanx.integrations.flower_client.sign_replies``): the digest of the reply's arrays as
sent. The strategy hashes the arrays as they arrived (``ctx.extras["payload_digests"]``) and
hands the envelopes to the pipeline, whose ``verify`` stage rejects, each with its reason,
unsigned (``missing_signature``), forged (``bad_signature``), tampered (``digest_mismatch``),
replayed (``replayed_nonce``, or ``stale_round`` for an earlier round's reply), another run's
(``wrong_run``), duplicated (``duplicate_client``: one key, one row per round), unknown and
revoked clients' replies; the honest replies of the round are still aggregated.

**Nodes and clients.** A Flower node id says which connection a reply came from; the key says who
sent it. Once a node's reply passes ``verify`` the node is bound to that client id, and its rows
carry the client id (so reputation follows the client, not the connection). A bound node that
presents another client's envelope is rejected as ``impersonation``, as is an unbound node that
claims a client bound to another node answering in the same round. A client seen on a new node
(a restarted SuperNode gets a new node id) is rebound, and the event is logged. Without
``verify`` rows are keyed by ``str(node_id)``.

**Missing nodes.** Nodes sent an instruction whose update never came are listed in the round's
``missing``, each with its cause in ``missing_causes``: no reply before the round's timeout, or
the error the SuperLink sent in its place (a node that died: NODE_UNAVAILABLE, after two missed
heartbeats). A ClientApp's own error reply is a row with the rejection ``reply_error``.

**Checkpoints.** With ``checkpoint=PATH`` the state is saved atomically after every round: the run
id, the rounds done, the global arrays, the pipeline's state (verify's nonces, reputation), the
node bindings and the history. A strategy built with the same ``checkpoint`` whose file exists
resumes: ``initial_arrays(default)`` returns the saved arrays, ``rounds_left(total)`` the rounds
still to run, and rounds continue from where they stopped under the same run id.

Per-round, per-node decisions land in ``strategy.history`` (and in a phalanx ``Store`` if one
is given), and each rejection is logged with its node, client and reason. Clients can lie about
``num-examples``, so rows are weighted equally unless ``weighted=True``.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore import log
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError("phalanx.integrations.flower needs Flower: pip install 'phalanx[flower]' "
                      f"(flwr>=1.42,<1.43); import failed with: {e}") from None

from ..context import RoundContext
from ..defenses.base import Aggregator
from ..defenses.pipeline import Pipeline, build_defense, defense_item
from ..defenses.signing import KeyRegistry, Verify
from ..defenses.validate import INGEST_KEY, Validate, collect_updates
from ..errors import PhalanxError
from .flower_client import ARRAYS_KEY, ROUND_KEY, RUN_KEY, find_arrays, read_envelope, record_digest

__all__ = ["PhalanxStrategy"]

CHECKPOINT_FORMAT = 1


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
    registry: the client public keys (``KeyRegistry`` or its path), needed by ``verify``.
    run_id: the run id clients sign (default: fresh and random; a resumed checkpoint's).
    checkpoint: file saved after every round, and resumed from when it exists.
    store / run_name: optional phalanx ``Store`` to log every round to. seed: seeds the
    per-round ``torch.Generator``. weighted: weight rows by the replies' ``num-examples``.
    Other keyword arguments go to Flower's ``FedAvg`` (fraction_train, min_train_nodes, ...).
    """

    def __init__(self, defense: Sequence[Any] | Pipeline = ("validate", "median"), f: int = 0,
                 server_lr: float = 1.0, store: Any = None, run_name: str = "flower", seed: int = 0,
                 weighted: bool = False, registry: KeyRegistry | str | Path | None = None,
                 run_id: str | None = None, checkpoint: str | Path | None = None, **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)) or not server_lr > 0:
            raise PhalanxError(f"PhalanxStrategy: server_lr must be a number > 0, got {server_lr!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise PhalanxError(f"PhalanxStrategy: run_id must be a non-empty string, got {run_id!r}")
        self.run_id: str = run_id or uuid.uuid4().hex[:12]
        if isinstance(registry, (str, Path)):
            registry = KeyRegistry.open(registry)
        if registry is not None and not isinstance(registry, KeyRegistry):
            raise PhalanxError("PhalanxStrategy: registry must be a KeyRegistry or the path of one, got "
                               f"{type(registry).__name__}")
        self.registry = registry
        if isinstance(defense, Pipeline):
            pipe = defense
        elif isinstance(defense, (list, tuple)):
            names = [defense_item(item)[0] for item in defense]
            if "verify" in names and registry is None:
                raise PhalanxError("PhalanxStrategy: the 'verify' stage needs the clients' public keys: pass "
                                   "registry=KeyRegistry or the path of one (phalanx keys init / generate)")
            inject: dict[str, Any] = {"sample_rate": float(self.fraction_train) or 1.0}
            if registry is not None:
                inject.update(registry=registry, run_id=self.run_id)
            pipe = build_defense(list(defense), f=f, **inject)
        else:
            raise PhalanxError("PhalanxStrategy: defense must be a list of defense entries or a "
                               f"Pipeline, got {type(defense).__name__}")
        layers = list(pipe.layers)
        if not any(isinstance(layer, Validate) for layer in layers):
            layers.insert(0, Validate(check_norms=False))  # so ingest rejections are applied
        self._tap = _Tap(pipe.aggregator)
        self.pipeline = Pipeline(layers, self._tap, pipe.post)
        self.verifiers = [s for s in layers if isinstance(s, Verify)]
        for v in self.verifiers:
            v.bind_run(self.run_id)
        self.server_lr = float(server_lr)
        self.seed = int(seed)
        self.weighted = bool(weighted)
        self.f = f
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.node_client: dict[int, str] = {}   # node id -> the client id its key proved
        self.client_node: dict[str, int] = {}   # client id -> the node it was last seen on
        self.rounds_done = 0
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._resumed: ArrayRecord | None = None
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []  # this round's instructions
        self._t_round: float | None = None
        if self.checkpoint is not None and self.checkpoint.is_file():
            self._load_checkpoint(self.checkpoint)
        self.store, self.run_name = store, run_name
        if store is not None:
            self._open_store()

    # ------------------------------------------------------------------ resume
    def initial_arrays(self, default: ArrayRecord) -> ArrayRecord:
        """The arrays to continue from: the latest global arrays once rounds were run (or loaded
        from the checkpoint), else ``default``."""
        if self.rounds_done and self._global is not None:
            return self._global
        return self._resumed if self._resumed is not None else default

    def rounds_left(self, total: int) -> int:
        """How many of ``total`` rounds are still to run (all of them unless resuming)."""
        return max(0, int(total) - self.rounds_done)

    def _open_store(self) -> None:
        store = self.store
        config = {"integration": "flower", "defense": repr(self.pipeline), "f": self.f,
                  "server_lr": self.server_lr, "weighted": self.weighted}
        if self.rounds_done:
            try:
                store.read_run(self.run_id)
                known = True
            except Exception:  # noqa: BLE001 - a store without this run: start it
                known = False
            if known:
                store.truncate_after(self.run_id, self.rounds_done)
                store.reopen_run(self.run_id)
                store.log_event(self.run_id, self.rounds_done, "resumed", {"from_round": self.rounds_done + 1})
                return
        store.start_run(config, name=self.run_name, seed=self.seed, run_id=self.run_id)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise PhalanxError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != "flower":
            raise PhalanxError(f"{path}: not a PhalanxStrategy checkpoint (format {CHECKPOINT_FORMAT})")
        if state["defense"] != self._defense_signature():
            raise PhalanxError(f"{path}: checkpoint was written with another defense "
                               f"({' -> '.join(state['defense'])}); resume with the same defense")
        self.run_id = state["run_id"]
        self.rounds_done = int(state["rounds_done"])
        self.pipeline.load_state_dict(state["pipeline"])
        for v in self.verifiers:
            v.bind_run(self.run_id)
        self.node_client = {int(k): str(v) for k, v in state["node_client"].items()}
        self.client_node = {str(k): int(v) for k, v in state["client_node"].items()}
        self.history = list(state["history"])
        self._resumed = ArrayRecord({k: Array(np.asarray(v)) for k, v in state["arrays"].items()})
        self.events.append({"round": self.rounds_done, "kind": "resumed", "from": str(path)})
        log(INFO, "phalanx: resumed run %s after round %s from %s", self.run_id, self.rounds_done, path)

    def _defense_signature(self) -> list[str]:
        """The stages and their settings, without the run id (which a resume takes from the file)."""
        return [f"Verify(max_round_lag={s.max_round_lag})" if isinstance(s, Verify) else repr(s)
                for s in self.pipeline.stages]

    def save_checkpoint(self, arrays: ArrayRecord, path: str | Path | None = None) -> None:
        """Write the state (see the module docstring) atomically to ``path`` or ``self.checkpoint``."""
        path = Path(path) if path is not None else self.checkpoint
        if path is None:
            raise PhalanxError("save_checkpoint: no path (pass one, or build the strategy with checkpoint=)")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "kind": "flower", "run_id": self.run_id,
                 "rounds_done": self.rounds_done, "defense": self._defense_signature(),
                 "pipeline": self.pipeline.state_dict(),
                 "arrays": {k: np.array(arrays[k].numpy()) for k in arrays.keys()},
                 "node_client": dict(self.node_client), "client_node": dict(self.client_node),
                 "history": self.history}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays  # the parameters this round's updates are relative to
        rnd = self.rounds_done + 1
        config[RUN_KEY] = self.run_id
        config[ROUND_KEY] = rnd - 1  # envelopes carry the 0-based round, as in the simulator
        config[ARRAYS_KEY] = self.arrayrecord_key
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = messages  # the Grid sets their message ids when it pushes them
        self._t_round = time.monotonic()
        return messages

    def set_global_arrays(self, arrays: ArrayRecord) -> None:
        """Set the current global arrays (``configure_train`` does this during a run)."""
        self._global = arrays

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise PhalanxError("PhalanxStrategy: aggregate_train called before configure_train "
                               "(or set_global_arrays): the global arrays are unknown")
        rnd = self.rounds_done + 1  # this round, 1-based (Flower's server_round when not resuming)
        replies = list(replies)
        layout = [(k, tuple(a.shape), np.dtype(a.numpy().dtype)) for k, a in self._global.items()]
        glob = np.concatenate([self._global[k].numpy().astype(np.float64).ravel() for k, _, _ in layout]) \
            if layout else np.zeros(0)
        d = glob.size
        node_ids, raw, reasons, examples, errors = [], [], {}, [], {}
        envelopes, env_why, digests = [], {}, []
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent if m.metadata.message_id}
        causes: dict[int, str] = {}
        rows_of = []
        for msg in replies:  # the SuperLink answers for a node that is gone: not a row, a missing node
            if int(msg.metadata.src_node_id) == SUPERLINK_NODE_ID and msg.has_error():
                target = sent.get(msg.metadata.reply_to_message_id)
                if target is not None:
                    causes[target] = f"{msg.error.code}: {msg.error.reason}"
                else:
                    log(WARNING, "phalanx: SuperLink error for an unknown instruction: %s", msg.error.reason)
            else:
                rows_of.append(msg)
        replies = rows_of
        for i, msg in enumerate(replies):
            nid = int(msg.metadata.src_node_id)
            vec, why, num, digest = self._read_reply(msg, layout, glob)
            if msg.has_error():
                errors[i] = f"{msg.error.code}: {msg.error.reason}"
            if nid in node_ids:
                why = why or "duplicate_node"
            if why is None and self.weighted and not (num is not None and math.isfinite(num) and num > 0):
                why = "bad_num_examples"
            env, bad = (None, None) if msg.has_error() else read_envelope(msg.content)
            if bad == "malformed_envelope":
                env = {"malformed": True}  # verify records malformed_envelope
            envelopes.append(env)
            digests.append(digest)
            node_ids.append(nid)
            raw.append(vec if why is None else None)
            examples.append(num)
            if why is not None:
                reasons[i] = why
        missing = [int(m.metadata.dst_node_id) for m in self._sent if int(m.metadata.dst_node_id) not in set(node_ids)]
        missing += [n for n in causes if n not in missing]
        self._sent = []
        entry: dict[str, Any] = {"round": rnd, "run_id": self.run_id, "skipped": True, "error": None,
                                 "seconds": time.monotonic() - self._t_round if self._t_round else None,
                                 "step_norm": 0.0, "clients": [], "missing": missing, "rejections": {},
                                 "missing_causes": {str(n): causes.get(n, "no reply before the round's timeout")
                                                    for n in missing}}
        for n in missing:
            log(WARNING, "phalanx: round %s: no update from node %s (client %s): %s", rnd, n,
                self.node_client.get(n, "unbound"), entry["missing_causes"][str(n)])
        if not replies:
            entry["error"] = "no replies"
            self._finish_round(entry, None)
            return None, None
        ids = self._identities(node_ids, envelopes)
        U, collect_reasons = collect_updates(raw, d)
        reasons = {**collect_reasons, **reasons}
        nums = torch.tensor([x if x is not None and math.isfinite(x) else float("nan") for x in examples],
                            dtype=torch.float64)
        w = nums.clone().float() if self.weighted else torch.ones(len(replies))
        for row in reasons:
            w[row] = 0.0
        extras: dict[str, Any] = {INGEST_KEY: reasons, "flower_round": server_round}
        if self.verifiers:
            extras.update(envelopes=envelopes, payload_digests=digests)
        ctx = RoundContext(round=rnd - 1, client_ids=ids, global_params=torch.from_numpy(glob).float(),
                           generator=torch.Generator().manual_seed(self.seed + rnd),
                           num_samples=nums, extras=extras)
        self._tap.last_w = None
        try:
            g, summary = self.pipeline(U, w, ctx)
        except PhalanxError as e:  # a bound the round cannot meet: no step, recorded
            log(WARNING, "phalanx: round %s skipped: %s", rnd, e)
            entry["error"] = str(e)
            entry["clients"] = self._rows(node_ids, ids, examples, U, None,
                                          {r: [f"ingest:{y}"] for r, y in reasons.items()}, errors=errors)
            self._finish_round(entry, None)
            return None, None
        why_all: dict[int, list[str]] = {}
        for rep in summary.info["reports"]:
            for row, why in rep.reasons.items():
                why_all.setdefault(row, []).append(f"{rep.name}:{why}")
        for row in summary.info.get("duplicates", []):
            if row not in why_all:  # one client id twice in the round: the pipeline kept the first
                why_all[row] = ["pipeline:duplicate_client"]
        if self.verifiers:
            self._bind(node_ids, ids, envelopes, why_all, rnd)
        final_w = self._tap.last_w if self._tap.last_w is not None else torch.zeros(len(replies))
        entry["clients"] = self._rows(node_ids, ids, examples, U, final_w, why_all, summary.selected, errors)
        entry["skipped"] = bool(summary.info["skipped"])
        step = self.server_lr * g.double().numpy()
        entry["step_norm"] = float(np.linalg.norm(step))
        accepted = [m for i, m in enumerate(replies) if bool(summary.selected[i]) and i not in reasons]
        metrics = self._metrics(accepted)
        metrics["phalanx-accepted"] = int(summary.selected.sum())
        metrics["phalanx-rejected"] = len(replies) - int(summary.selected.sum())
        metrics["phalanx-missing"] = len(missing)
        new = None if entry["skipped"] else self._unflatten(glob + step, layout)
        self._finish_round(entry, new)
        took = f" in {entry['seconds']:.1f} s" if entry["seconds"] is not None else ""
        log(INFO, "phalanx: round %s kept %s of %s replies (%s missing)%s", rnd,
            metrics["phalanx-accepted"], len(replies), len(missing), took)
        return new, metrics

    # ------------------------------------------------------------------ identities
    def _identities(self, node_ids: list[int], envelopes: list[Any]) -> list[str]:
        """The client id each row is judged as (see 'Nodes and clients' in the module docstring)."""
        if not self.verifiers:
            return [str(n) for n in node_ids]
        claimed = [getattr(e, "client_id", None) for e in envelopes]
        answering = set(node_ids)
        ids = []
        for nid, cid in zip(node_ids, claimed):
            bound = self.node_client.get(nid)
            if bound is not None:
                ids.append(bound)  # verify says impersonation if the envelope claims another id
            elif cid is not None and self.client_node.get(cid) not in answering:
                ids.append(cid)  # a first claim, or a client back on a new node (rebound once verified)
            else:  # no claim, or a claim on a client bound to another node answering this round
                ids.append(f"node-{nid}")
        # two unbound rows claiming one id: keep the id on rows whose signature holds, so a forged
        # copy cannot make the genuine row a duplicate
        counts = Counter(ids)
        for i, cid in enumerate(ids):
            if counts[cid] > 1 and self.node_client.get(node_ids[i]) is None and not self._signature_ok(envelopes[i]):
                ids[i] = f"node-{node_ids[i]}"
        return ids

    def _signature_ok(self, env: Any) -> bool:
        rec = self.registry.get(env.client_id) if self.registry is not None and hasattr(env, "client_id") else None
        if rec is None:
            return False
        from ..defenses.signing import _ECDSA  # noqa: PLC0415
        try:
            rec.public_key.verify(env.signature, env.message(), _ECDSA)
            return True
        except Exception:  # noqa: BLE001 - any failure means: not proven
            return False

    def _bind(self, node_ids, ids, envelopes, why_all, rnd) -> None:
        """Bind each node whose row passed every verify check to the client id its key proved."""
        for i, nid in enumerate(node_ids):
            if any(w.startswith("verify:") for w in why_all.get(i, [])) or not hasattr(envelopes[i], "client_id"):
                continue
            cid = envelopes[i].client_id
            if cid != ids[i]:
                continue
            old = self.client_node.get(cid)
            if old is not None and old != nid:
                self.node_client.pop(old, None)
                self.events.append({"round": rnd, "kind": "rebound", "client_id": cid, "from_node": old,
                                    "to_node": nid})
                log(INFO, "phalanx: client %s moved from node %s to node %s", cid, old, nid)
            self.node_client[nid], self.client_node[cid] = cid, nid

    # ------------------------------------------------------------------ helpers
    def _read_reply(self, msg: Message, layout, glob: np.ndarray):
        """(flat update or None, rejection reason or None, num-examples or None, payload digest or None)."""
        if msg.has_error():
            return None, "reply_error", None, None
        content = msg.content
        num = None
        for rec in content.metric_records.values():
            value = rec.get(self.weighted_by_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                num = float(value)
                break
        record = find_arrays(content, self.arrayrecord_key)
        if record is None:
            return None, "missing_arrays", num, None
        digest = None
        if self.verifiers:
            try:
                digest = record_digest(record)
            except Exception:  # noqa: BLE001 - undecodable arrays are rejected below
                digest = None
        if list(record.keys()) != [k for k, _, _ in layout]:
            return None, "wrong_keys", num, digest
        parts = []
        for key, shape, dtype in layout:
            try:
                a = record[key].numpy()
            except Exception:  # noqa: BLE001 - any undecodable payload is the client's fault
                return None, "undecodable", num, digest
            if a.dtype.kind != "f" and a.dtype != dtype:  # integer buffers only where the model has them
                return None, "bad_dtype", num, digest
            if tuple(a.shape) != shape:
                return None, "wrong_size", num, digest
            parts.append(a.astype(np.float64).ravel())
        flat = np.concatenate(parts) if parts else np.zeros(0)
        with np.errstate(over="ignore", invalid="ignore"):
            return (flat - glob).astype(np.float32), None, num, digest

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
    def _rows(node_ids, ids, examples, U, w, why, selected=None, errors=None) -> list[dict[str, Any]]:
        norms = U.double().norm(dim=1)
        rows = []
        seen: set[str] = set()
        for i, nid in enumerate(node_ids):
            cid = ids[i] if ids[i] not in seen else f"{ids[i]}#{i}"  # a repeated id keeps its own row
            seen.add(ids[i])
            row = {"client_id": cid, "node_id": nid,
                   "weight": float(w[i]) if w is not None else 0.0,
                   "selected": bool(selected[i]) if selected is not None else False,
                   "reasons": list(why.get(i, [])), "num_examples": examples[i],
                   "norm": float(norms[i]) if math.isfinite(float(norms[i])) else None}
            if errors and i in errors:
                row["error"] = errors[i]
            rows.append(row)
        return rows

    def _finish_round(self, entry: dict[str, Any], new_arrays: ArrayRecord | None) -> None:
        counts = Counter(r.split(":", 1)[1] if ":" in r else r
                         for c in entry["clients"] for r in c["reasons"][:1])
        entry["rejections"] = dict(sorted(counts.items()))
        for c in entry["clients"]:
            if c["reasons"]:
                log(WARNING, "phalanx: round %s node %s (client %s) rejected: %s%s", entry["round"], c["node_id"],
                    c["client_id"], ", ".join(c["reasons"]), f" [{c['error']}]" if "error" in c else "")
        self.history.append(entry)
        self.rounds_done = entry["round"]
        if self.store is not None:
            rows = [{"client_id": r["client_id"], "weight": r["weight"], "norm": r["norm"], "flags": r["reasons"],
                     "selected": r["selected"], "node_id": r["node_id"]} for r in entry["clients"]]
            rows += [{"client_id": self.node_client.get(n, f"node-{n}"), "weight": 0.0, "norm": None,
                      "flags": ["missing"], "selected": False, "node_id": n,
                      "cause": entry["missing_causes"][str(n)]} for n in entry["missing"]]
            self.store.log_clients(self.run_id, entry["round"], rows)
            self.store.log_round(self.run_id, entry["round"], self._round_metrics(entry))
        if new_arrays is not None:
            self._global = new_arrays
        if self.checkpoint is not None and self._global is not None:
            self.save_checkpoint(self._global)

    def record_metrics(self, round: int, metrics: dict[str, Any]) -> None:
        """Add metrics measured after round ``round`` (1-based; server-side accuracy) to its record."""
        entry = next((h for h in self.history if h["round"] == round), None)
        if entry is None:
            return
        entry.setdefault("metrics", {}).update(metrics)
        if self.store is not None:
            self.store.log_round(self.run_id, round, {**self._round_metrics(entry), **entry["metrics"]})

    @staticmethod
    def _round_metrics(entry: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": sum(r["selected"] for r in entry["clients"]),
                "rejected": sum(not r["selected"] for r in entry["clients"]),
                "missing": len(entry["missing"]), "rejections": entry["rejections"],
                "skipped": entry["skipped"], "step_norm": entry["step_norm"], "error": entry["error"],
                "seconds": entry.get("seconds")}

    def finish(self, final: dict[str, Any] | None = None, status: str = "done") -> None:
        """Close the run in the store (if any)."""
        if self.store is not None:
            self.store.finish_run(self.run_id, final or {"rounds": len(self.history)}, status)

    def state_dict(self) -> dict[str, Any]:
        """The pipeline's state (reputation scores, verify's nonces, ...) for checkpointing."""
        return self.pipeline.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state)
