import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from phalanx.bench import parse_grid, run_grid
from phalanx.report import build, markdown, terminal_table, tick, write_report
from phalanx.report.tables import headline

GRID = {
    "name": "rep",
    "base": {"data": {"dataset": "digits"}, "model": {"name": "logreg"},
             "federation": {"num_clients": 6, "rounds": 3, "batch_size": 16, "lr": 0.1}},
    "byzantine": [0.34],
    "attacks": {"clean": {"family": "none"}, "sign": {"family": "random", "name": "sign_flip"},
                "alie": {"family": "adaptive", "name": "alie"},
                "trigger": {"family": "backdoor", "poison": "pixel_trigger", "poison_params": {"size": 2}}},
    "defenses": {"mean": ["mean"], "layered": [{"clip": {"max_norm": "auto"}}, "median", "reputation"],
                 "dp": [{"update_clip": {"max_norm": 1.0}}, {"grad_noise": {"sigma": 0.01}}, "mean"]},
    "seeds": [0],
    "privacy": {"seeds": 1, "steps": 4, "dataset": "digits"},
}
FIGURES = ["heatmap-accuracy", "heatmap-asr", "curves-accuracy", "curves-asr", "detection", "reputation",
           "dist-norm", "dist-cosine", "drift", "privacy"]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "rep.db"
    out = run_grid(parse_grid(GRID), path, workers=1)
    assert out.ran == 12 and not out.failed and out.probes == 2  # 'mean' and 'layered' share a probe
    return path


@pytest.fixture(scope="module")
def written(db, tmp_path_factory):
    return write_report(db, tmp_path_factory.mktemp("out"))


@pytest.mark.parametrize("value, ref, expected", [
    (0.75, 0.80, "held"), (0.7499, 0.80, "partial"), (0.85, 0.80, "held"),
    (0.60, 0.80, "partial"), (0.5999, 0.80, "broken"), (0.5, None, None)])
def test_accuracy_tick_boundaries(value, ref, expected):
    assert tick(value, ref) == expected


@pytest.mark.parametrize("asr, expected", [(0.0, "held"), (0.0999, "held"), (0.10, "partial"),
                                           (0.4999, "partial"), (0.50, "broken"), (1.0, "broken")])
def test_asr_tick_boundaries(asr, expected):
    assert tick(asr, kind="asr") == expected


def test_summary_uses_the_thresholds_as_stated(db):
    rep = build(db)
    rows = {s.defense: s for s in rep.rows}
    assert set(rows) == {"mean", "layered", "dp"} and rep.results.baseline == "mean"
    ref = rows["mean"].clean.acc.mean
    for s in rows.values():
        for e in (s.random, s.adaptive):
            assert e.reference == pytest.approx(ref) and e.tick == tick(e.acc.mean, ref)
        assert s.backdoor.tick == tick(s.backdoor.asr.mean, kind="asr")
        assert s.agg_ms > 0 and s.psnr is not None
    assert rows["mean"].ratio == pytest.approx(1.0)
    assert rows["mean"].psnr == rows["layered"].psnr  # robust aggregation lets the update through


def test_report_has_the_table_and_every_figure(written):
    rep = written
    page = rep.html.read_text()
    assert 'id="comparative-table"' in page and "Adaptive attacks" in page and "within 5 points" in page
    for key in FIGURES:
        m = re.search(rf'<figure id="{key}[^"]*"><img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"',
                      page)
        assert m, key
        assert m.group(2).startswith("iVBORw0KGgo")  # a PNG
    assert "<figcaption>" in page and 'id="privacy-table"' in page
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # self-contained
    md = rep.markdown.read_text()
    assert "| Defense | No attack | Random attacks | Adaptive attacks | Backdoors | Overhead |" in md  # no malformed
    assert "| layered (f=" in md  # the server's guess of f is named
    console = Console(width=220, record=True)
    console.print(terminal_table(rep.results, rep.rows))
    text = console.export_text()
    assert "Backdoors" in text and "layered" in text and "ms" in text
    assert markdown(rep.results, rep.rows).startswith("# phalanx")


