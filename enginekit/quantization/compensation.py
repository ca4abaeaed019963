"""Weight rounding that also absorbs the error a layer's quantized inputs carry (`--weight-rounding
gptaq`: GPTQ for asymmetric calibration, after Li et al. 2025, "GPTAQ").

GPTQ (rounding.py) minimises |(W - Q) X| on the FP32 inputs X. At run time the layer sees X~,
inputs that carry every earlier layer's quantization error, and what reaches the model's output
is |W X - Q X~|. Least squares splits that exactly in two: the float weight W* = W C H~^-1
(C = sum x x~^T, H~ = sum x~ x~^T) whose output on X~ is closest to W's on X, then GPTQ rounding
W* on H~. The integer grid stays W's (scale max|w|/127 per channel, each channel's largest weight
still +-127), so every target reads the same scales as with GPTQ.

X~ depends on how the earlier layers were rounded, so the layers go one at a time in graph order,
each measured on a Q/DQ graph holding the integers already chosen upstream (one run of the part of
the graph the layer's input needs, per layer). Rounding every layer against one graph of GPTQ's
integers instead compensated errors that the upstream compensation had already removed:
efficientnet_lite0 top-1 agreement 0.95 -> 0.61. In that graph each finished layer's bias also
takes the shift of its output mean (W mu - Q mu~, what bias correction later fits on the finished
graph), so the next layers see inputs centred as they will be. The moments are not centred: a
fit of the covariances alone left the mean to bias correction, which could not repair it on
minilm_l6 (output SQNR before correction 4 dB) and cost efficientnet_lite0 0.4 dB.

Measured (2048 held-out crops, 256 calibration samples, min-max): efficientnet_lite0's output SQNR
+2.7 dB over GPTQ on ONNX Runtime, OpenVINO and TFLite alike. Not the default: minilm_l6's INT8
cosine falls 0.998 -> 0.988, for a reason not yet found (its calibration-data SQNR falls too, so
it is not over-fitting), and the build takes one pass per layer (+3 min on efficientnet_lite0).
A float fallback breaks its premise (every earlier layer INT8), so the builder refuses the two together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.calibration.table import CalibrationTable
from enginekit.core.progress import report
from enginekit.core.tensors import Feeds, batch_size
from enginekit.onnx.probe import probe
from enginekit.quantization.placement import QuantPlan
from enginekit.quantization.qdq import BiasOwners, ensure_bias, insert_qdq, matmul_bias_adds
from enginekit.quantization.rounding import (DAMPING, MIN_ROWS_PER_COLUMN, Layer, as_rows, first_samples, from_rows,
                                             grid_scale, input_rows, round_layer, roundable_layers)

ENCODING = "mixed"  # the quantized inputs are measured on the CPU targets' grid (as GPTQ's input noise is)
# Every calibration sample, up to this many: W* has as many unknowns per output channel as the
# layer's input width, and a CNN's late layers see few positions per sample (efficientnet_lite0's
# last stage: 49, for 1152 inputs). On GPTQ's 128 samples W* fitted the calibration data's noise
# (a centred fit, 2048 held-out crops: output SQNR +1.1 dB over GPTQ, top-1 agreement no better);
# on all 256, +2.3 dB and top-1 up on every target.
SAMPLES = 1024


@dataclass(frozen=True)
class InputMoments:
    """What one layer's inputs give the compensation, per group (float64)."""

    hessian: np.ndarray  # H~ = sum x~ x~^T: what GPTQ rounds W* on
    cross: np.ndarray  # C = sum x x~^T
    mean: np.ndarray  # mean of x
    quantized_mean: np.ndarray  # mean of x~
    rows: int


