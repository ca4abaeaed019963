"""A user's own accuracy metric: `module:function` taking (reference outputs, candidate outputs,
labels or None) as dicts of arrays by output name, returning {metric name: number}. Its figures
go into the manifest beside the built-in ones, and gates can name them."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.errors import InputError

UserMetric = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], "np.ndarray | None"], Mapping[str, float]]


def load_user_metric(spec: str | UserMetric | None) -> UserMetric | None:
    """`module:function` (imported from the working folder too), a callable, or None."""
    if spec is None or callable(spec):
        return spec
    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise InputError(f"a metric is given as module:function, not '{spec}'", option="metric")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # any import-time failure of user code is a bad option
        raise InputError(f"cannot load the metric '{spec}' ({type(exc).__name__}: {exc})", option="metric") from None
    if not callable(function):
        raise InputError(f"the metric '{spec}' is not a function", option="metric")
    return function


def run_user_metric(metric: UserMetric, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    labels: np.ndarray | None) -> dict[str, float]:
    """The user metric's figures, checked: a mapping of names to finite numbers."""
    try:
        result: Any = metric(reference, candidate, labels)
    except Exception as exc:
        raise InputError(f"the user metric raised {type(exc).__name__}: {exc}", option="metric") from None
    if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
        raise InputError("the user metric must return a dict of metric names to numbers", option="metric")
    figures = {}
    for key, value in result.items():
        try:
            figures[key] = float(value)
        except (TypeError, ValueError):
            raise InputError(f"the user metric's '{key}' is not a number", option="metric") from None
        if not math.isfinite(figures[key]):
            raise InputError(f"the user metric's '{key}' is {figures[key]}", option="metric")
    return figures
