"""Signed updates: canonical bytes, envelopes, the key registry and every rejection of the verify layer."""

import dataclasses
import hashlib
import json
import sqlite3
import stat
import struct

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from phalanx.context import simple_round_context
from phalanx.defenses.base import Aggregator, Report
from phalanx.defenses.pipeline import Pipeline
from phalanx.defenses.signing import (MAGIC, REASONS, ClientSigner, Envelope, KeyRegistry, Verify,
                                      canonical_bytes, fingerprint, load_private_key, public_pem, row_digest,
                                      sign_updates, write_private_key)
from phalanx.errors import DataError, IntegrityError, PhalanxError
from phalanx.registry import DEFENSES

RUN, RND, D = "run-1", 5, 16
HONEST = ["h0", "h1", "h2"]


@pytest.fixture
def world():
    reg = KeyRegistry()
    ids = HONEST + ["f", "t", "e", "i", "r", "s", "w", "m", "x"]
    signers = {c: ClientSigner(c, reg.generate(c)) for c in ids}
    return reg, signers


def _honest(signers, rnd=RND, seed=0):
    U = torch.randn(len(HONEST), D, generator=torch.Generator().manual_seed(seed + rnd))
    return U, sign_updates(U, signers, HONEST, RUN, rnd)


def _run(layer, U, envs, ids, rnd=RND):
    ctx = simple_round_context(U, round=rnd, extras={"envelopes": envs})
    ctx.client_ids = list(ids)
    return layer(U, torch.ones(len(ids)), ctx)


def _kept_mean(U, w):
    return (w[:, None] * U).sum(0) / w.sum()


# --------------------------------------------------------------- canonical bytes and envelopes
def test_canonical_bytes_are_little_endian_float32_whatever_the_input():
    want = struct.pack("<3f", 1.0, -2.5, 0.1)
    assert canonical_bytes(torch.tensor([1.0, -2.5, 0.1])) == want
    assert canonical_bytes(np.array([1.0, -2.5, 0.1], dtype=">f8")) == want
    M = torch.tensor([[1.0, 9.0], [-2.5, 9.0], [0.1, 9.0]])
    assert canonical_bytes(M[:, 0]) == want  # a non-contiguous column
    assert row_digest(M[:, 0]) == hashlib.sha256(want).hexdigest()
    with pytest.raises(PhalanxError, match=r"expected a 1-D vector \[d\], got shape \(3, 2\)"):
        row_digest(M)


def test_envelope_message_is_fixed_order_json_and_round_trips():
    env = Envelope("c0", "r", 3, "ab" * 16, "cd" * 32, b"s" * 70)
    body = '{"client_id":"c0","digest":"' + "cd" * 32 + '","nonce":"' + "ab" * 16 + '","round":3,"run_id":"r"}'
    assert env.message() == MAGIC + body.encode()
    assert Envelope.from_dict(json.loads(json.dumps(env.to_dict()))) == env
    with pytest.raises(IntegrityError, match="expected keys"):
        Envelope.from_dict({"client_id": "c0"})


def test_signer_makes_fresh_nonces_and_checks_its_inputs(world):
    reg, signers = world
    row = torch.ones(D)
    a, b = signers["h0"].sign(row, RUN, 0), signers["h0"].sign(row, RUN, 0)
    assert a.nonce != b.nonce and len(a.nonce) == 32 and a.digest == b.digest and a.problem() is None
    with pytest.raises(PhalanxError, match="round must be an integer >= 0, got -1"):
        signers["h0"].sign(row, RUN, -1)
    with pytest.raises(IntegrityError, match="expected an EC P-256"):
        ClientSigner("z", ec.generate_private_key(ec.SECP384R1()))


# --------------------------------------------------------------- each rejection reason
def _forged(reg, s, row):
    return "f", row, ClientSigner("f", ec.generate_private_key(ec.SECP256R1())).sign(row, RUN, RND)


def _tampered(reg, s, row):
    env = s["t"].sign(row, RUN, RND)
    row = row.clone()
    row[3] += 1e-3
    return "t", row, env


def _relabelled_round(reg, s, row):  # metadata changed after signing
    return "t", row, dataclasses.replace(s["t"].sign(row, RUN, RND - 1), round=RND)


def _impersonation(reg, s, row):  # the row comes from "i" but carries e's signed envelope
    return "i", row, s["e"].sign(row, RUN, RND)


