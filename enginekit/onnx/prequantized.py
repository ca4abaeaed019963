"""Models that arrive already quantized: an ONNX graph in the QDQ format (PyTorch QAT export,
ONNX Runtime's `quantize_static`, NVIDIA ModelOpt, enginekit's own INT8 artifacts).

`strip_qdq` turns such a graph into its float twin and keeps what the quantizer decided: every
activation's grid (scale, zero point, type) by tensor name, and weights dequantized to the float
values they stand for (already on their grid). The float graph goes through export and parity
like any source; the grids become the calibration table of every INT8 build, so no calibration
data is needed and the original scales are honoured (re-encoded only where a target needs
another encoding). Graphs in the QOperator format (QLinearConv ...) are refused: their float
twin is not recoverable op by op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from enginekit.core.errors import InputError
from enginekit.onnx.graph import drop_unused_initializers
from enginekit.onnx.nodes import attribute, drop_unused_domain, tensor_producers, tensor_readers

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "ConvInteger", "MatMulInteger", "QGemm",
                 "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu")
NHWC_MAX_POOL, MICROSOFT_DOMAIN = "NhwcMaxPool", "com.microsoft"  # ONNX Runtime's channels-last integer MaxPool
NHWC_POOLED_SUFFIX = "__nhwc"  # the channels-last integer output of ONNX Runtime's NhwcMaxPool, named after the float pool's output
_TYPES = {TensorProto.INT8: ("int8", -128, 127), TensorProto.UINT8: ("uint8", 0, 255)}


@dataclass(frozen=True)
class QuantGrid:
    """One activation's integer grid as the source quantized it."""

    scale: float
    zero_point: int
    type: str  # "int8" or "uint8"

    def bounds(self) -> tuple[float, float]:
        """The float range the grid represents: [(qmin - z) * s, (qmax - z) * s]."""
        low, high = (-128, 127) if self.type == "int8" else (0, 255)
        return (low - self.zero_point) * self.scale, (high - self.zero_point) * self.scale

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "type": self.type}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "QuantGrid":
        return cls(float(entry["scale"]), int(entry["zero_point"]), str(entry["type"]))


@dataclass
class Dequantized:
    model: onnx.ModelProto
    activations: dict[str, QuantGrid] = field(default_factory=dict)
    weights: int = 0  # weight (and bias) tensors dequantized into float initializers


def quantized_operators(model: onnx.ModelProto) -> list[str]:
    """The QOperator-format and dynamic-quantization ops of `model` (ConvInteger, DynamicQuantizeLSTM...):
    a graph already quantized by ONNX Runtime's tools, whose float weights are gone."""
    return sorted({node.op_type for node in model.graph.node if node.op_type in QOPERATOR_OPS or node.op_type.startswith("DynamicQuantize")})


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def strip_qdq(model: onnx.ModelProto, origin: str = "") -> Dequantized:
    """The float twin of a QDQ graph, with the grid of every quantized activation (`model`
    itself is left as it was)."""
    qoperator = quantized_operators(model)
    if qoperator:
        raise InputError(f"holds QOperator-format ops ({', '.join(qoperator)}); enginekit reads pre-quantized models in the "
                         "QDQ format (QuantizeLinear/DequantizeLinear around float ops)", origin)
    result = Dequantized(onnx.ModelProto())
    result.model.CopyFrom(model)
    graph = result.model.graph
    restore_channels_first_pools(result.model)
    initializers = {t.name: t for t in graph.initializer}
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    renames: dict[str, str] = {}  # a DQ output -> the float tensor it stands for
    nonneg: set[str] = set()  # tensors known to be >= 0 (a ReLU's output, or one on a grid from 0)
    relu_after: dict[int, onnx.NodeProto] = {}  # id(producer) -> the Relu restored after it
    constants: list[onnx.TensorProto] = []
    dropped: set[int] = set()
    rescaled: dict[str, list[onnx.NodeProto]] = {}  # a DQ output read on another grid than its Q's -> the float ops it is
    for index, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            grid, source = _grid(node, initializers, origin), node.input[0]
            read_as = source
            if grid.bounds()[0] == 0.0:
                if not _non_negative(source, producers, renames, nonneg):
                    # a quantizer that folded a ReLU into the grid's lower bound (ONNX Runtime's
                    # does): the float twin keeps it as a Relu
                    relu = onnx.helper.make_node("Relu", [source], [f"{source}__relu"], name=f"{node.name}__relu")
                    relu_after[id(producers[source])] = relu
                    read_as = relu.output[0]
                    result.activations[read_as] = grid
                nonneg |= {source, read_as}
            for reader in readers.get(node.output[0], []):
                if reader.op_type != "DequantizeLinear":
                    raise InputError(f"QuantizeLinear '{node.name}' feeds {reader.op_type} '{reader.name}', not a DequantizeLinear; "
                                     "only QDQ pairs are read", origin)
                read_grid = _grid(reader, initializers, origin)
                if read_grid == grid:
                    renames[reader.output[0]] = read_as
                else:
                    rescaled[reader.output[0]], values = _rescaling(read_as, grid, read_grid, reader)
                    constants += values
                    result.activations[reader.output[0]] = read_grid
            result.activations[source] = grid
            dropped.add(index)
        elif node.op_type == "QuantizeLinear" and all(r.op_type == "DequantizeLinear" for r in readers.get(node.output[0], [])):
            dropped.add(index)  # a weight's Q of a float constant: its DequantizeLinear becomes the constant
        elif node.op_type == "DequantizeLinear" and node.output[0] in renames:
            dropped.add(index)
        elif node.op_type == "DequantizeLinear":
            value = dequantized_constant(node, producers, initializers)
            if value is not None:
                constants.append(numpy_helper.from_array(value, node.output[0]))
                result.weights += 1
                dropped.add(index)
    left = [node for i, node in enumerate(graph.node) if i not in dropped]
    stray = sorted({node.op_type for node in left if node.op_type in QDQ_OPS and node.output[0] not in rescaled})
    if stray:
        raise InputError(f"holds {', '.join(stray)} nodes that are not activation or weight QDQ pairs; they cannot be read", origin)
    nodes = []
    for node in left:
        if node.op_type == "DequantizeLinear" and node.output[0] in rescaled:
            nodes += rescaled[node.output[0]]
            continue
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        for i, name in enumerate(kept.input):
            kept.input[i] = renames.get(name, name)
        nodes += [kept] + ([relu_after[id(node)]] if id(node) in relu_after else [])
    for output in graph.output:
        output.name = renames.get(output.name, output.name)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    drop_unused_initializers(result.model)
    return result


