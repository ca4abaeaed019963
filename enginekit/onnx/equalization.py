"""Cross-layer equalisation (Nagel et al., 2019, "Data-Free Quantization"): per-channel ranges of
consecutive convolutions made equal by rescaling, weights only, no data.

For Conv1 -> H -> Conv2, where H is positively homogeneous per channel (Relu, LeakyRelu, PRelu,
MaxPool, or nothing: H(x / s) == H(x) / s for s > 0), dividing Conv1's output channel c (its
weights and bias) by s_c and multiplying the weights with which Conv2 reads input channel c by s_c
computes the same function. With

    s_c = sqrt(r1_c / r2_c),   r1_c = max|W1[c, ...]|,   r2_c = max|W2[:, c, ...]|

both ranges become sqrt(r1_c * r2_c): an input channel that Conv2 weighs far more than the others
no longer decides the step of the INT8 grid every other channel of Conv2's output shares (weights
are quantized per output channel, so the spread that matters is across Conv2's input channels),
and the channels of the tensor between the two layers move towards one range. A layer sits in
two pairs (the second of one, the first of the next), so the scales are iterated to a fixed
point, as the paper does. ReLU6 and other clips are not homogeneous (clip(x / s, 0, 6) is not
clip(x, 0, 6) / s), so pairs through them are left alone.

The divisors are per tensor (the Conv1 output), the same shape as SmoothQuant's
(onnx/smoothing.py), and travel in the calibration table the same way: a given table remakes the
equalised graph without data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.onnx.nodes import attribute, tensor_readers

HOMOGENEOUS_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool", "Identity"})
MIN_RANGE = 1e-8  # a channel with (almost) no weights on either side keeps s = 1
MAX_ROUNDS = 50
CONVERGED = 1e-4  # stop when no scale of a round moves by more than this (relative)


@dataclass(frozen=True)
class Pair:
    """Conv `first` writes `tensor`; through `between` (homogeneous ops, one reader each) the
    convolutions `seconds` read it."""

    tensor: str
    first: onnx.NodeProto
    between: tuple[onnx.NodeProto, ...]
    seconds: tuple[onnx.NodeProto, ...]


def equalizable_pairs(model: onnx.ModelProto) -> dict[str, Pair]:
    """Conv output -> its pair, for every conv whose output reaches only convolutions (with
    constant, unshared weights) through homogeneous ops; in graph order."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    readers = tensor_readers(graph)
    outputs = {value.name for value in graph.output}

    def owned(name: str) -> bool:  # a constant only this node reads: rescaling it changes nothing else
        return name in constants and len(readers.get(name, [])) == 1

    pairs = {}
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or not owned(node.input[1]):
            continue
        if len(node.input) > 2 and node.input[2] and not owned(node.input[2]):
            continue
        tensor, between = node.output[0], []
        current = tensor
        while current not in outputs and len(readers.get(current, [])) == 1 and readers[current][0].op_type in HOMOGENEOUS_OPS:
            step = readers[current][0]
            if step.input[0] != current or len(step.output) != 1:  # a PRelu's slope is left as it is: no need to own it
                break
            between.append(step)
            current = step.output[0]
        seconds = readers.get(current, [])
        if current in outputs or not seconds:
            continue
        if all(second.op_type == "Conv" and second.input[0] == current and list(second.input).count(current) == 1
               and owned(second.input[1]) for second in seconds):
            pairs[tensor] = Pair(tensor, node, tuple(between), tuple(seconds))
    return pairs


