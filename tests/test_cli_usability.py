"""`phalanx list`, `show`, `export`, `report` on a store of plain runs, and `invert`'s progress bar."""

import csv
import io
import json
import re

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from phalanx.catalog import sections, stage_kind
from phalanx.cli import app, metric, runs_table
from phalanx.registry import ATTACKS, DATASETS, DEFENSES, MODELS, POISONS, Param, first_sentence, format_params
from phalanx.store import Store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two plain runs of a tiny config: one under a sign-flip attack, one clean."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 3, "data": {"dataset": "digits"}, "model": {"name": "logreg"},
        "federation": {"num_clients": 6, "rounds": 3, "batch_size": 16, "lr": 0.1},
        "attack": {"name": "sign_flip", "byzantine": 2}, "defense": ["validate", "median"]}))
    db = tmp / "runs.db"
    for extra in ([], ["--set", "attack.name=null", "--set", "attack.byzantine=0"]):
        r = runner.invoke(app, ["run", str(cfg), "--db", str(db), "--quiet", *extra])
        assert r.exit_code == 0, r.output
    return db


# ---------------------------------------------------------------- list


@pytest.mark.parametrize("text, first", [
    ("Fashion-MNIST (Xiao et al. 2017): 60k/10k images. More here.", "Fashion-MNIST (Xiao et al. 2017): 60k/10k images."),
    ("Weighted mean (FedAvg). f is not used.", "Weighted mean (FedAvg)."),
    ("Clip, e.g. to 1.5 or\n``auto``, per row.\n\nDetails.", "Clip, e.g. to 1.5 or auto, per row."),
    ("No full stop here", "No full stop here"),
    ("Mimic (Karimireddy, He & Jaggi, ICLR 2022): copy row j. Later.", "Mimic (Karimireddy, He & Jaggi, ICLR 2022): copy row j."),
    (None, ""),
])
def test_first_sentence_is_whole(text, first):
    assert first_sentence(text) == first


def test_defaults_are_written_as_in_yaml():
    params = (Param("path", required=True), Param("silo", None), Param("check", True), Param("rate", (0.001, 0.02)),
              Param("max_norm", "auto"), Param("eta", 0.2), Param("params", variadic=True))
    assert format_params(params) == ("path (required), silo=null, check=true, rate=[0.001, 0.02], max_norm=auto, "
                                     "eta=0.2, **params")


def test_every_description_is_a_complete_first_sentence():
    import inspect

    for reg in (DATASETS, MODELS, ATTACKS, POISONS, DEFENSES):
        for e in reg.entries():
            doc = " ".join(re.sub(r"``(.+?)``", r"\1", inspect.getdoc(e.factory) or "").split("\n\n")[0].split())
            assert e.description, f"{reg.kind} {e.name}: no docstring"
            assert doc.startswith(e.description), f"{reg.kind} {e.name}: {e.description!r} is not its docstring's start"
            assert e.description[-1] in ".!?" or e.description == doc, f"{reg.kind} {e.name}: cut mid-sentence"


def test_user_facing_parameters_only():
    assert [p.name for p in MODELS.params("cnn")] == ["width"]
    assert [p.name for p in DEFENSES.params("krum")] == []
    assert "f" in [p.name for p in DEFENSES.params("krum", internal=True)]
    assert [p.name for p in POISONS.params("label_flip")] == ["mapping"]


def test_stages_are_grouped_by_kind():
    assert stage_kind("clip") == "layer" and stage_kind("krum") == "aggregator" and stage_kind("central_dp") == "post"
    assert stage_kind("grad_noise") == "layer" and stage_kind("weak_dp") == "post"  # found by building them
    titles = [s.title for s in sections()]
    order = ["Datasets", "Models", "Attacks, random", "Attacks, adaptive", "Attacks, backdoor", "Attacks, malformed",
             "Data poisons, random", "Data poisons, backdoor", "Layers", "Aggregators", "Post steps"]
    assert [t for t in titles if t in order] == order and "Other defense stages" not in titles
    where = {e.name: s.title for s in sections() for e in s.entries}
    assert where["alie"] == "Attacks, adaptive" and where["nonfinite"] == "Attacks, malformed"
    assert where["pixel_trigger"] == "Data poisons, backdoor" and where["reputation"] == "Layers"


