"""The tensors the ONNX -> TensorFlow lowering passes from op to op, and the helpers every
lowering module reads its node with (the op lowerings in `lowering`, the recurrent ones in
`recurrent`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from enginekit.core.errors import InputError


@dataclass
class Value:
    """A tensor during lowering: a TF tensor or a numpy constant; `nhwc` marks 4-D tensors held
    channel-last."""

    data: Any
    nhwc: bool = False
    known: tuple[int | None, ...] | None = None  # a run-time Shape's dims known at lowering (None: run-time)
    onnx_dims: tuple[int | None, ...] | None = None  # the tensor's (NCHW) dims as ONNX shape inference knows them

    @property
    def const(self) -> bool:
        return isinstance(self.data, np.ndarray)

    @property
    def rank(self) -> int:
        return len(self.data.shape)


def tf_module():
    from enginekit.core.tf_support import require_tensorflow

    return require_tensorflow()


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def require_constant(value: Value, node: onnx.NodeProto, what: str) -> np.ndarray:
    if not value.const:
        raise InputError(f"node {node.name} ({node.op_type}): {what} must be a constant for the tflite target")
    return value.data
