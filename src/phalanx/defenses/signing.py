"""Signed updates: authentication, integrity and anti-replay, plus client key management.

Implemented here (ECDSA P-256 with SHA-256, FIPS 186-4, through the ``cryptography`` package):

* **Canonical update bytes.** A row is encoded as contiguous little-endian float32
  (``canonical_bytes``); its digest is SHA-256 of those bytes, hex (``row_digest``).
* **Envelope.** ``client_id, run_id, round, nonce`` (16 fresh random bytes, hex), ``digest`` and
  ``signature``. The signed message (``Envelope.message()``) is ``b"phalanx-envelope-v1\\n"``
  followed by the UTF-8 JSON object of the five fields other than the signature, keys sorted,
  separators ``","`` and ``":"``, ASCII-escaped. The signature is DER-encoded.
* **KeyRegistry.** Client id -> public key, revoked flag and creation time; in memory, or backed by
  a folder (``<id>.pub.pem`` + ``<id>.meta.json``; private keys ``<id>.key.pem``, mode 0600) or a
  SQLite file (table ``client_keys(client_id, public_pem, revoked, created)``).
* **ClientSigner.** What a client runs: ``sign(row, run_id, round) -> Envelope``.
* **Verify layer** (``DEFENSES["verify"]``): gives weight 0 to every row whose envelope fails and
  records one reason from ``REASONS``. Nonces are remembered for the rounds still inside the
  acceptance window ``[round - max_round_lag, round]`` (anything older is ``stale_round``), and
  ``state_dict`` keeps them so a resumed run still blocks replays.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..context import RoundContext
from ..errors import DataError, IntegrityError, PhalanxError
from ..registry import DEFENSES
from .base import Layer, Report, check_nonneg_int

MAGIC = b"phalanx-envelope-v1\n"
REASONS = ("missing_signature", "malformed_envelope", "impersonation", "wrong_run", "unknown_client",
           "revoked_client", "stale_round", "bad_signature", "digest_mismatch", "replayed_nonce")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
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


def check_client_id(client_id: Any) -> str:
    if not isinstance(client_id, str) or not _ID_RE.fullmatch(client_id):
        raise PhalanxError("client_id: expected 1-128 characters from [A-Za-z0-9._@-] starting "
                           f"with a letter or digit, got {client_id!r}")
    return client_id


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Envelope":
        fields = ("client_id", "run_id", "round", "nonce", "digest", "signature")
        if not isinstance(data, Mapping) or set(data) != set(fields):
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise IntegrityError(f"envelope: expected keys {', '.join(fields)}, got {got}")
        try:
            sig = bytes.fromhex(data["signature"])
        except (TypeError, ValueError):
            raise IntegrityError(f"envelope: signature must be hex, got {data['signature']!r:.40}") from None
        return cls(*(data[k] for k in fields[:-1]), signature=sig)


# ---------------------------------------------------------------------------- keys
def _check_p256(key: Any, what: str, private: bool) -> None:
    cls = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, cls) or not isinstance(key.curve, ec.SECP256R1):
        got = getattr(getattr(key, "curve", None), "name", None) or type(key).__name__
        raise IntegrityError(f"{what}: expected an EC P-256 (secp256r1) key, got {got}")


def public_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def load_public_pem(text: str | bytes, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(text.encode() if isinstance(text, str) else text)
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"{where}: expected a PEM public key, got unreadable data ({e})") from None
    _check_p256(key, where, private=False)
    return key


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PKCS#8 PEM private key (as written by ``KeyRegistry.generate``)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise PhalanxError(f"private key: cannot read {path} ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"private key {path}: expected an unencrypted PEM key ({e})") from None
    _check_p256(key, f"private key {path}", private=True)
    return key


def write_private_key(path: str | Path, key: ec.EllipticCurvePrivateKey, overwrite: bool = False) -> Path:
    """Write ``key`` as PKCS#8 PEM, created with mode 0600 (never readable by others)."""
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise PhalanxError(f"private key: {path} already exists; expected a new path") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
    return path


