"""The report on a fraud grid ticks AUPRC against the clean run's AUPRC, not accuracy."""

import pytest

from phalanx.bench import parse_grid, run_grid
from phalanx.report.tables import entry, headline, legend, load_results, summarize
from phalanx.store import Store

GRID = {
    "name": "fraudrep",
    "base": {"data": {"dataset": "fraud-synth", "partition": "silo",
                      "params": {"banks": 4, "rows": 12000, "min_rows": 1500}},
             "model": {"name": "tabular_logreg", "params": {"loss": "weighted", "pos_weight": 5}},
             "federation": {"num_clients": 4, "rounds": 2, "batch_size": 64, "lr": 0.1, "local_steps": 5}},
    "byzantine": [1],
    "attacks": {"clean": {"family": "none"}, "gauss": {"family": "random", "name": "gaussian", "params": {"scale": 3.0}},
                "trigger": {"family": "backdoor", "poison": "feature_trigger"}},
    "defenses": {"mean": ["mean"], "median": ["median"]},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("fr") / "fr.db"
    out = run_grid(parse_grid(GRID), path, workers=1)
    assert out.ran == 6 and not out.failed
    return load_results(Store(path))


def test_binary_task_ticks_auprc(results):
    (scenario,) = results.scenarios
    assert results.metric(scenario) == "auprc"
    clean = [r for r in results.runs if r.attack == "clean" and r.defense == "mean"][0]
    e = entry(results, scenario, "gauss", "median")
    assert e.metric == "auprc"
    assert e.reference == pytest.approx(clean.final("auprc"))  # the clean FedAvg run's AUPRC
    gauss = [r for r in results.runs if r.attack == "gauss" and r.defense == "median"][0]
    assert e.acc.mean == pytest.approx(gauss.final("auprc"))
    assert gauss.final("auprc") != pytest.approx(gauss.final("accuracy"))
    drop = round((e.reference - e.acc.mean) * 100, 6)
    assert e.tick == ("held" if drop <= 5 else "partial" if drop <= 20 else "broken")
    bd = entry(results, scenario, "trigger", "mean")
    assert bd.asr is not None and bd.tick in ("held", "partial", "broken")


def test_table_and_legend_say_auprc(results):
    rows = summarize(results)
    cols, text, _ = headline(results, rows)
    assert any("AUPRC" in cell for row in text for cell in row)
    assert "tick AUPRC" in legend(results)
