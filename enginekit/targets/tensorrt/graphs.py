"""The ONNX graphs TensorRT builds from, prepared and checked without TensorRT.

- FP16: the FP32 graph converted to float16 compute with float32 I/O, keeping numerically
  sensitive ops (normalisations, Softmax, reductions, GELU, exp/log/pow) in float32 — what
  TensorRT 11 expects in place of the removed FP16 builder flag. The converter is ONNX Runtime's
  float16 module (a maintained fork of onnxconverter-common), shipped in the onnxruntime wheel.
- INT8: the Q/DQ graph in the "int8" encoding, checked against TensorRT's rules.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, numpy_helper

from enginekit.onnx.graph import topological_sort
from enginekit.onnx.nodes import attribute, tensor_readers
from enginekit.quantization.placement import weight_channel_axis

FP32_OPS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "Softmax",
            "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "Gelu", "Erf",
            "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "CumSum", "Range")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS])
    topological_sort(converted)
    onnx.checker.check_model(converted)
    return converted


def tensorrt_qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Everything in a Q/DQ graph that TensorRT's explicit quantization rejects or would not fuse:
    non-int8 types, non-zero zero points, scales or zero points that are not initializers,
    non-positive scales, int32 (bias) dequantization, per-channel axes off the output channel."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = tensor_readers(model.graph)
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} '{node.name}' is an op of the '{node.domain}' domain, which TensorRT's ONNX parser does not read")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{node.op_type} '{node.name}'"
        scale, zero_point = (initializers.get(n) for n in (node.input[1], node.input[2] if len(node.input) > 2 else ""))
        if scale is None:
            problems.append(f"{where}: scale is not an initializer")
            continue
        if (numpy_helper.to_array(scale) <= 0).any():
            problems.append(f"{where}: non-positive scale")
        if zero_point is None:
            problems.append(f"{where}: zero point is missing or not an initializer")
        else:
            if zero_point.data_type != TensorProto.INT8:
                problems.append(f"{where}: zero point type {TensorProto.DataType.Name(zero_point.data_type)}, TensorRT needs INT8")
            if numpy_helper.to_array(zero_point).any():
                problems.append(f"{where}: non-zero zero point (TensorRT quantization is symmetric)")
        data = initializers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type == TensorProto.INT32:
            problems.append(f"{where}: int32 dequantization (TensorRT keeps biases in float)")
        if scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
            axis = attribute(node, "axis", 1)
            expected = _output_channel_axis(node, readers, data)
            if expected is not None and axis != expected:
                problems.append(f"{where}: per-channel axis {axis}, the consumer's output channels are on axis {expected}")
    return problems


def _output_channel_axis(node: onnx.NodeProto, readers, data) -> int | None:
    """The axis the consumer's output channels are on for the weight this DequantizeLinear feeds
    (the same rule the Q/DQ placement quantizes by)."""
    consumers = readers.get(node.output[0], [])
    if not consumers or data is None or consumers[0].op_type not in ("Conv", "Gemm", "MatMul"):
        return None
    consumer = consumers[0]
    return weight_channel_axis(consumer, list(consumer.input).index(node.output[0]), len(data.dims))
