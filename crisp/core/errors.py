"""The errors a user can act on: their message says everything (no traceback), and a run exits 2."""

from crisp.sparsity.errors import AttentionNotReached


class ConfigError(ValueError):
    """A config value that is not allowed: the message names the key, the value and what is allowed."""


class DataError(ValueError):
    """Data that cannot be used, with what is wrong and where (file and line)."""


class HubUnreachableError(RuntimeError):
    """Something needs the Hugging Face hub, which cannot be reached (or a packaged model is missing)."""


class OutOfSpace(RuntimeError):
    """The disk is full: which directory, and how much room the runs need there."""


# AttentionNotReached: a model whose attention crisp cannot make sparse (crisp.sparsity.errors)
USER_ERRORS = (ConfigError, DataError, HubUnreachableError, OutOfSpace, AttentionNotReached)