def _unknown(reg, s, row):
    return "u", row, ClientSigner("u", ec.generate_private_key(ec.SECP256R1())).sign(row, RUN, RND)


def _revoked(reg, s, row):
    reg.revoke("r")
    return "r", row, s["r"].sign(row, RUN, RND)


def _stale(reg, s, row):
    return "s", row, s["s"].sign(row, RUN, RND - 2)


def _future(reg, s, row):
    return "s", row, s["s"].sign(row, RUN, RND + 1)


def _wrong_run(reg, s, row):
    return "w", row, s["w"].sign(row, "another-run", RND)


def _missing(reg, s, row):
    return "m", row, None


def _bad_nonce(reg, s, row):
    return "x", row, dataclasses.replace(s["x"].sign(row, RUN, RND), nonce="xyz")


def _str_signature(reg, s, row):
    return "x", row, dataclasses.replace(s["x"].sign(row, RUN, RND), signature="00" * 70)


def _bool_round(reg, s, row):
    return "x", row, dataclasses.replace(s["x"].sign(row, RUN, RND), round=True)


def _garbage(reg, s, row):
    return "x", row, "not an envelope"


def _bad_dict(reg, s, row):
    d = s["x"].sign(row, RUN, RND).to_dict()
    d["signature"] = "zz"
    return "x", row, d


CASES = [(_forged, "bad_signature"), (_tampered, "digest_mismatch"), (_relabelled_round, "bad_signature"),
         (_impersonation, "impersonation"), (_unknown, "unknown_client"), (_revoked, "revoked_client"),
         (_stale, "stale_round"), (_future, "stale_round"), (_wrong_run, "wrong_run"),
         (_missing, "missing_signature"), (_bad_nonce, "malformed_envelope"),
         (_str_signature, "malformed_envelope"), (_bool_round, "malformed_envelope"),
         (_garbage, "malformed_envelope"), (_bad_dict, "malformed_envelope")]


@pytest.mark.parametrize("craft,reason", CASES, ids=[c.__name__.strip("_") for c, _ in CASES])
def test_each_bad_envelope_is_rejected_with_its_reason(world, craft, reason):
    reg, signers = world
    U, envs = _honest(signers)
    cid, row, env = craft(reg, signers, torch.full((D,), 50.0))
    U2 = torch.cat([U, row[None]])
    out, w, rep = _run(Verify(reg, RUN, max_round_lag=1), U2, envs + [env], HONEST + [cid])
    assert out is U2
    assert rep.reasons == {3: reason} and reason in REASONS
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert rep.selected.tolist() == [True, True, True, False]
    torch.testing.assert_close(_kept_mean(U2, w), U.mean(0))


def test_all_attacks_in_one_round_leave_only_the_honest_mean(world):
    reg, signers = world
    U, envs = _honest(signers)
    rows, ids, bad = [U], list(HONEST), []
    for k, (craft, _) in enumerate(CASES):
        cid, row, env = craft(reg, signers, torch.full((D,), 10.0 + k))
        rows.append(row[None])
        ids.append(cid)
        bad.append(env)
    # same-round replay: h1's envelope and row sent a second time
    rows.append(U[1:2].clone())
    ids.append("h1")
    bad.append(envs[1])
    U2 = torch.cat(rows)
    _, w, rep = _run(Verify(reg, RUN, max_round_lag=1), U2, envs + bad, ids)
    want = {3 + k: reason for k, (_, reason) in enumerate(CASES)} | {len(ids) - 1: "replayed_nonce"}
    assert rep.reasons == want
    assert w[:3].tolist() == [1.0] * 3 and not w[3:].any()
    torch.testing.assert_close(_kept_mean(U2, w), U.mean(0))
    assert rep.info["accepted"] == 3 and rep.info["rejected"] == len(ids) - 3


def test_pipeline_mean_after_verify_equals_the_honest_mean(world):
    class Mean(Aggregator):
        name = "mean"

        def __call__(self, U, w, ctx):
            return _kept_mean(U, w), Report(self.name, n=U.shape[0])

    reg, signers = world
    U, envs = _honest(signers)
    cid, row, env = _forged(reg, signers, torch.full((D,), 1e6))
    U2 = torch.cat([U, row[None]])
    ctx = simple_round_context(U2, round=RND, extras={"envelopes": envs + [env]})
    ctx.client_ids = HONEST + [cid]
    g, rep = Pipeline([DEFENSES.build("verify", registry=reg, run_id=RUN)], Mean())(U2, torch.ones(4), ctx)
    torch.testing.assert_close(g, U.mean(0))
    assert rep.reasons == {3: "verify:bad_signature"}