def compensated_weights(model: onnx.ModelProto, plan: QuantPlan, table: CalibrationTable, batches: Sequence[Feeds],
                        axes: Mapping[str, int | None], start: Mapping[str, np.ndarray], per_channel: bool = True,
                        threads: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """{weight initializer: its signed integers} for every roundable layer of `plan`, each chosen
    for |W X - Q X~| on the first SAMPLES samples of `batches`, and how many samples that was;
    `start`: GPTQ's integers, which the layers not reached yet hold in the graphs X~ is measured
    on (and a layer with too few input rows keeps)."""
    from threadpoolctl import threadpool_limits

    layers = roundable_layers(model, plan)
    samples = list(first_samples(batches, SAMPLES, axes))
    count = sum(batch_size(feeds, axes) for feeds in samples)
    measured = onnx.ModelProto()  # `model` with the finished layers' biases moved (see the module's docstring)
    measured.CopyFrom(model)
    owners = BiasOwners(measured)
    nodes = {n.name: n for n in measured.graph.node}
    adds = matmul_bias_adds(measured)
    initializers = {t.name: t for t in model.graph.initializer}
    values = dict(start)
    # one BLAS thread, as in rounding.rounded_weights: the same integers on every machine and worker
    with threadpool_limits(limits=1, user_api="blas"):
        for index, layer in enumerate(layers):
            report("weight compensation", index, len(layers), "layers")
            quantized = insert_qdq(measured, plan, table, ENCODING, per_channel, "int8", values).model
            moments = input_moments(model, quantized, layer, samples, threads)
            if moments.rows < MIN_ROWS_PER_COLUMN * moments.hessian.shape[-1]:
                continue
            weight = numpy_helper.to_array(initializers[layer.weight]).astype(np.float32)
            target = compensated_weight(layer, weight, moments.cross, moments.hessian)
            values[layer.weight] = round_layer(layer, weight, moments.hessian, per_channel, target)
            node = nodes[layer.node.name]
            if node.op_type != "MatMul" or node.name in adds:
                bias = ensure_bias(measured, node, weight.shape[0] if node.op_type != "MatMul" else weight.shape[1], owners)
                shift = _mean_shift(layer, weight, values[layer.weight], moments, per_channel)
                bias.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(bias) + shift).astype(np.float32), bias.name))
    return values, count


def compensated_weight(layer: Layer, weight: np.ndarray, cross: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """W* = W C H~^-1 (least squares of W's output on X by W*'s on X~, C = sum x x~^T), written
    W + W (C - H~) H~^-1 so that equal inputs (C = H~) leave W as it is; H~ damped like GPTQ's H."""
    rows = as_rows(layer, weight).astype(np.float64)
    w = rows.reshape(layer.groups, rows.shape[0] // layer.groups, -1)
    diag = np.einsum("gii->gi", hessian)
    damping = DAMPING * np.maximum(diag.mean(axis=1), 1e-30)
    damped = hessian + np.eye(hessian.shape[-1])[None] * damping[:, None, None]
    update = np.linalg.solve(damped, (cross - hessian).transpose(0, 2, 1)).transpose(0, 2, 1)  # (C - H~) H~^-1, H~ symmetric
    moved = (w + np.matmul(w, update)).reshape(rows.shape)
    return from_rows(layer, moved.astype(np.float32), weight.shape)


def input_moments(model: onnx.ModelProto, quantized: onnx.ModelProto, layer: Layer, batches: Sequence[Feeds],
                  threads: int | None = None) -> InputMoments:
    """The layer's input rows x in `model` and the same rows (same positions) x~ in `quantized`,
    where the node of the same name reads its input's DequantizeLinear output, summed over `batches`."""
    noisy = next((n.input[0] for n in quantized.graph.node if n.name == layer.node.name), layer.input)
    dims = [d for t in model.graph.initializer if t.name == layer.weight for d in t.dims]
    sums: list[np.ndarray] = []
    count = 0
    exact_values = probe(model, [layer.input], batches, threads, pruned=True)
    for exact, measured in zip(exact_values, probe(quantized, [noisy], batches, threads, pruned=True)):
        x = input_rows(layer, exact[layer.input], dims).astype(np.float64)
        q = input_rows(layer, measured[noisy], dims).astype(np.float64)
        parts = [np.matmul(q.transpose(0, 2, 1), q), np.matmul(x.transpose(0, 2, 1), q), x.sum(axis=1), q.sum(axis=1)]
        sums = [a + b for a, b in zip(sums, parts)] if sums else parts
        count += x.shape[1]
    hessian, cross, x_sum, q_sum = sums
    return InputMoments(hessian=hessian, cross=cross, mean=x_sum / count, quantized_mean=q_sum / count, rows=count)


def _mean_shift(layer: Layer, weight: np.ndarray, integers: np.ndarray, moments: InputMoments, per_channel: bool) -> np.ndarray:
    """Per output channel, W mu - Q mu~: how far the rounded layer's output mean on X~ is from the
    FP32 layer's on X."""
    rows = as_rows(layer, weight).astype(np.float64)
    scale = grid_scale(rows, per_channel).astype(np.float64)
    rounded = as_rows(layer, integers.astype(np.float64)) * scale[:, None]
    g = layer.groups
    exact = np.matmul(rows.reshape(g, -1, rows.shape[1]), moments.mean[:, :, None])
    measured = np.matmul(rounded.reshape(g, -1, rows.shape[1]), moments.quantized_mean[:, :, None])
    return (exact - measured).reshape(-1)