def test_list_output_at_80_columns():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0, r.output
    out, note = r.output.split("Defaults are shown as in YAML.")
    assert "in_shape and num_classes" in note and "defense_f" in note
    for title in ("Datasets", "Models", "Attacks, adaptive", "Data poisons, backdoor", "Layers", "Aggregators",
                  "Post steps"):
        assert title in out
    assert "…" not in out and "in_shape=" not in out and "num_classes=" not in out and "'float'" not in out
    assert "Krum (Blanchard et al. 2017): the row with the lowest Krum score; n > 2f + 2." in " ".join(out.split())
    assert "max_norm=auto" in out and "z_threshold=3.5, check_norms=true" in " ".join(out.split())
    r = runner.invoke(app, ["list", "aggregators"])
    assert r.exit_code == 0 and "krum" in r.output and "fashion-mnist" not in r.output
    r = runner.invoke(app, ["list", "stages"])
    assert r.exit_code == 1 and "KIND must be one of" in r.output


# ---------------------------------------------------------------- show


def test_show_is_readable_at_80_columns(store, tmp_path):
    db = tmp_path / "many.db"
    s = Store(db)
    a = s.start_run({}, "grid/a-very-long-attack-label/a-long-defense-label/s0", 0)
    s.finish_run(a, {"accuracy": 0.8731, "asr": 0.031, "epsilon": 2.5, "defense_f": 3})
    b = s.start_run({}, "killed", 1)
    s.finish_run(b, {"error": "interrupted", "round": 4}, status="interrupted")
    s.close()
    con = Console(file=io.StringIO(), width=80, record=True)
    con.print(runs_table(Store(db).runs() + Store(store).runs(), "the runs"))
    text = con.export_text()
    assert "…" not in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("run"))
    for col in ("run", "name", "seed", "status", "started", "min", "accuracy"):
        assert re.search(rf"\b{col}\b", header), (col, header)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "87.3%" in text and "asr 3.1%" in text and "interrupted" in text and "epsilon 2.5" in text
    r = runner.invoke(app, ["show", str(store)])
    assert r.exit_code == 0 and "%" in r.output and "…" not in r.output


def test_metric_formats_rates_as_percentages():
    assert metric("accuracy", 0.8731) == "87.3%" and metric("asr_raw", 0.5) == "50.0%"
    assert metric("auprc", 0.25) == "25.0%" and metric("loss", 0.73921) == "0.739" and metric("defense_f", 3) == "3"
    assert metric("accuracy", None) == "-"


# ---------------------------------------------------------------- export


def test_export_csv_and_json(store, tmp_path):
    s = Store(store)
    runs, n_rounds = s.runs(), s.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
    n_clients = s.db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]
    r = runner.invoke(app, ["export", str(store), "--format", "csv", "--out", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    rows = {t: list(csv.DictReader(open(tmp_path / "csv" / f"{t}.csv"))) for t in ("runs", "rounds", "clients")}
    assert len(rows["runs"]) == len(runs) and len(rows["rounds"]) == n_rounds and len(rows["clients"]) == n_clients
    assert {float(x["final_accuracy"]) for x in rows["runs"]} == {x["final"]["accuracy"] for x in runs}
    assert "accuracy" in rows["rounds"][0] and "validate_score" in rows["clients"][0]
    assert json.loads(rows["runs"][0]["config"])["data"]["dataset"] == "digits"
    r = runner.invoke(app, ["export", str(store), "--format", "json", "--out", str(tmp_path / "json")])
    assert r.exit_code == 0, r.output
    data = {t: json.loads((tmp_path / "json" / f"{t}.json").read_text()) for t in ("runs", "rounds", "clients", "events")}
    assert len(data["runs"]) == len(runs) and len(data["clients"]) == n_clients
    assert data["runs"][0]["config"]["model"]["name"] == "logreg" and isinstance(data["clients"][0]["flags"], list)
    r = runner.invoke(app, ["export", str(store), "--format", "xml", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "format must be one of csv, json" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "none.db")])
    assert r.exit_code == 1 and "no results store" in r.output


# ---------------------------------------------------------------- report of plain runs


def test_report_of_plain_runs(store, tmp_path):
    r = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    runs = Store(store).runs()
    assert 'id="runs-table"' in page and 'id="runs-accuracy"' in page
    for run in runs:
        assert f'id="clients-{run["run_id"]}"' in page and run["run_id"] in r.output
    attacked, clean = runs
    caption = re.compile(r'id="clients-(\w+)".*?<figcaption>(.*?)</figcaption>', re.S)
    caps = dict(caption.findall(page))
    assert "malicious clients in red" in caps[attacked["run_id"]]
    assert "malicious" not in caps[clean["run_id"]]
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    assert (tmp_path / "rep" / "report.md").read_text().count("| tiny |") == 2


# ---------------------------------------------------------------- invert


def test_invert_shows_a_progress_bar(tmp_path):
    r = runner.invoke(app, ["invert", "--dataset", "digits", "--seeds", "2", "--steps", "2", "--restarts", "1",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "2/2" in r.output and "median" in r.output
