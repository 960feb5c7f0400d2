"""A Flower app for a real deployment, driven by the same experiment YAML as the simulator.

``deploy/flower_app`` wires these two into Flower (``server_app.py``: ``app = make_server_app()``;
``client_app.py``: ``app = make_client_app()``). The experiment file (``experiment`` in the
app's run config, relative to the app folder, which ``flwr run`` ships to every party) names the
dataset, model, local training and the defense, exactly as for ``phalanx run``:

* **ServerApp** (on the SuperLink's machine): builds the model, a ``PhalanxStrategy`` with the
  YAML's ``defense`` (``verify`` checks every reply against the key registry at ``registry``,
  public keys only), waits for ``expected-nodes`` SuperNodes (``node-wait`` seconds at most),
  runs ``federation.rounds`` rounds (each waits ``round-timeout`` seconds at most for replies)
  with server-side evaluation on the dataset's test split, and writes the run's record:
  ``store`` (a phalanx results store: ``phalanx show --db``), ``checkpoint`` (saved every
  round; a later run with the same checkpoint resumes from it) and ``summary`` (a JSON file:
  run id, rounds, per-round accuracy, rejections by reason, missing nodes).
* **ClientApp** (on each SuperNode): trains the model on its share of the data, the way the
  simulator trains a client (``federation.*`` local settings; partition ``partition-id`` of
  ``num-partitions`` from the node config), and signs its reply with its own key
  (``sign_replies``: node config ``phalanx-client-id`` and ``phalanx-private-key``).

Fault drills (for tests and rehearsals; nothing happens unless a node config names one):
``phalanx-fault`` = ``nan`` (the node sends NaN arrays, validly signed), ``forge`` (its replies
carry a signature by a key the server does not know), ``replay`` (from round
``phalanx-fault-round`` on it sends its first reply again), ``forge-replay`` (a forged reply in
round 1, its honest round-1 reply replayed afterwards) or ``hang`` (from round
``phalanx-fault-round`` on it touches ``phalanx-fault-marker`` and stalls, so that an operator or
a test can kill the node mid-round).

Run-config keys (``[tool.flwr.app.config]``, or ``flwr run --run-config``): experiment,
registry, registry-seen (a file in the server's own folder keeping the highest registry seq it
loaded, so that a restart refuses an older copy), admin-fingerprint, expected-nodes, min-nodes, node-wait, round-timeout, store,
checkpoint, summary.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from ..config import ExperimentConfig, load_config
from ..data import load_configured, partition
from ..errors import PhalanxError
from ..metrics import imbalance_metrics, positive_scores
from ..models import build_model
from ..training import LocalSpec, evaluate, local_update
from ..updates import flatten_params, load_flat
from .flower_client import ENVELOPE_KEY, ROUND_KEY, RUN_KEY, record_digest, sign_replies

__all__ = ["make_client_app", "make_server_app"]

DEFAULTS = {"experiment": "experiment.yaml", "registry": "", "registry-seen": "", "admin-fingerprint": "",
            "expected-nodes": 0, "min-nodes": 1, "node-wait": 120, "round-timeout": 300, "store": "", "checkpoint": "", "summary": ""}


def _app_dir() -> Path:
    return Path(os.environ.get("PHALANX_APP_DIR", "."))


@lru_cache(maxsize=4)
def _experiment(path: str) -> ExperimentConfig:
    return load_config(Path(path))


def experiment_path(run_config: dict, app_dir: Path) -> Path:
    p = Path(str(run_config.get("experiment", DEFAULTS["experiment"])))
    return p if p.is_absolute() else app_dir / p


def dataset_for(cfg: ExperimentConfig):
    ds = load_configured(cfg.data)
    if cfg.data.train_subset or cfg.data.test_subset:
        ds = ds.subset(cfg.data.train_subset, cfg.data.test_subset, seed=cfg.seed)
    return ds


def client_rows(cfg: ExperimentConfig, ds, part: int, parts: int) -> torch.Tensor:
    """Partition ``part`` of ``parts``, drawn as the simulator draws its clients' shares."""
    d = cfg.data
    params: dict[str, Any] = {}
    if d.partition == "silo":
        params = {"silos": ds.silo_train, "names": ds.silos}
    elif d.partition == "dirichlet":
        params = {"alpha": d.alpha}
    elif d.partition == "shards":
        params = {"shards_per_client": d.shards_per_client}
    idx = partition(ds.y_train, parts, d.partition, seed=cfg.seed, **params)
    if not 0 <= part < parts:
        raise PhalanxError(f"partition-id must be in [0, {parts}), got {part}")
    return idx[part]


def model_for(cfg: ExperimentConfig, ds):
    return build_model(cfg.model.name, ds.in_shape, ds.num_classes, cfg.seed, **cfg.model.params)


