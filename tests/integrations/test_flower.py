"""PhalanxStrategy against real Flower objects: Message replies, and Flower's own round loop."""

from collections.abc import Iterable

import numpy as np
import pytest

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from phalanx.integrations.flower import PhalanxStrategy
from phalanx.store import Store

SHAPES = {"w": (4, 3), "b": (3,)}


@pytest.fixture(autouse=True)
def server_identity():
    """What Flower's ServerApp runtime sets before the strategy builds any Message."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def global_arrays(rng):
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def reply(node_id, arrays: dict, num_examples=10, error=False):
    """A train reply exactly as a Flower ClientApp would send it to the server."""
    out = Message(content=RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=node_id)
    if error:
        return Message(Error(code=1, reason="client crashed"), reply_to=out)
    rec = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": num_examples,
                                                                      "loss": 0.5})}), reply_to=out)


def honest_round(rng, glob, n_honest=8, scale=0.01):
    mu = {k: np.full(s, 0.2, dtype=np.float32) for k, s in SHAPES.items()}
    sent = []
    for _ in range(n_honest):
        sent.append({k: glob[k].numpy() + mu[k] + scale * rng.normal(size=SHAPES[k]).astype(np.float32)
                     for k in SHAPES})
    mean = {k: np.mean([s[k] for s in sent], axis=0) for k in SHAPES}
    return sent, mean


@pytest.mark.parametrize("defense", [
    ["validate", "trimmed_mean"],
    ["validate", {"clip": {"max_norm": "auto"}}, "nnm", "trimmed_mean", "reputation"],
])
def test_aggregate_train_rejects_huge_and_nan(defense):
    rng = np.random.default_rng(0)
    glob = global_arrays(rng)
    strategy = PhalanxStrategy(defense=defense, f=2)
    strategy.set_global_arrays(glob)
    sent, mean = honest_round(rng, glob)
    replies = [reply(100 + i, s) for i, s in enumerate(sent)]
    replies.append(reply(200, {k: np.full(s, 1e6, dtype=np.float32) for k, s in SHAPES.items()}))
    replies.append(reply(201, {k: np.full(s, np.nan, dtype=np.float32) for k, s in SHAPES.items()}))

    arrays, metrics = strategy.aggregate_train(1, replies)

    for k in SHAPES:
        got = arrays[k].numpy()
        assert got.shape == SHAPES[k] and got.dtype == np.float32
        np.testing.assert_allclose(got, mean[k], atol=0.02)
    clients = {c["node_id"]: c for c in strategy.history[-1]["clients"]}
    assert len(clients) == 10
    assert clients[201]["reasons"] and "validate:nonfinite" in clients[201]["reasons"]
    assert clients[200]["reasons"] and "validate:norm_outlier" in clients[200]["reasons"]
    for nid in (200, 201):
        assert clients[nid]["weight"] == 0.0 and not clients[nid]["selected"]
    assert all(clients[100 + i]["weight"] > 0 for i in range(8))
    assert metrics["phalanx-rejected"] >= 2 and metrics["loss"] == pytest.approx(0.5)


def test_malformed_replies_are_recorded_not_fatal(tmp_path):
    rng = np.random.default_rng(1)
    glob = global_arrays(rng)
    with Store(tmp_path / "r.db") as store:
        strategy = PhalanxStrategy(defense=["median"], store=store, server_lr=0.5)  # validate is added
        strategy.set_global_arrays(glob)
        sent, mean = honest_round(rng, glob, n_honest=5)
        replies = [reply(1 + i, s) for i, s in enumerate(sent)]
        good = sent[0]
        replies += [
            reply(10, {"w": good["w"].T, "b": good["b"]}),                       # wrong shape
            reply(11, {"w": good["w"].astype(np.int32), "b": good["b"]}),         # integer dtype
            reply(12, {"w": good["w"]}),                                          # missing key
            reply(13, {}, error=True),                                            # error reply
            reply(1, good),                                                       # node 1 again
        ]
        arrays, _ = strategy.aggregate_train(3, replies)
        clients = strategy.history[-1]["clients"]
        why = {(c["node_id"], i): c["reasons"] for i, c in enumerate(clients)}
        assert why[(10, 5)] == ["validate:wrong_size"]
        assert why[(11, 6)] == ["validate:bad_dtype"]
        assert why[(12, 7)] == ["validate:wrong_keys"]
        assert why[(13, 8)] == ["validate:reply_error"]
        assert why[(1, 9)] == ["validate:duplicate_node"]
        assert all(not why[(1 + i, i)] for i in range(5))
        for k in SHAPES:  # median of the 5 honest rows, half a step from the global arrays
            med = np.median([s[k] for s in sent], axis=0)
            np.testing.assert_allclose(arrays[k].numpy(), glob[k].numpy() + 0.5 * (med - glob[k].numpy()),
                                       atol=1e-5)
        strategy.finish()
        rows = store.client_rows(strategy.run_id)
    assert len(rows) == 10 and sum(1 for r in rows if r["flags"]) == 5


def test_reputation_follows_node_ids_across_rounds():
    rng = np.random.default_rng(2)
    glob = global_arrays(rng)
    strategy = PhalanxStrategy(defense=["validate", "median", "reputation"])
    for rnd in (1, 2, 3):
        strategy.set_global_arrays(glob)
        sent, _ = honest_round(rng, glob, n_honest=6)
        replies = [reply(500 + i, s) for i, s in enumerate(sent)]
        # node 999 pushes the other way every round: it disagrees with the aggregate
        replies.append(reply(999, {k: glob[k].numpy() - 0.2 for k in SHAPES}))
        glob, _ = strategy.aggregate_train(rnd, replies)
    rep = strategy.pipeline.layers[-1]
    assert rep.name == "reputation"
    assert set(rep.scores) == {str(500 + i) for i in range(6)} | {"999"}
    assert rep.scores["999"] < min(rep.scores[str(500 + i)] for i in range(6))
    assert len(rep.history["999"]) == 3
    restored = PhalanxStrategy(defense=["validate", "median", "reputation"])
    restored.load_state_dict(strategy.state_dict())
    assert restored.pipeline.layers[-1].scores == rep.scores


# ---------------------------------------------------------------- end to end through Flower
class LoopbackGrid(Grid):
    """A Flower Grid that runs a ClientApp in this process for each node (no network, no Ray)."""

    def __init__(self, app: ClientApp, node_ids: list[int]):
        self.app, self.node_ids, self._run = app, node_ids, None
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition": i}, state=RecordDict(),
                                    run_config={}) for i, n in enumerate(node_ids)}

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def test_end_to_end_flower_rounds_on_digits(tmp_path):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(y))
    X, y = X[perm], y[perm]
    Xte, yte, Xtr, ytr = X[:300], y[:300], X[300:], y[300:]
    n_nodes, bad = 6, 5
    parts = np.array_split(np.arange(len(ytr)), n_nodes)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i = context.node_config["partition"]
        W = msg.content["arrays"]["W"].numpy().copy()
        b = msg.content["arrays"]["b"].numpy().copy()
        xs, ys = Xtr[parts[i]], ytr[parts[i]]
        for _ in range(20):  # full-batch softmax regression, fixed number of steps
            z = xs @ W + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(ys)), ys] -= 1.0
            W -= 0.5 * xs.T @ p / len(ys)
            b -= 0.5 * p.mean(0)
        if i == bad:
            W[:] = np.nan
        arrays = ArrayRecord({"W": Array(W.astype(np.float32)), "b": Array(b.astype(np.float32))})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(ys)})}),
                       reply_to=msg)

    def accuracy(_rnd, arrays):
        z = Xte @ arrays["W"].numpy() + arrays["b"].numpy()
        return MetricRecord({"accuracy": float((z.argmax(1) == yte).mean())})

    init = ArrayRecord({"W": Array(np.zeros((64, 10), np.float32)), "b": Array(np.zeros(10, np.float32))})
    with Store(tmp_path / "flower.db") as store:
        strategy = PhalanxStrategy(defense=["validate", "trimmed_mean", "reputation"], f=1, store=store,
                                   fraction_evaluate=0.0, min_available_nodes=n_nodes)
        grid = LoopbackGrid(app, [1000 + i for i in range(n_nodes)])
        result = strategy.start(grid=grid, initial_arrays=init, num_rounds=2, train_config=ConfigRecord(),
                                evaluate_fn=accuracy)
        strategy.finish()
        record = store.read_run(strategy.run_id)

    assert [h["round"] for h in strategy.history] == [1, 2]
    for h in strategy.history:
        assert len(h["clients"]) == n_nodes and not h["skipped"]
        byid = {c["node_id"]: c for c in h["clients"]}
        assert "validate:nonfinite" in byid[1000 + bad]["reasons"]
        assert sum(c["selected"] for c in h["clients"]) >= 3
    acc = result.evaluate_metrics_serverapp
    assert acc[2]["accuracy"] > 0.8 > acc[0]["accuracy"]
    assert np.isfinite(result.arrays["W"].numpy()).all()
    assert [r["round"] for r in record.rounds] == [1, 2] and record.status == "done"