def test_report_without_optional_data_says_what_it_skipped(tmp_path):
    g = {k: v for k, v in GRID.items() if k != "privacy"}
    g["attacks"] = {"sign": GRID["attacks"]["sign"]}
    g["defenses"] = {"mean": ["mean"]}
    g["base"] = {**g["base"], "federation": {**g["base"]["federation"], "rounds": 2}}
    run_grid(parse_grid(g), tmp_path / "a.db", workers=1)
    page = write_report(tmp_path / "a.db", tmp_path / "out").html.read_text()
    for key in ("heatmap-asr", "reputation", "privacy"):
        assert re.search(rf'<p class="note" id="{key}[^"]*">Skipped: ', page), key
    assert 'id="comparative-table"' in page


def test_a_failed_run_counts_as_zero_and_is_listed(tmp_path):
    g = {k: v for k, v in GRID.items() if k != "privacy"}
    g["attacks"] = {"clean": {"family": "none"}, "sign": GRID["attacks"]["sign"],
                    "nan": {"family": "malformed", "name": "nonfinite"}}
    g["defenses"] = {"mean": ["mean"], "median": ["median"]}
    g["base"] = {**g["base"], "federation": {**g["base"]["federation"], "rounds": 2}}
    out = run_grid(parse_grid(g), tmp_path / "f.db", workers=1)
    assert len(out.failed) == 1 and out.failed[0][0].startswith("nan x mean")
    rep = write_report(tmp_path / "f.db", tmp_path / "out")
    rows = {s.defense: s for s in rep.rows}
    assert rows["mean"].malformed.acc.mean == 0.0 and rows["mean"].malformed.tick == "broken"
    assert rows["mean"].malformed.failed and "non-finite" in rows["mean"].malformed.failed[0]
    assert rows["median"].malformed.acc.mean > 0.5 and not rows["median"].malformed.failed
    assert rows["mean"].random.attack == "sign" and not rows["mean"].random.failed  # families kept apart
    cols, text, _ = headline(rep.results, rep.rows)
    assert "Malformed updates" in cols and "failed" in text[0][cols.index("Malformed updates")]
    page = rep.html.read_text()
    assert 'id="failed-runs"' in page and "1 failed" in page and "non-finite" in page
    assert "## Failed runs" in rep.markdown.read_text()


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="chromium not installed (optional system package)")
def test_screenshot_in_headless_chromium(written, tmp_path):
    rep = written
    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.py"
    png = tmp_path / "shot.png"
    r = subprocess.run([sys.executable, str(script), str(rep.html), "--out", str(png)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert shutil.which("chromium") or Path("/usr/bin/chromium").exists()


# ---------------------------------------------------------------- figures (issue 17)


@pytest.fixture(scope="module")
def drawn(db, draw_figures):
    """Every figure of the report as a live matplotlib figure (key -> figure), and the report."""
    return draw_figures(db)


def test_heatmap_numbers_are_legible_and_the_colour_bar_is_in_percent(drawn):
    from phalanx.report.plots import DPI

    figs, _ = drawn
    for key, fig in figs.items():
        if not key.startswith("heatmap"):
            continue
        texts = [t for t in fig.axes[0].texts]
        assert texts and all(t.get_fontsize() * DPI / 72 >= 9 for t in texts), key
        assert all(t.get_text().endswith("%") for t in texts)
        bar = fig.axes[1]
        labels = [t.get_text() for t in bar.get_yticklabels() if t.get_text()]
        assert labels and all(lab.endswith("%") for lab in labels), (key, labels)


def test_heatmap_colours_are_the_ticks(drawn, db):
    """A 33% ASR is 'partial' in the table; its heatmap cell is partial's colour, never held's."""
    from phalanx.report.plots import TICK_COLOURS, cell_ticks
    from phalanx.report.tables import Entry, Stat, Summary

    scen = ("digits", "iid", 0.34)
    e = Entry(scen, "trigger", Stat(0.9, 0, 0.9, 0.9, 1), Stat(0.9, 0, 0.9, 0.9, 1),
              asr=Stat(0.33, 0, 0.33, 0.33, 1), tick=tick(0.33, kind="asr"))
    s = Summary("mean", None, None, None, e, None, None, None, None, cells={(scen, "trigger"): e})
    _, ticks, _ = cell_ticks([s], scen, ["trigger"], backdoor=True)
    assert ticks == [["partial"]] and TICK_COLOURS["partial"] != TICK_COLOURS["held"]
    figs, _ = drawn
    rows = build_rows(figs)
    rep = build(db)
    kinds = ["broken", "partial", "held", None]
    for key, (image, cells) in rows.items():  # each drawn cell holds the index of its own tick's colour
        backdoor = key.startswith("heatmap-asr")
        attacks = [a for a, f in rep.results.attacks.items() if (f == "backdoor") == backdoor]
        _, want, _ = cell_ticks(rep.rows, rep.results.scenarios[0], attacks, backdoor)
        assert image.tolist() == [[float(kinds.index(t)) for t in row] for row in want], key


def build_rows(figs):
    """heatmap key -> (the colour-index image, its non-empty cells)."""
    out = {}
    for key, fig in figs.items():
        if key.startswith("heatmap"):
            image = fig.axes[0].images[0].get_array()
            out[key] = (image, [v for v in image.flatten().tolist() if v != 3.0])
    return out


def test_per_round_panels_have_labels_and_no_malicious_line_without_attackers(drawn):
    figs, _ = drawn
    for key in ("curves-accuracy", "curves-asr", "detection", "reputation", "dist-norm", "dist-cosine", "drift"):
        fig = figs[key]
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert axes[0].get_ylabel(), key
        for ax in axes:
            assert [t.get_text() for t in ax.get_yticklabels() if t.get_text()], (key, ax.get_title())
    for key in ("dist-norm", "dist-cosine"):
        clean = next(ax for ax in figs[key].axes if ax.get_title() == "clean")
        assert "malicious" not in [line.get_label() for line in clean.get_lines()]
        sign = next(ax for ax in figs[key].axes if ax.get_title() == "sign")
        assert "malicious" in [line.get_label() for line in sign.get_lines()]
    styles = [(line.get_color(), line.get_linestyle()) for line in figs["curves-accuracy"].axes[0].get_lines()]
    assert len(set(styles)) == len(styles)  # every defense has its own colour and line style


def test_captions_do_not_repeat_titles_nor_name_a_fixed_setting(written):
    page = written.html.read_text()
    figures = re.findall(r"<figcaption><b>(.*?)\.</b> (.*?)</figcaption>", page)
    assert len(figures) >= 8
    for title, caption in figures:
        assert not caption.lower().startswith(title.lower()[:20]), (title, caption)
        assert title.lower() not in caption.lower(), (title, caption)
    assert "LeNet, Fashion-MNIST" not in page and "Fashion-MNIST" not in page  # the audit ran on digits here
    assert "iDLG (digits, batch 1" in page


def test_single_seed_cells_have_no_ranges(written):
    page = written.html.read_text()
    md = written.markdown.read_text()
    for text in (page, md):
        assert not re.search(r"\[\d+(\.\d)?[-–]\d+(\.\d)?\]", text)
    assert "min–max" not in page


def test_image_grid_figures_keep_accuracy(drawn):
    figs, _ = drawn
    assert not any("auprc" in k for k in figs)
    assert figs["curves-accuracy"].axes[0].get_ylabel() == "test accuracy"
    heat = next(k for k in figs if k.startswith("heatmap-accuracy"))
    assert figs[heat].axes[0].get_title() == "Accuracy (%)"
