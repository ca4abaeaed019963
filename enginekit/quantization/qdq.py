"""Rewrite an FP32 ONNX graph into an explicit Q/DQ graph from a plan, a table and an encoding.

Activations: QuantizeLinear -> DequantizeLinear right after the producer; quantized consumers
read the DQ output, float consumers keep the original tensor. Weights: int8 initializers with a
per-channel DequantizeLinear. Biases stay float here (bias correction edits them); for targets
that want them, `integerize_biases` turns them into int32 with scale = input scale x weight scale.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from enginekit.calibration.table import CalibrationTable
from enginekit.core.errors import InputError
from enginekit.onnx.graph import drop_unused_initializers
from enginekit.onnx.nodes import attribute, graph_reads, tensor_readers
from enginekit.quantization.encoding import QParams, activation_qparams, quantize_weight
from enginekit.quantization.placement import QuantPlan

DQ_SUFFIX = "__dq"


@dataclass
class QdqGraph:
    model: onnx.ModelProto
    activations: dict[str, QParams] = field(default_factory=dict)
    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)  # weight tensor -> per-channel scales
    rounded: set[str] = field(default_factory=set)  # weights whose integers are not the nearest (quantization.rounding)


def insert_qdq(fp32: onnx.ModelProto, plan: QuantPlan, table: CalibrationTable, encoding: str, per_channel: bool = True,
               weight_type: str = "int8", rounded: Mapping[str, np.ndarray] | None = None) -> QdqGraph:
    """`rounded`: weight initializer -> its signed integers (quantization.rounding), for the
    weights not rounded to nearest."""
    missing = [t for t in plan.activations if plan.same_scale.get(t, t) not in table.tensors]
    if missing:
        raise InputError(f"the calibration table has no range for {len(missing)} tensor(s) this graph quantizes (e.g. {missing[:3]}); calibrate this model again")
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    result = QdqGraph(model)
    for tensor in plan.activations:
        source = plan.same_scale.get(tensor, tensor)
        result.activations[tensor] = activation_qparams(tensor, table.tensors[source], encoding)

    initializers = {t.name: t for t in graph.initializer}
    new_initializers: list[onnx.TensorProto] = []
    weight_nodes: dict[str, list[onnx.NodeProto]] = {}
    for spec in plan.weights:
        if spec.tensor in result.weight_scales:
            continue
        chosen = (rounded or {}).get(spec.tensor)
        values, scales, zero_points = quantize_weight(numpy_helper.to_array(initializers[spec.tensor]), spec.axis if per_channel else None,
                                                      weight_type, chosen)
        if chosen is not None:
            result.rounded.add(spec.tensor)
        result.weight_scales[spec.tensor] = scales
        q_name = f"{spec.tensor}__int8"
        new_initializers += [
            numpy_helper.from_array(values, q_name),
            numpy_helper.from_array(scales, f"{spec.tensor}__scale"),
            numpy_helper.from_array(zero_points, f"{spec.tensor}__zp"),
        ]
        attributes = {"axis": spec.axis} if per_channel else {}
        weight_nodes.setdefault(spec.node, []).append(helper.make_node(
            "DequantizeLinear", [q_name, f"{spec.tensor}__scale", f"{spec.tensor}__zp"], [spec.tensor + DQ_SUFFIX],
            name=f"{spec.tensor}_DequantizeLinear", **attributes))

    def qdq_nodes(tensor: str) -> list[onnx.NodeProto]:
        qp = result.activations[tensor]
        new_initializers.extend([
            numpy_helper.from_array(np.array(qp.scale, np.float32), f"{tensor}__scale"),
            numpy_helper.from_array(np.array(qp.zero_point, qp.numpy_type), f"{tensor}__zp"),
        ])
        inputs = [f"{tensor}__scale", f"{tensor}__zp"]
        return [
            helper.make_node("QuantizeLinear", [tensor, *inputs], [f"{tensor}__q"], name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tensor}__q", *inputs], [tensor + DQ_SUFFIX], name=f"{tensor}_DequantizeLinear"),
        ]

    quantized_nodes = set(plan.nodes)
    rewired = {spec.tensor for spec in plan.weights} | set(plan.activations)
    nodes: list[onnx.NodeProto] = []
    for value in graph.input:
        if value.name in result.activations:
            nodes += qdq_nodes(value.name)
    for node in graph.node:
        nodes += weight_nodes.get(node.name, [])
        if node.name in quantized_nodes or any(name in plan.outputs for name in node.input):
            node.input[:] = [name + DQ_SUFFIX if name in rewired and _reads_quantized(node, name, plan) else name for name in node.input]
        nodes.append(node)
        for output in node.output:
            if output in result.activations:
                nodes += qdq_nodes(output)
    del graph.node[:]
    graph.node.extend(nodes)
    used = graph_reads(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_initializers)
    return result


def rounded_float_weights(qdq: QdqGraph) -> dict[str, np.ndarray]:
    """The weights `qdq` did not round to nearest, dequantized (float32, the FP32 layout): what a
    target that quantizes float weights itself (per channel, max|w|/127) turns into the same
    integers."""
    initializers = {t.name: t for t in qdq.model.graph.initializer}
    weights = {}
    for node in qdq.model.graph.node:
        name = node.input[0].removesuffix("__int8")
        if node.op_type != "DequantizeLinear" or name not in qdq.rounded:
            continue
        values, scales, zero_points = (numpy_helper.to_array(initializers[t]).astype(np.float32) for t in node.input[:3])
        axis = attribute(node, "axis", 1) if scales.ndim else None
        shape = [-1 if i == axis % values.ndim else 1 for i in range(values.ndim)] if axis is not None else [1] * values.ndim
        weights[name] = ((values - zero_points.reshape(shape)) * scales.reshape(shape)).astype(np.float32)
    return weights


def _reads_quantized(node: onnx.NodeProto, name: str, plan: QuantPlan) -> bool:
    return plan.read_quantized(name, node.name) or any(w.tensor == name and w.node == node.name for w in plan.weights)


def biased_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The layers bias correction adjusts: Conv and Gemm nodes whose weights are quantized, and
    MatMul nodes with a quantized weight whose output only feeds the Add of a constant vector (a
    transformer's Linear layer, exported as MatMul + Add)."""
    adds = matmul_bias_adds(model)
    return [n for n in model.graph.node if n.input[1:2] and n.input[1].endswith(DQ_SUFFIX)
            and (n.op_type in ("Conv", "Gemm") or (n.op_type == "MatMul" and n.name in adds))]