# --------------------------------------------------------------- replay across rounds and resumes
def test_replay_in_a_later_round(world):
    reg, signers = world
    U, envs = _honest(signers)
    for lag, reason in ((1, "replayed_nonce"), (0, "stale_round")):
        layer = Verify(reg, RUN, max_round_lag=lag)
        assert not _run(layer, U, envs, HONEST)[2].reasons
        U6, envs6 = _honest(signers, rnd=RND + 1)
        U6[1], envs6[1] = U[1], envs[1]  # h1's round-5 message replayed in round 6
        _, w, rep = _run(layer, U6, envs6, HONEST, rnd=RND + 1)
        assert rep.reasons == {1: reason} and w.tolist() == [1.0, 0.0, 1.0]
    # once outside the window the old envelope is stale (and its nonce is forgotten)
    _, _, rep = _run(layer, U, envs, HONEST, rnd=RND + 3)
    assert set(rep.reasons.values()) == {"stale_round"}


def test_state_dict_keeps_nonces_so_a_resume_blocks_replays(world):
    reg, signers = world
    U, envs = _honest(signers)
    first = Verify(reg, RUN, max_round_lag=1)
    _run(first, U, envs, HONEST)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may go through JSON
    resumed = Verify(reg, RUN, max_round_lag=1)
    resumed.load_state_dict(state)
    for rnd in (RND, RND + 1):
        _, w, rep = _run(resumed, U, envs, HONEST, rnd=rnd)
        assert set(rep.reasons.values()) == {"replayed_nonce"} and not w.any()
    fresh = Verify(reg, RUN, max_round_lag=1)  # control: without the state the replay would pass
    assert not _run(fresh, U, envs, HONEST)[2].reasons
    other = Verify(reg, "other")  # a restored state resumes its own run
    other.load_state_dict(state)
    assert other.run_id == RUN and set(_run(other, U, envs, HONEST)[2].reasons.values()) == {"replayed_nonce"}
    other.bind_run("run-2")  # another run: its envelopes count, the old run's are wrong_run
    assert set(_run(other, U, envs, HONEST)[2].reasons.values()) == {"wrong_run"}
    with pytest.raises(PhalanxError, match="state run_id must be a non-empty string"):
        resumed.load_state_dict({**state, "run_id": ""})
    with pytest.raises(PhalanxError, match="state must have keys"):
        resumed.load_state_dict({"nonce": []})
    resumed.load_state_dict({})  # an empty state (a fresh pipeline slot) is a no-op


def test_layer_never_raises_on_bad_envelope_lists(world):
    reg, signers = world
    U, envs = _honest(signers)
    layer = Verify(reg, RUN)
    for extras, reason in (({}, "missing_signature"), ({"envelopes": envs[:2]}, "malformed_envelope"),
                           ({"envelopes": 7}, "malformed_envelope"), ({"envelopes": "abc"}, "malformed_envelope")):
        ctx = simple_round_context(U, round=RND, extras=extras)
        ctx.client_ids = list(HONEST)
        _, w, rep = layer(U, torch.ones(3), ctx)
        assert set(rep.reasons.values()) == {reason} and not w.any()
    with pytest.raises(PhalanxError, match="expected U \\[n, d\\], w \\[n\\] and n client ids"):
        layer(U, torch.ones(2), simple_round_context(U))


def test_factory_checks_parameters(world, tmp_path):
    reg, _ = world
    with pytest.raises(PhalanxError, match="max_round_lag must be an integer >= 0, got -1"):
        DEFENSES.build("verify", registry=reg, run_id=RUN, max_round_lag=-1)
    with pytest.raises(PhalanxError, match="run_id must be a non-empty string"):
        DEFENSES.build("verify", registry=reg, run_id="")
    with pytest.raises(PhalanxError, match="expected an existing folder .* got missing path"):
        DEFENSES.build("verify", registry=str(tmp_path / "nope"), run_id=RUN)


# --------------------------------------------------------------- the key registry
def _same(a: KeyRegistry, b: KeyRegistry):
    return [(r.client_id, r.fingerprint, r.revoked, r.created) for r in a.list()] == \
           [(r.client_id, r.fingerprint, r.revoked, r.created) for r in b.list()]


