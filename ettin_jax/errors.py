"""Error types and the "did you mean" hint shared by every validator."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A recipe, override or preset is invalid; the message names the file, key and value."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Returns " Did you mean 'x'?" for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=2, cutoff=0.6)
    if not close:
        return ""
    return f" Did you mean {' or '.join(repr(c) for c in close)}?"


def first_line(err: BaseException, *, innermost: bool = False) -> str:
    """The first line of an error's message (at most 300 characters), or its type's name: how
    a caught error is named in a one-line report. `innermost`: of the error it was raised
    from, all the way down (storage libraries wrap the informative one)."""
    while innermost and err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


class CheckpointError(ValueError):
    """A checkpoint or HuggingFace directory is missing, incomplete or not what it claims to be;
    the message names the directory or file, the tensor or field, and what was expected."""


class MissingCheckpointError(CheckpointError):
    """A run, member or step directory holds no checkpoint (yet); `path` is it and the message
    says how to train one."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = str(path)


class MetricsError(ValueError):
    """A run directory has no usable metrics; the message names the directory or file."""