def matmul_bias_adds(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul node name -> the initializer its output's only reader, an Add, adds (a 1-D vector)."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = tensor_readers(model.graph)
    outputs = {o.name for o in model.graph.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.output[0] in outputs:
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add":
            continue
        other = [name for name in after[0].input if name != node.output[0]]
        if len(other) == 1 and other[0] in initializers and len(initializers[other[0]].dims) == 1:
            found[node.name] = other[0]
    return found


def bias_axis(node: onnx.NodeProto) -> int:
    """The axis a layer's output channels (and its bias) are on: 1 for Conv/Gemm, the last for MatMul."""
    return -1 if node.op_type == "MatMul" else 1


class BiasOwners:
    """Who reads each initializer of a model, kept current while biases are given to their layers:
    a bias several nodes read (exporters merge equal constants) is copied for the one layer whose
    bias changes. One count for the whole graph, so giving every layer its bias costs one pass."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.readers = Counter(name for node in model.graph.node for name in node.input)
        self.readers.update(output.name for output in model.graph.output)  # an output is read by the caller
        self.initializers = {t.name: t for t in model.graph.initializer}

    def own(self, holder: onnx.NodeProto, slot: int, name: str) -> onnx.TensorProto:
        """`holder.input[slot]` (an initializer) as one only that input reads: itself, or a copy
        named `name` that the input is pointed at."""
        current = holder.input[slot]
        if self.readers[current] <= 1:
            return self.initializers[current]
        return self._add(numpy_helper.from_array(numpy_helper.to_array(self.initializers[current]), name), holder, slot)

    def add_zero_bias(self, node: onnx.NodeProto, channels: int, name: str) -> onnx.TensorProto:
        """A zero bias of `channels` for a Conv/Gemm that has none (its third input)."""
        while len(node.input) < 3:
            node.input.append("")
        return self._add(numpy_helper.from_array(np.zeros(channels, np.float32), name), node, 2)

    def _add(self, tensor: onnx.TensorProto, holder: onnx.NodeProto, slot: int) -> onnx.TensorProto:
        self.model.graph.initializer.append(tensor)
        stored = self.model.graph.initializer[-1]  # the message in the graph (append copies)
        if holder.input[slot]:
            self.readers[holder.input[slot]] -= 1
        holder.input[slot] = stored.name
        self.readers[stored.name] += 1
        self.initializers[stored.name] = stored
        return stored


def ensure_bias(model: onnx.ModelProto, node: onnx.NodeProto, channels: int, owners: BiasOwners | None = None) -> onnx.TensorProto:
    """The node's own float bias initializer (a MatMul's: the constant its Add adds), creating a
    zero bias for a Conv/Gemm that has none. A bias other nodes read too is copied for this node
    first: exporters merge equal constants, and a transformer's zero-initialised Linear biases
    reached ONNX as 2 initializers for 24 layers (the corpus ViT), so correcting one layer's bias
    moved 20 others' (INT8 cosine 0.9997 -> 0.60). Pass one `owners` for many nodes of a graph."""
    owners = owners or BiasOwners(model)
    name = f"{node.name}__bias"
    if node.op_type == "MatMul":
        add = next(n for n in model.graph.node if node.output[0] in n.input and n.op_type == "Add")
        return owners.own(add, list(add.input).index(matmul_bias_adds(model)[node.name]), name)
    if len(node.input) > 2 and node.input[2]:
        return owners.own(node, 2, name)
    return owners.add_zero_bias(node, channels, name)


BIAS_HEADROOM = 2**24  # |int32 bias| kept below this: the products a kernel adds to it cannot overflow int32


def integerize_biases(qdq: QdqGraph) -> None:
    """Replace float Conv/Gemm biases by int32 + DequantizeLinear (scale = input x weight scale),
    the form ONNX Runtime fuses into QLinearConv / QGemm. A channel whose bias would not fit in
    BIAS_HEADROOM first gets a coarser weight scale (`widen_dead_channels`)."""
    model = qdq.model
    owners = BiasOwners(model)
    weight_axes = {n.output[0]: attribute(n, "axis", 1) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in owners.initializers:
            bias_tensor = owners.own(node, 2, f"{node.name}__bias")  # one int32 bias per node: its scale is that node's
            activation = node.input[0].removesuffix(DQ_SUFFIX)
            weight = node.input[1].removesuffix(DQ_SUFFIX)
            bias = _bias_vector(numpy_helper.to_array(bias_tensor), qdq.weight_scales[weight].size) if weight in qdq.weight_scales else None
            if node.input[0].endswith(DQ_SUFFIX) and activation in qdq.activations and bias is not None:
                widen_dead_channels(qdq, owners.initializers, weight, bias, qdq.activations[activation].scale, weight_axes[node.input[1]])
                scale = (qdq.activations[activation].scale * qdq.weight_scales[weight].astype(np.float64)).astype(np.float32)
                scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
                values = np.round(bias / scale.astype(np.float64)).clip(-(2**31), 2**31 - 1).astype(np.int32)
                base = node.input[2]
                model.graph.initializer.extend([
                    numpy_helper.from_array(values, f"{base}__int32"),
                    numpy_helper.from_array(scale, f"{base}__int32_scale"),
                    numpy_helper.from_array(np.zeros_like(values), f"{base}__int32_zp"),
                ])
                nodes.append(helper.make_node("DequantizeLinear", [f"{base}__int32", f"{base}__int32_scale", f"{base}__int32_zp"],
                                              [f"{base}{DQ_SUFFIX}"], name=f"{base}_DequantizeLinear", axis=0))
                node.input[2] = f"{base}{DQ_SUFFIX}"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)


def _bias_vector(bias: np.ndarray, channels: int) -> np.ndarray | None:
    """A Conv/Gemm bias as the 1-D vector an int32 DequantizeLinear takes (a scale of more than
    one dim is invalid: OpenVINO refused skl2onnx's Gemm bias of shape [1, N]): [1, N] and a
    scalar broadcast over per-channel weights become [N]; a bias that varies along the rows too
    ([M, N]) has no such form and stays float."""
    if bias.size == 1 and channels > 1:
        return np.full(channels, float(bias.reshape(-1)[0]))
    if bias.ndim == 0 or bias.size != bias.shape[-1]:
        return bias.reshape(1).astype(np.float64) if bias.size == 1 else None
    return bias.reshape(-1).astype(np.float64)


def widen_dead_channels(qdq: QdqGraph, initializers: Mapping[str, onnx.TensorProto], weight: str, bias: np.ndarray,
                        input_scale: float, axis: int) -> list[int]:
    """Give each output channel (along `axis` of the weight) whose bias / (input scale x weight scale) exceeds BIAS_HEADROOM
    the weight scale |bias| / (input scale x BIAS_HEADROOM), its integer weights re-rounded to it;
    returns those channels.

    Why: a channel whose weights are ~0 (a dead channel after batch-norm folding: efficientnet_lite0
    has dozens) has a per-channel scale near 1e-11; its int32 bias was clipped at -2^31, and ONNX
    Runtime's QLinearConv, adding the products to it, wrapped around: the first layer's output lost
    15 dB against the exact simulation, and every layer with such channels lost some. Re-rounded to
    the coarser scale those weights become 0 or a few levels, which changes the output by less
    than the weights themselves (~1e-9 each)."""
    scales = qdq.weight_scales[weight]
    if scales.size != bias.size or scales.size == 1:
        return []
    needed = np.abs(bias) / (input_scale * BIAS_HEADROOM)
    channels = np.flatnonzero(needed > scales)
    if channels.size == 0:
        return []
    values = numpy_helper.to_array(initializers[f"{weight}__int8"])
    zero_point = int(numpy_helper.to_array(initializers[f"{weight}__zp"]).reshape(-1)[0])  # one for every channel: 0 or 128
    signed = np.moveaxis(values.astype(np.int64) - zero_point, axis, 0)
    widened = scales.astype(np.float64).copy()
    widened[channels] = needed[channels]
    levels = np.rint(signed[channels] * (scales[channels] / widened[channels]).reshape(-1, *[1] * (signed.ndim - 1)))
    signed[channels] = np.clip(levels, -127, 127)
    restored = np.moveaxis(signed, 0, axis) + zero_point
    new_scales = widened.astype(np.float32)
    initializers[f"{weight}__int8"].CopyFrom(numpy_helper.from_array(restored.astype(values.dtype), f"{weight}__int8"))
    initializers[f"{weight}__scale"].CopyFrom(numpy_helper.from_array(new_scales, f"{weight}__scale"))
    qdq.weight_scales[weight] = new_scales
    return channels.tolist()

