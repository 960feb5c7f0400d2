"""Errors raised by phalanx. Every message names the parameter, what was expected and what was given."""


class PhalanxError(ValueError):
    """Base class of every error phalanx raises on bad input."""


class ConfigError(PhalanxError):
    """An experiment configuration is invalid (unknown key, wrong type, out of range)."""


class DataError(PhalanxError):
    """A dataset file is missing, truncated or corrupt."""


class BoundError(PhalanxError):
    """A defense's bound on the number of clients n and Byzantine clients f does not hold."""


class IntegrityError(PhalanxError):
    """A signature, digest, nonce or key check failed."""
