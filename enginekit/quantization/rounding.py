"""Weight rounding that minimises each layer's output error (GPTQ, Frantar et al. 2022), instead
of rounding every weight to its nearest integer.

A layer computes W x. Rounding each weight to nearest minimises |W - Q| but not the output error
|(W - Q) x| over the inputs the layer actually sees: the errors of correlated inputs add up.
GPTQ rounds one input column at a time and spreads that column's rounding error over the columns
not yet rounded, weighted by the inverse of H = sum x x^T (the inputs' second moments, from the
calibration data), which is the least-squares optimal update. The integer grid is unchanged
(symmetric per output channel, scale max|w|/127, and each channel's largest weight keeps +-127),
so every target reads the same scales; only which integer each weight takes changes. Measured on
efficientnet_lite0 (1024 held-out crops, weights only): top-1 agreement with FP32 0.879 -> 0.965.

H is measured on the FP32 graph's inputs to each layer (Conv as im2col patches per group, Gemm and
MatMul as rows), a sample of positions per batch, in passes whose matrices fit a memory budget,
plus the rounding noise the layer's quantized input adds at run time (`rounded_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.core.tensors import Feeds, batch_size, take
from enginekit.onnx.nodes import attribute
from enginekit.onnx.probe import probe
from enginekit.quantization.encoding import symmetric_weight_scale
from enginekit.quantization.placement import QuantPlan

SAMPLES = 128  # calibration samples H is measured on (each gives many rows: positions, tokens)
ROWS_PER_BATCH = 2048  # rows (output positions, tokens) of one batch kept per layer, at most ...
ELEMENTS_PER_BATCH = 1 << 22  # ... and at most this many values (rows x the layer's input width)
HESSIAN_BYTES = 1 << 29  # the matrices accumulated in one pass over the samples
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default): a stable inverse
BLOCK = 128  # columns rounded together before the rest is updated in one product
LIMIT = 127  # the symmetric integer grid: [-127, 127]
MIN_ROWS_PER_COLUMN = 4  # fewer input rows than this many per column of H: nearest rounding (see rounded_weights)
MAX_COLUMNS = 8192  # wider inputs keep nearest rounding: H alone would take 512 MiB and its inverse minutes


@dataclass(frozen=True)
class Layer:
    """One layer whose weight GPTQ rounds: `weight` viewed as (groups, rows, columns) in the
    order its input patches are built."""

    node: onnx.NodeProto
    weight: str
    groups: int

    @property
    def input(self) -> str:
        return self.node.input[0]


def roundable_layers(model: onnx.ModelProto, plan: QuantPlan) -> list[Layer]:
    """The layers of `plan` whose quantized weight this module can round: a 2-D Conv (4-D weight,
    any groups), a Gemm without transA, and a MatMul of an activation by a 2-D weight; each
    weight read by this one layer only."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    nodes = {n.name: n for n in model.graph.node}
    layers = []
    for spec in plan.weights:
        node = nodes.get(spec.node)
        weight = initializers.get(spec.tensor)
        if node is None or weight is None or readers.get(spec.tensor) != 1 or node.input[1:2] != [spec.tensor]:
            continue
        dims = list(weight.dims)
        if node.op_type == "Conv" and len(dims) == 4 and spec.axis == 0:
            layer = Layer(node, spec.tensor, attribute(node, "group", 1))
        elif node.op_type == "Gemm" and len(dims) == 2 and not attribute(node, "transA", 0) and spec.axis == (0 if attribute(node, "transB", 0) else 1):
            layer = Layer(node, spec.tensor, 1)
        elif node.op_type == "MatMul" and len(dims) == 2 and spec.axis == 1:
            layer = Layer(node, spec.tensor, 1)
        else:
            continue
        if _columns(layer, dims) <= MAX_COLUMNS:
            layers.append(layer)
    return layers


def _columns(layer: Layer, dims: list[int]) -> int:
    """The width of one group's input rows (H is columns x columns per group)."""
    if layer.node.op_type == "Conv":
        return int(np.prod(dims[1:]))
    return dims[1] if layer.node.op_type == "Gemm" and attribute(layer.node, "transB", 0) else dims[0]


