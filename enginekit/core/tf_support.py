"""TensorFlow and Keras, imported only when a Keras source or the TFLite target needs them, and
the one way enginekit turns TensorSpecs into a TF input signature (so the ONNX lowering and the
Keras trace name and shape their inputs alike)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from enginekit.core.optional import require
from enginekit.core.tensors import TensorSpec


def require_tensorflow() -> Any:
    return require("tensorflow", "tflite", "building .tflite files", quiet=True)


def require_keras() -> Any:
    require("tensorflow", "keras", "Keras models", quiet=True)  # the TF backend is what enginekit converts
    return require("keras", "keras", "Keras models", quiet=True)


def input_signature(specs: Sequence[TensorSpec]) -> list[Any]:
    """tf.TensorSpecs named like the inputs; symbolic dims become None."""
    tf = require_tensorflow()
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape], tf.as_dtype(s.dtype), name=s.name) for s in specs]