ADMIN = ec.generate_private_key(ec.SECP256R1())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_registry_round_trip_through_a_signed_folder_and_sqlite(tmp_path):
    reg = KeyRegistry(dir=tmp_path / "keys", admin_key=ADMIN)
    priv = {c: reg.generate(c, private_dir=tmp_path / "private") for c in ("a", "b", "c")}
    reg.revoke("b")
    assert _mode(tmp_path / "keys") == 0o700 and _mode(tmp_path / "private") == 0o700
    for c in priv:
        assert _mode(tmp_path / "private" / f"{c}.key.pem") == 0o600
        assert not (tmp_path / "keys" / f"{c}.key.pem").exists()  # never next to the public keys
        assert _mode(tmp_path / "keys" / f"{c}.pub.pem") == 0o644
        assert (tmp_path / "keys" / f"{c}.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY")
    assert sorted(x.name for x in (tmp_path / "keys").iterdir()) == \
        ["a.pub.pem", "admin.pub.pem", "b.pub.pem", "c.pub.pem", "registry.json"]
    again = KeyRegistry.open(tmp_path / "keys")  # reading needs no admin key
    assert _same(reg, again) and [r.revoked for r in again.list()] == [False, True, False]
    assert again.admin_public_fingerprint == fingerprint(ADMIN.public_key())

    db = tmp_path / "keys.db"
    reg.save_sqlite(db)
    assert _mode(db) == 0o644
    from_db = KeyRegistry.open(db)
    assert _same(reg, from_db)
    assert _same(reg, from_db.save_dir(tmp_path / "copy", admin_key=ADMIN))

    # a private key read back from disk signs updates that the SQLite registry accepts
    signer = ClientSigner("a", load_private_key(tmp_path / "private" / "a.key.pem"))
    U = torch.randn(1, D)
    ctx = simple_round_context(U, extras={"envelopes": [signer.sign(U[0], RUN, 0)]})
    ctx.client_ids = ["a"]
    assert not Verify(str(db), RUN)(U, torch.ones(1), ctx)[2].reasons


@pytest.mark.parametrize("backend", ["dir", "db"])
def test_revocation_on_disk_reaches_a_running_layer(tmp_path, backend):
    path = tmp_path / ("keys" if backend == "dir" else "keys.db")
    reg = KeyRegistry(**{backend: path}, admin_key=ADMIN)
    signer = ClientSigner("a", reg.generate("a", private_dir=tmp_path / "priv"))
    layer = Verify(str(path), RUN, max_round_lag=1)
    U = torch.randn(1, D)
    for rnd, want in ((0, {}), (1, {0: "revoked_client"})):
        ctx = simple_round_context(U, round=rnd, extras={"envelopes": [signer.sign(U[0], RUN, rnd)]})
        ctx.client_ids = ["a"]
        assert layer(U, torch.ones(1), ctx)[2].reasons == want
        KeyRegistry.open(path, admin_key=ADMIN).revoke("a")  # `phalanx keys revoke a` between rounds


def _layer_round(layer, signer, rnd):
    U = torch.randn(1, D)
    ctx = simple_round_context(U, round=rnd, extras={"envelopes": [signer.sign(U[0], RUN, rnd)]})
    ctx.client_ids = [signer.client_id]
    _, _, rep = layer(U, torch.ones(1), ctx)
    return rep


