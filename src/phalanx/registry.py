"""Name -> factory tables for datasets, models, attacks, data poisons and defenses.

Register with a decorator, build by name with keyword parameters::

    @DEFENSES.register("krum")
    def krum(f: int = 0) -> Aggregator: ...

    DEFENSES.build("krum", f=3)

Unknown names and unknown parameters raise one clear ``ConfigError`` listing what exists.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from .errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}
        self._doc: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None):
        def deco(factory: Callable[..., Any]):
            if name in self._table:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = factory
            text = doc or (inspect.getdoc(factory) or "").split("\n")[0]
            self._doc[name] = text
            return factory

        return deco

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests, and a plug-in that replaces its own entry); unknown names are an error."""
        self.get(name)
        del self._table[name]
        del self._doc[name]

    def names(self) -> list[str]:
        return sorted(self._table)

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, parameters, one-line doc) for every entry."""
        rows = []
        for name in self.names():
            sig = inspect.signature(self._table[name])
            params = ", ".join(str(p) for p in sig.parameters.values())
            rows.append((name, params, self._doc[name]))
        return rows

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


DATASETS = Registry("dataset")
MODELS = Registry("model")
ATTACKS = Registry("attack")
POISONS = Registry("data poison")
DEFENSES = Registry("defense")
