"""Attacks: model poisoning (rows of the update matrix), data poisoning, backdoors, inversion.

Importing this package registers every built-in attack. Each submodule registers itself.
"""

import importlib

for _mod in ("model_poisoning", "adaptive", "data_poisoning", "backdoor", "backdoor_updates"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:  # a module not written yet
        if e.name != f"{__name__}.{_mod}":
            raise
