"""`make demo`'s grid keeps the cells that show the lessons (docs/results/demo.md has their numbers)."""

from pathlib import Path

import yaml

from phalanx.bench import expand, load_grid

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grid_demo.yaml"


def test_the_demo_grid_has_its_lesson_cells():
    spec = load_grid(GRID)
    families = {label: a.family for label, a in spec.attacks.items()}
    assert {"none", "random", "adaptive", "backdoor"} <= set(families.values())
    # plain mean broken by a random attack; an adaptive attack against the rule it beats; a backdoor
    # that passes the mean and not the trimmed mean; the layered default beside them all
    assert families["gaussian"] == "random" and spec.defenses["mean"].stages == ["mean"]
    assert families["ipm"] == "adaptive" and spec.defenses["median"].stages == ["median"]
    assert families["fang_krum"] == "adaptive" and spec.defenses["krum"].stages == ["krum"]
    assert spec.attacks["pixel_trigger"].poison == "pixel_trigger"
    assert spec.defenses["trimmed_mean"].stages == ["trimmed_mean"]
    coords = {(c.coords["attack"], c.coords["defense"]) for c in expand(spec)}
    assert {("gaussian", "mean"), ("ipm", "median"), ("fang_krum", "krum"), ("pixel_trigger", "mean"),
            ("pixel_trigger", "trimmed_mean")} <= coords
    assert {("clean", "layered")} | {(a, "layered") for a in spec.attacks} <= coords


def test_the_layered_row_is_the_shipped_default():
    shipped = yaml.safe_load((ROOT / "configs" / "layered.yaml").read_text())
    layered = load_grid(GRID).defenses["layered"]
    assert layered.stages == shipped["defense"]
    assert not layered.federation, "the shipped default runs without server data or signing"