def equalization_divisors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per equalisable tensor, the divisor of each channel (float32), iterated over every pair
    until the ranges stop moving."""
    pairs = equalizable_pairs(model)
    constants = {init.name: init for init in model.graph.initializer}
    weights = {name: numpy_helper.to_array(constants[name]).astype(np.float64)
               for pair in pairs.values() for name in [pair.first.input[1], *(second.input[1] for second in pair.seconds)]}
    divisors = {tensor: np.ones(weights[pair.first.input[1]].shape[0]) for tensor, pair in pairs.items()}
    for _ in range(MAX_ROUNDS):
        moved = 0.0
        for tensor, pair in pairs.items():
            first = weights[pair.first.input[1]]
            first_range = np.abs(first).reshape(first.shape[0], -1).max(axis=1)
            second_range = np.max([_input_channel_ranges(weights[second.input[1]], _group(second), first.shape[0])
                                   for second in pair.seconds], axis=0)
            usable = (first_range > MIN_RANGE) & (second_range > MIN_RANGE)
            scale = np.where(usable, np.sqrt(np.where(usable, first_range, 1) / np.where(usable, second_range, 1)), 1.0)
            _divide_first(weights, pair, scale)
            for second in pair.seconds:
                weights[second.input[1]] = _scale_inputs(weights[second.input[1]], _group(second), scale)
            divisors[tensor] = divisors[tensor] * scale
            moved = max(moved, float(np.abs(scale - 1).max(initial=0.0)))
        if moved < CONVERGED:
            break
    return {tensor: value.astype(np.float32) for tensor, value in divisors.items() if not np.all(value == 1)}


def apply_equalization(model: onnx.ModelProto, divisors: Mapping[str, np.ndarray], pairs: Mapping[str, Pair]) -> int:
    """Divide, in place, each tensor in `divisors` (a pair's Conv1 output: its weights and bias)
    and multiply its readers' weights back; returns how many pairs were equalised. `pairs`:
    `equalizable_pairs(model)`, which the caller has checked holds every tensor of `divisors`."""
    constants = {init.name: init for init in model.graph.initializer}
    for tensor, values in divisors.items():
        pair, scale = pairs[tensor], np.asarray(values, dtype=np.float64)
        first = constants[pair.first.input[1]]
        if first.dims[0] != scale.shape[0]:
            raise ValueError(f"'{tensor}' has {first.dims[0]} channels, the equalisation {scale.shape[0]}")
        names = [name for name in pair.first.input[1:3] if name]
        for name in names:
            value = numpy_helper.to_array(constants[name])
            shape = (-1,) + (1,) * (value.ndim - 1)
            constants[name].CopyFrom(numpy_helper.from_array((value / scale.reshape(shape)).astype(value.dtype), name))
        for second in pair.seconds:
            value = numpy_helper.to_array(constants[second.input[1]])
            scaled = _scale_inputs(value.astype(np.float64), _group(second), scale)
            constants[second.input[1]].CopyFrom(numpy_helper.from_array(scaled.astype(value.dtype), second.input[1]))
    return len(divisors)


def _group(conv: onnx.NodeProto) -> int:
    return int(attribute(conv, "group", 1))


def _input_channel_ranges(weight: np.ndarray, group: int, channels: int) -> np.ndarray:
    """max |w| over everything that multiplies each input channel of a (grouped) convolution."""
    per_group = weight.shape[1]
    grouped = np.abs(weight).reshape(group, weight.shape[0] // group, per_group, -1)
    ranges = grouped.max(axis=(1, 3)).reshape(group * per_group)
    if ranges.shape[0] != channels:
        raise ValueError(f"a convolution reads {ranges.shape[0]} channels where {channels} are written")
    return ranges


def _scale_inputs(weight: np.ndarray, group: int, scale: np.ndarray) -> np.ndarray:
    """`weight` with everything that multiplies input channel c multiplied by scale[c]."""
    per_group = weight.shape[1]
    grouped = weight.reshape(group, weight.shape[0] // group, per_group, -1)
    return (grouped * scale.reshape(group, 1, per_group, 1)).reshape(weight.shape)


def _divide_first(weights: dict[str, np.ndarray], pair: Pair, scale: np.ndarray) -> None:
    name = pair.first.input[1]
    weights[name] = weights[name] / scale.reshape((-1,) + (1,) * (weights[name].ndim - 1))

