"""Defenses: layers, aggregators and post steps, composable in a Pipeline.

Importing this package registers every built-in defense.
"""

from . import (backdoor_defenses, clip, detect, preagg, privacy, reputation, robust,  # noqa: F401
               signing, validate)
