"""Client key management: ECDSA P-256 key pairs and the registry of client public keys.

A ``KeyRegistry`` maps client id -> public key, revoked flag and creation time; in memory, or
backed by a folder (``<id>.pub.pem`` + ``<id>.meta.json``; private keys ``<id>.key.pem``, mode
0600) or a SQLite file (table ``client_keys(client_id, public_pem, revoked, created)``).
``phalanx keys generate/list/revoke`` drives it from the shell; ``defenses.signing`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import DataError, IntegrityError, PhalanxError

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")

def check_client_id(client_id: Any) -> str:
    if not isinstance(client_id, str) or not _ID_RE.fullmatch(client_id):
        raise PhalanxError("client_id: expected 1-128 characters from [A-Za-z0-9._@-] starting "
                           f"with a letter or digit, got {client_id!r}")
    return client_id


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


