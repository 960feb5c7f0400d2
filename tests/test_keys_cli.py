"""`phalanx keys`: generate, list and revoke over a PEM folder and a SQLite file; clean errors."""

import stat

import pytest
from typer.testing import CliRunner

from phalanx.defenses.signing import KeyRegistry
from phalanx.keys_cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _ok(*args):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def _fails(*args, match):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output
    assert "Traceback" not in res.output


def test_generate_list_revoke_in_a_folder(tmp_path):
    out = _ok("generate", "bank-a", "bank-b")  # default folder: ./keys
    assert "bank-a" in out and "bank-b" in out
    for cid in ("bank-a", "bank-b"):
        assert stat.S_IMODE((tmp_path / "keys" / f"{cid}.key.pem").stat().st_mode) == 0o600
        assert (tmp_path / "keys" / f"{cid}.pub.pem").exists()
    reg = KeyRegistry.open(tmp_path / "keys")
    listing = _ok("list", "--dir", "keys")
    for col in ("client_id", "fingerprint", "revoked", "created"):
        assert col in listing
    assert reg.get("bank-a").fingerprint[:16] in listing
    _ok("revoke", "bank-a", "--dir", "keys")
    rows = {line.split("│")[1].strip(): line for line in _ok("list").splitlines() if "bank-" in line}
    assert "yes" in rows["bank-a"] and "no" in rows["bank-b"]
    assert KeyRegistry.open(tmp_path / "keys").get("bank-a").revoked


def test_generate_list_revoke_in_sqlite(tmp_path):
    _ok("generate", "c1", "c2", "--db", "reg.db", "--private-dir", "private")
    assert stat.S_IMODE((tmp_path / "private" / "c1.key.pem").stat().st_mode) == 0o600
    _ok("revoke", "c2", "--db", "reg.db")
    reg = KeyRegistry.open(tmp_path / "reg.db")
    assert [(r.client_id, r.revoked) for r in reg.list()] == [("c1", False), ("c2", True)]
    assert "c2" in _ok("list", "--db", "reg.db")


def test_errors_are_one_line_and_exit_1():
    _ok("generate", "a")
    _fails("generate", "a", match="client 'a' already has a key")
    _fails("generate", "../evil", match="client_id: expected")
    _fails("revoke", "zz", match="unknown client 'zz'; known: a")
    _fails("list", "--db", "missing.db", match="got missing path missing.db")
    _fails("list", "--dir", "keys", "--db", "x.db", match="expected one of --dir or --db, got both")
    _ok("generate", "a", "--force")
