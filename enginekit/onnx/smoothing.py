"""SmoothQuant-style migration of activation outliers into MatMul weights (Xiao et al., 2023).

A transformer's MatMul inputs (LayerNorm outputs, attention contexts, GELU outputs) carry a few
channels with values far larger than the rest; one per-tensor INT8 scale then spends its grid on
those channels and the others lose most of their bits. For a MatMul X @ W with a constant W,
X @ W == (X / s) @ (diag(s) W) for any positive per-channel s, so dividing channel k of X by

    s_k = max|X_k| ** alpha / max|W_k,:| ** (1 - alpha)

flattens X's channels (the weights, quantized per output channel, absorb the spread). The
division is folded into the producer where it is affine per channel (LayerNormalization's scale
and bias), else one `Mul` by 1/s is inserted, shared by every MatMul reading X. The smoothed graph
computes the same function as the original (up to float rounding): it is an FP32 graph that the
one calibration pass, the Q/DQ hub and every INT8 target then start from.

Only MatMuls whose activation has rank >= 3 (batch, tokens, channels) are smoothed: the
transformer case the method was made for; a CNN's classifier head is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.onnx.equalization import apply_equalization, equalizable_pairs
from enginekit.onnx.nodes import attribute, tensor_producers, tensor_readers

DEFAULT_ALPHA = 0.8
MIN_PEAK = 1e-5  # channels that are (almost) always zero keep s from dividing by zero
SILENT_CHANNEL = 1e-4  # a channel whose calibration peak is below this share of its tensor's largest is not rescaled


def smoothable_inputs(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls that read it against a constant 2-D weight that nothing
    else reads (a tied weight cannot be rescaled for one reader); rank >= 3 activations only,
    see the module docstring."""
    constants = {init.name: init for init in model.graph.initializer}
    readers = tensor_readers(model.graph)
    ranks = None
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[0] in constants or node.input[1] not in constants:
            continue
        if len(constants[node.input[1]].dims) != 2 or len(readers[node.input[1]]) != 1:
            continue
        ranks = _ranks(model) if ranks is None else ranks
        if ranks.get(node.input[0], 0) >= 3:
            found.setdefault(node.input[0], []).append(node)
    return found


def smoothing_scales(model: onnx.ModelProto, peaks: Mapping[str, np.ndarray], alpha: float = DEFAULT_ALPHA) -> dict[str, np.ndarray]:
    """Per smoothable tensor in `peaks` (activation -> per-channel max |value| over the
    calibration data, last axis), the divisor s of each channel (float32)."""
    constants = {init.name: init for init in model.graph.initializer}
    scales = {}
    for tensor, nodes in smoothable_inputs(model).items():
        peak = peaks.get(tensor)
        weights = [numpy_helper.to_array(constants[node.input[1]]) for node in nodes]
        if peak is None or any(w.shape[0] != peak.shape[0] for w in weights):
            continue  # the channel count does not match: leave it
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        divisor = np.maximum(peak, MIN_PEAK) ** alpha / np.maximum(weight_peak, MIN_PEAK) ** (1 - alpha)
        # a channel silent on the calibration data says nothing about its range: left as it is (divisor 1), not
        # multiplied by ~1/MIN_PEAK**alpha (MobileBERT: a ReLU channel at 0 in calibration fired at 358 on a padded
        # position, x8649, 3.1e6 against a calibrated range of 9.75)
        silent = peak < SILENT_CHANNEL * peak.max() if peak.size else peak.astype(bool)
        scales[tensor] = np.where(silent, 1.0, divisor).astype(np.float32)
    return scales


def apply_smoothing(model: onnx.ModelProto, scales: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `model` whose MatMul inputs in `scales` are divided by them (folded into a
    LayerNormalization, else one inserted Mul) and whose weights are multiplied by them, and whose
    other tensors in `scales` are cross-layer equalised (onnx/equalization.py: the same per-channel
    divisor, folded into the convolution that writes the tensor); and what was done. The table
    carries `scales`, so a given table rebuilds the same graph without data."""
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    constants = {init.name: init for init in graph.initializer}
    producers = tensor_producers(graph)
    readers = tensor_readers(graph)
    matmuls = smoothable_inputs(smoothed)
    others = {tensor: values for tensor, values in scales.items() if tensor not in matmuls}
    pairs = equalizable_pairs(smoothed)
    unknown = sorted(set(others) - set(pairs))
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not an input of a MatMul with constant weights, nor a convolution's output "
                         "that convolutions read, in this model")
    equalized = apply_equalization(smoothed, others, pairs)
    folded = inserted = 0
    for tensor, values in scales.items():
        nodes, scale = matmuls.get(tensor), np.asarray(values, dtype=np.float32)
        if not nodes:
            continue  # equalised above
        for node in nodes:
            weight = numpy_helper.to_array(constants[node.input[1]])
            if weight.shape[0] != scale.shape[0]:
                raise ValueError(f"'{tensor}' has {weight.shape[0]} channels, the smoothing {scale.shape[0]}")
            constants[node.input[1]].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(weight.dtype), node.input[1]))
        producer = producers.get(tensor)
        if _foldable(producer, tensor, nodes, readers, constants, graph):
            for name in producer.input[1:3]:
                if name:
                    value = numpy_helper.to_array(constants[name])
                    constants[name].CopyFrom(numpy_helper.from_array((value / scale).astype(value.dtype), name))
            folded += 1
        else:
            _insert_scale(graph, tensor, nodes, (1.0 / scale).astype(np.float32))
            inserted += 1
    record = {"tensors": folded + inserted, "folded_into_layernorm": folded, "scale_ops_inserted": inserted}
    return smoothed, {**record, "equalized_pairs": equalized} if equalized else record


def _foldable(producer: onnx.NodeProto | None, tensor: str, nodes: list[onnx.NodeProto], readers: dict[str, list[onnx.NodeProto]],
              constants: dict[str, onnx.TensorProto], graph: onnx.GraphProto) -> bool:
    """A LayerNormalization over the last axis whose only readers are these MatMuls, with its
    own (unshared, constant) scale and bias: dividing them by s divides its output by s."""
    if producer is None or producer.op_type != "LayerNormalization" or producer.output[0] != tensor:
        return False
    axis = attribute(producer, "axis", -1)
    if axis != -1 or {id(n) for n in readers.get(tensor, [])} != {id(n) for n in nodes}:
        return False
    if tensor in {o.name for o in graph.output}:
        return False
    params = [name for name in producer.input[1:3] if name]
    return all(name in constants and len(readers.get(name, [])) == 1 for name in params)


def _insert_scale(graph: onnx.GraphProto, tensor: str, nodes: list[onnx.NodeProto], inverse: np.ndarray) -> None:
    """One `Mul(tensor, 1/s)` before the first of `nodes`, which read its output instead."""
    base = f"{tensor}/smoothquant"
    graph.initializer.append(numpy_helper.from_array(inverse, f"{base}/inverse_scale"))
    mul = onnx.helper.make_node("Mul", [tensor, f"{base}/inverse_scale"], [f"{base}/output"], name=f"{base}/Mul")
    for node in nodes:
        node.input[0] = f"{base}/output"
    first = min(list(graph.node).index(node) for node in nodes)
    graph.node.insert(first, mul)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> rank, where the graph's value infos (shape inference when it has none) know it."""
    inferred = model
    if not model.graph.value_info:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - ranks are a hint; an unknown rank means "not smoothed"
            pass
    ranks = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks
