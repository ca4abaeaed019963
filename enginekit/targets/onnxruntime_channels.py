"""ONNX Runtime INT8: Q/DQ convolutions with fewer than 16 output channels get zero channels up to 16.

Why: MLAS's integer convolution is several times slower when a convolution writes fewer than 16
channels than when it writes 16, on the same input (timed here, one thread, a 2-core AVX-512
VNNI EPYC, Q/DQ included: 4 -> 10 channels 3x3 at 64x64 137 us, 4 -> 16 79 us, float 59 us;
8 -> 10 at 48x48 90 us, 8 -> 16 52 us). From 16 channels up a few more cost what they compute
(40 or 48, 200 or 208: the same time), so only narrower convolutions are widened. A tiny
network's first layers are that narrow (MTCNN's P-Net writes 10 channels at 62x62; its
integer first convolution took 3x its float twin's time).

How: the convolution gets zero weights, zero bias and step 1 for the new channels, which hold
exact zeros (0 is on every activation grid). The widened tensor flows through ops that treat
channels alone (activations, pooling, per-tensor Q/DQ, a PRelu with one slope per channel, a
depthwise convolution, which is widened the same way) to convolutions that read every channel,
which get zero weights for the new ones. The outputs are bit-identical. A widened tensor must
reach nothing else (a graph output, a Concat, a Reshape, a product with another tensor): then
the convolution is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.onnx.nodes import attribute, tensor_producers, tensor_readers

ALIGNED_CHANNELS = 16  # MLAS's integer convolutions run full speed from this many output channels
CHANNEL_WISE_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                              "MaxPool", "AveragePool", "Identity"})  # each output channel is a function of its own input channel


@dataclass
class _Widening:
    """The edits that widen one convolution's output channels, collected before any is made."""

    channels: int
    padded: int
    tensors: set[str] = field(default_factory=set)  # tensors that carry the new channels
    widen_outputs: list[onnx.NodeProto] = field(default_factory=list)  # convolutions whose output channels grow (axis 0)
    widen_inputs: list[onnx.NodeProto] = field(default_factory=list)  # convolutions reading every channel (axis 1)
    slopes: list[onnx.NodeProto] = field(default_factory=list)  # PRelus whose per-channel slope grows


