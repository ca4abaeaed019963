"""The compute layers a build keeps float (--exclude-node and friends, or --auto-fallback's
choice), found in the TFLite graph. ai-edge-quantizer leaves each such op float (NO_QUANTIZE):
LiteRT runs it between a DEQUANTIZE and a QUANTIZE and the rest of the flatbuffer stays
full-integer, so one float set serves every target, TFLite included.

An ONNX layer is found by value, through the range matching (ranges.RangeMap.matched): the TFLite
compute op whose output equals the layer's output, or, where the converter fused what follows
into it (an activation, a bias Add, a batch norm), the output of that follower.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from enginekit.onnx.nodes import tensor_readers
from enginekit.targets.tflite.ranges import RangeMap

COMPUTE_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"}
FUSED_FOLLOWERS = {"Relu", "Clip", "Add", "BatchNormalization", "LeakyRelu", "Tanh", "Sigmoid"}
MAX_FOLLOWERS = 2  # a bias Add and an activation


def float_op_outputs(model: onnx.ModelProto, nodes: Sequence[str], ranges: RangeMap) -> tuple[list[str], list[str]]:
    """For `nodes` (ONNX compute layers kept float): the output tensor of each one's TFLite
    compute op, and the nodes for which none was found."""
    by_onnx: dict[str, list[str]] = {}
    for tflite_tensor, onnx_tensor in ranges.matched.items():
        if ranges.producers.get(tflite_tensor) in COMPUTE_OPS:
            by_onnx.setdefault(onnx_tensor, []).append(tflite_tensor)
    readers = tensor_readers(model.graph)
    named = {node.name: node for node in model.graph.node}
    found, missing = [], []
    for name in nodes:
        tensor = named[name].output[0] if name in named else None
        for _ in range(MAX_FOLLOWERS + 1):
            if tensor is None or tensor in by_onnx:
                break
            following = readers.get(tensor, [])
            tensor = following[0].output[0] if len(following) == 1 and following[0].op_type in FUSED_FOLLOWERS else None
        if tensor in by_onnx:
            found += [t for t in by_onnx[tensor] if t not in found]
        else:
            missing.append(name)
    return found, missing
