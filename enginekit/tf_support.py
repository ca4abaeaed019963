"""TensorFlow and Keras, imported only when a Keras source or the TFLite target needs them, and
the one way enginekit turns TensorSpecs into a TF input signature (so the ONNX lowering and the
Keras trace name and shape their inputs alike)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from enginekit.errors import MissingDependencyError
from enginekit.models.spec import TensorSpec


def _quiet_import(name: str, missing: str) -> Any:
    """Import with fd 2 silenced: TensorFlow prints absl lines before any log level applies."""
    from enginekit.quiet import quiet_stderr

    try:
        with quiet_stderr():
            return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(missing) from None


def require_tensorflow() -> Any:
    return _quiet_import("tensorflow", "building .tflite files needs the 'tflite' extra (pip install 'enginekit[tflite]')")


def require_keras() -> Any:
    missing = "Keras models need the 'keras' extra (pip install 'enginekit[keras]')"
    _quiet_import("tensorflow", missing)  # the TF backend is what enginekit converts
    return _quiet_import("keras", missing)


def input_signature(specs: Sequence[TensorSpec]) -> list[Any]:
    """tf.TensorSpecs named like the inputs; symbolic dims become None."""
    tf = require_tensorflow()
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape], tf.as_dtype(s.dtype), name=s.name) for s in specs]
