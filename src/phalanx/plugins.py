"""Plug-ins: your own datasets, models, attacks, poisons and defense stages, imported before any
name in a config is resolved.

A plug-in is a Python module that registers its pieces when it is imported (see
docs/extending.md). There are three ways to load one:

* ``--plugin my_stages.py`` (or ``--plugin mypackage.stages``) on any ``phalanx`` command,
  repeatable; a relative path is taken from the current folder;
* ``plugins: [my_stages.py, mypackage.stages]`` in an experiment config or a grid; a relative
  path is taken from the folder of that YAML file;
* an installed package's entry points in the group ``phalanx.plugins``::

      [project.entry-points."phalanx.plugins"]
      mystages = "mypackage.stages"            # a module: importing it registers its pieces
      more = "mypackage.stages:register"       # or a function, called with no arguments

  Entry points are loaded once per process, the first time a config is read or a command starts.

An entry that names a ``.py`` file (or contains a path separator) is a file; anything else is a
dotted module name, imported from ``sys.path`` and, failing that, from the config's folder and
the current folder. A config keeps its plug-ins as absolute paths, so that the stored config,
checkpoints and a grid's 'spawn' worker processes import the same files. Each file or module is
imported once per process. One that cannot be imported raises ``ConfigError`` naming it and the
error it raised.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Iterable

from .errors import ConfigError

ENTRY_POINT_GROUP = "phalanx.plugins"

_LOADED: dict[str, ModuleType] = {}  # resolved file path or module name -> the module
_ENTRY_POINTS: list[str] | None = None  # names loaded from the entry-point group (None: not yet)


def is_file(spec: str) -> bool:
    """Does ``spec`` name a Python file (rather than a dotted module)?"""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve(spec: str, base: str | Path | None = None) -> str:
    """The absolute path of a file plug-in (relative to ``base``, else the current folder); a
    module name unchanged."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"plugins: each entry is a .py file or a dotted module name, got {spec!r}")
    spec = spec.strip()
    if not is_file(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(base or Path.cwd()) / path
    return str(path.resolve())


def load_plugin(spec: str, base: str | Path | None = None) -> ModuleType:
    """Import one plug-in (once per process) and return its module."""
    key = resolve(spec, base)
    if key in _LOADED:
        return _LOADED[key]
    module = _load_file(spec, Path(key)) if is_file(key) else _load_module(spec, key, base)
    _LOADED[key] = module
    return module


def _load_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"plugin {spec!r}: no such file {path}")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"phalanx_plugin_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"plugin {spec!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # any error in the user's module: name the plug-in and the error
        sys.modules.pop(name, None)
        raise ConfigError(f"plugin {spec!r} ({path}) cannot be imported: {type(e).__name__}: {e}") from None
    return module


def _load_module(spec: str, name: str, base: str | Path | None) -> ModuleType:
    top = name.split(".")[0]

    def failed(e: Exception) -> ConfigError:
        return ConfigError(f"plugin {spec!r} cannot be imported: {type(e).__name__}: {e}")

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != top:  # the module exists, but something it imports does not
            raise failed(e) from None
    except Exception as e:
        raise failed(e) from None
    folders = list(dict.fromkeys(str(Path(p).resolve()) for p in (base, Path.cwd()) if p is not None))
    added = [f for f in folders if f not in sys.path]
    sys.path.extend(added)  # the config's folder and the current one, after everything else
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != top:
            raise failed(e) from None
        for f in added:
            sys.path.remove(f)
        raise ConfigError(f"plugin {spec!r} cannot be imported: ModuleNotFoundError: no module named {top!r} "
                          f"on sys.path or in {', '.join(folders)}") from None
    except Exception as e:
        raise failed(e) from None


def load_entry_points() -> list[str]:
    """Load every entry point of the group ``phalanx.plugins`` (once per process); their names."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is not None:
        return _ENTRY_POINTS
    _ENTRY_POINTS = []  # set first, so a plug-in that reads a config while loading does not recurse
    loaded = []
    try:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, ModuleType):
                    obj()
            except Exception as e:
                raise ConfigError(f"plugin entry point {ep.name!r} ({ep.value}, group {ENTRY_POINT_GROUP}) "
                                  f"cannot be imported: {type(e).__name__}: {e}") from None
            loaded.append(ep.name)
    except BaseException:
        _ENTRY_POINTS = None  # a later call tries again (and fails again, with the same message)
        raise
    _ENTRY_POINTS = loaded
    return loaded


def activate(specs: Iterable[str] | None, base: str | Path | None = None) -> list[str]:
    """Load the entry points, then each plug-in of ``specs``; the specs resolved (files as
    absolute paths), in order, without repeats."""
    load_entry_points()
    out: list[str] = []
    for spec in specs or []:
        key = resolve(spec, base)
        if key not in out:
            load_plugin(spec, base)  # errors name the entry as written
            out.append(key)
    return out


_COMMAND_LINE: list[str] = []  # the --plugin entries given before the command (``phalanx --plugin X run``)


def set_command_line(specs: Iterable[str] | None) -> list[str]:
    """Import the plug-ins given before the command and remember them (resolved) for this invocation."""
    _COMMAND_LINE[:] = activate(specs)
    return list(_COMMAND_LINE)


def command_line(specs: Iterable[str] | None = None) -> list[str]:
    """Import ``specs`` (a command's own ``--plugin`` entries); those given before the command and
    these, resolved, in order."""
    return list(dict.fromkeys([*_COMMAND_LINE, *activate(specs)]))


def loaded() -> list[str]:
    """The plug-ins imported so far in this process (files as absolute paths, then entry points)."""
    return [*_LOADED, *(f"entry point {n}" for n in _ENTRY_POINTS or [])]