def test_deleting_or_editing_files_cannot_unrevoke_anyone(tmp_path):
    keys = tmp_path / "keys"
    reg = KeyRegistry(dir=keys, admin_key=ADMIN)
    signers = {c: ClientSigner(c, reg.generate(c, private_dir=tmp_path / "p")) for c in ("a", "b")}
    old_state = (keys / "registry.json").read_text()
    reg.revoke("b")
    layer = Verify(str(keys), RUN, max_round_lag=5)
    assert _layer_round(layer, signers["b"], 0).reasons == {0: "revoked_client"}
    # (1) delete b's public key copy: b is still listed, signed, revoked
    (keys / "b.pub.pem").unlink()
    assert KeyRegistry.open(keys).get("b").revoked
    assert _layer_round(layer, signers["b"], 1).reasons == {0: "revoked_client"}
    # (2) edit the state by hand to drop the revocation: the signature no longer verifies
    doc = json.loads((keys / "registry.json").read_text())
    doc["revoked_clients"], doc["revoked_keys"] = [], []
    (keys / "registry.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="does not verify with the admin key"):
        KeyRegistry.open(keys)
    rep = _layer_round(layer, signers["b"], 2)  # the running layer keeps what it loaded last
    assert rep.reasons == {0: "revoked_client"} and "does not verify" in rep.info["registry_error"]
    # (3) delete the signed state: refuse to load, never "no revocations"
    (keys / "registry.json").unlink()
    with pytest.raises(IntegrityError, match="registry.json is missing"):
        KeyRegistry.open(keys)
    assert _layer_round(layer, signers["b"], 3).reasons == {0: "revoked_client"}
    # (4) restore the older (validly signed) copy from before the revocation: a running
    # registry refuses to go back
    (keys / "registry.json").write_text(old_state)
    rep = _layer_round(layer, signers["b"], 4)
    assert rep.reasons == {0: "revoked_client"} and "went back from seq" in rep.info["registry_error"]
    # (5) replace the admin key and re-sign: refused when the admin key is pinned
    other = ec.generate_private_key(ec.SECP256R1())
    KeyRegistry(dir=tmp_path / "forged", admin_key=other).add("b", signers["b"].public_key)
    for name in ("admin.pub.pem", "registry.json"):
        (keys / name).write_text((tmp_path / "forged" / name).read_text())
    with pytest.raises(IntegrityError, match="the admin key was replaced"):
        KeyRegistry.open(keys, admin_fingerprint=fingerprint(ADMIN.public_key()))
    rep = _layer_round(layer, signers["b"], 5)
    assert rep.reasons == {0: "revoked_client"} and "admin key was replaced" in rep.info["registry_error"]


def test_rotation_revokes_the_old_key_for_good(tmp_path):
    keys = tmp_path / "keys"
    reg = KeyRegistry(dir=keys, admin_key=ADMIN)
    old = ClientSigner("a", reg.generate("a", private_dir=tmp_path / "p"))
    old_pub = (keys / "a.pub.pem").read_text()
    new = ClientSigner("a", reg.rotate("a", private_dir=tmp_path / "p"))
    assert ClientSigner.from_file("a", tmp_path / "p" / "a.key.pem").public_key.public_numbers() == \
        new.public_key.public_numbers()
    layer = Verify(str(keys), RUN, max_round_lag=5)
    assert not _layer_round(layer, new, 0).reasons
    assert _layer_round(layer, old, 0).reasons == {0: "bad_signature"}
    # even if someone puts the old public key back, the signed state says which key is a's
    (keys / "a.pub.pem").write_text(old_pub)
    with pytest.raises(IntegrityError, match="a.pub.pem is not the key the signed registry.json lists"):
        KeyRegistry.open(keys)
    # a revoked client comes back only with a new key, by the admin's rotation
    (keys / "a.pub.pem").write_text(public_pem(new.public_key))
    reg = KeyRegistry.open(keys, admin_key=ADMIN)
    reg.revoke("a")
    assert reg.get("a").revoked and _layer_round(layer, new, 1).reasons == {0: "revoked_client"}
    newer = ClientSigner("a", reg.rotate("a", private_dir=tmp_path / "p"))
    assert not reg.get("a").revoked and reg.revoked_fingerprints() >= {fingerprint(old.public_key),
                                                                        fingerprint(new.public_key)}
    assert not _layer_round(layer, newer, 2).reasons


def test_registry_modes_and_errors_are_clear(tmp_path):
    with pytest.raises(PhalanxError, match="creating .* needs the admin key"):
        KeyRegistry(dir=tmp_path / "k")
    reg = KeyRegistry(dir=tmp_path / "k", admin_key=ADMIN)
    reg.generate("a")  # no private_dir: the private key is returned, written nowhere
    assert sorted(x.name for x in (tmp_path / "k").iterdir()) == ["a.pub.pem", "admin.pub.pem", "registry.json"]
    with pytest.raises(PhalanxError, match="client 'a' already has a key"):
        reg.generate("a")
    with pytest.raises(PhalanxError, match="client_id: expected .* got '../evil'"):
        reg.generate("../evil")
    with pytest.raises(PhalanxError, match="revoke: unknown client 'zz'; known: a"):
        reg.revoke("zz")
    with pytest.raises(PhalanxError, match="inside the registry"):
        reg.generate("b", private_dir=tmp_path / "k")
    with pytest.raises(PhalanxError, match="inside the registry"):
        reg.generate("b", private_dir=tmp_path / "k" / "sub")
    with pytest.raises(PhalanxError, match="changing it needs the admin key"):
        KeyRegistry.open(tmp_path / "k").revoke("a")
    with pytest.raises(IntegrityError, match="admin key given is not the registry's"):
        KeyRegistry.open(tmp_path / "k", admin_key=ec.generate_private_key(ec.SECP256R1())).revoke("a")
    (tmp_path / "k" / "b.pub.pem").write_text("garbage")
    with pytest.raises(IntegrityError, match="b.pub.pem is not the key the signed registry.json lists"):
        KeyRegistry.open(tmp_path / "k")
    (tmp_path / "k" / "b.pub.pem").unlink()
    for target, mode in ((tmp_path / "k", 0o777), (tmp_path / "k" / "a.pub.pem", 0o666)):
        target.chmod(mode)
        with pytest.raises(IntegrityError, match="is world-writable"):
            KeyRegistry.open(tmp_path / "k")
        target.chmod(0o700 if target.is_dir() else 0o644)
    KeyRegistry.open(tmp_path / "k")
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 10)
    with pytest.raises(DataError, match="expected a SQLite file with table registry"):
        KeyRegistry.open(tmp_path / "bad.db")
    with sqlite3.connect(tmp_path / "old.db") as con:  # a registry from before signed revocations
        con.execute("CREATE TABLE client_keys (client_id TEXT)")
    with pytest.raises(DataError, match="re-created with `phalanx keys init`"):
        KeyRegistry.open(tmp_path / "old.db")
    with pytest.raises(PhalanxError, match="expected dir or db, got both"):
        KeyRegistry(dir=tmp_path / "k", db=tmp_path / "x.db")
    loose = write_private_key(tmp_path / "loose.key.pem", ADMIN)
    loose.chmod(0o644)
    with pytest.raises(IntegrityError, match="mode 0644 lets others read or write it"):
        load_private_key(loose)


