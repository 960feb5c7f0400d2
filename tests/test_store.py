import pytest

from phalanx.errors import PhalanxError
from phalanx.store import Store


def test_round_trip_and_append(tmp_path):
    path = tmp_path / "r.db"
    with Store(path) as s:
        rid = s.start_run({"name": "a", "seed": 1}, name="a", seed=1)
        s.log_round(rid, 0, {"accuracy": 0.5, "loss": 1.2, "seconds": 0.1, "det_precision": None,
                             "weird": float("nan")})
        s.log_clients(rid, 0, [{"client_id": "c0", "malicious": True, "norm": 2.0, "weight": 0.0,
                                "cosine": -0.9, "flags": ["nonfinite"], "reputation": 0.2}])
        s.log_event(rid, 0, "rollback", {"to": 0})
    with Store(path) as s:  # reopened: append a second run
        rid2 = s.start_run({"name": "b"}, name="b", seed=2)
        s.log_round(rid2, 0, {"accuracy": 0.7})
        s.finish_run(rid2, {"accuracy": 0.7})
        runs = {r["run_id"]: r for r in s.runs()}
        assert set(runs) == {rid, rid2}
        assert runs[rid]["status"] == "running" and runs[rid2]["status"] == "done"
        rec = s.read_run(rid)
        assert rec.config == {"name": "a", "seed": 1} and rec.seed == 1
        assert "torch" in rec.versions and "python" in rec.versions
        assert rec.rounds == [{"round": 0, "accuracy": 0.5, "loss": 1.2, "seconds": 0.1,
                               "det_precision": None, "weird": None}]
        (row,) = s.client_rows(rid)
        assert row["malicious"] is True and row["flags"] == ["nonfinite"] and row["reputation"] == 0.2
        assert s.events(rid) == [{"round": 0, "kind": "rollback", "to": 0}]
        assert s.read_run(rid2).final == {"accuracy": 0.7}


def test_unknown_run_and_corrupt_file(tmp_path):
    with Store(tmp_path / "r.db") as s:
        with pytest.raises(PhalanxError, match="no run with id 'zzz'"):
            s.read_run("zzz")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(PhalanxError, match="not a phalanx results store"):
        Store(bad)