def restore_channels_first_pools(model: onnx.ModelProto) -> None:
    """Turn, in place, each Transpose -> com.microsoft NhwcMaxPool -> Transpose of a
    QuantizeLinear's integers (how enginekit's ONNX Runtime artifact runs an 8-bit max pool,
    targets/onnxruntime_graph.py) back into the DequantizeLinear -> MaxPool -> QuantizeLinear
    on that grid it stands for."""
    from onnx import helper

    graph = model.graph
    while (pool := _restorable_pool(graph)) is not None:
        to_nhwc, to_nchw, quantize = pool[1:]
        pooled = pool[0].output[0].removesuffix(NHWC_POOLED_SUFFIX)  # the float pool's output, as the hub named it
        pooling = {a.name: helper.get_attribute_value(a) for a in pool[0].attribute}
        nodes = [helper.make_node("DequantizeLinear", [quantize.output[0], *quantize.input[1:]], [f"{pooled}__input"], name=f"{pooled}__dq"),
                 helper.make_node("MaxPool", [f"{pooled}__input"], [pooled], name=pool[0].name, **pooling),
                 helper.make_node("QuantizeLinear", [pooled, *quantize.input[1:]], [to_nchw.output[0]], name=f"{pooled}__q")]
        position = list(graph.node).index(to_nhwc)
        for node in pool:
            if node is not quantize:
                graph.node.remove(node)
        for offset, node in enumerate(nodes):
            graph.node.insert(position + offset, node)
    drop_unused_domain(model, MICROSOFT_DOMAIN)


def _restorable_pool(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, ...] | None:
    """The first NhwcMaxPool in enginekit's form (pool, transpose in, transpose out, the
    QuantizeLinear writing its integers), or None. A pool reading another pool's integers is
    found once that one is restored."""
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    for pool in graph.node:
        if pool.op_type != NHWC_MAX_POOL or pool.domain != MICROSOFT_DOMAIN:
            continue
        to_nhwc, after = producers.get(pool.input[0]), readers.get(pool.output[0], [])
        quantize = producers.get(to_nhwc.input[0]) if to_nhwc is not None and to_nhwc.op_type == "Transpose" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear" and len(after) == 1 and after[0].op_type == "Transpose" \
                and len(readers.get(to_nhwc.output[0], [])) == 1:
            return pool, to_nhwc, after[0], quantize
    return None