def _now(ts: float | None = None) -> str:
    t = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return t.replace(microsecond=0).isoformat()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class KeyRecord:
    client_id: str
    public_key: ec.EllipticCurvePublicKey
    revoked: bool = False
    created: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


_SCHEMA = ("CREATE TABLE IF NOT EXISTS client_keys (client_id TEXT PRIMARY KEY, public_pem TEXT "
           "NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL)")


class KeyRegistry:
    """Client id -> P-256 public key. ``dir=`` or ``db=`` backs it on disk (every change is written
    through); with neither it lives in memory. ``create=False`` requires the store to exist."""

    def __init__(self, *, dir: str | Path | None = None, db: str | Path | None = None,
                 create: bool = True):
        if dir is not None and db is not None:
            raise PhalanxError(f"key registry: expected dir or db, got both ({dir}, {db})")
        self.dir, self.db = (Path(p) if p is not None else None for p in (dir, db))
        self._records: dict[str, KeyRecord] = {}
        self._stamp: Any = None
        store = self.dir or self.db
        if store is not None and not store.exists() and not create:
            raise PhalanxError(f"key registry: expected an existing {'folder' if self.dir else 'SQLite file'}"
                               f" of client keys, got missing path {store}")
        if self.dir is not None:
            if self.dir.exists() and not self.dir.is_dir():
                raise PhalanxError(f"key registry: expected a folder, got file {self.dir}")
            self.dir.mkdir(parents=True, exist_ok=True)
        elif self.db is not None and create:
            self._sql(lambda c: c.execute(_SCHEMA))
        self._load()

    @classmethod
    def open(cls, path: str | Path) -> "KeyRegistry":
        """An existing registry: a folder of PEM files, or a SQLite file."""
        p = Path(path)
        if not p.exists():
            raise PhalanxError(f"key registry: expected an existing folder of <id>.pub.pem files or a "
                               f"SQLite file, got missing path {p}")
        return cls(dir=p, create=False) if p.is_dir() else cls(db=p, create=False)

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, client_id: str) -> KeyRecord | None:
        return self._records.get(client_id)

    def list(self) -> list[KeyRecord]:
        return [self._records[k] for k in sorted(self._records)]

    def generate(self, client_id: str, *, private_dir: str | Path | None = None,
                 overwrite: bool = False) -> ec.EllipticCurvePrivateKey:
        """Make a P-256 key pair, register the public half and return the private key. The private
        key is also written to ``private_dir`` (default: the registry's folder, if any)."""
        check_client_id(client_id)
        if client_id in self._records and not overwrite:
            raise PhalanxError(f"generate: client {client_id!r} already has a key; expected a new id "
                               "(or overwrite=True)")
        key = ec.generate_private_key(ec.SECP256R1())
        out = Path(private_dir) if private_dir is not None else self.dir
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_private_key(out / f"{client_id}.key.pem", key, overwrite=overwrite)
        self.add(client_id, key.public_key(), overwrite=True)
        return key

    def add(self, client_id: str, public_key: ec.EllipticCurvePublicKey, *, overwrite: bool = False,
            revoked: bool = False, created: str | None = None) -> KeyRecord:
        check_client_id(client_id)
        _check_p256(public_key, f"public key of {client_id!r}", private=False)
        if client_id in self._records and not overwrite:
            raise PhalanxError(f"add: client {client_id!r} is already registered; expected a new id")
        rec = KeyRecord(client_id, public_key, bool(revoked), created or _now())
        self._records[client_id] = rec
        self._persist(rec)
        return rec

    def revoke(self, client_id: str) -> None:
        rec = self._records.get(client_id)
        if rec is None:
            known = ", ".join(sorted(self._records)[:10]) or "none"
            raise PhalanxError(f"revoke: unknown client {client_id!r}; known: {known}")
        rec.revoked = True
        self._persist(rec)

    # -- storage
    def _sql(self, fn):
        try:
            with closing(sqlite3.connect(self.db)) as con, con:
                return fn(con)
        except sqlite3.Error as e:
            raise DataError(f"key registry {self.db}: expected a SQLite file with table client_keys, "
                            f"got error: {e}") from None

    def _persist(self, rec: KeyRecord) -> None:
        if self.dir is not None:
            _atomic_write(self.dir / f"{rec.client_id}.pub.pem", public_pem(rec.public_key))
            meta = {"client_id": rec.client_id, "revoked": rec.revoked, "created": rec.created}
            _atomic_write(self.dir / f"{rec.client_id}.meta.json", json.dumps(meta) + "\n")
        elif self.db is not None:
            self._save_rows([rec])

    def _current_stamp(self) -> Any:
        """Changes whenever the store does: files are replaced atomically (new inode each write);
        SQLite bumps its file change counter (header bytes 24-27) on every write transaction."""
        if self.dir is not None:
            return sorted((e.name, e.inode(), e.stat().st_mtime_ns) for e in os.scandir(self.dir)
                          if e.name.endswith((".pub.pem", ".meta.json")))
        with open(self.db, "rb") as f:
            head = f.read(28)
        st = self.db.stat()
        return (st.st_mtime_ns, st.st_size, head[24:28])

    def refresh(self) -> bool:
        """Reload from disk when the backing store changed (for example ``phalanx keys revoke``)."""
        if (self.dir is None and self.db is None) or self._current_stamp() == self._stamp:
            return False
        self._load()
        return True

    def _load(self) -> None:
        if self.dir is None and self.db is None:
            return
        stamp, records = self._current_stamp(), {}
        if self.dir is not None:
            for pub in sorted(self.dir.glob("*.pub.pem")):
                cid, meta_path = pub.name[: -len(".pub.pem")], pub.with_name(pub.name[:-8] + ".meta.json")
                key = load_public_pem(pub.read_bytes(), f"key registry {pub}")
                try:  # the metadata file is optional: not revoked, created = file time
                    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                    revoked, created = bool(meta.get("revoked", False)), str(meta.get("created") or
                                                                             _now(pub.stat().st_mtime))
                except (ValueError, AttributeError):
                    raise DataError(f"key registry {meta_path}: expected a JSON object with "
                                    "revoked and created, got unreadable data") from None
                records[cid] = KeyRecord(cid, key, revoked, created)
        else:
            rows = self._sql(lambda c: c.execute(
                "SELECT client_id, public_pem, revoked, created FROM client_keys").fetchall())
            for cid, pem, revoked, created in rows:
                key = load_public_pem(pem, f"key registry {self.db} row {cid!r}")
                records[cid] = KeyRecord(cid, key, bool(revoked), str(created))
        self._records, self._stamp = records, stamp

    def save_dir(self, dir: str | Path) -> "KeyRegistry":
        """Export every public key and its metadata to a folder; returns the folder registry."""
        out = KeyRegistry(dir=dir)
        for rec in self.list():
            out.add(rec.client_id, rec.public_key, overwrite=True, revoked=rec.revoked, created=rec.created)
        return out

    def save_sqlite(self, path: str | Path) -> "KeyRegistry":
        """Export every public key and its metadata to a SQLite file; returns the file registry."""
        out = KeyRegistry(db=path)
        out._save_rows(self.list())
        out._load()
        return out

    def _save_rows(self, recs: Sequence[KeyRecord]) -> None:
        rows = [(r.client_id, public_pem(r.public_key), int(r.revoked), r.created) for r in recs]
        self._sql(lambda c: (c.execute(_SCHEMA), c.executemany(
            "INSERT OR REPLACE INTO client_keys (client_id, public_pem, revoked, created) "
            "VALUES (?, ?, ?, ?)", rows)))

    def __repr__(self) -> str:
        return f"KeyRegistry({self.dir or self.db or 'memory'}, clients={len(self)})"


