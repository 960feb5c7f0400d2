"""The layered defense inside the round loop: signing, recovery, reputation, stored reasons."""

import torch

from phalanx.config import parse_config
from phalanx.federation import Federation, Hooks
from phalanx.store import Store


def test_signed_round_rejects_a_tampered_row_and_keeps_the_rest(tiny_config, tmp_path):
    tiny_config["federation"].update(signing=True, rounds=2)
    tiny_config["defense"] = ["verify", "validate", "mean"]

    def tamper(U, ctx):  # a man in the middle alters client 1's update after it was signed
        U[1] += 0.5

    fed = Federation(parse_config(tiny_config), hooks=Hooks(before_aggregate=[tamper]))
    store = Store(tmp_path / "r.db")
    fed.run(store)
    rows = store.client_rows(fed.run_id)
    flagged = {(r["round"], r["client_id"]): r["flags"] for r in rows if r["flags"]}
    assert flagged == {(0, "client001"): ["verify:digest_mismatch"], (1, "client001"): ["verify:digest_mismatch"]}
    assert all(r["weight"] > 0 for r in rows if r["client_id"] != "client001")
    rounds = store.read_run(fed.run_id).rounds
    assert all(r["sign_seconds"] > 0 for r in rounds)
    assert all("validate_score" in r for r in rows)  # what the validation layer saw (robust z)


def test_recovery_rolls_back_a_poisoned_round(tiny_config, tmp_path):
    tiny_config["federation"].update(rounds=6, num_clients=8, server_data=200)
    tiny_config["attack"] = {"name": "scaling", "params": {"factor": -50.0}, "byzantine": 2, "rounds": [4]}
    plain = Federation(parse_config(tiny_config))
    plain_final = plain.run()
    tiny_config["federation"]["recovery_drop"] = 0.05
    fed = Federation(parse_config(tiny_config))
    store = Store(tmp_path / "r.db")
    final = fed.run(store)
    events = store.events(fed.run_id)
    assert [e["kind"] for e in events] == ["rollback"] and events[0]["round"] == 4
    bad = {cid for cid, m in zip(fed.client_ids, fed.malicious.tolist()) if m}
    assert bad <= set(events[0]["excluded"])
    assert final["accuracy"] > plain_final["accuracy"] + 0.2


def test_reputation_in_a_run_quarantines_attackers(tiny_config):
    tiny_config["federation"].update(rounds=6, num_clients=10)
    tiny_config["attack"] = {"name": "sign_flip", "byzantine": 2}
    tiny_config["defense"] = ["validate", "median", "reputation"]  # reputation may follow the aggregator
    tiny_config["defense_f"] = 2  # auto would assume floor((10 - 3) / 4) = 1: at most one quarantined
    fed = Federation(parse_config(tiny_config))
    final = fed.run()
    assert final["quarantined_attackers"] == 2 and final["rounds_to_quarantine"] <= 3
    rep = fed.defense.layers[-1]
    assert rep.name == "reputation"
    assert not (rep.quarantined - {c for c, m in zip(fed.client_ids, fed.malicious.tolist()) if m})


def test_attackers_simulate_the_server_without_its_signature_check(tiny_config):
    # Byzantine clients sign with valid keys, so verify passes their rows. An attacker that simulated
    # verify (with no envelopes) saw every row rejected, and optimal ALIE settled on z = 0.
    tiny_config["federation"].update(num_clients=10, rounds=2)
    tiny_config["attack"] = {"name": "alie", "byzantine": 2, "params": {"variant": "optimal"}}
    found = {}
    for signing, defense in ((False, ["median"]), (True, ["verify", "median"])):
        tiny_config["federation"]["signing"] = signing
        tiny_config["defense"] = defense
        fed = Federation(parse_config(tiny_config))
        assert [s.name for s in fed.defense.as_attackers_see_it().stages] == ["median"]
        fed.run()
        found[signing] = fed.attack.last["z"]
    assert found[True] == found[False] > 0