def align_output_channels(model: onnx.ModelProto) -> int:
    """Widen, in place, every ungrouped Q/DQ Conv writing fewer than ALIGNED_CHANNELS channels
    to ALIGNED_CHANNELS, where its output reaches only ops that can carry the new zero channels
    (see the module's docstring). Returns how many Convs were widened."""
    widened, stale = 0, set()
    for conv in [n for n in model.graph.node if n.op_type == "Conv" and attribute(n, "group", 1) == 1]:
        plan = _plan(model.graph, conv)
        if plan is not None:
            stale |= plan.tensors | _apply(model.graph, plan)
            widened += 1
    if stale:  # the shapes recorded for widened tensors and constants no longer hold
        kept = [v for v in model.graph.value_info if v.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return widened


def _plan(graph: onnx.GraphProto, conv: onnx.NodeProto) -> _Widening | None:
    weights = _quantized_weight(graph, conv)
    if weights is None or weights.ndim < 3 or not 0 < weights.shape[0] < ALIGNED_CHANNELS:
        return None
    plan = _Widening(weights.shape[0], ALIGNED_CHANNELS, widen_outputs=[conv])
    readers, outputs = tensor_readers(graph), {o.name for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    pending = [conv.output[0]]
    while pending:
        tensor = pending.pop()
        if tensor in plan.tensors:
            continue
        if tensor in outputs or not readers.get(tensor):
            return None
        plan.tensors.add(tensor)
        for reader in readers[tensor]:
            role = _role(graph, reader, tensor, plan.channels, initializers)
            if role is None:
                return None
            if role == "reads_all":
                plan.widen_inputs.append(reader)
                continue
            if role == "depthwise":
                plan.widen_outputs.append(reader)
            elif role == "slope":
                plan.slopes.append(reader)
            pending.append(reader.output[0])
    return plan


def _role(graph: onnx.GraphProto, node: onnx.NodeProto, tensor: str, channels: int,
          initializers: dict[str, onnx.TensorProto]) -> str | None:
    """How `node` treats the widened `tensor`: passes its channels on ("channel_wise"), needs
    its per-channel slope widened ("slope"), is a depthwise Conv widened like the producer
    ("depthwise"), reads every channel ("reads_all": a Conv's input weights widened), or None
    (it cannot take the new channels)."""
    if len(node.output) != 1 or node.input[0] != tensor or tensor in node.input[1:]:
        return None
    if node.op_type in CHANNEL_WISE_OPS:
        return "channel_wise"
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        scale = initializers.get(node.input[1]) if len(node.input) > 1 else None
        return "channel_wise" if scale is not None and not list(scale.dims) else None
    if node.op_type == "PRelu":
        slope = initializers.get(node.input[1]) if len(node.input) > 1 else None
        return "slope" if slope is not None and _channel_axis_of_slope(list(slope.dims), channels) is not None else None
    if node.op_type != "Conv" or _quantized_weight(graph, node) is None:
        return None
    group = attribute(node, "group", 1)
    if group == 1:
        return "reads_all"
    weights = _quantized_weight(graph, node)
    return "depthwise" if group == channels and weights.shape[0] == channels and weights.shape[1] == 1 else None


def _quantized_weight(graph: onnx.GraphProto, conv: onnx.NodeProto) -> np.ndarray | None:
    """A Conv's integer weights where they (behind a DequantizeLinear), their per-channel steps
    and zero points, and its bias (a constant, or integers behind a DequantizeLinear) are read
    by nothing else, so that they can be widened; None otherwise."""
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    initializers = {t.name: t for t in graph.initializer}

    def private(name: str) -> bool:
        return name in initializers and len(readers.get(name, [])) == 1

    def dequantized_constant(name: str) -> onnx.NodeProto | None:
        dequantize = producers.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(readers.get(name, [])) != 1 \
                or not private(dequantize.input[0]):
            return None
        shared = [i for i in dequantize.input[1:] if i and not private(i)]
        return dequantize if all(i in initializers and numpy_helper.to_array(initializers[i]).size == 1 for i in shared) else None

    weight = dequantized_constant(conv.input[1]) if len(conv.input) > 1 else None
    bias = conv.input[2] if len(conv.input) > 2 else ""
    if weight is None or (bias and not private(bias) and dequantized_constant(bias) is None):
        return None
    return numpy_helper.to_array(initializers[weight.input[0]])


def _channel_axis_of_slope(dims: list[int], channels: int) -> int | None:
    """The axis of a PRelu slope of shape [C, 1, ...] or [1, C, 1, ...] that holds the channels."""
    if dims and dims[0] == channels and all(d == 1 for d in dims[1:]):
        return 0
    if len(dims) > 1 and dims[0] == 1 and dims[1] == channels and all(d == 1 for d in dims[2:]):
        return 1
    return None


def _apply(graph: onnx.GraphProto, plan: _Widening) -> set[str]:
    """Make the plan's edits; returns the names of the constants widened."""
    producers = tensor_producers(graph)
    initializers = {t.name: t for t in graph.initializer}
    widened: set[str] = set()

    def pad(name: str, axis: int, value: float | None) -> None:
        """Add the new channels along `axis`, all `value`, or the last channel's (None)."""
        tensor = initializers[name]
        array = numpy_helper.to_array(tensor)
        widths = [(0, plan.padded - plan.channels if i == axis else 0) for i in range(array.ndim)]
        padded = np.pad(array, widths, mode="edge") if value is None else np.pad(array, widths, constant_values=value)
        tensor.CopyFrom(numpy_helper.from_array(padded, name))
        widened.add(name)

    def pad_dequantized(dequantize: onnx.NodeProto) -> None:
        """A DequantizeLinear's integers (0 added) and per-channel steps and zero points (the
        last channel's repeated: a bias's step stays the input's step times the weight's, which
        ORT's integer convolution takes for granted)."""
        pad(dequantize.input[0], 0, 0)
        for name in dequantize.input[1:3]:
            if name and list(initializers[name].dims) == [plan.channels]:
                pad(name, 0, None)

    for conv in plan.widen_outputs:
        pad_dequantized(producers[conv.input[1]])
        bias = conv.input[2] if len(conv.input) > 2 else ""
        if bias in initializers:  # a float bias
            pad(bias, 0, 0)
        elif bias:
            pad_dequantized(producers[bias])
        if attribute(conv, "group", 1) != 1:
            next(a for a in conv.attribute if a.name == "group").i = plan.padded
    for conv in plan.widen_inputs:
        pad(producers[conv.input[1]].input[0], 1, 0)
    for prelu in plan.slopes:
        pad(prelu.input[1], _channel_axis_of_slope(list(initializers[prelu.input[1]].dims), plan.channels), 1)
    return widened
