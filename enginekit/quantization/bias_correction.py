"""Sequential bias correction: quantization shifts the mean of every layer's output; subtract
that shift from the layer's bias, one layer at a time in topological order, each measured on a
graph whose earlier layers are already corrected.

Measured on EfficientNet-Lite0 (FINDINGS): top-1 agreement with FP32 from 82 % to 96 %, while
correcting every layer from one pass over-corrects and diverges (45 %). Each layer runs only
the prefix of the quantized graph that produces it, in ONNX Runtime's integer kernels, so the
cost is about half a pass per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.core.progress import report
from enginekit.core.tensors import Feeds
from enginekit.onnx.probe import probe
from enginekit.quantization.qdq import QdqGraph, biased_nodes, ensure_bias


def channel_means(model: onnx.ModelProto, tensors: Sequence[str], batches: Sequence[Feeds], threads: int | None) -> dict[str, np.ndarray]:
    """Mean of each tensor over every axis but 1 (channels), accumulated over the batches."""
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for values in probe(model, tensors, batches, threads):
        for name in tensors:
            value = values[name].astype(np.float64)
            axes = tuple(i for i in range(value.ndim) if i != 1)
            sums[name] = sums.get(name, 0.0) + value.sum(axis=axes)
            count[name] = count.get(name, 0) + value.size // value.shape[1]
    return {name: sums[name] / count[name] for name in tensors}


def correct_biases(fp32: onnx.ModelProto, qdq: QdqGraph, batches: Sequence[Feeds], threads: int | None = None) -> dict[str, float]:
    """Correct the float biases of `qdq.model` in place; returns the size of each correction."""
    layers = biased_nodes(qdq.model)
    outputs = [node.output[0] for node in layers]
    reference = channel_means(fp32, outputs, batches, threads)
    initializers = {t.name: t for t in qdq.model.graph.initializer}
    inputs = [v.name for v in qdq.model.graph.input if v.name not in initializers]
    corrections: dict[str, float] = {}
    for index, node in enumerate(layers):
        prefix = onnx.utils.Extractor(qdq.model).extract_model(inputs, [node.output[0]])
        measured = channel_means(prefix, [node.output[0]], batches, threads)[node.output[0]]
        shift = measured - reference[node.output[0]]
        bias_name = ensure_bias(qdq.model, node, shift.size)
        initializers = {t.name: t for t in qdq.model.graph.initializer}
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64) - shift
        initializers[bias_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        corrections[node.name] = float(np.abs(shift).max())
        report("bias correction", index + 1, len(layers), "layers")
    return corrections


def corrected_float_model(fp32: onnx.ModelProto, qdq: QdqGraph) -> onnx.ModelProto:
    """The FP32 graph with the bias-corrected Conv/Gemm biases of `qdq` (float or int32 + DQ),
    for targets that quantize a float graph themselves (TFLite) yet should get the same
    correction."""
    initializers = {t.name: numpy_helper.to_array(t) for t in qdq.model.graph.initializer}
    dequantized = {}
    for node in qdq.model.graph.node:
        if (node.op_type == "DequantizeLinear" and all(name in initializers for name in node.input[:2])
                and initializers[node.input[0]].dtype == np.int32):  # int32 biases (1-D, scale per channel)
            zero_point = initializers[node.input[2]] if len(node.input) > 2 and node.input[2] else 0
            dequantized[node.output[0]] = (initializers[node.input[0]].astype(np.float64) - zero_point) * initializers[node.input[1]]
    biases = {}
    for node in qdq.model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            value = initializers.get(node.input[2], dequantized.get(node.input[2]))
            if value is not None:
                biases[node.name] = np.asarray(value, np.float32)
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    for node in model.graph.node:
        if node.name in biases:
            channels = biases[node.name].size
            name = ensure_bias(model, node, channels)
            target = next(t for t in model.graph.initializer if t.name == name)
            target.CopyFrom(numpy_helper.from_array(biases[node.name], name))
    return model
