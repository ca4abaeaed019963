"""Errors the CLI turns into one line on stderr and an exit code.

Exit codes: 2 = the input is unusable (bad file, bad option, missing library); 1 = the input was
fine but a quality gate (parity, accuracy) failed. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class EnginekitError(Exception):
    """An error the user can act on; its message is printed as one line."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, option: str | None = None):
        self.path = None if path is None else str(path)
        self.option = option  # the setting that fixes it (the CLI names its flag)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def naming(exc: EnginekitError, path: str | Path) -> EnginekitError:
    """The same error naming `path` when it names no file yet (a failure deep in a run, such as
    ONNX Runtime refusing an input, is reported against the model the user gave)."""
    if exc.path is not None:
        return exc
    named = type(exc)(str(exc), path, exc.option)
    return named


class InputError(EnginekitError):
    """A file, name or option that enginekit cannot use."""


class MissingDependencyError(EnginekitError):
    """A target or source needs a library (or hardware) that is absent here."""


class GateError(EnginekitError):
    """A produced artifact failed a quality gate (parity or accuracy); nothing was published."""

    exit_code = 1


def debugging() -> bool:
    """Whether the user asked for tracebacks (--debug sets ENGINEKIT_DEBUG): an unexpected error is
    then raised where it happens instead of being reported as one line."""
    return bool(os.environ.get("ENGINEKIT_DEBUG"))


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library's error message on one line, at most `limit` characters, for a message of ours
    (its type's name where it has no message)."""
    text = " ".join(str(exc).split())[:limit]
    return text or type(exc).__name__


def unexpected_line(exc: BaseException) -> str:
    """The one line for a bug or an unforeseen library failure (no traceback: see `debugging`)."""
    text = one_line(exc, 300) if str(exc).strip() else "(no message)"  # the type is named already
    return f"unexpected {type(exc).__name__}: {text} (rerun with --debug for the traceback)"
