"""`phalanx keys`: init, generate, list, revoke and rotate over a signed folder and a SQLite file;
private keys only where the operator says; clean one-line errors."""

import json
import stat

import pytest
from typer.testing import CliRunner

from phalanx.defenses.signing import KeyRegistry
from phalanx.cli.keys import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHALANX_ADMIN_KEY", raising=False)


def _ok(*args, env=None):
    res = runner.invoke(app, list(args), env=env)
    assert res.exit_code == 0, res.output
    return res.output


def _fails(*args, match):
    res = runner.invoke(app, list(args))
    assert res.exit_code != 0, res.output
    lines = res.output.strip().splitlines()
    assert "Traceback" not in res.output
    if res.exit_code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output
    else:  # typer's own usage error (a missing required option)
        assert match in res.output, res.output


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


ADMIN = ("--admin-key", "admin/admin.key.pem")


def test_init_generate_list_revoke_rotate_in_a_folder(tmp_path):
    out = _ok("init", *ADMIN)  # default folder: ./keys
    assert "admin fingerprint" in out and _mode(tmp_path / "admin" / "admin.key.pem") == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    out = _ok("generate", "bank-a", "bank-b", *ADMIN, "--private-dir", "out")
    assert "bank-a" in out and "bank-b" in out
    for cid in ("bank-a", "bank-b"):
        assert _mode(tmp_path / "out" / f"{cid}.key.pem") == 0o600
        assert _mode(tmp_path / "keys" / f"{cid}.pub.pem") == 0o644
    assert not list((tmp_path / "keys").glob("*.key.pem"))  # no private key in the registry
    reg = KeyRegistry.open(tmp_path / "keys")
    listing = _ok("list", "--dir", "keys")
    for col in ("client_id", "fingerprint", "revoked", "created", "signed by admin key", "seq 3"):
        assert col in listing
    assert reg.get("bank-a").fingerprint[:16] in listing
    _ok("revoke", "bank-a", *ADMIN, env={"PHALANX_ADMIN_KEY": "admin/admin.key.pem"})
    rows = {line.split("│")[1].strip(): line for line in _ok("list").splitlines() if "bank-" in line}
    assert "yes" in rows["bank-a"] and "no" in rows["bank-b"]
    old = reg.get("bank-b").fingerprint
    out = _ok("rotate", "bank-b", "--private-dir", "out", env={"PHALANX_ADMIN_KEY": "admin/admin.key.pem"})
    assert f"old key {old[:16]} revoked" in out
    after = KeyRegistry.open(tmp_path / "keys")
    assert after.get("bank-a").revoked and not after.get("bank-b").revoked
    assert after.get("bank-b").fingerprint != old and old in after.revoked_fingerprints()
    pin = after.admin_public_fingerprint
    assert "bank-b" in _ok("list", "--admin-fingerprint", pin[:16])
    _fails("list", "--admin-fingerprint", "0" * 16, match="expected 0000000000000000")


def test_in_sqlite(tmp_path):
    _ok("init", "--db", "reg.db", *ADMIN)
    _ok("generate", "c1", "c2", "--db", "reg.db", *ADMIN, "--private-dir", "private")
    assert _mode(tmp_path / "private" / "c1.key.pem") == 0o600 and _mode(tmp_path / "reg.db") == 0o644
    _ok("revoke", "c2", "--db", "reg.db", *ADMIN)
    reg = KeyRegistry.open(tmp_path / "reg.db")
    assert [(r.client_id, r.revoked) for r in reg.list()] == [("c1", False), ("c2", True)]
    assert "c2" in _ok("list", "--db", "reg.db")


