"""Name -> factory tables for datasets, models, attacks, data poisons and defenses.

Register with a decorator, build by name with keyword parameters::

    @DEFENSES.register("krum")
    def krum(f: int = 0) -> Aggregator:
        '''Krum (Blanchard et al. 2017): the row with the lowest Krum score; n > 2f + 2.'''

    DEFENSES.build("krum", f=3)

Unknown names and unknown parameters raise one clear ``ConfigError`` listing what exists. The
first sentence of a factory's docstring is its description in ``phalanx list``. An attack or a
data poison may name its family (``ATTACKS.register("mine", family="adaptive")``), which groups it
in ``phalanx list``.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError

# Parameters the simulator fills in itself: not shown to users by ``phalanx list``.
INTERNAL_PARAMS = {
    "model": {"in_shape", "num_classes"},
    "data poison": {"num_classes"},
    "defense": {"f", "registry", "run_id", "sample_rate"},
}

# Families of the built-in attacks and poisons (a plug-in names its own with ``family=``).
FAMILIES = {
    "attack": {
        "random": ("gaussian", "sign_flip", "scaling", "zero"),
        "adaptive": ("alie", "ipm", "minmax", "minsum", "fang_krum", "fang_trmean", "mimic", "on_off", "stealth"),
        "backdoor": ("model_replacement", "constrain_scale", "neurotoxin"),
        "malformed": ("nonfinite",),
    },
    "data poison": {
        "random": ("label_flip", "fraud_label_flip"),
        "backdoor": ("pixel_trigger", "dba", "semantic", "feature_trigger"),
    },
}

_ABBREVIATION = re.compile(r"(?:\b(?:al|e\.g|i\.e|etc|vs|cf|Fig|Eq|approx|resp|incl|No)|(?:^|\s|\()[A-Z])\.$")


def first_sentence(text: str | None) -> str:
    """The first sentence of ``text``'s first paragraph, whole (never cut mid-sentence): up to the
    first '.', '!' or '?' followed by a space, skipping abbreviations such as 'et al.' and 'e.g.'.
    Double-backquoted literals lose their quotes."""
    para = " ".join((text or "").strip().split("\n\n")[0].split())
    para = re.sub(r"``(.+?)``", r"\1", para)  # reStructuredText literals read as plain words
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        head = para[:m.end()]
        if not _ABBREVIATION.search(head):
            return head
    return para


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a factory: its name and default (``required`` when it has none)."""

    name: str
    default: Any = None
    required: bool = False
    variadic: bool = False  # **params: passed on (bucketing's inner rule)


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    params: tuple[Param, ...]
    family: str | None
    factory: Callable[..., Any]


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}
        self._doc: dict[str, str] = {}
        self._family: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None, family: str | None = None):
        """Decorator: register ``factory`` under ``name``. ``doc`` replaces the docstring's first
        sentence as the description; ``family`` groups an attack or poison in ``phalanx list``."""
        def deco(factory: Callable[..., Any]):
            if name in self._table:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = factory
            self._doc[name] = first_sentence(doc or inspect.getdoc(factory))
            if family is not None:
                self._family[name] = family
            return factory

        return deco

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests, and a plug-in that replaces its own entry); unknown names are an error."""
        self.get(name)
        del self._table[name]
        del self._doc[name]
        self._family.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._table)

    def family(self, name: str) -> str | None:
        """The family of an attack or poison: the one it registered with, else the built-in table's."""
        self.get(name)
        if name in self._family:
            return self._family[name]
        return next((fam for fam, names in FAMILIES.get(self.kind, {}).items() if name in names), None)

    def params(self, name: str, internal: bool = False) -> tuple[Param, ...]:
        """The factory's parameters; without ``internal``, only those a user sets (not ``in_shape``,
        ``num_classes``, or a stage's ``f``, which the simulator fills in)."""
        hidden = set() if internal else INTERNAL_PARAMS.get(self.kind, set())
        out = []
        for p in inspect.signature(self.get(name)).parameters.values():
            if p.name in hidden or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                out.append(Param(p.name, variadic=True))
            else:
                out.append(Param(p.name, None if p.default is p.empty else p.default, p.default is p.empty))
        return tuple(out)

    def entry(self, name: str) -> Entry:
        return Entry(name, self._doc[name], self.params(name), self.family(name), self.get(name))

    def entries(self) -> list[Entry]:
        return [self.entry(n) for n in self.names()]

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, user-facing parameters, one-sentence description) for every entry."""
        return [(e.name, format_params(e.params), e.description) for e in self.entries()]

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._table:
            close = difflib.get_close_matches(name, self._table, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")
        return self._table[name]

    def build(self, name: str, **params: Any) -> Any:
        factory = self.get(name)
        sig = inspect.signature(factory)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not accepts_any:
            unknown = sorted(set(params) - set(sig.parameters))
            if unknown:
                allowed = ", ".join(sig.parameters) or "none"
                raise ConfigError(f"{self.kind} {name!r}: unknown parameter(s) {', '.join(unknown)}; "
                                  f"allowed: {allowed}")
        try:
            return factory(**params)
        except TypeError as e:  # a missing required parameter
            raise ConfigError(f"{self.kind} {name!r}: {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._table


def format_value(value: Any) -> str:
    """A default as a user writes it in YAML: null, true, 0.5, auto, [0.001, 0.02]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value and value.strip() == value else repr(value)
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return type(value).__name__


def format_params(params: tuple[Param, ...]) -> str:
    """'z_threshold=3.5, check_norms=true' (required ones as 'path (required)')."""
    parts = []
    for p in params:
        if p.variadic:
            parts.append(f"**{p.name}")
        elif p.required:
            parts.append(f"{p.name} (required)")
        else:
            parts.append(f"{p.name}={format_value(p.default)}")
    return ", ".join(parts)


DATASETS = Registry("dataset")
MODELS = Registry("model")
ATTACKS = Registry("attack")
POISONS = Registry("data poison")
DEFENSES = Registry("defense")
