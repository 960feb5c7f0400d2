"""``phalanx keys``: client key management over a signed KeyRegistry (see ``phalanx.keys``).

    phalanx keys init     --dir registry --admin-key admin/admin.key.pem
    phalanx keys generate bank-a bank-b --dir registry --admin-key admin/admin.key.pem --private-dir out/
    phalanx keys list     --dir registry
    phalanx keys revoke   bank-b --dir registry --admin-key admin/admin.key.pem
    phalanx keys rotate   bank-a --dir registry --admin-key admin/admin.key.pem --private-dir out/
    phalanx keys migrate  old-keys --dir registry --admin-key admin/admin.key.pem

A registry is a folder (``--dir``, default ``keys``) or a SQLite file (``--db``) of public keys
and revocations, signed by the admin key. Private keys go where ``--private-dir`` says, never into
the registry (each client's ``<id>.key.pem``, 0600, to hand to that client only). ``--admin-key``
may also come from ``$PHALANX_ADMIN_KEY``. Errors print one line on stderr and exit with code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import PhalanxError
from ..keys import (KeyRegistry, _inside, fingerprint, load_private_key, migrate_legacy, new_private_key,
                    write_private_key)

app = typer.Typer(help="Manage client signing keys (ECDSA P-256) in a registry signed by an admin key.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

DirOpt = typer.Option(None, "--dir", help="Registry folder (default: keys).")
DbOpt = typer.Option(None, "--db", help="Registry SQLite file.")
AdminOpt = typer.Option(..., "--admin-key", envvar="PHALANX_ADMIN_KEY",
                        help="The admin's private key (PEM, 0600), which signs every change.")
PrivOpt = typer.Option(..., "--private-dir", help="Where the clients' private keys are written (<id>.key.pem, "
                       "0600); outside the registry. Hand each file to its client only.")
PinOpt = typer.Option(None, "--admin-fingerprint", help="Refuse a registry not signed by this admin key "
                      "(its SHA-256 fingerprint, or a prefix of at least 16 hex characters).")


def _fail(msg: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {msg}", markup=False)
    raise typer.Exit(1)


def _path(dir: Optional[Path], db: Optional[Path]) -> tuple[str, Path]:
    if dir is not None and db is not None:
        _fail(f"expected one of --dir or --db, got both (--dir {dir}, --db {db})")
    return ("db", db) if db is not None else ("dir", dir if dir is not None else Path("keys"))


def _open(dir: Optional[Path], db: Optional[Path], admin_key: Optional[Path] = None,
          pin: Optional[str] = None) -> KeyRegistry:
    kind, path = _path(dir, db)
    key = load_private_key(admin_key) if admin_key is not None else None
    reg = KeyRegistry(**{kind: path}, create=False, admin_key=key)
    if pin is not None:
        pin = pin.lower()
        if len(pin) < 16 or not (reg.admin_public_fingerprint or "").startswith(pin):
            raise PhalanxError(f"registry {path} is signed by admin key {(reg.admin_public_fingerprint or '')[:16]}, "
                               f"expected {pin[:16]}")
    return reg


@app.command()
def init(dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt, admin_key: Path = AdminOpt) -> None:
    """Create an empty registry signed by the admin key (made at --admin-key when missing)."""
    console = Console(highlight=False)
    try:
        kind, path = _path(dir, db)
        if path.exists():
            raise PhalanxError(f"{path} already exists; expected a new registry path")
        if kind == "dir" and _inside(admin_key, path):
            raise PhalanxError(f"--admin-key {admin_key} is inside the registry {path}; keep it elsewhere")
        if admin_key.exists():
            key = load_private_key(admin_key)
        else:
            key = new_private_key()
            write_private_key(admin_key, key)
            console.print(f"admin key {admin_key} (0600): keep it offline; it signs every change")
        reg = KeyRegistry(**{kind: path}, admin_key=key)
        console.print(f"registry {path}  admin fingerprint {fingerprint(key.public_key())}  seq {reg.seq}")
    except (PhalanxError, OSError) as e:
        _fail(str(e))


@app.command()
def generate(client_ids: List[str] = typer.Argument(..., metavar="CLIENT_ID...", help="Ids to create keys for."),
             dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt, admin_key: Path = AdminOpt,
             private_dir: Path = PrivOpt,
             force: bool = typer.Option(False, "--force", help="Replace existing keys (prefer rotate).")) -> None:
    """Create a P-256 key pair per client: public key into the registry, private key to --private-dir."""
    console = Console(highlight=False)
    try:
        reg = _open(dir, db, admin_key)
        for cid in client_ids:
            if cid in reg and not force:
                raise PhalanxError(f"client {cid!r} already has a key in {reg.location}; expected a new id "
                                   "(or rotate, or --force)")
        for cid in client_ids:
            reg.generate(cid, private_dir=private_dir, overwrite=force)
            console.print(f"{cid}  fingerprint {reg.get(cid).fingerprint[:16]}  private key "
                          f"{private_dir / (cid + '.key.pem')}")
    except (PhalanxError, OSError) as e:
        _fail(str(e))


@app.command("list")
def list_keys(dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt,
              admin_fingerprint: Optional[str] = PinOpt) -> None:
    """Check the registry's signature and show its clients: id, key fingerprint, revoked, created."""
    try:
        reg = _open(dir, db, pin=admin_fingerprint)
    except (PhalanxError, OSError) as e:
        _fail(str(e))
    console = Console(highlight=False)
    console.print(f"registry {reg.location}: signed by admin key {reg.admin_public_fingerprint}, seq {reg.seq}, "
                  f"{len(reg.revoked_fingerprints())} revoked key(s)")
    if not len(reg):
        console.print(f"no keys in {reg.location}")
        return
    table = Table(title=f"client keys in {reg.location}")
    for col in ("client_id", "fingerprint", "revoked", "created"):
        table.add_column(col, no_wrap=True)
    for rec in reg.list():
        table.add_row(rec.client_id, rec.fingerprint[:16], "yes" if rec.revoked else "no", rec.created)
    console.print(table)


