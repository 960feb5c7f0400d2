"""Attacks: model poisoning (rows of the update matrix), data poisoning, backdoors, inversion.

Importing this package registers every built-in attack and data poison.
"""

from . import (adaptive, backdoor, backdoor_updates, data_poisoning, fang, layered, mimic,  # noqa: F401
               model_poisoning, tabular)