# --------------------------------------------------------------- one client, one row per round
def test_a_second_validly_signed_row_of_a_client_is_a_duplicate(world):
    reg, signers = world
    U, envs = _honest(signers)
    extra = torch.stack([U[1] + 5.0, U[1] - 5.0])
    extra_envs = [signers["h1"].sign(row, RUN, RND) for row in extra]  # fresh nonces, valid signatures
    assert extra_envs[0].nonce != envs[1].nonce
    U2 = torch.cat([U, extra])
    layer = Verify(reg, RUN, max_round_lag=1)
    _, w, rep = _run(layer, U2, envs + extra_envs, HONEST + ["h1", "h1"])
    assert rep.reasons == {3: "duplicate_client", 4: "duplicate_client"} and "duplicate_client" in REASONS
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0] and rep.info["duplicates"] == 2
    torch.testing.assert_close(_kept_mean(U2, w), U.mean(0))
    # the duplicate's nonce is remembered: replayed alone in the next round it is still refused
    U6, envs6 = _honest(signers, rnd=RND + 1)
    U6[1], envs6[1] = extra[0], extra_envs[0]
    _, w, rep = _run(layer, U6, envs6, HONEST, rnd=RND + 1)
    assert rep.reasons == {1: "replayed_nonce"}


def test_a_forged_row_ahead_does_not_use_up_the_genuine_one(world):
    reg, signers = world
    U, envs = _honest(signers)
    forged = dataclasses.replace(signers["h1"].sign(U[1] * 0 + 9.0, RUN, RND), signature=envs[0].signature)
    U2 = torch.cat([U[1:2] * 0 + 9.0, U])
    _, w, rep = _run(Verify(reg, RUN), U2, [forged] + envs, ["h1"] + HONEST)
    assert rep.reasons == {0: "bad_signature"} and w.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_a_second_row_in_a_later_call_for_the_same_round_is_a_duplicate_even_after_resume(world):
    reg, signers = world
    U, envs = _honest(signers)
    first = Verify(reg, RUN, max_round_lag=1)
    assert not _run(first, U, envs, HONEST)[2].reasons
    late = U[:1] + 1.0
    late_env = [signers["h0"].sign(late[0], RUN, RND)]
    _, w, rep = _run(first, late, late_env, ["h0"])
    assert rep.reasons == {0: "duplicate_client"} and not w.any()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Verify(reg, RUN, max_round_lag=1)
    resumed.load_state_dict(state)
    late_env = [signers["h0"].sign(late[0], RUN, RND)]
    assert _run(resumed, late, late_env, ["h0"])[2].reasons == {0: "duplicate_client"}
    # the next round is a new round: one row each again
    U6, envs6 = _honest(signers, rnd=RND + 1)
    assert not _run(resumed, U6, envs6, HONEST, rnd=RND + 1)[2].reasons


