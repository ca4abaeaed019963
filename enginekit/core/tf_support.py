"""TensorFlow and Keras, imported only when a Keras source or the TFLite target needs them, and
the one way enginekit turns TensorSpecs into a TF input signature (so the ONNX lowering and the
Keras trace name and shape their inputs alike)."""

from __future__ import annotations

import re
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
    """tf.TensorSpecs named like the inputs (signature_name); symbolic dims become None."""
    tf = require_tensorflow()
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in s.shape], tf.as_dtype(s.dtype), name=signature_name(s.name))
            for s in specs]


_TF_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")
_ESCAPED = "enginekit_hex."


def signature_name(name: str) -> str:
    """`name` as a TF input (and so TFLite signature) name: itself where TensorFlow takes it,
    else its UTF-8 bytes in hex behind a marker. TensorFlow refuses names such as
    'onnx::Flatten_0' (older torch exports): the converter then wrote no signature at all."""
    return name if _TF_NAME.fullmatch(name) else _ESCAPED + name.encode().hex()


def model_input_name(name: str) -> str:
    """The model's own input name back from its signature_name."""
    if name.startswith(_ESCAPED):
        try:
            return bytes.fromhex(name[len(_ESCAPED):]).decode()
        except ValueError:
            return name
    return name
