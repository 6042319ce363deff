"""Hydra's and OmegaConf's config errors as crisp says its own: one line, exit code 2.

Hydra reports an unknown key, a choice that does not exist (``strategy=unifrom``), a value of the wrong
type (``optim.lr=abc``) or an override it cannot parse with several lines and exit code 1; crisp's own
checks say what is wrong in one line and exit 2 (:mod:`crisp.core.errors`). :func:`one_line` turns the
first kind into the second, so that every config error looks and exits the same.
"""

from __future__ import annotations

import re

from hydra.errors import (
    CompactHydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf.errors import OmegaConfBaseException

from crisp.core.errors import USER_ERRORS

# what Hydra and OmegaConf add to a message that says nothing to a user of crisp
_NOISE = re.compile(r"^\s*(full_key:|object_type=|reference_type=|Config search path|provider=|Set the environment)")


def is_user_error(err: BaseException) -> bool:
    """A config error (Hydra's, OmegaConf's, crisp's) or another error the user can act on (a full disk)."""
    return isinstance(err, (CompactHydraException, OmegaConfBaseException, *USER_ERRORS))


def one_line(err: BaseException) -> str:
    """What is wrong, in one line: the key (or override), the value and what is allowed where Hydra says it."""
    if isinstance(err, USER_ERRORS):
        return _flat(str(err))
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        if group:
            return f"{group}={choice} is not allowed: choose one of {', '.join(sorted(err.options))}"
    if isinstance(err, OverrideParseException):
        return f"{err.override} cannot be parsed: {_flat(str(err.message).splitlines()[0])}"
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        cause = err.__cause__
        return one_line(cause) if is_user_error(cause) else f"{_flat(str(err).splitlines()[0])} {_flat(str(cause))}"
    message, cause = str(err), err.__cause__
    override = re.search(r"Error merging override (\S+)", message)
    if override and isinstance(cause, OmegaConfBaseException):
        return f"{override.group(1)} is not allowed: {_first(cause)}"
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        key, append = unknown.group(1), re.search(r"To append to your config use \+(\S+)", message)
        given = append.group(1) if append else key
        return f"{given} is not allowed: the config has no key {key} (a new key is added with +{given})"
    if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
        return f"{err.full_key}: {_first(err)}"
    return _flat(message + (f": {_first(cause)}" if isinstance(cause, OmegaConfBaseException) else ""))


def _first(err: BaseException) -> str:
    """An OmegaConf error's own sentence (without the lines that locate it in the config)."""
    return _flat(getattr(err, "msg", None) or str(err))


def _flat(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _NOISE.match(line)]
    return " ".join(lines)
