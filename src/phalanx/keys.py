"""Client key management: ECDSA P-256 key pairs and the registry of client public keys.

A ``KeyRegistry`` maps client id -> public key, revoked flag and creation time. It holds public
keys only: a client's private key is written where the operator says (``private_dir``), never
into the registry. In memory (``KeyRegistry()``, the simulator's), or on disk, where every
change is signed by an **admin key** so that the registry is tamper-evident:

* a folder (created 0700): ``admin.pub.pem`` (the admin's public key), ``registry.json`` (the
  signed state) and ``<id>.pub.pem`` copies of each client's key for the operator (0644); or
* a SQLite file (created 0644) holding the same ``admin.pub.pem`` and ``registry.json`` texts
  (table ``registry(name, body)``).

``registry.json`` is the authority: its body (format, a sequence number ``seq`` that grows with
every change, the clients with their PEM keys and creation times, the revoked client ids and the
revoked key fingerprints) is signed with the admin key (ECDSA P-256, SHA-256, over
``b"phalanx-registry-v1\\n"`` + the body as sorted, compact, ASCII JSON). Loading refuses a
registry whose signature does not verify, whose ``admin.pub.pem`` is not the pinned admin key
(``admin_fingerprint=``), whose ``registry.json`` is missing, whose ``<id>.pub.pem`` copies
disagree with it, or whose folder or files are world-writable. So deleting or editing a file
cannot un-revoke anyone: a revocation lives in the signed body, and the body cannot lose it
without the admin key. A running registry also refuses to go back to a lower ``seq`` or to a
different admin key (a restored older copy), keeping what it loaded last. Across restarts, a
server passes ``seen_seq=`` (a file in its own state folder, not next to the registry): the highest
``seq`` it has ever loaded is kept there (0600), and a registry below it is refused at start-up
too, so restoring an older signed copy cannot un-revoke a client while the server was down.

Rotation: ``rotate(id)`` gives a client a new key pair; the old key's fingerprint is revoked, so
it stays rejected even if its public key file comes back. Rotating a revoked client readmits it
with the new key. ``phalanx keys init | generate | list | revoke | rotate`` drives it from the
shell; ``defenses.signing`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import stat
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import DataError, IntegrityError, PhalanxError

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
REGISTRY_MAGIC = b"phalanx-registry-v1\n"
REGISTRY_FORMAT = "phalanx-registry-v1"
ADMIN_FILE, STATE_FILE = "admin.pub.pem", "registry.json"
_ECDSA = ec.ECDSA(hashes.SHA256())


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


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


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
    """Read an unencrypted PKCS#8 PEM private key (as ``write_private_key`` writes it). Like ssh,
    refuses a key file that others may read or write (mode must allow nothing beyond 0600)."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as e:
        raise PhalanxError(f"private key: cannot read {path} ({e.strerror})") from None
    if mode & 0o077:
        raise IntegrityError(f"private key {path}: mode {mode:04o} lets others read or write it; "
                             f"expected 0600 (chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"private key {path}: expected an unencrypted PEM key ({e})") from None
    _check_p256(key, f"private key {path}", private=True)
    return key


def write_private_key(path: str | Path, key: ec.EllipticCurvePrivateKey, overwrite: bool = False) -> Path:
    """Write ``key`` as PKCS#8 PEM, created with mode 0600 (a new folder: 0700)."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
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


def _write_public(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0644."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(text)
    os.replace(tmp, path)


def _inside(path: Path, folder: Path) -> bool:
    p, d = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return p == d or d in p.parents


def _body_bytes(body: dict[str, Any]) -> bytes:
    return REGISTRY_MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass
class KeyRecord:
    client_id: str
    public_key: ec.EllipticCurvePublicKey
    revoked: bool = False
    created: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


_SCHEMA = "CREATE TABLE IF NOT EXISTS registry (name TEXT PRIMARY KEY, body TEXT NOT NULL)"


class KeyRegistry:
    """Client id -> P-256 public key (see the module docstring).

    ``KeyRegistry()`` lives in memory. ``dir=`` or ``db=`` backs it on disk: creating a new one,
    and every change, needs ``admin_key`` (the admin's private key); reading needs none.
    ``admin_fingerprint`` pins the admin key a registry on disk must be signed with.
    ``create=False`` requires the store to exist. ``seen_seq``: the file where this reader keeps
    the highest ``seq`` it has loaded (read first, raised after every load)."""

    def __init__(self, *, dir: str | Path | None = None, db: str | Path | None = None, create: bool = True,
                 admin_key: ec.EllipticCurvePrivateKey | None = None, admin_fingerprint: str | None = None,
                 seen_seq: str | Path | None = None):
        if dir is not None and db is not None:
            raise PhalanxError(f"key registry: expected dir or db, got both ({dir}, {db})")
        if admin_key is not None:
            _check_p256(admin_key, "key registry: admin_key", private=True)
        self.dir, self.db = (Path(p) if p is not None else None for p in (dir, db))
        self.admin_key = admin_key
        self.admin_fingerprint = admin_fingerprint
        self.seen_seq = Path(seen_seq) if seen_seq is not None else None
        self.seq = self._read_seen()
        self._records: dict[str, KeyRecord] = {}
        self._revoked_clients: set[str] = set()
        self._revoked_keys: set[str] = set()
        self._stamp: Any = None
        self._admin_fp: str | None = None
        store = self.dir or self.db
        if store is None:
            return
        if not store.exists():
            if not create:
                raise PhalanxError(f"key registry: expected an existing {'folder' if self.dir else 'SQLite file'}"
                                   f" of client keys, got missing path {store}")
            if admin_key is None:
                raise PhalanxError(f"key registry: creating {store} needs the admin key (admin_key=, or "
                                   "`phalanx keys init --admin-key PATH`): every change to it is signed")
            self._create(store)
        elif self.dir is not None and not self.dir.is_dir():
            raise PhalanxError(f"key registry: expected a folder, got file {self.dir}")
        self._load()

    @classmethod
    def open(cls, path: str | Path, *, admin_key: ec.EllipticCurvePrivateKey | None = None,
             admin_fingerprint: str | None = None, seen_seq: str | Path | None = None) -> "KeyRegistry":
        """An existing registry: a folder, or a SQLite file."""
        p = Path(path)
        if not p.exists():
            raise PhalanxError(f"key registry: expected an existing folder (admin.pub.pem, registry.json) or "
                               f"SQLite file, got missing path {p}")
        kind = {"dir": p} if p.is_dir() else {"db": p}
        return cls(**kind, create=False, admin_key=admin_key, admin_fingerprint=admin_fingerprint,
                   seen_seq=seen_seq)

    # -- reading
    def __contains__(self, client_id: str) -> bool:
        return client_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, client_id: str) -> KeyRecord | None:
        return self._records.get(client_id)

    def list(self) -> list[KeyRecord]:
        return [self._records[k] for k in sorted(self._records)]

    @property
    def location(self) -> str:
        return str(self.dir or self.db or "memory")

    @property
    def admin_public_fingerprint(self) -> str | None:
        """The fingerprint of the admin key the registry on disk is signed with (None in memory)."""
        return self._admin_fp

    # -- changes
    def generate(self, client_id: str, *, private_dir: str | Path | None = None,
                 overwrite: bool = False) -> ec.EllipticCurvePrivateKey:
        """Make a P-256 key pair, register the public half and return the private key. With
        ``private_dir`` the private key is also written there (``<id>.key.pem``, 0600), which
        must not be the registry's folder nor inside it."""
        check_client_id(client_id)
        if client_id in self._records and not overwrite:
            raise PhalanxError(f"generate: client {client_id!r} already has a key; expected a new id "
                               "(or overwrite=True, or rotate)")
        out = self._private_path(private_dir, client_id)
        key = new_private_key()
        if out is not None:
            write_private_key(out, key, overwrite=overwrite)
        self.add(client_id, key.public_key(), overwrite=True)
        return key

    def add(self, client_id: str, public_key: ec.EllipticCurvePublicKey, *, overwrite: bool = False,
            revoked: bool = False, created: str | None = None) -> KeyRecord:
        check_client_id(client_id)
        _check_p256(public_key, f"public key of {client_id!r}", private=False)
        if client_id in self._records and not overwrite:
            raise PhalanxError(f"add: client {client_id!r} is already registered; expected a new id")
        self._writable("add")
        rec = KeyRecord(client_id, public_key, False, created or _now())
        self._records[client_id] = rec
        if revoked:
            self._revoked_clients.add(client_id)
        self._refresh_flags()
        self._save()
        return rec

    def revoke(self, client_id: str) -> None:
        """Revoke a client and its current key (recorded in the signed state)."""
        rec = self._known("revoke", client_id)
        self._writable("revoke")
        self._revoked_clients.add(client_id)
        self._revoked_keys.add(rec.fingerprint)
        self._refresh_flags()
        self._save()

    def rotate(self, client_id: str, *, private_dir: str | Path | None = None) -> ec.EllipticCurvePrivateKey:
        """A new key pair for ``client_id``; its old key is revoked for good. Readmits a revoked client."""
        old = self._known("rotate", client_id)
        self._writable("rotate")
        out = self._private_path(private_dir, client_id)
        key = new_private_key()
        if out is not None:
            write_private_key(out, key, overwrite=True)
        self._revoked_keys.add(old.fingerprint)
        self._revoked_clients.discard(client_id)
        self._records[client_id] = KeyRecord(client_id, key.public_key(), False, _now())
        self._refresh_flags()
        self._save()
        return key

    def revoked_fingerprints(self) -> set[str]:
        return set(self._revoked_keys)

    def _known(self, what: str, client_id: str) -> KeyRecord:
        rec = self._records.get(client_id)
        if rec is None:
            known = ", ".join(sorted(self._records)[:10]) or "none"
            raise PhalanxError(f"{what}: unknown client {client_id!r}; known: {known}")
        return rec

    def _private_path(self, private_dir: str | Path | None, client_id: str) -> Path | None:
        if private_dir is None:
            return None
        out = Path(private_dir)
        if self.dir is not None and _inside(out, self.dir):
            raise PhalanxError(f"private keys: {out} is inside the registry {self.dir}; expected a folder "
                               "outside it (the registry holds public keys only)")
        return out / f"{client_id}.key.pem"

    def _writable(self, what: str) -> None:
        if (self.dir or self.db) is not None and self.admin_key is None:
            raise PhalanxError(f"{what}: the registry {self.location} is signed; changing it needs the admin "
                               "key (admin_key=, or --admin-key PATH)")

    def _refresh_flags(self) -> None:
        for cid, rec in self._records.items():
            rec.revoked = cid in self._revoked_clients or rec.fingerprint in self._revoked_keys

    # -- storage
    def _sql(self, fn):
        try:
            with closing(sqlite3.connect(self.db)) as con, con:
                return fn(con)
        except sqlite3.Error as e:
            raise DataError(f"key registry {self.db}: expected a SQLite file with table registry, "
                            f"got error: {e}") from None

    def _create(self, store: Path) -> None:
        admin_pem = public_pem(self.admin_key.public_key())
        if self.dir is not None:
            self.dir.mkdir(parents=True, mode=0o700)
            os.chmod(self.dir, 0o700)
            _write_public(self.dir / ADMIN_FILE, admin_pem)
        else:
            self.db.parent.mkdir(parents=True, exist_ok=True)
            self._sql(lambda c: (c.execute(_SCHEMA), c.execute(
                "INSERT OR REPLACE INTO registry (name, body) VALUES (?, ?)", (ADMIN_FILE, admin_pem))))
            os.chmod(self.db, 0o644)
        self._admin_fp = fingerprint(self.admin_key.public_key())
        self._save()

    def _body(self) -> dict[str, Any]:
        return {"format": REGISTRY_FORMAT, "seq": self.seq,
                "clients": {c: {"public_key": public_pem(r.public_key), "created": r.created}
                            for c, r in sorted(self._records.items())},
                "revoked_clients": sorted(self._revoked_clients), "revoked_keys": sorted(self._revoked_keys)}

    def _save(self) -> None:
        if self.dir is None and self.db is None:
            return
        if self._admin_fp is not None and fingerprint(self.admin_key.public_key()) != self._admin_fp:
            raise IntegrityError(f"key registry {self.location}: the admin key given is not the registry's "
                                 f"(fingerprint {self._admin_fp[:16]})")
        self.seq += 1
        body = self._body()
        text = json.dumps({**body, "signature": self.admin_key.sign(_body_bytes(body), _ECDSA).hex()},
                          indent=1, sort_keys=True) + "\n"
        if self.dir is not None:
            _write_public(self.dir / STATE_FILE, text)
            names = {f"{c}.pub.pem" for c in self._records}
            for c, r in self._records.items():  # the operator's copies, rewritten when they changed
                copy, pem = self.dir / f"{c}.pub.pem", public_pem(r.public_key)
                if not copy.is_file() or copy.read_text() != pem:
                    _write_public(copy, pem)
            for stale in self.dir.glob("*.pub.pem"):  # a rotated-away or foreign copy
                if stale.name not in names and stale.name != ADMIN_FILE:
                    stale.unlink()
        else:
            self._sql(lambda c: (c.execute(_SCHEMA), c.execute(
                "INSERT OR REPLACE INTO registry (name, body) VALUES (?, ?)", (STATE_FILE, text))))
        self._stamp = self._current_stamp()
        self._write_seen()

    def _current_stamp(self) -> Any:
        """Changes whenever the store does: files are replaced atomically (new inode each write);
        SQLite bumps its file change counter (header bytes 24-27) on every write transaction."""
        if self.dir is not None:
            return sorted((e.name, e.inode(), e.stat().st_mtime_ns) for e in os.scandir(self.dir)
                          if e.name.endswith((".pem", ".json")))
        with open(self.db, "rb") as f:
            head = f.read(28)
        st = self.db.stat()
        return (st.st_mtime_ns, st.st_size, head[24:28])

    def refresh(self) -> bool:
        """Reload from disk when the backing store changed (for example ``phalanx keys revoke``).
        Raises (keeping what was loaded) on a registry that fails a check, goes back to a lower
        ``seq`` or changes its admin key."""
        if (self.dir is None and self.db is None) or self._current_stamp() == self._stamp:
            return False
        self._load()
        return True

    def _check_modes(self) -> None:
        paths = [self.dir, *sorted(self.dir.iterdir())] if self.dir is not None else [self.db]
        for p in paths:
            mode = p.lstat().st_mode
            if stat.S_IMODE(mode) & 0o002:
                raise IntegrityError(f"key registry: {p} is world-writable (mode {stat.S_IMODE(mode):04o}); "
                                     f"anyone could change the keys; expected 0700 for the folder, 0644 for files")
            if stat.S_ISLNK(mode):
                raise IntegrityError(f"key registry: {p} is a symbolic link; expected plain files")

    def _read_texts(self) -> tuple[str | None, str | None, dict[str, str]]:
        if self.dir is not None:
            read = lambda name: (self.dir / name).read_text() if (self.dir / name).is_file() else None  # noqa: E731
            copies = {p.name[:-len(".pub.pem")]: p.read_text() for p in self.dir.glob("*.pub.pem")
                      if p.name != ADMIN_FILE}
            return read(ADMIN_FILE), read(STATE_FILE), copies
        try:
            rows = dict(self._sql(lambda c: c.execute("SELECT name, body FROM registry").fetchall()))
        except DataError:
            raise DataError(f"key registry {self.db}: expected a SQLite file with table registry (admin.pub.pem, "
                            "registry.json); an older registry without signed revocations must be re-created "
                            "with `phalanx keys init`") from None
        return rows.get(ADMIN_FILE), rows.get(STATE_FILE), {}

    def _load(self) -> None:
        where = self.location
        self._check_modes()
        stamp = self._current_stamp()
        admin_text, state_text, copies = self._read_texts()
        if admin_text is None:
            raise IntegrityError(f"key registry {where}: {ADMIN_FILE} is missing; expected the admin's public key "
                                 "(an older registry without signed revocations must be re-created with "
                                 "`phalanx keys init`)")
        admin = load_public_pem(admin_text, f"key registry {where}: {ADMIN_FILE}")
        admin_fp = fingerprint(admin)
        pinned = self.admin_fingerprint or self._admin_fp
        if pinned is not None and admin_fp != pinned:
            raise IntegrityError(f"key registry {where}: signed by admin key {admin_fp[:16]}, expected "
                                 f"{pinned[:16]} (the admin key was replaced)")
        if state_text is None:
            raise IntegrityError(f"key registry {where}: {STATE_FILE} is missing; expected the signed list of "
                                 "keys and revocations (a registry never loses it: restore it from a backup)")
        try:
            doc = json.loads(state_text)
            sig = bytes.fromhex(doc.pop("signature"))
            body = doc
            admin.verify(sig, _body_bytes(body), _ECDSA)
        except InvalidSignature:
            raise IntegrityError(f"key registry {where}: {STATE_FILE} does not verify with the admin key; "
                                 "it was changed without it") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError(f"key registry {where}: {STATE_FILE} is not a signed registry "
                                 "(expected JSON with a hex signature)") from None
        if body.get("format") != REGISTRY_FORMAT or not isinstance(body.get("seq"), int):
            raise IntegrityError(f"key registry {where}: {STATE_FILE} has format {body.get('format')!r}; "
                                 f"expected {REGISTRY_FORMAT!r}")
        if body["seq"] < self.seq:
            seen = f" (the highest this server loaded, kept in {self.seen_seq})" if self.seen_seq else ""
            raise IntegrityError(f"key registry {where}: {STATE_FILE} went back from seq {self.seq}{seen} to "
                                 f"{body['seq']} (an older copy was restored); keeping seq {self.seq}")
        records = {}
        for cid, entry in body["clients"].items():
            check_client_id(cid)
            key = load_public_pem(entry["public_key"], f"key registry {where}: client {cid!r}")
            records[cid] = KeyRecord(cid, key, False, str(entry["created"]))
        for cid, text in copies.items():
            if cid not in records or load_public_pem(text, f"key registry {where}: {cid}.pub.pem").public_numbers() \
                    != records[cid].public_key.public_numbers():
                raise IntegrityError(f"key registry {where}: {cid}.pub.pem is not the key the signed "
                                     f"{STATE_FILE} lists for {cid!r}; remove it or restore it")
        self._records, self.seq, self._admin_fp, self._stamp = records, body["seq"], admin_fp, stamp
        self._revoked_clients = set(body["revoked_clients"])
        self._revoked_keys = set(body["revoked_keys"])
        self._refresh_flags()
        self._write_seen()

    def _read_seen(self) -> int:
        """The highest seq recorded in ``seen_seq`` (0 when there is no such file yet)."""
        if self.seen_seq is None or not self.seen_seq.exists():
            return 0
        text = self.seen_seq.read_text().strip()
        if not text.isdigit():
            raise IntegrityError(f"key registry: {self.seen_seq} should hold the highest registry seq this server "
                                 f"loaded (a whole number), got {text[:40]!r}; restore it or remove it knowingly")
        return int(text)

    def _write_seen(self) -> None:
        if self.seen_seq is None or self._read_seen() >= self.seq:
            return
        self.seen_seq.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.seen_seq.with_name(self.seen_seq.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.seq}\n")
        os.replace(tmp, self.seen_seq)

    def save_dir(self, dir: str | Path, admin_key: ec.EllipticCurvePrivateKey | None = None) -> "KeyRegistry":
        """Copy every public key and revocation into a new signed folder; returns it."""
        return self._copy(KeyRegistry(dir=dir, admin_key=admin_key or self.admin_key))

    def save_sqlite(self, path: str | Path, admin_key: ec.EllipticCurvePrivateKey | None = None) -> "KeyRegistry":
        """Copy every public key and revocation into a new signed SQLite file; returns it."""
        return self._copy(KeyRegistry(db=path, admin_key=admin_key or self.admin_key))

    def _copy(self, out: "KeyRegistry") -> "KeyRegistry":
        out._records = {c: KeyRecord(c, r.public_key, False, r.created) for c, r in self._records.items()}
        out._revoked_clients, out._revoked_keys = set(self._revoked_clients), set(self._revoked_keys)
        out._refresh_flags()
        out._save()
        return out

    def __repr__(self) -> str:
        return f"KeyRegistry({self.location}, clients={len(self)})"


# ---------------------------------------------------------------------------- legacy registries
def read_legacy(path: str | Path) -> list[tuple[str, ec.EllipticCurvePublicKey, bool, str]]:
    """The clients of a registry written before signed revocations: (id, public key, revoked, created).

    A folder held ``<id>.pub.pem`` with ``<id>.meta.json`` ({"revoked", "created"}) and, next to them,
    private keys ``<id>.key.pem``; a SQLite file a table ``client_keys(client_id, public_pem,
    revoked, created)``. Nothing in it was signed, so the operator vouches for what is migrated."""
    p = Path(path)
    out = []
    if p.is_dir():
        for pub in sorted(p.glob("*.pub.pem")):
            cid = check_client_id(pub.name[:-len(".pub.pem")])
            meta_file = p / f"{cid}.meta.json"
            try:
                meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            except ValueError:
                raise DataError(f"legacy registry {p}: {meta_file.name} is not JSON") from None
            key = load_public_pem(pub.read_text(), f"legacy registry {p}: {pub.name}")
            out.append((cid, key, bool(meta.get("revoked", False)), str(meta.get("created", _now()))))
        return out
    try:
        with closing(sqlite3.connect(f"file:{p}?mode=ro", uri=True)) as con:
            rows = con.execute("SELECT client_id, public_pem, revoked, created FROM client_keys").fetchall()
    except sqlite3.Error as e:
        raise DataError(f"legacy registry {p}: expected a folder of <id>.pub.pem files or a SQLite file with "
                        f"table client_keys, got error: {e}") from None
    return [(check_client_id(c), load_public_pem(pem, f"legacy registry {p}: client {c!r}"), bool(r), str(t))
            for c, pem, r, t in rows]


def migrate_legacy(old: str | Path, admin_key: ec.EllipticCurvePrivateKey, *, dir: str | Path | None = None,
                   db: str | Path | None = None) -> KeyRegistry:
    """A new signed registry (``dir=`` or ``db=``) holding the public keys, creation times and
    revocations of the legacy registry at ``old``; its private keys are not carried over."""
    entries = read_legacy(old)
    new = Path(dir if dir is not None else db)
    if new.exists():
        raise PhalanxError(f"migrate: {new} already exists; expected a new registry path")
    legacy = KeyRegistry()
    legacy._records = {cid: KeyRecord(cid, key, False, created) for cid, key, _, created in entries}
    legacy._revoked_clients = {cid for cid, _, revoked, _ in entries if revoked}
    legacy._revoked_keys = {fingerprint(key) for _, key, revoked, _ in entries if revoked}
    return legacy._copy(KeyRegistry(dir=dir, db=db, admin_key=admin_key))