def test_resume_from_state_dict_into_a_fresh_layer_blocks_a_replay_in_the_next_round(world):
    reg, signers = world
    before = Verify(reg, RUN, max_round_lag=2)
    U, envs = _honest(signers)
    _run(before, U, envs, HONEST)  # round 5, then a checkpoint
    resumed = Verify(reg, RUN, max_round_lag=2)  # a new process builds the layer afresh
    resumed.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert resumed.state_dict() == before.state_dict()
    U6, envs6 = _honest(signers, rnd=RND + 1)
    U6[2], envs6[2] = U[2], envs[2]  # h2's round-5 envelope replayed in round 6
    _, w, rep = _run(resumed, U6, envs6, HONEST, rnd=RND + 1)
    assert rep.reasons == {2: "replayed_nonce"} and w.tolist() == [1.0, 1.0, 0.0]
    fresh = Verify(reg, RUN, max_round_lag=2)  # control: without the state it would pass
    assert not _run(fresh, U6, envs6, HONEST, rnd=RND + 1)[2].reasons
    # a checkpoint written before 'counted' existed still loads
    old = {k: v for k, v in before.state_dict().items() if k != "counted"}
    Verify(reg, RUN, max_round_lag=2).load_state_dict(old)
    with pytest.raises(PhalanxError, match="verify: state counted must map client id -> round"):
        Verify(reg, RUN).load_state_dict({**before.state_dict(), "counted": [1, 2]})


# --------------------------------------------------------------- in the simulator: clients sign
def _sim(cfg, attack, defense, rounds=2, store=None):
    from phalanx.config import parse_config
    from phalanx.federation import Federation

    cfg["federation"].update(signing=True, rounds=rounds, num_clients=6)
    cfg["attack"] = {**attack, "byzantine": 2}
    cfg["defense"] = defense
    f = Federation(parse_config(cfg))
    return f, f.run(store)


def test_the_server_holds_public_keys_only_and_each_client_signs_its_own_row(tiny_config):
    from phalanx.config import parse_config
    from phalanx.federation import Federation

    tiny_config["federation"]["signing"] = True
    tiny_config["defense"] = ["verify", "mean"]
    fed = Federation(parse_config(tiny_config))
    verify = fed.defense.layers[0]
    assert isinstance(verify, Verify) and len(verify.registry) == 6
    for cid, signer in fed.signers.items():  # the registry's key is the client's public half
        assert verify.registry.get(cid).public_key.public_numbers() == signer.public_key.public_numbers()
    reg_state = vars(verify.registry)
    assert not any(isinstance(v, ec.EllipticCurvePrivateKey) for v in reg_state.values())
    assert all(not hasattr(r, "private_key") for r in verify.registry.list())


@pytest.mark.parametrize("attack,reason,first", [
    ({"name": "forge_signature"}, "bad_signature", 0),
    ({"name": "forge_signature", "params": {"mode": "tampered"}}, "digest_mismatch", 0),
    ({"name": "impersonate"}, "impersonation", 0),
    # an eavesdropper's replay needs a capture first: in round 0 the attackers' rows are validly signed
    ({"name": "replay", "params": {"source": "honest"}}, "impersonation", 1),
])
def test_envelope_attacks_are_named_in_a_config_and_caught_by_verify(tiny_config, tmp_path, attack, reason, first):
    from phalanx.store import Store

    store = Store(tmp_path / "r.db")
    fed, final = _sim(tiny_config, attack, ["verify", "mean"], rounds=3, store=store)
    bad = {c for c, m in zip(fed.client_ids, fed.malicious.tolist()) if m}
    flagged = {(r["round"], r["client_id"]): r["flags"] for r in store.client_rows(fed.run_id) if r["flags"]}
    # every attacker row of every round was rejected with the attack's reason, nobody else's
    assert flagged == {(rnd, c): [f"verify:{reason}"] for c in bad for rnd in range(first, 3)}
    if not first:
        _, plain = _sim(tiny_config, {**attack}, ["mean"], rounds=3)
        assert final["accuracy"] > plain["accuracy"] + 0.2  # without verify the poisoned rows land


