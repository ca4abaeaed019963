"""ONNX Runtime INT8: Q/DQ convolutions with fewer than 16 output channels get zero channels up to 16.

Why: MLAS's integer convolution is several times slower when a convolution writes fewer than 16
channels than when it writes 16, on the same input (timed here, one thread, a 2-core AVX-512
VNNI EPYC, Q/DQ included: 4 -> 10 channels 3x3 at 64x64 137 us, 4 -> 16 79 us, float 59 us;
8 -> 10 at 48x48 90 us, 8 -> 16 52 us). From 16 channels up a few more cost what they compute
(40 or 48, 200 or 208: the same time), so only narrower convolutions are widened. A tiny
network's first layers are that narrow (MTCNN's P-Net writes 10 channels at 62x62; its
integer first convolution took 3x its float twin's time).

How: the convolution gets zero weights, zero bias and the last channel's steps for the new
channels (weights with zero point 0 only: int8, not the uint8 weights of CPUs without VNNI),
which hold exact zeros (0 is on every activation grid). The widened tensor flows through ops
that treat channels alone (activations, pooling, per-tensor Q/DQ, a PRelu with one slope per
channel, a depthwise convolution, which is widened the same way) to convolutions that read every
channel, which get zero weights for the new ones. The outputs are bit-identical. A widened tensor must
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
    tensors: set[str] = field(default_factory=set)  # tensors that carry the new channels
    widen_outputs: list[onnx.NodeProto] = field(default_factory=list)  # convolutions whose output channels grow (axis 0)
    widen_inputs: list[onnx.NodeProto] = field(default_factory=list)  # convolutions reading every channel (axis 1)
    slopes: list[onnx.NodeProto] = field(default_factory=list)  # PRelus whose per-channel slope grows


def align_output_channels(model: onnx.ModelProto) -> int:
    """Widen, in place, every ungrouped Q/DQ Conv writing fewer than ALIGNED_CHANNELS channels
    to ALIGNED_CHANNELS, where its output reaches only ops that can carry the new zero channels
    (see the module's docstring). Returns how many Convs were widened."""
    graph = _Graph(model.graph)  # widening edits constants and attributes, never which node reads what
    widened, stale = 0, set()
    for conv in [n for n in model.graph.node if n.op_type == "Conv" and attribute(n, "group", 1) == 1]:
        plan = graph.plan(conv)
        if plan is not None:
            stale |= plan.tensors | _apply(graph, plan)
            widened += 1
    if stale:  # the shapes recorded for widened tensors and constants no longer hold
        kept = [v for v in model.graph.value_info if v.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return widened


class _Graph:
    """Who writes and reads each tensor of a graph, and its constants, looked up once."""

    def __init__(self, graph: onnx.GraphProto):
        self.producers, self.readers = tensor_producers(graph), tensor_readers(graph)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def plan(self, conv: onnx.NodeProto) -> _Widening | None:
        """The edits that widen `conv`'s output channels, or None where they cannot be made."""
        dims = self.weight_dims(conv)
        if dims is None or len(dims) < 3 or not 0 < dims[0] < ALIGNED_CHANNELS:
            return None
        plan = _Widening(dims[0], widen_outputs=[conv])
        pending = [conv.output[0]]
        while pending:
            tensor = pending.pop()
            if tensor in plan.tensors:
                continue
            if tensor in self.outputs or not self.readers.get(tensor):
                return None
            plan.tensors.add(tensor)
            for reader in self.readers[tensor]:
                role = self.role(reader, tensor, plan.channels)
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

    def role(self, node: onnx.NodeProto, tensor: str, channels: int) -> str | None:
        """How `node` treats the widened `tensor`: passes its channels on ("channel_wise"), needs
        its per-channel slope widened ("slope"), is a depthwise Conv widened like the producer
        ("depthwise"), reads every channel ("reads_all": a Conv's input weights widened), or
        None (it cannot take the new channels)."""
        if len(node.output) != 1 or node.input[0] != tensor or tensor in node.input[1:]:
            return None
        if node.op_type in CHANNEL_WISE_OPS:
            return "channel_wise"
        constant = self.initializers.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return "channel_wise" if constant is not None and not list(constant.dims) else None
        if node.op_type == "PRelu":
            return "slope" if constant is not None and _channel_axis_of_slope(list(constant.dims), channels) is not None else None
        dims = self.weight_dims(node) if node.op_type == "Conv" else None
        if dims is None:
            return None
        group = attribute(node, "group", 1)
        if group == 1:
            return "reads_all"
        return "depthwise" if group == channels and dims[0] == channels and dims[1] == 1 else None

    def weight_dims(self, conv: onnx.NodeProto) -> list[int] | None:
        """A Conv's weight shape where its integer weights (behind a DequantizeLinear), their
        per-channel steps and zero points, and its bias (a constant, or integers behind a
        DequantizeLinear) are read by nothing else, so that they can be widened; else None."""
        weight = self._dequantized_constant(conv.input[1]) if len(conv.input) > 1 else None
        bias = conv.input[2] if len(conv.input) > 2 else ""
        if weight is None or (bias and not self._private(bias) and self._dequantized_constant(bias) is None):
            return None
        return list(self.initializers[weight.input[0]].dims)

    def _private(self, name: str) -> bool:
        return name in self.initializers and len(self.readers.get(name, [])) == 1

    def _dequantized_constant(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear writing `name` from constant integers only it reads, with zero
        points 0 (so that a 0 added to the integers is a 0 added to the values: not uint8
        weights, zero point 128) and steps and zero points that only it reads or that are
        single values (not widened)."""
        dequantize = self.producers.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(self.readers.get(name, [])) != 1 \
                or not self._private(dequantize.input[0]):
            return None
        zero_point = dequantize.input[2] if len(dequantize.input) > 2 else ""
        if zero_point and (zero_point not in self.initializers or np.any(numpy_helper.to_array(self.initializers[zero_point]) != 0)):
            return None
        shared = [i for i in dequantize.input[1:] if i and not self._private(i)]
        single = all(i in self.initializers and int(np.prod(self.initializers[i].dims)) == 1 for i in shared)
        return dequantize if single else None


def _channel_axis_of_slope(dims: list[int], channels: int) -> int | None:
    """The axis of a PRelu slope of shape [C, 1, ...] or [1, C, 1, ...] that holds the channels."""
    if dims and dims[0] == channels and all(d == 1 for d in dims[1:]):
        return 0
    if len(dims) > 1 and dims[0] == 1 and dims[1] == channels and all(d == 1 for d in dims[2:]):
        return 1
    return None


def _apply(graph: _Graph, plan: _Widening) -> set[str]:
    """Make the plan's edits; returns the names of the constants widened."""
    producers, initializers = graph.producers, graph.initializers
    widened: set[str] = set()

    def pad(name: str, axis: int, value: float | None) -> None:
        """Add the new channels along `axis`, all `value`, or the last channel's (None)."""
        tensor = initializers[name]
        array = numpy_helper.to_array(tensor)
        widths = [(0, ALIGNED_CHANNELS - plan.channels if i == axis else 0) for i in range(array.ndim)]
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
            next(a for a in conv.attribute if a.name == "group").i = ALIGNED_CHANNELS
    for conv in plan.widen_inputs:
        pad(producers[conv.input[1]].input[0], 1, 0)
    for prelu in plan.slopes:
        pad(prelu.input[1], _channel_axis_of_slope(list(initializers[prelu.input[1]].dims), plan.channels), 1)
    return widened