@app.command()
def revoke(client_id: str = typer.Argument(..., metavar="CLIENT_ID"),
           dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt, admin_key: Path = AdminOpt) -> None:
    """Revoke a client and its key: the verify layer rejects its updates from the next round on."""
    try:
        reg = _open(dir, db, admin_key)
        reg.revoke(client_id)
    except (PhalanxError, OSError) as e:
        _fail(str(e))
    Console(highlight=False).print(f"revoked {client_id} in {reg.location} (seq {reg.seq})")


@app.command()
def rotate(client_id: str = typer.Argument(..., metavar="CLIENT_ID"),
           dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt, admin_key: Path = AdminOpt,
           private_dir: Path = PrivOpt) -> None:
    """Give a client a new key pair; its old key is revoked for good (a revoked client is readmitted)."""
    try:
        reg = _open(dir, db, admin_key)
        old = reg.get(client_id).fingerprint if client_id in reg else None
        reg.rotate(client_id, private_dir=private_dir)
    except (PhalanxError, OSError) as e:
        _fail(str(e))
    Console(highlight=False).print(f"rotated {client_id}: old key {old[:16]} revoked, new key "
                                   f"{reg.get(client_id).fingerprint[:16]}, private key "
                                   f"{private_dir / (client_id + '.key.pem')}")


@app.command()
def migrate(old: Path = typer.Argument(..., metavar="OLD", help="A registry from before signed revocations: "
                                       "a folder of <id>.pub.pem + <id>.meta.json, or a SQLite file."),
            dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt, admin_key: Path = AdminOpt) -> None:
    """Copy an unsigned legacy registry's public keys and revocations into a new signed one."""
    console = Console(highlight=False)
    try:
        if not old.exists():
            raise PhalanxError(f"expected an existing legacy registry, got missing path {old}")
        kind, path = _path(dir, db)
        reg = migrate_legacy(old, load_private_key(admin_key), **{kind: path})
    except (PhalanxError, OSError) as e:
        _fail(str(e))
    revoked = sum(r.revoked for r in reg.list())
    console.print(f"registry {reg.location}: {len(reg)} client(s), {revoked} revoked, signed by admin key "
                  f"{reg.admin_public_fingerprint[:16]} (seq {reg.seq})")
    private = sorted(old.glob("*.key.pem")) if old.is_dir() else []
    if private:
        console.print(f"{len(private)} private key(s) still sit in {old} ({', '.join(p.name for p in private[:3])}"
                      f"{', ...' if len(private) > 3 else ''}): hand each to its client only, then delete them there")


if __name__ == "__main__":  # pragma: no cover
    app()
