"""``phalanx keys``: client key management (generate, list, revoke) over a KeyRegistry.

A registry is a folder of PEM files (``--dir``, default ``keys``) or a SQLite file (``--db``).
Errors print one line on stderr and exit with code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .keys import KeyRegistry
from .errors import PhalanxError

app = typer.Typer(help="Manage client signing keys (ECDSA P-256).", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

DirOpt = typer.Option(None, "--dir", help="Registry folder of <id>.pub.pem files (default: keys).")
DbOpt = typer.Option(None, "--db", help="Registry SQLite file (table client_keys).")


def _fail(msg: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {msg}", markup=False)
    raise typer.Exit(1)


def _open(dir: Optional[Path], db: Optional[Path], create: bool) -> KeyRegistry:
    if dir is not None and db is not None:
        _fail(f"expected one of --dir or --db, got both (--dir {dir}, --db {db})")
    if db is not None:
        return KeyRegistry(db=db, create=create)
    return KeyRegistry(dir=dir if dir is not None else Path("keys"), create=create)


@app.command()
def generate(client_ids: List[str] = typer.Argument(..., metavar="CLIENT_ID...", help="Ids to create keys for."),
             dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt,
             private_dir: Optional[Path] = typer.Option(
                 None, "--private-dir", help="Where private keys go (default: the --dir folder, or "
                 "the folder holding --db)."),
             force: bool = typer.Option(False, "--force", help="Replace existing keys.")) -> None:
    """Create a P-256 key pair per client: public key into the registry, private key (0600) to disk."""
    console = Console(highlight=False)
    try:
        reg = _open(dir, db, create=True)
        out = private_dir if private_dir is not None else (db.parent if db is not None else reg.dir)
        for cid in client_ids:
            if cid in reg and not force:
                raise PhalanxError(f"client {cid!r} already has a key in {reg.dir or reg.db}; "
                                   "expected a new id (or --force)")
        for cid in client_ids:
            reg.generate(cid, private_dir=out, overwrite=force)
            rec = reg.get(cid)
            console.print(f"{cid}  fingerprint {rec.fingerprint[:16]}  private key {out / (cid + '.key.pem')}")
    except (PhalanxError, OSError) as e:
        _fail(str(e))


@app.command("list")
def list_keys(dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt) -> None:
    """Show registered clients: id, key fingerprint, revoked, created."""
    try:
        reg = _open(dir, db, create=False)
    except (PhalanxError, OSError) as e:
        _fail(str(e))
    console = Console(highlight=False)
    if not len(reg):
        console.print(f"no keys in {reg.dir or reg.db}")
        return
    table = Table(title=f"client keys in {reg.dir or reg.db}")
    for col in ("client_id", "fingerprint", "revoked", "created"):
        table.add_column(col, no_wrap=True)
    for rec in reg.list():
        table.add_row(rec.client_id, rec.fingerprint[:16], "yes" if rec.revoked else "no", rec.created)
    console.print(table)


@app.command()
def revoke(client_id: str = typer.Argument(..., metavar="CLIENT_ID"),
           dir: Optional[Path] = DirOpt, db: Optional[Path] = DbOpt) -> None:
    """Mark a client's key revoked: the verify layer rejects its updates from the next round on."""
    try:
        reg = _open(dir, db, create=False)
        reg.revoke(client_id)
    except (PhalanxError, OSError) as e:
        _fail(str(e))
    Console(highlight=False).print(f"revoked {client_id} in {reg.dir or reg.db}")


if __name__ == "__main__":  # pragma: no cover
    app()
