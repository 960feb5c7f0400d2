"""Defenses: layers, aggregators and post steps, composable in a Pipeline.

Importing this package registers every built-in defense. Each submodule registers itself.
"""

import importlib

for _mod in ("robust", "preagg", "detect", "validate", "clip", "reputation", "signing", "privacy", "backdoor_defenses"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:  # a module not written yet
        if e.name != f"{__name__}.{_mod}":
            raise