# ---------------------------------------------------------------------------- client
def _train(msg: Message, context: Context, app_dir: Path) -> Message:
    cfg = _experiment(str(experiment_path(context.run_config, app_dir)))
    node = context.node_config
    part, parts = int(node.get("partition-id", 0)), int(node.get("num-partitions", cfg.federation.num_clients))
    ds = dataset_for(cfg)
    idx = client_rows(cfg, ds, part, parts)
    model = model_for(cfg, ds)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    params = flatten_params(model)
    fed = cfg.federation
    spec = LocalSpec(fed.local_epochs, fed.batch_size, fed.lr, fed.momentum, fed.weight_decay, fed.local_steps)
    rnd = int(msg.content["config"].get(ROUND_KEY, int(msg.content["config"].get("server-round", 1)) - 1))
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, rnd, part]).integers(2**62)))
    update, loss = local_update(model, params, ds.x_train[idx], ds.y_train[idx], spec, gen)
    new = params + update
    if str(node.get("phalanx-fault", "")) == "nan" and rnd + 1 >= int(node.get("phalanx-fault-round", 1)):
        new = torch.full_like(new, float("nan"))
    load_flat(model, new)
    arrays = ArrayRecord(model.state_dict())
    metrics = MetricRecord({"num-examples": int(len(idx)), "train-loss": float(loss)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def fault_drill(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: the node's configured fault (see the module docstring); a no-op without one."""
    node = context.node_config
    fault = str(node.get("phalanx-fault", ""))
    config = msg.content.get("config") if "config" in msg.content else None
    rnd = int(config.get(ROUND_KEY, 0)) + 1 if isinstance(config, ConfigRecord) else 1
    at = int(node.get("phalanx-fault-round", 1))
    if fault == "hang" and rnd >= at:
        marker = str(node.get("phalanx-fault-marker", ""))
        if marker:
            Path(marker).write_text(f"{os.getpid()} round {rnd}\n")
        log(30, "phalanx fault drill: node %s stalls in round %s", context.node_id, rnd)
        time.sleep(float(node.get("phalanx-fault-seconds", 900)))
    reply = call_next(msg, context)
    if not fault or reply.has_error() or ENVELOPE_KEY not in reply.content:
        return reply
    state = context.state  # kept by the SuperNode across the rounds of a run
    if fault in ("forge", "forge-replay") and (fault == "forge" or rnd == 1):
        if fault == "forge-replay":
            _keep(state, reply.content)
        from ..defenses.signing import ClientSigner

        rogue = ClientSigner(str(node.get("phalanx-client-id", "rogue")), ClientSigner.generate("x")._key)
        env = rogue.sign_digest(record_digest(reply.content["arrays"]), str(config[RUN_KEY]), rnd - 1)
        reply.content[ENVELOPE_KEY] = ConfigRecord(env.to_record())
    elif fault in ("replay", "forge-replay"):
        if _DRILL + "arrays" not in state:
            _keep(state, reply.content)
        elif rnd >= at:  # the kept reply, signed for an earlier round, sent again
            return Message(RecordDict({"arrays": state[_DRILL + "arrays"], "metrics": state[_DRILL + "metrics"],
                                       ENVELOPE_KEY: state[_DRILL + "envelope"]}), reply_to=msg)
    return reply


_DRILL = "phalanx-drill-"


def _keep(state: RecordDict, content: RecordDict) -> None:
    """Keep a signed reply in the node's state, to replay it later."""
    arrays = content["arrays"]
    state[_DRILL + "arrays"] = ArrayRecord({k: Array(np.array(arrays[k].numpy())) for k in arrays.keys()})
    state[_DRILL + "metrics"] = MetricRecord(dict(content["metrics"])) if "metrics" in content else MetricRecord()
    state[_DRILL + "envelope"] = ConfigRecord(dict(content[ENVELOPE_KEY]))


def make_client_app(app_dir: str | Path | None = None) -> ClientApp:
    """The ClientApp: local training as in the simulator, each reply signed with the node's key."""
    where = Path(app_dir) if app_dir is not None else _app_dir()
    app = ClientApp(mods=[fault_drill, sign_replies])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(msg, context, where)

    return app


# ---------------------------------------------------------------------------- server
def _rc(context: Context, key: str):
    return context.run_config.get(key, DEFAULTS[key])


def _wait_for_nodes(grid: Grid, expected: int, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(1.0)


class PromptGrid(Grid):
    """``grid`` with replies collected every ``poll`` seconds: Flower's own ``send_and_receive``
    asks the SuperLink every 3 s, up to 3 s of idle wait per round on a loopback deployment."""

    def __init__(self, grid: Grid, poll: float = 0.25):
        self.grid, self.poll = grid, poll

    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        waiting = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies = []
        while waiting and (timeout is None or time.monotonic() < end):
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(self.poll)
        return replies


def run_server(grid: Grid, context: Context, app_dir: Path) -> dict[str, Any]:
    """The ServerApp's main; returns (and writes to ``summary``) the run's summary."""
    from ..store import Store
    from .flower import PhalanxStrategy

    t0 = time.monotonic()
    path = experiment_path(context.run_config, app_dir)
    cfg = _experiment(str(path))
    ds = dataset_for(cfg)
    model = model_for(cfg, ds)
    registry = str(_rc(context, "registry")) or None
    if registry is not None:
        from ..keys import KeyRegistry

        registry = KeyRegistry.open(registry, admin_fingerprint=str(_rc(context, "admin-fingerprint")) or None,
                                    seen_seq=str(_rc(context, "registry-seen")) or None)
    store = Store(str(_rc(context, "store"))) if str(_rc(context, "store")) else None
    fed = cfg.federation
    expected = int(_rc(context, "expected-nodes")) or fed.num_clients
    strategy = PhalanxStrategy(defense=cfg.defense, f=cfg.server_f(), server_lr=fed.server_lr, store=store,
                               run_name=cfg.name, seed=cfg.seed, weighted=fed.weighting == "samples",
                               registry=registry, checkpoint=str(_rc(context, "checkpoint")) or None,
                               fraction_train=1.0, fraction_evaluate=0.0,
                               min_available_nodes=int(_rc(context, "min-nodes")),
                               min_train_nodes=int(_rc(context, "min-nodes")))
    log(20, "phalanx: run %s (%s), defense %s; %s round(s) to go", strategy.run_id, path.name,
        " -> ".join(s.name for s in strategy.pipeline.stages), strategy.rounds_left(fed.rounds))
    found = _wait_for_nodes(grid, expected, float(_rc(context, "node-wait")))
    log(20, "phalanx: %s of %s expected nodes connected", found, expected)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        m = model_for(cfg, ds)
        m.load_state_dict(arrays.to_torch_state_dict())
        params = flatten_params(m)
        acc, loss = evaluate(m, params, ds.x_test, ds.y_test)
        out = {"accuracy": float(acc), "loss": float(loss) if np.isfinite(loss) else -1.0}
        if ds.num_classes == 2 and torch.isfinite(params).all():  # fraud: AUPRC and the like beside accuracy
            scores = positive_scores(m, params, ds.x_test)
            out.update({k: float(v) for k, v in imbalance_metrics(ds.y_test, scores).items() if v is not None})
        return MetricRecord(out)

    init = strategy.initial_arrays(ArrayRecord(model.state_dict()))
    start = evaluate_fn(0, init)
    start_acc = start["accuracy"]
    accuracy = {strategy.rounds_done: start_acc}
    auprc: dict[int, float] = {}  # binary (fraud) tasks
    offset = strategy.rounds_done

    def evaluate_each(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        out = evaluate_fn(server_round, arrays) if server_round else start
        accuracy[offset + server_round] = float(out["accuracy"])
        if "auprc" in out:
            auprc[offset + server_round] = float(out["auprc"])
        if server_round:
            strategy.record_metrics(offset + server_round, {k: float(out[k]) for k in out.keys()})
        return out

    status = "done"
    try:
        result = strategy.start(grid=PromptGrid(grid), initial_arrays=init, num_rounds=strategy.rounds_left(fed.rounds),
                                timeout=float(_rc(context, "round-timeout")), train_config=ConfigRecord(),
                                evaluate_fn=evaluate_each)
        final = result.arrays if len(list(result.arrays.keys())) else init
    except BaseException:
        status = "failed"
        raise
    finally:
        summary = {"run_id": strategy.run_id, "experiment": str(path), "status": status,
                   "rounds_done": strategy.rounds_done, "rounds": fed.rounds,
                   "resumed_from": offset, "accuracy": {str(k): v for k, v in sorted(accuracy.items())},
                   **({"auprc": {str(k): v for k, v in sorted(auprc.items())}} if auprc else {}),
                   "history": [{k: h.get(k) for k in ("round", "rejections", "missing", "missing_causes", "skipped",
                                                       "error", "seconds")}
                               | {"clients": [{k: c.get(k) for k in ("node_id", "client_id", "reasons", "selected",
                                                                      "error")} for c in h["clients"]]}
                               for h in strategy.history],
                   "bindings": {str(k): v for k, v in strategy.node_client.items()},
                   "seconds": time.monotonic() - t0}
        if status == "done":
            arrays = final
            summary["final_finite"] = bool(all(np.isfinite(arrays[k].numpy()).all() for k in arrays.keys()))
        out = str(_rc(context, "summary"))
        if out:
            tmp = Path(out).with_name(Path(out).name + ".tmp")
            tmp.write_text(json.dumps(summary, indent=1, default=str))
            os.replace(tmp, out)
        if store is not None:
            strategy.finish({"accuracy": accuracy.get(strategy.rounds_done), "rounds": strategy.rounds_done},
                            status="done" if status == "done" and strategy.rounds_done >= fed.rounds else "interrupted")
            store.close()
    log(20, "phalanx: run %s finished %s of %s rounds; accuracy %s%s", strategy.run_id, strategy.rounds_done,
        fed.rounds, summary["accuracy"], f"; AUPRC {summary['auprc']}" if auprc else "")
    return summary


def make_server_app(app_dir: str | Path | None = None) -> ServerApp:
    """The ServerApp: a PhalanxStrategy configured from the experiment YAML (module docstring)."""
    where = Path(app_dir) if app_dir is not None else _app_dir()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, where)

    return app
