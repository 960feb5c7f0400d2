"""Signed Flower replies: clients sign with their own keys (the sign_replies mod), the strategy
verifies against public keys only, rejects each kind of bad reply with its reason and still
aggregates the honest replies of the round; node bindings, missing nodes, checkpoint and resume."""

import copy
from collections.abc import Iterable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from phalanx.defenses.signing import ClientSigner, KeyRegistry, write_private_key
from phalanx.errors import PhalanxError
from phalanx.integrations.flower import PhalanxStrategy
from phalanx.integrations.flower_client import ENVELOPE_KEY, record_digest, sign_replies, sign_reply
from phalanx.store import Store


@pytest.fixture(autouse=True)
def server_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LoopbackGrid(Grid):
    """Runs the ClientApp in this process for each node; nodes in ``down`` never answer."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict]):
        self.app, self._run, self.down, self.dead = app, None, set(), set()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
                         for n, cfg in node_configs.items()}

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's Grid does when it pushes
            if m.metadata.dst_node_id in self.dead:  # the SuperLink answers for a node that died
                out.append(create_message_error_unavailable_res_message(m.metadata, "node_unavail"))
            elif m.metadata.dst_node_id not in self.down:
                out.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
        return out


def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(y))
    return X[perm], y[perm]


X, Y = digits()
XTE, YTE, XTR, YTR = X[:300], Y[:300], X[300:], Y[300:]


def softmax_steps(W, b, xs, ys, steps=20, lr=0.5):
    for _ in range(steps):
        z = xs @ W + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(ys)), ys] -= 1.0
        W = W - lr * xs.T @ p / len(ys)
        b = b - lr * p.mean(0)
    return W, b


ROGUE = ClientSigner("rogue", ec.generate_private_key(ec.SECP256R1()))
SAVED: dict[int, Message] = {}  # node -> its previous signed reply (for the replaying node)


def make_app(n_parts: int) -> ClientApp:
    parts = np.array_split(np.arange(len(YTR)), n_parts)

    def faults(msg: Message, context: Context, call_next) -> Message:
        """Outermost mod: what a faulty or malicious node does to its reply after signing."""
        reply = call_next(msg, context)
        fault = context.node_config.get("fault", "")
        rnd = msg.content["config"]["phalanx-round"]
        if fault == "tamper":  # arrays changed in transit after signing
            W = reply.content["arrays"]["W"].numpy().copy()
            W[0, 0] += 1.0
            reply.content["arrays"]["W"] = Array(W)
        elif fault == "forge":  # signed with a key the registry does not know, under its own id
            env = ROGUE.sign_digest(record_digest(reply.content["arrays"]), msg.content["config"]["phalanx-run-id"], rnd)
            env = type(env)(**{**env.__dict__, "client_id": context.node_config["phalanx-client-id"]})
            reply.content[ENVELOPE_KEY] = ConfigRecord(env.to_record())
        elif fault == "unsigned":
            del reply.content[ENVELOPE_KEY]
        elif fault == "replay":  # honest in its first round, then its first reply again
            if context.node_id in SAVED:
                old = SAVED[context.node_id]
                return Message(copy.deepcopy(old.content), reply_to=msg)
            SAVED[context.node_id] = reply
        elif fault == "impersonate":  # claims client c0's id, with a key it holds
            env = ROGUE.sign_digest(record_digest(reply.content["arrays"]), msg.content["config"]["phalanx-run-id"], rnd)
            env = type(env)(**{**env.__dict__, "client_id": "c0"})
            reply.content[ENVELOPE_KEY] = ConfigRecord(env.to_record())
        return reply

    app = ClientApp(mods=[faults, sign_replies])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i = context.node_config["partition"]
        W, b = softmax_steps(msg.content["arrays"]["W"].numpy(), msg.content["arrays"]["b"].numpy(),
                             XTR[parts[i]], YTR[parts[i]])
        if context.node_config.get("fault") == "nan":
            W = np.full_like(W, np.nan)
        arrays = ArrayRecord({"W": Array(W.astype(np.float32)), "b": Array(b.astype(np.float32))})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(parts[i])})}),
                       reply_to=msg)

    return app


def accuracy(arrays):
    z = XTE @ arrays["W"].numpy() + arrays["b"].numpy()
    return float((z.argmax(1) == YTE).mean())


INIT = ArrayRecord({"W": Array(np.zeros((64, 10), np.float32)), "b": Array(np.zeros(10, np.float32))})


def federation(tmp_path, faults: dict[int, str], shared_key: dict[int, int] | None = None):
    """Nodes 100.. with clients c0..; public keys in the registry, private keys in files."""
    reg = KeyRegistry()
    configs = {}
    n = len(faults)
    for k, fault in faults.items():
        cid = f"c{k}"
        src = (shared_key or {}).get(k)
        if src is not None:  # this node uses another client's id and key file
            configs[100 + k] = {**configs[100 + src], "partition": k, "fault": fault}
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        reg.add(cid, key.public_key())
        path = write_private_key(tmp_path / f"{cid}.key.pem", key)
        configs[100 + k] = {"partition": k, "phalanx-client-id": cid, "phalanx-private-key": str(path),
                            "fault": fault}
    SAVED.clear()
    return reg, LoopbackGrid(make_app(n), configs)


DEFENSE = ["verify", {"validate": {"check_norms": False}}, "median"]  # norms: not the point here


def run(strategy, grid, rounds):
    return strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(INIT),
                          num_rounds=strategy.rounds_left(rounds), train_config=ConfigRecord(),
                          evaluate_fn=lambda r, a: MetricRecord({"accuracy": accuracy(a)}))


def reasons(entry):
    return {c["node_id"]: c["reasons"] for c in entry["clients"]}


def test_verify_needs_a_registry_and_holds_public_keys_only():
    with pytest.raises(PhalanxError, match="'verify' stage needs the clients' public keys"):
        PhalanxStrategy(defense=DEFENSE)
    s = PhalanxStrategy(defense=DEFENSE, registry=KeyRegistry())
    assert s.verifiers and s.verifiers[0].run_id == s.run_id and len(s.run_id) == 12
    assert PhalanxStrategy(defense=DEFENSE, registry=KeyRegistry()).run_id != s.run_id  # fresh per run


def test_each_bad_reply_is_rejected_with_its_reason_and_the_honest_ones_aggregated(tmp_path):
    faults = {0: "", 1: "", 2: "", 3: "nan", 4: "tamper", 5: "forge", 6: "unsigned", 7: "replay",
              8: "impersonate", 9: ""}
    reg, grid = federation(tmp_path, faults, shared_key={9: 0})  # node 109 holds c0's key too
    with Store(tmp_path / "r.db") as store:
        strategy = PhalanxStrategy(defense=DEFENSE, registry=reg, store=store, fraction_evaluate=0.0,
                                   min_available_nodes=len(faults))
        run(strategy, grid, 1)
        strategy.node_client_at_round1 = strategy.client_node["c0"]
        result = run(strategy, grid, 3)
        strategy.finish()
        rows = store.client_rows(strategy.run_id)
    first, second = (reasons(h) for h in strategy.history[:2])
    assert first[103] == ["validate:nonfinite"]
    assert first[104] == ["verify:digest_mismatch"]
    assert first[105] == ["verify:bad_signature"]
    assert first[106] == ["verify:missing_signature"]
    assert first[107] == [] and second[107] == ["verify:stale_round"]   # replays its round-1 reply
    assert first[108] == ["verify:impersonation"]  # claims c0 while node 100 answers as c0
    # c0's key on two nodes (100 and 109): in round 1 the first reply counts, the other is a second
    # row of c0; once c0 is bound to that node, the other node's claim is impersonation
    kept = strategy.node_client_at_round1
    other = 109 if kept == 100 else 100
    assert first[kept] == [] and first[other] == ["verify:duplicate_client"]
    assert second[other] == ["verify:impersonation"] and second[kept] == []
    for h in strategy.history:
        assert all(not reasons(h)[100 + k] for k in (1, 2)) and not h["skipped"]
        assert {c["client_id"] for c in h["clients"] if c["node_id"] in (kept, 101, 102)} == {"c0", "c1", "c2"}
    assert strategy.node_client == {kept: "c0", 101: "c1", 102: "c2", 103: "c3", 107: "c7"}
    assert accuracy(result.arrays) > 0.8 > accuracy(INIT)
    assert {r["client_id"] for r in rows} >= {"c0", "c1", "c2"}
    assert strategy.history[0]["rejections"] == {"bad_signature": 1, "digest_mismatch": 1, "duplicate_client": 1,
                                                 "impersonation": 1, "missing_signature": 1, "nonfinite": 1}


def test_revocation_and_missing_nodes_are_recorded(tmp_path):
    reg, grid = federation(tmp_path, {0: "", 1: "", 2: "", 3: ""})
    strategy = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0, min_available_nodes=3)
    strategy.start(grid=grid, initial_arrays=INIT, num_rounds=1, train_config=ConfigRecord())
    reg.revoke("c1")
    grid.down.add(102)  # node 102 never answers
    grid.dead.add(103)  # node 103 died: the SuperLink sends NODE_UNAVAILABLE in its place
    strategy.start(grid=grid, initial_arrays=INIT, num_rounds=1, train_config=ConfigRecord())
    last = strategy.history[-1]
    assert last["round"] == 2 and sorted(last["missing"]) == [102, 103]
    assert last["missing_causes"]["102"] == "no reply before the round's timeout"
    assert "Node Unavailable" in last["missing_causes"]["103"]
    assert sorted(reasons(last)) == [100, 101]  # the SuperLink's error is not a row
    assert reasons(last)[101] == ["verify:revoked_client"] and not reasons(last)[100]


def test_a_reply_signed_for_another_run_is_wrong_run(tmp_path):
    reg, grid = federation(tmp_path, {0: "", 1: "", 2: ""})
    s1 = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0)
    msgs = s1.configure_train(1, INIT, ConfigRecord(), grid)
    replies = grid.send_and_receive(msgs)
    s2 = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0)  # another run of one config
    s2.set_global_arrays(INIT)
    s2.aggregate_train(1, replies)
    assert set(sum(reasons(s2.history[-1]).values(), [])) == {"verify:wrong_run"}


def test_checkpoint_resume_keeps_run_id_round_nonces_and_bindings(tmp_path):
    reg, grid = federation(tmp_path, {0: "", 1: "", 2: ""})
    ck = tmp_path / "server.pt"
    first = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0, checkpoint=ck)
    run(first, grid, 2)
    assert ck.is_file() and first.rounds_done == 2
    # a round-2 reply captured on the wire, to be replayed to the restarted server
    msgs = first.configure_train(3, first._global, ConfigRecord(), grid)
    captured = grid.send_and_receive(msgs)
    first._sent = []
    again = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0, checkpoint=ck)
    assert again.run_id == first.run_id and again.rounds_done == 2 and again.rounds_left(4) == 2
    assert again.node_client == first.node_client
    np.testing.assert_array_equal(again.initial_arrays(INIT)["W"].numpy(), first._global["W"].numpy())
    res = run(again, grid, 4)
    assert [h["round"] for h in again.history] == [1, 2, 3, 4]
    assert all(not any(reasons(h).values()) for h in again.history)
    assert res.evaluate_metrics_serverapp[2]["accuracy"] > 0.8
    # the captured round-3 replies were signed for round 3 (index 2): now they are replays
    third = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0, checkpoint=ck)
    third.set_global_arrays(third.initial_arrays(INIT))
    third.aggregate_train(1, captured)
    assert set(sum(reasons(third.history[-1]).values(), [])) == {"verify:stale_round"}
    with pytest.raises(PhalanxError, match="another defense"):
        PhalanxStrategy(defense=["verify", "validate", "mean"], registry=reg, checkpoint=ck)


def test_sign_reply_envelope_covers_the_arrays_as_sent(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    signer = ClientSigner("c0", key)
    out = Message(content=RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=5)
    rec = ArrayRecord({"W": Array(np.ones((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})
    reply = Message(RecordDict({"arrays": rec}), reply_to=out)
    env = sign_reply(reply, signer, "run-x", 4)
    assert env.digest == record_digest(rec) and env.round == 4 and env.run_id == "run-x"
    got = dict(reply.content[ENVELOPE_KEY])
    assert got["signature"] == env.signature and got["client_id"] == "c0"
    swapped = ArrayRecord({"b": rec["b"], "W": rec["W"]})  # same arrays, other order: other digest
    assert record_digest(swapped) != env.digest


def test_a_client_back_on_a_new_node_is_rebound(tmp_path):
    reg, grid = federation(tmp_path, {0: "", 1: "", 2: ""})
    strategy = PhalanxStrategy(defense=DEFENSE, registry=reg, fraction_evaluate=0.0, min_available_nodes=3)
    strategy.start(grid=grid, initial_arrays=INIT, num_rounds=1, train_config=ConfigRecord())
    assert strategy.client_node["c0"] == 100
    # node 100's SuperNode restarts: Flower gives it a new node id, the organisation keeps its key
    grid.contexts[200] = grid.contexts.pop(100)
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(INIT), num_rounds=1, train_config=ConfigRecord())
    last = strategy.history[-1]
    assert not any(reasons(last).values()) and strategy.node_client.get(200) == "c0" and 100 not in strategy.node_client
    assert strategy.events[-1] == {"round": 2, "kind": "rebound", "client_id": "c0", "from_node": 100, "to_node": 200}
