"""The compute layers a build keeps float (--exclude-node and friends, or --auto-fallback's
choice), found in the TFLite graph. ai-edge-quantizer leaves each such op float (NO_QUANTIZE):
LiteRT runs it between a DEQUANTIZE and a QUANTIZE and the rest of the flatbuffer stays
full-integer, so one float set serves every target, TFLite included.

An ONNX layer is found by value, through the range matching (ranges.RangeMap.matched): the TFLite
op whose output equals the layer's output, or, where the converter fused what follows into it
(an activation, a bias Add, a batch norm), the output of that follower. Not only compute layers:
the fallback's units also hold the residual Adds and the pooling a quantized tensor passes
through (on efficientnet_lite0, 24 of its 60 units), and with those left int8 the tensor the unit
frees on the Q/DQ graph stayed quantized on TFLite. Data movement (PAD, RESHAPE, TRANSPOSE, ...)
reading a float op's output stays float too, so a float tensor is not requantized on its way to
the next float op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from enginekit.onnx.nodes import tensor_readers
from enginekit.targets.tflite.ranges import RangeMap
from enginekit.targets.tflite.recurrent import SCOPE as RECURRENCE_SCOPE

FUSED_FOLLOWERS = {"Relu", "Clip", "Add", "BatchNormalization", "LeakyRelu", "Tanh", "Sigmoid"}
MAX_FOLLOWERS = 2  # a bias Add and an activation
# data movement that follows a float op's output float (QUANTIZE, DEQUANTIZE, SHAPE and GATHER are
# not: they change type or read indices)
FLOAT_FOLLOWING_OPS = {"RESHAPE", "TRANSPOSE", "PAD", "PADV2", "SQUEEZE", "EXPAND_DIMS", "STRIDED_SLICE", "SLICE"}
_NOT_A_LAYER = {"QUANTIZE", "DEQUANTIZE", "SHAPE", "DELEGATE"} | FLOAT_FOLLOWING_OPS


def float_op_outputs(model: onnx.ModelProto, nodes: Sequence[str], ranges: RangeMap) -> tuple[list[str], list[str]]:
    """For `nodes` (ONNX layers kept float): the output tensors of the TFLite ops to leave float
    (each one's op, and the data movement after them), and the nodes for which none was found."""
    by_onnx: dict[str, list[str]] = {}
    for tflite_tensor, onnx_tensor in ranges.matched.items():
        if ranges.producers.get(tflite_tensor, "DELEGATE") not in _NOT_A_LAYER:
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
    return found + moved_after(found, ranges), missing


def moved_after(float_tensors: Sequence[str], ranges: RangeMap) -> list[str]:
    """Outputs of FLOAT_FOLLOWING_OPS whose data input is a float op's output (transitively)."""
    floating, moved = set(float_tensors), []
    changed = True
    while changed:
        changed = False
        for tensor, inputs in ranges.inputs_of.items():
            if tensor not in floating and ranges.producers.get(tensor) in FLOAT_FOLLOWING_OPS and inputs and inputs[0] in floating:
                floating.add(tensor)
                moved.append(tensor)
                changed = True
    return moved


def recurrence_outputs(ranges: RangeMap) -> list[str]:
    """The outputs of the ops an LSTM or GRU was unrolled into (and the data movement after
    them): they stay float in int8, as the Q/DQ hub keeps the recurrence float on every other
    target. Quantized, each step's gate SPLIT took output scales XNNPACK refuses ("failed to
    prepare"), and a state requantized at every step compounds its rounding along the sequence."""
    inside = [tensor for tensor in ranges.producers if any(part.startswith(RECURRENCE_SCOPE + "/") for part in tensor.split(";"))]
    return inside + moved_after(inside, ranges)


def mask_outputs(ranges: RangeMap) -> list[str]:
    """The outputs of the ops writing a mask's sentinels on the calibration feeds (-inf, or
    float32's lowest as PyTorch's masked_fill writes it, and the attention scores it is added
    to), and the data movement after them: they stay float in int8, where the Q/DQ hub never
    puts a grid on them. Quantized, a range from -3.4e38 to the scores' top gave a scale of
    ~1e36, on which LiteRT aborted (SIGABRT: a PyTorch encoder with a key-padding mask)."""
    inside = [tensor for tensor in ranges.masks if tensor in ranges.producers]
    return inside + moved_after(inside, ranges)


# A CONCATENATION puts its inputs on its output's one int8 grid: an input spanning less than this
# share of the output's range keeps fewer than 255 / MIXED_SPAN_RATIO = 16 steps (4 bits) there
MIXED_SPAN_RATIO = 16


def mixed_concat_outputs(ranges: RangeMap) -> list[str]:
    """The outputs of the CONCATENATIONs that the model returns (through data movement only)
    joining tensors of ranges too unlike to share one grid, and that movement: they stay float,
    their inputs dequantized, as the Q/DQ hub leaves graph outputs. A YOLO head joins boxes in
    pixels with scores in [0, 1]: on the grid of [0, 320] every score became 0 or 1.27
    (nudenet's YOLOv8n, score cosine 0.875). A Concat some op reads is left alone: its reader
    would put the values back on one grid."""
    def span(tensor: str) -> float:
        low, high = ranges.ranges[tensor]
        return high - low

    readers: dict[str, list[str]] = {}
    for tensor, inputs in ranges.inputs_of.items():
        for name in inputs:
            readers.setdefault(name, []).append(tensor)
    kept = []
    for tensor, inputs in ranges.inputs_of.items():
        joined = [t for t in inputs if t in ranges.ranges]
        if ranges.producers.get(tensor) != "CONCATENATION" or tensor not in ranges.ranges or len(joined) < 2 or \
                min(span(t) for t in joined) * MIXED_SPAN_RATIO >= span(tensor):
            continue
        tail = [tensor, *moved_after([tensor], ranges)]
        if all(reader in tail for name in tail for reader in readers.get(name, [])):
            kept += tail
    return kept


PASS_THROUGH_OPS = FLOAT_FOLLOWING_OPS | {"CONCATENATION", "MAX_POOL_2D"}  # ops that only move or select values


def dequantized_only(model: bytes) -> list[str]:
    """Outputs of data movement in an int8 flatbuffer that moves values from a QUANTIZE to
    DEQUANTIZEs only (through further data movement; never read by an integer op nor returned):
    each such chain costs a QUANTIZE, a DEQUANTIZE and a rounding for nothing. The choices that
    keep ops float leave them behind: QUANTIZE -> TRANSPOSE -> DEQUANTIZE in front of a first
    convolution kept float for speed (MTCNN's nets), QUANTIZE -> RESHAPE -> DEQUANTIZE between a
    float PReLU and float heads. Kept float, the movement runs on the float values and the pair
    disappears. (Movement after an integer op is left alone: float, it would only move 4x the
    bytes.)"""
    from enginekit.targets.tflite.runner import undelegated_interpreter

    interpreter = undelegated_interpreter(model)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    writer = {index: op for op in ops for index in op["outputs"]}
    readers: dict[int, list[dict]] = {}
    for op in ops:
        for index in op["inputs"]:
            readers.setdefault(index, []).append(op)
    returned = {detail["index"] for detail in interpreter.get_output_details()}

    def quantized(index: int) -> bool:
        return index in tensors and np.dtype(tensors[index]["dtype"]).kind in "iu" and tensors[index]["dtype"] not in (np.int32, np.int64)

    def from_quantize(index: int) -> bool:
        op = writer.get(index)
        return op is not None and (op["op_name"] == "QUANTIZE" or (
            op["op_name"] in PASS_THROUGH_OPS and all(from_quantize(i) for i in op["inputs"] if quantized(i))))

    def only_dequantized(index: int) -> bool:
        return index not in returned and bool(readers.get(index)) and all(
            op["op_name"] == "DEQUANTIZE" or (op["op_name"] in PASS_THROUGH_OPS and all(only_dequantized(o) for o in op["outputs"]))
            for op in readers[index])

    return [tensors[o]["name"] for op in ops if op["op_name"] in PASS_THROUGH_OPS
            for o in op["outputs"] if quantized(o) and from_quantize(o) and only_dequantized(o)]
