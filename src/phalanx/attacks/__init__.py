"""Attacks: model poisoning (rows of the update matrix), data poisoning, backdoors, inversion.

Importing this package registers every built-in attack and data poison.
"""

from . import (adaptive, backdoor, backdoor_updates, data_poisoning, envelopes, fang, layered,  # noqa: F401
               mimic, model_poisoning, tabular)
