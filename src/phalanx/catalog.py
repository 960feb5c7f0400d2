"""What can be named in a config, grouped for ``phalanx list``: datasets, models, attacks by family,
data poisons by family, and defense stages by kind (layers, aggregators, post steps).

Each entry shows its name, the first sentence of its factory's docstring, and only the parameters a
user sets, with their defaults written as in YAML; parameters the simulator fills in (a model's
``in_shape`` and ``num_classes``, a stage's ``f``) are left out.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from .registry import ATTACKS, DATASETS, DEFENSES, MODELS, POISONS, Entry, format_params

STAGE_KINDS = ("layer", "aggregator", "post", "other")

ATTACK_FAMILIES = {
    "random": "read only their own rows",
    "adaptive": "read the honest rows; some simulate the server's pipeline",
    "backdoor": "carry a backdoor through aggregation; pair with a poison",
    "malformed": "non-finite rows",
}
POISON_FAMILIES = {
    "random": "untargeted, relabel training data",
    "backdoor": "targeted, plant a backdoor (measured by its attack success rate, asr)",
}


@dataclass
class Section:
    key: str  # the word `phalanx list KEY` selects it by
    title: str
    note: str  # what the group is
    where: str  # how a config names one
    entries: list[Entry]


def stage_kind(name: str) -> str:
    """'layer', 'aggregator', 'post' or 'other' for a registered defense stage: the class registered,
    else the factory's return annotation, else by building it with its defaults (and the values the
    simulator injects; building central_dp would import Opacus, seconds)."""
    from .defenses.base import Aggregator, Layer, Post

    factory = DEFENSES.get(name)
    kinds = ((Layer, "layer"), (Aggregator, "aggregator"), (Post, "post"))
    try:
        ret = factory if isinstance(factory, type) else typing.get_type_hints(factory).get("return")
    except Exception:  # an annotation that does not resolve
        ret = None
    for cls, kind in kinds:
        if isinstance(ret, type) and issubclass(ret, cls):
            return kind
    try:
        stage = DEFENSES.build(name, **_probe_params(name))
    except Exception:  # needs a parameter we cannot guess
        return "other"
    return next((kind for cls, kind in kinds if isinstance(stage, cls)), "other")


def _probe_params(name: str) -> dict:
    from .defenses.signing import KeyRegistry

    inject = {"f": 0, "registry": KeyRegistry(), "run_id": "list", "sample_rate": 1.0}
    out = {}
    for p in DEFENSES.params(name, internal=True):
        if p.name in inject:
            out[p.name] = inject[p.name]
        elif p.required:
            out[p.name] = 0.5
    return out


def sections() -> list[Section]:
    """Every kind of registered piece, in the order a config names them."""
    out = [Section("datasets", "Datasets", "", "data: {dataset: NAME}", DATASETS.entries()),
           Section("models", "Models", "", "model: {name: NAME, params: {...}}", MODELS.entries())]
    attacks = ATTACKS.entries()
    for fam, note in [*ATTACK_FAMILIES.items(), (None, "no family given")]:
        group = [e for e in attacks if (e.family if e.family in ATTACK_FAMILIES else None) == fam]
        if group:
            out.append(Section("attacks", f"Attacks, {fam or 'other'}", note,
                               "attack: {name: NAME, params: {...}, byzantine: 0.2}", group))
    poisons = POISONS.entries()
    for fam, note in [*POISON_FAMILIES.items(), (None, "no family given")]:
        group = [e for e in poisons if (e.family if e.family in POISON_FAMILIES else None) == fam]
        if group:
            out.append(Section("poisons", f"Data poisons, {fam or 'other'}", note,
                               "attack: {poison: NAME, poison_params: {...}, byzantine: 0.2}", group))
    stages = {k: [] for k in STAGE_KINDS}
    for e in DEFENSES.entries():
        stages[stage_kind(e.name)].append(e)
    titles = {"layer": ("layers", "Layers", "reject, clip, filter or mix rows; before the aggregator"),
              "aggregator": ("aggregators", "Aggregators", "exactly one per defense"),
              "post": ("post", "Post steps", "change the aggregate; after the aggregator"),
              "other": ("other", "Other defense stages", "")}
    for kind in STAGE_KINDS:
        if stages[kind]:
            key, title, note = titles[kind]
            out.append(Section(key, title, note, "defense: [LAYER, ..., AGGREGATOR, POST, ...]", stages[kind]))
    return out


KEYS = ("datasets", "models", "attacks", "poisons", "layers", "aggregators", "post", "other")
FOOTNOTE = ("Defaults are shown as in YAML. Left out: a model's in_shape and num_classes (from the dataset), and "
            "every stage's f, which the server fills in with its own guess, defense_f (default auto = "
            "floor((n - 3) / 4)).")


def tables(only: str | None = None) -> list:
    """One rich Table per section (``only``: the sections of one key such as 'attacks')."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out = []
    for sec in sections():
        if only is not None and sec.key != only:
            continue
        title = Text.assemble((sec.title, "bold"), (f": {sec.note}" if sec.note else "", ""),
                              ("\nin a config: " + sec.where, "dim"))
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
        t.add_column("name", style="bold", no_wrap=True)
        t.add_column("description and parameters", overflow="fold", ratio=1)
        for e in sec.entries:
            cell = Text(e.description or "(no description)")
            params = format_params(e.params)
            cell.append("\n" + (f"parameters: {params}" if params else "no parameters"), style="dim")
            t.add_row(e.name, cell)
        out.append(t)
    return out