# ---------------------------------------------------------------------------- signing
class ClientSigner:
    """Signs one client's update rows: a fresh nonce per call, ECDSA P-256 over ``message()``."""

    def __init__(self, client_id: str, private_key: ec.EllipticCurvePrivateKey):
        self.client_id = check_client_id(client_id)
        _check_p256(private_key, f"ClientSigner({client_id!r}): private_key", private=True)
        self._key = private_key

    @classmethod
    def from_file(cls, client_id: str, path: str | Path) -> "ClientSigner":
        return cls(client_id, load_private_key(path))

    def sign(self, update_row: Any, run_id: str, round: int) -> Envelope:
        if not isinstance(run_id, str) or not run_id:
            raise PhalanxError(f"sign: run_id must be a non-empty string, got {run_id!r}")
        check_nonneg_int("sign", "round", round)
        env = Envelope(self.client_id, run_id, round, secrets.token_hex(16), row_digest(update_row))
        return replace(env, signature=self._key.sign(env.message(), _ECDSA))


def sign_updates(U: torch.Tensor, signers: Mapping[str, ClientSigner], client_ids: Sequence[str],
                 run_id: str, round: int) -> list[Envelope]:
    """One envelope per row of U, signed by ``signers[client_ids[i]]`` (simulation helper)."""
    return [signers[cid].sign(U[i], run_id, round) for i, cid in enumerate(client_ids)]


