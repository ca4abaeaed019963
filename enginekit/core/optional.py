"""Libraries that only some sources, targets or data need: imported on first use, and when one is
missing the error names the extra that brings it (`pip install 'enginekit[EXTRA]'`)."""

from __future__ import annotations

import importlib
from typing import Any

from enginekit.core.errors import MissingDependencyError


def missing(extra: str, purpose: str) -> MissingDependencyError:
    return MissingDependencyError(f"{purpose} needs the '{extra}' extra (pip install 'enginekit[{extra}]')")


def require(module: str, extra: str, purpose: str, quiet: bool = False) -> Any:
    """`module` imported; a missing one is a one-line MissingDependencyError naming `extra`.
    `quiet` silences fd 2 during the import (TensorFlow prints before any log level applies)."""
    try:
        if quiet:
            from enginekit.core.quiet import quiet_stderr

            with quiet_stderr():
                return importlib.import_module(module)
        return importlib.import_module(module)
    except ImportError:
        raise missing(extra, purpose) from None


def require_torch(purpose: str = "PyTorch models") -> Any:
    return require("torch", "torch", purpose)