def rounded_weights(model: onnx.ModelProto, plan: QuantPlan, batches: Iterable[Feeds], axes: Mapping[str, int | None],
                    steps: Mapping[str, float] | None = None, per_channel: bool = True,
                    threads: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """{weight initializer: its signed integer values in [-127, 127]} for every roundable layer of
    `plan`, on the grid `encoding.quantize_weight` uses; and the samples H was measured on
    (`batches` split along each input's batch axis, `axes`). `steps`: the quantization step of
    each quantized activation, whose rounding noise (step^2/12 per value, independent of the
    value) every input row carries at run time, so it is added to H's diagonal: without it GPTQ
    hides weight error in directions the FP32 inputs never take, which the quantized inputs do
    (PP-OCR cls: every layer's FP32 output error 1-20 dB lower, the INT8 model's 4 dB worse)."""
    layers = roundable_layers(model, plan)
    if not layers:
        return {}, 0
    from threadpoolctl import threadpool_limits

    # one BLAS thread: a sum split over another number of threads rounds differently, which can
    # flip a weight, and a Ray worker (one thread) must choose the integers a local build does
    with threadpool_limits(limits=1, user_api="blas"):
        return _rounded_weights(model, layers, batches, axes, steps or {}, per_channel, threads)


def _rounded_weights(model: onnx.ModelProto, layers: list[Layer], batches: Iterable[Feeds], axes: Mapping[str, int | None],
                     steps: Mapping[str, float], per_channel: bool, threads: int | None) -> tuple[dict[str, np.ndarray], int]:
    samples = list(first_samples(batches, SAMPLES, axes))
    count = sum(batch_size(feeds, axes) for feeds in samples)
    initializers = {t.name: t for t in model.graph.initializer}
    rounded: dict[str, np.ndarray] = {}
    for chunk in _chunks(layers, initializers):
        hessians = input_hessians(model, chunk, samples, threads)
        for layer in chunk:
            hessian, rows = hessians[layer.weight]
            if rows < MIN_ROWS_PER_COLUMN * hessian.shape[-1]:
                continue
            noise = rows * steps.get(layer.input, 0.0) ** 2 / 12
            hessian = hessian + noise * np.eye(hessian.shape[-1])[None]
            weight = numpy_helper.to_array(initializers[layer.weight]).astype(np.float32)
            rounded[layer.weight] = round_layer(layer, weight, hessian, per_channel)
    return rounded, count


def round_layer(layer: Layer, weight: np.ndarray, hessian: np.ndarray, per_channel: bool = True,
                target: np.ndarray | None = None) -> np.ndarray:
    """`weight` in its own layout -> integer values (int8) of the same shape, on `weight`'s grid;
    `target`: the float values to round instead (`compensated_weight`), on that same grid."""
    rows = as_rows(layer, weight)  # (out, columns)
    scale = grid_scale(rows, per_channel)
    g = layer.groups
    goal = rows if target is None else as_rows(layer, target)
    values = gptq(goal.reshape(g, goal.shape[0] // g, -1), hessian, scale.reshape(g, -1)).reshape(rows.shape)
    # each channel's largest weight keeps +-127, so a target that requantizes the dequantized
    # weights (TFLite) finds the same scale, hence the same integers
    top = np.abs(rows).argmax(axis=1)
    index = np.arange(rows.shape[0])
    values[index, top] = np.clip(np.round(rows[index, top] / scale), -LIMIT, LIMIT)
    return from_rows(layer, values.astype(np.int8), weight.shape)


def grid_scale(rows: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """The weight grid's step per output channel of `rows` (out, columns), as
    `encoding.quantize_weight` sets it (per tensor: one max for all)."""
    amax = np.abs(rows).max(axis=1) if per_channel else np.full(rows.shape[0], np.abs(rows).max())
    return symmetric_weight_scale(amax.astype(np.float32))


def gptq(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """GPTQ for `groups` independent problems at once: weight (g, r, d), hessian (g, d, d),
    scale (g, r) -> integer values (g, r, d) as float64. Columns go in order of decreasing
    H diagonal (the most-used inputs first, GPTQ's "act order"), in blocks of BLOCK."""
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    g, _, d = w.shape
    # an input that was always zero in the calibration data: its weights round to nearest, alone
    # (GPTQ zeroes them, which data that does reach that input would find)
    group, column = np.nonzero(np.einsum("gii->gi", h) <= 0)
    h[group, column, column] = 1.0
    diag = np.einsum("gii->gi", h).copy()
    h += np.eye(d)[None] * (DAMPING * diag.mean(axis=1))[:, None, None]
    order = np.argsort(-diag, axis=1, kind="stable")
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], 1), order[:, None, :], 2)
    w = np.take_along_axis(w, np.broadcast_to(order[:, None, :], w.shape), 2)
    upper = _inverse_cholesky_upper(h)
    s = scale.astype(np.float64)[:, :, None]
    q = np.zeros_like(w)
    for start in range(0, d, BLOCK):
        end = min(start + BLOCK, d)
        errors = np.zeros((g, w.shape[1], end - start))
        for i in range(start, end):
            column = w[:, :, i]
            q[:, :, i] = np.clip(np.round(column / s[:, :, 0]), -LIMIT, LIMIT)
            error = (column - q[:, :, i] * s[:, :, 0]) / upper[:, i, i][:, None]
            w[:, :, i + 1:end] -= error[:, :, None] * upper[:, None, i, i + 1:end]
            errors[:, :, i - start] = error
        if end < d:
            w[:, :, end:] -= np.matmul(errors, upper[:, start:end, end:])
    inverse = np.argsort(order, axis=1)
    return np.take_along_axis(q, np.broadcast_to(inverse[:, None, :], q.shape), 2)


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U with U^T U = H^-1 (upper triangular), per group; more damping where H is not positive."""
    for extra in (0.0, 0.1, 1.0):
        try:
            damped = h + np.eye(h.shape[-1])[None] * (extra * np.einsum("gii->gi", h).mean(axis=1))[:, None, None]
            return np.linalg.cholesky(np.linalg.inv(damped)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the inputs' second-moment matrix is not positive definite")


def input_hessians(model: onnx.ModelProto, layers: Sequence[Layer], batches: Sequence[Feeds],
                   threads: int | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """{weight: (H = sum x x^T of its layer's input rows per group, float64; how many rows)} over `batches`."""
    initializers = {t.name: t for t in model.graph.initializer}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in probe(model, sorted({layer.input for layer in layers}), batches, threads):
        for layer in layers:
            rows = input_rows(layer, values[layer.input], list(initializers[layer.weight].dims))
            product = np.matmul(rows.transpose(0, 2, 1), rows).astype(np.float64)
            sums[layer.weight] = sums[layer.weight] + product if layer.weight in sums else product
            counts[layer.weight] = counts.get(layer.weight, 0) + rows.shape[1]
    return {name: (value, counts[name]) for name, value in sums.items()}


def input_rows(layer: Layer, x: np.ndarray, weight_dims: list[int]) -> np.ndarray:
    """What the layer multiplies its weight with, as (groups, rows, columns) float32: a Conv's
    im2col patches (columns in the weight's (in/g, kh, kw) order), a Gemm's or MatMul's rows; at
    most ROWS_PER_BATCH rows (and ELEMENTS_PER_BATCH values), spread evenly."""
    x = np.asarray(x, np.float32)
    if layer.node.op_type != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        return flat[_spread(flat.shape[0], flat.shape[1])][None]
    return _patches(layer.node, x, weight_dims[2:], layer.groups)


def _patches(node: onnx.NodeProto, x: np.ndarray, kernel: list[int], groups: int) -> np.ndarray:
    kh, kw = kernel
    strides = list(attribute(node, "strides", [1, 1]))
    dilations = list(attribute(node, "dilations", [1, 1]))
    n, channels, height, width = x.shape
    top, left, bottom, right = _pads(node, (height, width), (kh, kw), strides, dilations)
    padded = np.pad(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), ((0, 0), (top, bottom), (left, right), (0, 0)))  # NHWC
    out_h = (padded.shape[1] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (padded.shape[2] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    pick = _spread(n * out_h * out_w, channels * kh * kw)
    sample, position = np.divmod(pick, out_h * out_w)
    row, col = np.divmod(position, out_w)
    row, col = row * strides[0], col * strides[1]
    taps = [padded[sample, row + i * dilations[0], col + j * dilations[1]] for i in range(kh) for j in range(kw)]  # each (P, C)
    patches = np.stack(taps, axis=-1).reshape(len(pick), groups, channels // groups * kh * kw)
    return np.ascontiguousarray(patches.transpose(1, 0, 2))


def _pads(node: onnx.NodeProto, size: tuple[int, int], kernel: tuple[int, int], strides: list[int], dilations: list[int]) -> list[int]:
    """[top, left, bottom, right] of a 2-D Conv, auto_pad resolved."""
    auto = attribute(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return [0, 0, 0, 0]
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        return list(attribute(node, "pads", [0, 0, 0, 0]))
    begin, end = [], []
    for length, k, stride, dilation in zip(size, kernel, strides, dilations):
        total = max(0, (-(-length // stride) - 1) * stride + (k - 1) * dilation + 1 - length)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return [*begin, *end]


def _spread(rows: int, width: int) -> np.ndarray:
    limit = max(256, min(ROWS_PER_BATCH, ELEMENTS_PER_BATCH // max(width, 1)))
    return np.arange(rows) if rows <= limit else np.linspace(0, rows - 1, limit).astype(np.int64)


def as_rows(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """The weight as (output channels, input columns): a Conv's (out, in/g*kh*kw), a Gemm's
    (out, in), a MatMul's (N, K)."""
    if layer.node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if layer.node.op_type == "Gemm" and attribute(layer.node, "transB", 0):
        return weight
    return weight.T


def from_rows(layer: Layer, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if layer.node.op_type == "Conv" or (layer.node.op_type == "Gemm" and attribute(layer.node, "transB", 0)):
        return np.ascontiguousarray(rows.reshape(shape))
    return np.ascontiguousarray(rows.T)


def _chunks(layers: Sequence[Layer], initializers: Mapping[str, onnx.TensorProto]) -> Iterable[list[Layer]]:
    """`layers` in groups whose matrices H fit HESSIAN_BYTES together (one pass each)."""
    chunk: list[Layer] = []
    used = 0
    for layer in layers:
        columns = _columns(layer, list(initializers[layer.weight].dims))
        size = layer.groups * columns * columns * 8
        if chunk and used + size > HESSIAN_BYTES:
            yield chunk
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        yield chunk


def first_samples(batches: Iterable[Feeds], samples: int, axes: Mapping[str, int | None], size: int = 8) -> Iterable[Feeds]:
    """The first `samples` samples of `batches`, in batches of at most `size` (the probed
    activations of every layer input are held for one batch at a time)."""
    left = samples
    for feeds in batches:
        count = batch_size(feeds, axes)
        for start in range(0, count, size):
            if left <= 0:
                return
            stop = start + min(size, count - start, left)
            yield take(feeds, start, stop, axes)
            left -= stop - start