def _rescaling(source: str, written: QuantGrid, read: QuantGrid,
               dequantize: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The float ops a QuantizeLinear -> DequantizeLinear pair on two grids computes:
    clip(x, bounds of the written grid) * s_read / s_written + (z_written - z_read) * s_read,
    named by the DequantizeLinear's output (ONNX Runtime's artifact writes a hard sigmoid so: the
    clip is the saturation, the rescale its gain; targets/onnxruntime_graph.py)."""
    from onnx import helper

    stem, low, high = dequantize.output[0], *written.bounds()
    constants = [numpy_helper.from_array(np.array(value, np.float32), f"{stem}__{name}")
                 for name, value in (("low", low), ("high", high), ("gain", read.scale / written.scale),
                                     ("offset", (written.zero_point - read.zero_point) * read.scale))]
    return [helper.make_node("Clip", [source, f"{stem}__low", f"{stem}__high"], [f"{stem}__clipped"], name=f"{stem}__clip"),
            helper.make_node("Mul", [f"{stem}__clipped", f"{stem}__gain"], [f"{stem}__scaled"], name=f"{stem}__gain"),
            helper.make_node("Add", [f"{stem}__scaled", f"{stem}__offset"], [stem], name=f"{stem}__offset")], constants


SIGN_KEEPING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze",
                "Unsqueeze", "Resize", "Slice", "Split", "Concat", "Identity", "Pad")


def _non_negative(tensor: str, producers: dict[str, onnx.NodeProto], renames: dict[str, str], nonneg: set[str]) -> bool:
    """Whether `tensor` is >= 0 already: a graph input (its data decides), a Relu's output, or what
    a sign-keeping op (pooling, reshapes, concat) makes of tensors that are."""
    producer = producers.get(tensor)
    if tensor in nonneg or producer is None:
        return True
    if producer.op_type in ("Relu", "Sigmoid", "Softmax", "Abs", "Exp"):
        return True
    data = [renames.get(name, name) for name in (producer.input if producer.op_type == "Concat" else producer.input[:1]) if name]
    return producer.op_type in SIGN_KEEPING and bool(data) and all(_non_negative(name, producers, renames, nonneg) for name in data)


def activation_grid(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> QuantGrid | None:
    """The per-tensor 8-bit grid of a QuantizeLinear/DequantizeLinear with constant parameters,
    or None where it has none (computed or per-channel parameters, another integer type)."""
    try:
        return _grid(node, initializers, "")
    except InputError:
        return None


def _grid(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], origin: str) -> QuantGrid:
    scale = initializers.get(node.input[1])
    zero_point = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zero_point is None):
        raise InputError(f"{node.op_type} '{node.name}': its scale or zero point is computed, not a constant", origin)
    scales = numpy_helper.to_array(scale).ravel()
    if scales.size != 1:
        raise InputError(f"{node.op_type} '{node.name}' quantizes an activation per channel; activations are per tensor", origin)
    data_type = zero_point.data_type if zero_point is not None else TensorProto.UINT8
    if data_type not in _TYPES:
        raise InputError(f"{node.op_type} '{node.name}' quantizes to {TensorProto.DataType.Name(data_type)}; "
                         "int8 and uint8 grids are read", origin)
    z = int(numpy_helper.to_array(zero_point).ravel()[0]) if zero_point is not None else 0
    return QuantGrid(float(scales[0]), z, _TYPES[data_type][0])


def dequantized_constant(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The float value a DequantizeLinear of a constant computes: (q - z) * s of an integer
    constant, or DQ(Q(float constant)) as PyTorch's QAT export writes a weight (the constant
    rounded to its grid); None when the input is not constant."""
    if node.input[0] in initializers:
        values = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
        scale, zero = _scale_and_zero(node, initializers, values.ndim)
        return ((values - zero) * scale).astype(np.float32)
    producer = producers.get(node.input[0])
    if producer is None or producer.op_type != "QuantizeLinear" or producer.input[0] not in initializers:
        return None
    weight = numpy_helper.to_array(initializers[producer.input[0]]).astype(np.float64)
    scale, zero = _scale_and_zero(producer, initializers, weight.ndim)
    zero_tensor = initializers.get(producer.input[2]) if len(producer.input) > 2 else None
    low, high = _TYPES.get(zero_tensor.data_type if zero_tensor is not None else TensorProto.UINT8, ("", -128, 127))[1:]
    quantized = np.clip(np.round(weight / scale) + zero, low, high)
    return ((quantized - zero) * scale).astype(np.float32)


def _scale_and_zero(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q/DQ node's scale and zero point (0 when absent), shaped to broadcast along its axis."""
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in initializers else np.zeros_like(scale))
    if scale.size <= 1:
        return scale, zero
    axis = attribute(node, "axis", 1) % rank
    shape = [-1 if i == axis else 1 for i in range(rank)]
    return scale.reshape(shape), zero.reshape(shape)