def test_replay_of_an_own_earlier_row_is_stale_after_its_first_round(tiny_config, tmp_path):
    from phalanx.store import Store

    tiny_config["federation"].update(signing=True, rounds=3, num_clients=6)
    tiny_config["attack"] = {"name": "replay", "byzantine": 2}
    tiny_config["defense"] = ["verify", "mean"]
    from phalanx.config import parse_config
    from phalanx.federation import Federation

    fed = Federation(parse_config(tiny_config))
    store = Store(tmp_path / "r.db")
    fed.run(store)
    rows = store.client_rows(fed.run_id)
    bad = {c for c, m in zip(fed.client_ids, fed.malicious.tolist()) if m}
    flags = {(r["round"], r["client_id"]): r["flags"] for r in rows if r["client_id"] in bad}
    for cid in bad:  # first round: its poisoned row validly signed (a Byzantine key holder passes verify)
        assert flags[(0, cid)] == [] and flags[(1, cid)] == flags[(2, cid)] == ["verify:stale_round"]
    assert all(not r["flags"] for r in rows if r["client_id"] not in bad)


# --------------------------------------------------------------- run ids
def test_each_run_has_its_own_random_run_id_bound_into_every_envelope(tiny_config, tmp_path):
    from phalanx.config import parse_config
    from phalanx.federation import Federation, Hooks
    from phalanx.store import Store

    tiny_config["federation"].update(signing=True, rounds=2)
    tiny_config["defense"] = ["verify", "mean"]
    seen: list = []
    cfg = parse_config(tiny_config)
    a = Federation(cfg, hooks=Hooks(before_aggregate=[lambda U, ctx: seen.append((U.clone(), ctx.extras["envelopes"]))]))
    b = Federation(cfg)
    assert a.run_id != b.run_id and len(a.run_id) == 12  # two runs of one config
    store = Store(tmp_path / "r.db")
    a.run(store)
    assert store.runs()[0]["run_id"] == a.run_id == a.defense.layers[0].run_id  # stored, bound
    assert {e.run_id for _, envs in seen for e in envs} == {a.run_id}
    # run a's round-0 envelopes are worthless to run b, even in its round 0
    U, envs = seen[0]
    ctx = simple_round_context(U, extras={"envelopes": envs})
    ctx.client_ids = [e.client_id for e in envs]
    b.defense.layers[0].registry = a.defense.layers[0].registry  # even with the same keys
    assert set(b.defense.layers[0](U, torch.ones(len(envs)), ctx)[2].reasons.values()) == {"wrong_run"}


def test_a_resumed_run_keeps_its_run_id(tiny_config, tmp_path):
    from phalanx.config import parse_config
    from phalanx.federation import Federation
    from phalanx.store import Store

    tiny_config["federation"].update(signing=True, rounds=3)
    tiny_config["defense"] = ["verify", "mean"]
    cfg, ck, store = parse_config(tiny_config), tmp_path / "ck.pt", Store(tmp_path / "r.db")
    from phalanx.checkpoint import save_checkpoint

    first = Federation(cfg)
    run_id = store.start_run(cfg.model_dump(), cfg.name, cfg.seed)  # as `phalanx run` does
    first.bind_run(run_id)
    first.run_round(0)  # one round, then the checkpoint `phalanx run` writes after each round
    save_checkpoint(ck, first, run_id)
    again = Federation(cfg)
    assert again.run_id != run_id
    again.run(store, run_id=run_id, checkpoint=ck)
    assert again.run_id == run_id == again.defense.layers[0].run_id
    rows = store.client_rows(run_id)
    assert rows and not any(r["flags"] for r in rows)


def test_a_restarted_server_with_seen_seq_refuses_an_older_registry_copy(tmp_path):
    keys, seen = tmp_path / "keys", tmp_path / "server-state" / "registry.seq"
    reg = KeyRegistry(dir=keys, admin_key=ADMIN)
    reg.generate("b")
    old_state = (keys / "registry.json").read_text()
    reg.revoke("b")
    first = KeyRegistry.open(keys, seen_seq=seen)  # the server before its restart
    assert first.get("b").revoked and int(seen.read_text()) == first.seq
    assert stat.S_IMODE(seen.stat().st_mode) == 0o600
    (keys / "registry.json").write_text(old_state)  # restored while the server was down
    with pytest.raises(IntegrityError, match=r"went back from seq .*registry.seq"):
        KeyRegistry.open(keys, seen_seq=seen)
    assert not KeyRegistry.open(keys).get("b").revoked  # without its record a fresh reader cannot tell
    seen.write_text("five\n")
    with pytest.raises(IntegrityError, match="whole number"):
        KeyRegistry.open(keys, seen_seq=seen)
