"""The reference model zoo: each entry is a ModelSpec with real weights and real data."""

from __future__ import annotations

import difflib
import importlib

from enginekit.core.errors import InputError
from enginekit.core.optional import missing
from enginekit.models.spec import ModelSpec

_ZOO_MODULES = {
    "digits_cnn": "enginekit.models.digits_cnn",
    "digits_keras": "enginekit.models.digits_keras",
    "efficientnet_lite0": "enginekit.models.efficientnet_lite",
    "minilm_l6": "enginekit.models.minilm",
}


def zoo_names() -> list[str]:
    return list(_ZOO_MODULES)


def get_spec(name: str) -> ModelSpec:
    """The zoo entry called `name`; an unknown name is an InputError that suggests close ones."""
    if name not in _ZOO_MODULES:
        close = difflib.get_close_matches(name, _ZOO_MODULES, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(_ZOO_MODULES)}"
        raise InputError(f"unknown zoo model '{name}' ({hint})")
    try:
        return importlib.import_module(_ZOO_MODULES[name]).SPEC
    except ImportError:
        raise missing("zoo", f"the zoo model '{name}'") from None


__all__ = ["ModelSpec", "get_spec", "zoo_names"]