def test_errors_are_one_line_and_exit_1(tmp_path):
    _ok("init", *ADMIN)
    _fails("init", *ADMIN, match="keys already exists")
    _fails("generate", "a", *ADMIN, match="--private-dir")  # required: no default next to the registry
    _fails("generate", "a", *ADMIN, "--private-dir", "keys", match="inside the registry")
    _fails("generate", "a", "--private-dir", "out", match="--admin-key")
    _ok("generate", "a", *ADMIN, "--private-dir", "out")
    _fails("generate", "a", *ADMIN, "--private-dir", "out", match="client 'a' already has a key")
    _fails("generate", "../evil", *ADMIN, "--private-dir", "out", match="client_id: expected")
    _fails("revoke", "zz", *ADMIN, match="unknown client 'zz'; known: a")
    _fails("list", "--db", "missing.db", match="got missing path missing.db")
    _fails("list", "--dir", "keys", "--db", "x.db", match="expected one of --dir or --db, got both")
    _fails("init", "--dir", "k2", "--admin-key", "k2/admin.key.pem", match="inside the registry")
    (tmp_path / "other.key.pem").write_text("x")
    (tmp_path / "other.key.pem").chmod(0o600)
    _fails("revoke", "a", "--admin-key", "other.key.pem", match="expected an unencrypted PEM key")
    _ok("init", "--dir", "k3", "--admin-key", "admin2.key.pem")
    _fails("revoke", "a", "--admin-key", "admin2.key.pem", match="admin key given is not the registry's")
    (tmp_path / "keys").chmod(0o777)
    _fails("list", match="world-writable")
    (tmp_path / "keys").chmod(0o700)
    _ok("generate", "a", *ADMIN, "--private-dir", "out", "--force")


def _legacy_folder(path, clients):
    """A registry as written before signed revocations: <id>.pub.pem, <id>.meta.json, <id>.key.pem."""
    from phalanx.keys import new_private_key, public_pem, write_private_key

    path.mkdir()
    for cid, revoked in clients.items():
        key = new_private_key()
        (path / f"{cid}.pub.pem").write_text(public_pem(key.public_key()))
        (path / f"{cid}.meta.json").write_text(json.dumps({"revoked": revoked, "created": "2026-01-01T00:00:00Z"}))
        write_private_key(path / f"{cid}.key.pem", key)


def test_migrate_a_legacy_folder_and_sqlite_file(tmp_path):
    import sqlite3

    from phalanx.keys import new_private_key, write_private_key

    _legacy_folder(tmp_path / "old", {"bank-a": False, "bank-b": True})
    write_private_key(tmp_path / "admin.key.pem", new_private_key())
    out = _ok("migrate", "old", "--dir", "keys", "--admin-key", "admin.key.pem")
    assert "2 client(s), 1 revoked" in out and "2 private key(s) still sit in old" in out
    reg = KeyRegistry.open(tmp_path / "keys")
    assert [(r.client_id, r.revoked, r.created) for r in reg.list()] == [
        ("bank-a", False, "2026-01-01T00:00:00Z"), ("bank-b", True, "2026-01-01T00:00:00Z")]
    assert reg.get("bank-b").fingerprint in reg.revoked_fingerprints()
    assert not list((tmp_path / "keys").glob("*.key.pem"))  # private keys are not carried over
    with sqlite3.connect(tmp_path / "old.db") as con:
        con.execute("CREATE TABLE client_keys (client_id TEXT, public_pem TEXT, revoked INTEGER, created TEXT)")
        con.execute("INSERT INTO client_keys VALUES (?, ?, 1, 't0')",
                    ("c1", (tmp_path / "old" / "bank-a.pub.pem").read_text()))
    _ok("migrate", "old.db", "--db", "new.db", "--admin-key", "admin.key.pem")
    assert [(r.client_id, r.revoked) for r in KeyRegistry.open(tmp_path / "new.db").list()] == [("c1", True)]
    _fails("migrate", "old", "--dir", "keys", "--admin-key", "admin.key.pem", match="already exists")
    _fails("migrate", "nowhere", "--dir", "k2", "--admin-key", "admin.key.pem", match="missing path nowhere")
