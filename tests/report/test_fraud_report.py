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
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("fr") / "fr.db"
    out = run_grid(parse_grid(GRID), path, workers=1)
    assert out.ran == 6 and not out.failed
    return path


@pytest.fixture(scope="module")
def results(db):
    return load_results(Store(db))


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


@pytest.fixture(scope="module")
def drawn(db, draw_figures):
    return draw_figures(db)


def test_figures_plot_auprc_not_accuracy(drawn):
    figs, rep = drawn
    res = rep.results
    (scenario,) = res.scenarios
    assert not any("accuracy" in k for k in figs), list(figs)
    # per-round curves: each defense's line is its runs' AUPRC, labelled so
    curves = figs["curves-auprc"]
    panels = {ax.get_title(): ax for ax in curves.axes if ax.get_visible()}
    assert panels["clean"].get_ylabel() == "test AUPRC"
    for attack, ax in panels.items():
        for line in ax.get_lines():
            (run,) = res.group(scenario, attack, line.get_label())
            auprc, acc = run.series("auprc"), run.series("accuracy")
            assert list(line.get_ydata()) == pytest.approx(auprc), (attack, line.get_label())
            assert list(line.get_ydata()) != pytest.approx(acc)
    # heatmap: titled AUPRC, each printed value the cell's final AUPRC
    key = next(k for k in figs if k.startswith("heatmap-auprc"))
    ax = figs[key].axes[0]
    assert ax.get_title() == "AUPRC (%)"
    attacks = [t.get_text() for t in ax.get_xticklabels()]
    by_label = {row.label: row.defense for row in rep.rows}  # a row label may add the f its stages assumed
    defenses = [by_label[t.get_text()] for t in ax.get_yticklabels()]
    for text in ax.texts:
        j, i = (round(v) for v in text.get_position())
        (run,) = res.group(scenario, attacks[j], defenses[i])
        assert text.get_text() == f"{100 * run.final('auprc'):.1f}%"


def test_runs_report_has_an_auprc_curve(db, tmp_path):
    from phalanx.report.runs import write_runs_report

    page = write_runs_report(db, tmp_path).html.read_text()
    assert 'id="runs-auprc"' in page and "Test AUPRC per round" in page
