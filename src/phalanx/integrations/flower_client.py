"""The client side of signed Flower replies: each client signs its own reply with its own key.

A Flower ClientApp adds ``sign_replies`` to its mods::

    app = ClientApp(mods=[sign_replies])

and each SuperNode says who it is and where its private key lives, in its node config::

    flower-supernode ... --node-config "phalanx-client-id='bank-a' phalanx-private-key='/keys/bank-a.key.pem'"

For every TRAIN reply, the mod computes ``arrays_digest`` over the reply's arrays (the ArrayRecord
the server aggregates, in its key order) and signs an ``Envelope`` with the run id and round the
server put in the train config (``phalanx-run-id``, ``phalanx-round``). The envelope travels in the
reply as a ConfigRecord under ``phalanx-envelope``; ``PhalanxStrategy`` with a ``verify`` stage
checks it against the registry's public key. The private key never leaves the client's machine.

An instruction without ``phalanx-run-id`` (a server that does not verify) gets an unsigned reply.
A node config without the two keys, or an unreadable key, fails the task with a message naming
what is missing (the server records the error reply).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType

from ..defenses.signing import ClientSigner, Envelope, arrays_digest
from ..errors import PhalanxError

__all__ = ["ARRAYS_KEY", "ENVELOPE_KEY", "NODE_CLIENT_ID", "NODE_PRIVATE_KEY", "ROUND_KEY", "RUN_KEY",
           "find_arrays", "read_envelope", "record_digest", "sign_replies", "sign_reply", "signer_for"]

ENVELOPE_KEY = "phalanx-envelope"      # reply: ConfigRecord with the envelope's fields
RUN_KEY = "phalanx-run-id"             # train config: the run id to sign
ROUND_KEY = "phalanx-round"            # train config: the round to sign (0-based)
ARRAYS_KEY = "phalanx-arrays-key"      # train config: which ArrayRecord of the reply is signed
NODE_CLIENT_ID = "phalanx-client-id"   # node config: the client id the key belongs to
NODE_PRIVATE_KEY = "phalanx-private-key"  # node config: path of the client's PEM private key

_SIGNERS: dict[tuple[str, str], ClientSigner] = {}


def record_digest(record: ArrayRecord) -> str:
    """``arrays_digest`` of an ArrayRecord, in its key order."""
    return arrays_digest((k, record[k].numpy()) for k in record.keys())


def find_arrays(content, key: str = "arrays") -> ArrayRecord | None:
    """The ArrayRecord a reply carries under ``key``, else its only ArrayRecord, else None."""
    rec = content.get(key) if key in content else None
    if isinstance(rec, ArrayRecord):
        return rec
    found = list(content.array_records.values())
    return found[0] if len(found) == 1 else None


def read_envelope(content) -> tuple[Envelope | None, str | None]:
    """(envelope, None), or (None, 'missing_signature' / 'malformed_envelope')."""
    rec = content.get(ENVELOPE_KEY) if ENVELOPE_KEY in content else None
    if rec is None:
        return None, "missing_signature"
    if not isinstance(rec, ConfigRecord):
        return None, "malformed_envelope"
    try:
        env = Envelope.from_dict(dict(rec))
    except PhalanxError:
        return None, "malformed_envelope"
    return (env, None) if env.problem() is None else (None, "malformed_envelope")


def signer_for(context: Context) -> ClientSigner:
    """The node's signer, from its node config (``phalanx-client-id``, ``phalanx-private-key``);
    loaded once per process."""
    cfg = context.node_config
    missing = [k for k in (NODE_CLIENT_ID, NODE_PRIVATE_KEY) if not isinstance(cfg.get(k), str) or not cfg.get(k)]
    if missing:
        raise PhalanxError(f"sign_replies: node config lacks {', '.join(missing)}; start the SuperNode with "
                           f"--node-config \"{NODE_CLIENT_ID}='ID' {NODE_PRIVATE_KEY}='/path/ID.key.pem'\"")
    cid, path = str(cfg[NODE_CLIENT_ID]), str(Path(str(cfg[NODE_PRIVATE_KEY])).expanduser())
    signer = _SIGNERS.get((cid, path))
    if signer is None:
        signer = _SIGNERS[(cid, path)] = ClientSigner.from_file(cid, path)
    return signer


def sign_reply(reply: Message, signer: ClientSigner, run_id: str, round: int,
               arrays_key: str = "arrays") -> Envelope:
    """Sign the arrays of ``reply`` (in place: the envelope is added to its content); returns it."""
    record = find_arrays(reply.content, arrays_key)
    if record is None:
        raise PhalanxError(f"sign_reply: the reply has no ArrayRecord {arrays_key!r} (nor a single one) to sign")
    env = signer.sign_digest(record_digest(record), run_id, round)
    reply.content[ENVELOPE_KEY] = ConfigRecord(env.to_record())
    return env


def train_config(msg: Message) -> dict[str, Any] | None:
    """The server's signing request in a TRAIN instruction: {run_id, round, arrays_key} or None."""
    for rec in msg.content.config_records.values():
        if RUN_KEY in rec and ROUND_KEY in rec:
            return {"run_id": rec[RUN_KEY], "round": rec[ROUND_KEY], "arrays_key": rec.get(ARRAYS_KEY, "arrays")}
    return None


def sign_replies(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: sign every TRAIN reply with this node's own key (see the module docstring)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    req = train_config(msg)
    if req is None:
        return reply
    sign_reply(reply, signer_for(context), str(req["run_id"]), int(req["round"]), str(req["arrays_key"]))
    return reply