# ---------------------------------------------------------------------------- the layer
class Verify(Layer):
    """Zero-weights rows whose envelope (``ctx.extras["envelopes"]``) fails; see ``REASONS``."""

    name = "verify"

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
        idx = list(checked)
        if len(idx) > 1 and self.workers > 1 and rows.shape[1] >= 1 << 18:
            with ThreadPoolExecutor(min(self.workers, len(idx))) as pool:  # sha256 drops the GIL
                digests = list(pool.map(lambda i: row_digest(rows[i]), idx))
        else:
            digests = [row_digest(rows[i]) for i in idx]
        batch: set[str] = set()
        for i, dig in zip(idx, digests):
            env = checked[i]
            if not secrets.compare_digest(dig, env.digest):
                report.reject(i, "digest_mismatch")
            elif env.nonce in batch or env.nonce in self._nonces.get(env.round, ()):
                report.reject(i, "replayed_nonce")
            else:
                batch.add(env.nonce)
                self._nonces.setdefault(env.round, set()).add(env.nonce)
        rejected = sorted(report.reasons)
        w = w.clone()
        if rejected:
            w[torch.tensor(rejected, dtype=torch.long, device=w.device)] = 0
        report.selected = torch.ones(n, dtype=torch.bool)
        report.selected[rejected] = False
        report.info.update(accepted=n - len(rejected), rejected=len(rejected),
                           nonces_remembered=sum(len(s) for s in self._nonces.values()))
        return U, w, report

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "nonces": {str(r): sorted(s) for r, s in self._nonces.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not isinstance(state, Mapping) or set(state) != {"run_id", "nonces"}:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise PhalanxError(f"verify: state must have keys nonces, run_id; got {got}")
        if state["run_id"] != self.run_id:
            raise PhalanxError(f"verify: state is for run_id {state['run_id']!r}, "
                               f"expected this layer's run_id {self.run_id!r}")
        try:
            self._nonces = {int(r): {str(x) for x in s} for r, s in dict(state["nonces"]).items()}
        except (TypeError, ValueError):
            raise PhalanxError("verify: state nonces must map round -> list of hex nonces, got "
                               f"{type(state['nonces']).__name__}") from None

    def __repr__(self) -> str:
        return f"Verify(run_id={self.run_id!r}, max_round_lag={self.max_round_lag}, registry={self.registry!r})"


@DEFENSES.register("verify")
def verify(registry: KeyRegistry | str, run_id: str, max_round_lag: int = 0, workers: int = 0) -> Verify:
    """Authenticate rows: ECDSA P-256 signature, payload digest, nonce replay, round and run checks."""
    return Verify(registry, run_id, max_round_lag, workers)
