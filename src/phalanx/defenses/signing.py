"""Signed updates: authentication, integrity and anti-replay (keys live in ``phalanx.keys``).

Implemented here (ECDSA P-256 with SHA-256, FIPS 186-4, through the ``cryptography`` package):

* **Canonical update bytes.** A row is encoded as contiguous little-endian float32
  (``canonical_bytes``); its digest is SHA-256 of those bytes, hex (``row_digest``). A payload
  of named arrays (a Flower reply) has ``arrays_digest``: SHA-256 over each array's name, dtype,
  shape and little-endian C-order bytes, in the payload's order.
* **Envelope.** ``client_id, run_id, round, nonce`` (16 fresh random bytes, hex), ``digest`` and
  ``signature``. The signed message (``Envelope.message()``) is ``b"phalanx-envelope-v1\\n"``
  followed by the UTF-8 JSON object of the five fields other than the signature, keys sorted,
  separators ``","`` and ``":"``, ASCII-escaped. The signature is DER-encoded.
* **KeyRegistry** (``phalanx.keys``). Client id -> public key, revoked flag and creation time; in
  memory, or on disk as a folder or SQLite file whose keys and revocations are signed by an admin
  key. It never holds a private key.
* **ClientSigner.** What a client runs, with its own private key: ``sign(row, run_id, round)
  -> Envelope`` (or ``sign_digest`` for a digest it computed itself, such as ``arrays_digest``).
  The server holds public keys only.
* **Verify layer** (``DEFENSES["verify"]``): gives weight 0 to every row whose envelope fails and
  records one reason from ``REASONS``. Nonces are remembered for the rounds still inside the
  acceptance window ``[round - max_round_lag, round]`` (anything older is ``stale_round``). One
  client, one row per round: once a row of a client id passes every check, any further row of
  that id in the same round (in the same call, or a later call for the same ``ctx.round``) is
  rejected as ``duplicate_client``, however validly signed; its nonce is remembered all the same,
  so it cannot be replayed later. ``state_dict`` keeps the run id, the nonces and each client's
  last counted round, so a resumed run still blocks replays and second rows; loading a state
  resumes that run (the layer takes the state's run id). When the server hashed each row's payload
  as it arrived (``ctx.extras["payload_digests"]``, one hex digest or None per row), the envelope's
  digest is compared with that instead of the row's own digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..context import RoundContext
from ..errors import IntegrityError, PhalanxError
from ..keys import (_ID_RE, KeyRecord, KeyRegistry, _check_p256, check_client_id, fingerprint,  # noqa: F401
                    load_private_key, load_public_pem, public_pem, write_private_key)
from ..registry import DEFENSES
from .base import Layer, Report, check_nonneg_int

MAGIC = b"phalanx-envelope-v1\n"
REASONS = ("missing_signature", "malformed_envelope", "impersonation", "wrong_run", "unknown_client",
           "revoked_client", "stale_round", "bad_signature", "digest_mismatch", "replayed_nonce",
           "duplicate_client")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ECDSA = ec.ECDSA(hashes.SHA256())


# ---------------------------------------------------------------------------- canonical bytes
def _row_array(row: Any) -> np.ndarray:
    if isinstance(row, torch.Tensor):
        row = row.detach().to("cpu", torch.float32).contiguous().numpy()
    arr = np.ascontiguousarray(row, dtype="<f4")  # no copy when already LE float32, contiguous
    if arr.ndim != 1:
        raise PhalanxError(f"update row: expected a 1-D vector [d], got shape {tuple(arr.shape)}")
    return arr


def canonical_bytes(row: Any) -> bytes:
    """The bytes that are hashed: the row as contiguous little-endian float32."""
    return _row_array(row).tobytes()


def row_digest(row: Any) -> str:
    """SHA-256 (hex) of ``canonical_bytes(row)``, hashed from a zero-copy view of the row."""
    return hashlib.sha256(memoryview(_row_array(row)).cast("B")).hexdigest()


ARRAYS_MAGIC = b"phalanx-arrays-v1\n"


def arrays_digest(arrays: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 (hex) of named arrays, in the order given: ``ARRAYS_MAGIC``, then per array one
    JSON line ``[name, dtype (little-endian numpy form, e.g. "<f4"), shape]`` followed by the
    array's bytes in C order, little-endian. What a Flower client signs for its reply's arrays."""
    h = hashlib.sha256(ARRAYS_MAGIC)
    for name, arr in arrays:
        if not isinstance(name, str):
            raise PhalanxError(f"arrays_digest: array names must be strings, got {type(name).__name__}")
        a = np.asarray(arr)
        if a.dtype.hasobject:
            raise PhalanxError(f"arrays_digest: array {name!r} has dtype object; expected numbers")
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        head = json.dumps([name, a.dtype.str, list(a.shape)], separators=(",", ":"), ensure_ascii=True)
        h.update(head.encode("ascii") + b"\n")
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()



# ---------------------------------------------------------------------------- envelope
@dataclass(frozen=True)
class Envelope:
    """What a client sends beside its update row. ``signature`` signs ``message()``."""

    client_id: str
    run_id: str
    round: int
    nonce: str
    digest: str
    signature: bytes = b""

    def message(self) -> bytes:
        body = {"client_id": self.client_id, "digest": self.digest, "nonce": self.nonce,
                "round": self.round, "run_id": self.run_id}
        return MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True).encode("ascii")

    def problem(self) -> str | None:
        """None when every field has the right type and shape, else what is wrong."""
        if not isinstance(self.client_id, str) or not _ID_RE.fullmatch(self.client_id):
            return f"client_id: expected an id string, got {self.client_id!r}"
        if not isinstance(self.run_id, str) or not self.run_id:
            return f"run_id: expected a non-empty string, got {self.run_id!r}"
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            return f"round: expected an integer >= 0, got {self.round!r}"
        if not isinstance(self.nonce, str) or not _HEX32.fullmatch(self.nonce):
            return f"nonce: expected 32 lowercase hex characters, got {self.nonce!r:.40}"
        if not isinstance(self.digest, str) or not _HEX64.fullmatch(self.digest):
            return f"digest: expected 64 lowercase hex characters, got {self.digest!r:.80}"
        if not isinstance(self.signature, bytes) or not 8 <= len(self.signature) <= 80:
            return f"signature: expected 8-80 bytes (DER), got {type(self.signature).__name__}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for transport (signature as hex)."""
        return {"client_id": self.client_id, "run_id": self.run_id, "round": self.round,
                "nonce": self.nonce, "digest": self.digest, "signature": self.signature.hex()}

    def to_record(self) -> dict[str, Any]:
        """The fields as a Flower ConfigRecord takes them (signature as raw bytes)."""
        return {**self.to_dict(), "signature": bytes(self.signature)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Envelope":
        fields = ("client_id", "run_id", "round", "nonce", "digest", "signature")
        if not isinstance(data, Mapping) or set(data) != set(fields):
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise IntegrityError(f"envelope: expected keys {', '.join(fields)}, got {got}")
        raw = data["signature"]
        try:
            sig = bytes(raw) if isinstance(raw, (bytes, bytearray)) else bytes.fromhex(raw)
        except (TypeError, ValueError):
            raise IntegrityError(f"envelope: signature must be bytes or hex, got {raw!r:.40}") from None
        return cls(*(data[k] for k in fields[:-1]), signature=sig)


# ---------------------------------------------------------------------------- signing
class ClientSigner:
    """Signs one client's update rows: a fresh nonce per call, ECDSA P-256 over ``message()``."""

    def __init__(self, client_id: str, private_key: ec.EllipticCurvePrivateKey):
        self.client_id = check_client_id(client_id)
        _check_p256(private_key, f"ClientSigner({client_id!r}): private_key", private=True)
        self._key = private_key

    @classmethod
    def generate(cls, client_id: str) -> "ClientSigner":
        """A signer with a fresh P-256 key, made where the client runs."""
        return cls(client_id, ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_file(cls, client_id: str, path: str | Path) -> "ClientSigner":
        return cls(client_id, load_private_key(path))

    def sign(self, update_row: Any, run_id: str, round: int) -> Envelope:
        """An envelope for one update row (its ``row_digest``)."""
        return self.sign_digest(row_digest(update_row), run_id, round)

    def sign_digest(self, digest: str, run_id: str, round: int) -> Envelope:
        """An envelope for a payload whose SHA-256 digest (hex) the client computed itself."""
        if not isinstance(run_id, str) or not run_id:
            raise PhalanxError(f"sign: run_id must be a non-empty string, got {run_id!r}")
        check_nonneg_int("sign", "round", round)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise PhalanxError(f"sign: digest must be 64 lowercase hex characters, got {digest!r:.80}")
        env = Envelope(self.client_id, run_id, round, secrets.token_hex(16), digest)
        return replace(env, signature=self._key.sign(env.message(), _ECDSA))

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()


def sign_updates(U: torch.Tensor, signers: Mapping[str, ClientSigner], client_ids: Sequence[str],
                 run_id: str, round: int) -> list[Envelope]:
    """One envelope per row of U, signed by ``signers[client_ids[i]]`` (simulation helper)."""
    return [signers[cid].sign(U[i], run_id, round) for i, cid in enumerate(client_ids)]


# ---------------------------------------------------------------------------- the layer
class Verify(Layer):
    """Zero-weights rows whose envelope (``ctx.extras["envelopes"]``) fails; see ``REASONS``.

    It judges who sent a row, not what the row says: Byzantine clients hold valid keys, so an
    attacker simulating the server leaves it out (``Pipeline.as_attackers_see_it``).

    Duplicates: the first row of a client id that passes every check counts (rows are taken in
    order); every later row of that id in the round that would also pass is ``duplicate_client``.
    A row that fails a check keeps its own reason and does not use up the client's row, so a
    forged row sent ahead under a client's id cannot silence the genuine one."""

    name = "verify"
    judges_identity = True

    def __init__(self, registry: KeyRegistry | str | Path, run_id: str, max_round_lag: int = 0,
                 workers: int = 0):
        if isinstance(registry, (str, Path)):
            registry = KeyRegistry.open(registry)
        if not isinstance(registry, KeyRegistry):
            raise PhalanxError(f"verify: registry must be a KeyRegistry or a path, got {type(registry).__name__}")
        if not isinstance(run_id, str) or not run_id:
            raise PhalanxError(f"verify: run_id must be a non-empty string, got {run_id!r}")
        self.registry, self.run_id = registry, run_id
        self.max_round_lag = check_nonneg_int("verify", "max_round_lag", max_round_lag)
        workers = check_nonneg_int("verify", "workers", workers)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._nonces: dict[int, set[str]] = {}
        self._counted: dict[str, int] = {}  # client id -> the last round a row of it was accepted

    def _meta_reason(self, env: Any, cid: Any, rnd: int) -> tuple[str | None, Any]:
        """Every check but the digest and the nonce; returns (reason or None, the Envelope)."""
        if env is None:
            return "missing_signature", None
        if isinstance(env, Mapping):
            try:
                env = Envelope.from_dict(env)
            except PhalanxError:
                return "malformed_envelope", None
        if not isinstance(env, Envelope) or env.problem() is not None:
            return "malformed_envelope", None
        if env.client_id != str(cid):
            return "impersonation", env
        if env.run_id != self.run_id:
            return "wrong_run", env
        rec = self.registry.get(env.client_id)
        if rec is None:
            return "unknown_client", env
        if rec.revoked:
            return "revoked_client", env
        if not rnd - self.max_round_lag <= env.round <= rnd:
            return "stale_round", env
        try:
            rec.public_key.verify(env.signature, env.message(), _ECDSA)
        except (InvalidSignature, ValueError, TypeError):
            return "bad_signature", env
        return None, env

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        if U.dim() != 2 or w.shape != (U.shape[0],) or len(ctx.client_ids) != U.shape[0]:
            raise PhalanxError(f"verify: expected U [n, d], w [n] and n client ids, got U "
                               f"{tuple(U.shape)}, w {tuple(w.shape)}, {len(ctx.client_ids)} ids")
        n, rnd = U.shape[0], int(ctx.round)
        report = Report(self.name, n=n)
        try:
            self.registry.refresh()
        except (PhalanxError, OSError) as e:  # keep the keys loaded last time
            report.info["registry_error"] = str(e)
        envs = ctx.extras.get("envelopes")
        if envs is None:
            envs = [None] * n
        elif not isinstance(envs, Sequence) or isinstance(envs, (str, bytes)) or len(envs) != n:
            got = f"{len(envs)} entries" if isinstance(envs, Sequence) else type(envs).__name__
            report.info["error"] = f"envelopes: expected a list of n={n} entries, got {got}"
            envs = [object()] * n  # cannot align them with rows: every row is malformed
        for r in [r for r in self._nonces if r < rnd - self.max_round_lag]:
            del self._nonces[r]
        self._counted = {c: r for c, r in self._counted.items() if r >= rnd}  # older: no longer needed
        checked: dict[int, Envelope] = {}
        for i in range(n):
            try:
                why, env = self._meta_reason(envs[i], ctx.client_ids[i], rnd)
            except Exception:  # never let a crafted envelope crash the round
                why, env = "malformed_envelope", None
            if why:
                report.reject(i, why)
            else:
                checked[i] = env
        rows = U.detach().to("cpu", torch.float32).contiguous()
        payload = ctx.extras.get("payload_digests")  # what the server hashed as each row arrived
        if not (isinstance(payload, Sequence) and not isinstance(payload, (str, bytes)) and len(payload) == n):
            if payload is not None:
                report.info["error"] = f"payload_digests: expected a list of n={n} entries"
            payload = [None] * n
        idx = [i for i in checked if payload[i] is None]
        if len(idx) > 1 and self.workers > 1 and rows.shape[1] >= 1 << 18:
            with ThreadPoolExecutor(min(self.workers, len(idx))) as pool:  # sha256 drops the GIL
                hashed = dict(zip(idx, pool.map(lambda i: row_digest(rows[i]), idx)))
        else:
            hashed = {i: row_digest(rows[i]) for i in idx}
        idx = list(checked)
        digests = [hashed[i] if payload[i] is None else str(payload[i]) for i in idx]
        batch: set[str] = set()
        counted: set[str] = set()  # client ids with a row accepted in this call
        duplicates = 0
        for i, dig in zip(idx, digests):
            env = checked[i]
            if not secrets.compare_digest(dig, env.digest):
                report.reject(i, "digest_mismatch")
            elif env.nonce in batch or env.nonce in self._nonces.get(env.round, ()):
                report.reject(i, "replayed_nonce")
            else:
                batch.add(env.nonce)
                self._nonces.setdefault(env.round, set()).add(env.nonce)
                if env.client_id in counted or self._counted.get(env.client_id) == rnd:
                    report.reject(i, "duplicate_client")
                    duplicates += 1
                else:
                    counted.add(env.client_id)
        for cid in counted:
            self._counted[cid] = rnd
        rejected = sorted(report.reasons)
        w = w.clone()
        if rejected:
            w[torch.tensor(rejected, dtype=torch.long, device=w.device)] = 0
        report.selected = torch.ones(n, dtype=torch.bool)
        report.selected[rejected] = False
        report.info.update(accepted=n - len(rejected), rejected=len(rejected), duplicates=duplicates,
                           nonces_remembered=sum(len(s) for s in self._nonces.values()))
        return U, w, report

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly: the remembered nonces per envelope round, and each client's last round
        with an accepted row (so a resumed run still rejects replays and second rows)."""
        return {"run_id": self.run_id, "nonces": {str(r): sorted(s) for r, s in self._nonces.items()},
                "counted": dict(sorted(self._counted.items()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        keys = set(state) if isinstance(state, Mapping) else None
        if keys is None or not {"run_id", "nonces"} <= keys <= {"run_id", "nonces", "counted"}:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise PhalanxError(f"verify: state must have keys nonces, run_id (and counted); got {got}")
        if not isinstance(state["run_id"], str) or not state["run_id"]:
            raise PhalanxError(f"verify: state run_id must be a non-empty string, got {state['run_id']!r}")
        try:
            nonces = {int(r): {str(x) for x in s} for r, s in dict(state["nonces"]).items()}
        except (TypeError, ValueError):
            raise PhalanxError("verify: state nonces must map round -> list of hex nonces, got "
                               f"{type(state['nonces']).__name__}") from None
        raw = state.get("counted", {})  # absent in checkpoints written before it existed
        try:
            counted = {str(c): int(r) for c, r in dict(raw).items()}
        except (TypeError, ValueError):
            raise PhalanxError("verify: state counted must map client id -> round, got "
                               f"{type(raw).__name__}") from None
        self._nonces, self._counted = nonces, counted
        self.run_id = state["run_id"]  # a restored state continues its own run

    def bind_run(self, run_id: str) -> None:
        """Accept envelopes of run ``run_id`` from now on; a different run forgets the nonces and
        counted rows (they belong to the old run, whose envelopes are now ``wrong_run``)."""
        if not isinstance(run_id, str) or not run_id:
            raise PhalanxError(f"verify: run_id must be a non-empty string, got {run_id!r}")
        if run_id != self.run_id:
            self.run_id, self._nonces, self._counted = run_id, {}, {}

    def __repr__(self) -> str:
        return f"Verify(run_id={self.run_id!r}, max_round_lag={self.max_round_lag}, registry={self.registry!r})"


@DEFENSES.register("verify")
def verify(registry: KeyRegistry | str, run_id: str, max_round_lag: int = 0, workers: int = 0) -> Verify:
    """Authenticate rows: ECDSA P-256 signature, payload digest, nonce replay, round and run checks."""
    return Verify(registry, run_id, max_round_lag, workers)
