"""Put the CalibrationTable's ranges onto the tensors of a float .tflite.

The converter renames, fuses and transposes tensors, so names cannot be trusted: each TFLite
activation is matched by VALUE to an ONNX tensor of the FP32 graph, on the same samples. Sorted
values are layout-free (NHWC and NCHW sort the same), so a match survives the converter's
transposes. A tensor with no twin (a PAD, a transpose of a matched tensor) takes its producer's
input range, which is what the integer kernels of such data-movement ops need anyway. What is
still left (an intermediate of an op the converter decomposed, e.g. PReLU's negative part) gets
the min-max of its values through the float flatbuffer over up to MEASURED_SAMPLES calibration
samples, and the manifest counts it (`measured_in_tflite`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from enginekit.calibration.table import CalibrationTable, TensorRange
from enginekit.core.tensors import Feeds
from enginekit.quantization.encoding import asymmetric_range
from enginekit.targets.tflite.runner import dequantize, quantize, signature_inputs

MEASURED_SAMPLES = 32  # calibration samples a tensor without an ONNX twin is measured on
MATCH_TOLERANCE = 1e-3  # of the tensor's largest magnitude; float kernels differ far less than this
_SAME_RANGE_OPS = {"PAD", "TRANSPOSE", "RESHAPE", "MAX_POOL_2D", "SQUEEZE", "EXPAND_DIMS", "PADV2"}
# A softmax input whose range is wider than MASKED_WIDTH holds an additive attention mask (-1e4,
# -1e9, the float minimum; logits themselves span tens): it keeps only its top SOFTMAX_SPAN
# (exp(-16) ~ 1e-7 is far below the 1/256 step of the int8 output); the mask would otherwise
# stretch the scores' grid over ~1e4..1e38 and leave them no level at all. Narrower inputs are
# left alone: each row needs its own top, and a row whose maximum lies far below the tensor's
# would lose it (PP-OCR cls: SQNR 22.7 -> 19.4 dB when every softmax input was cut).
SOFTMAX_SPAN = 16.0
MASKED_WIDTH = 1000.0


@dataclass
class RangeMap:
    """TFLite tensor name -> (low, high), and how each was found (for the manifest)."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)  # tflite tensor -> onnx tensor
    inherited: dict[str, str] = field(default_factory=dict)  # tflite tensor -> tflite tensor it copies
    scaled: dict[str, str] = field(default_factory=dict)  # tflite tensor -> the tensor it is a positive multiple of
    measured: list[str] = field(default_factory=list)  # no twin: min-max on the calibration feeds
    softmax_clipped: list[str] = field(default_factory=list)  # softmax inputs cut to their top SOFTMAX_SPAN
    zero_centred_inputs: list[str] = field(default_factory=list)  # graph inputs given the zero-point-0 grid (input_grid)
    producers: dict[str, str] = field(default_factory=dict)  # tflite tensor -> the op type that writes it
    inputs_of: dict[str, list[str]] = field(default_factory=dict)  # tflite tensor -> the inputs of the op that writes it
    masks: list[str] = field(default_factory=list)  # tensors holding mask sentinels on the calibration feeds (has_mask_sentinels)

    def summary(self) -> dict[str, int]:
        return {"tensors": len(self.ranges), "matched_by_value": len(self.matched), "inherited_from_producer": len(self.inherited),
                "scaled_from_input": len(self.scaled),
                "measured_in_tflite": len(self.measured), "softmax_inputs_clipped": len(self.softmax_clipped),
                "zero_centred_inputs": len(self.zero_centred_inputs)}


def tflite_range(rng: TensorRange) -> tuple[float, float]:
    """The asymmetric int8 range TFLite stores for a table entry: the observed [min, max] clipped
    to the method's amax, widened to include zero (TFLite's zero point must be exact)."""
    low, high = asymmetric_range(rng, rng.amax)
    if high - low <= 1e-12:
        high = low + 1e-6
    return float(low), float(high)


def onnx_activations(model: onnx.ModelProto, names: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    from enginekit.onnx.probe import probe

    return next(probe(model, names, [feeds]))


def tflite_activations(model: bytes, feeds: Feeds) -> tuple[dict[str, np.ndarray], list[dict], list[dict]]:
    """Every float activation of the float model on `feeds` (name -> value), plus the tensor
    and op details of the interpreter (to follow producers)."""
    from enginekit.targets.tflite.runner import undelegated_interpreter

    import warnings

    with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": that is what this is
        warnings.simplefilter("ignore")
        interpreter = undelegated_interpreter(model, experimental_preserve_all_tensors=True)
    inputs = input_indices(interpreter)
    for name, index in inputs.items():
        interpreter.resize_tensor_input(index, feeds[name].shape, strict=False)
    interpreter.allocate_tensors()
    dtypes = {detail["index"]: detail["dtype"] for detail in interpreter.get_input_details()}
    for name, index in inputs.items():  # float inputs as float32, token ids as the integer type the model takes
        interpreter.set_tensor(index, feeds[name].astype(dtypes.get(index, np.float32)))
    interpreter.invoke()
    ops = interpreter._get_ops_details()
    produced = {t for op in ops for t in op["outputs"]}
    tensors = interpreter.get_tensor_details()
    values = {}
    for detail in tensors:
        if detail["dtype"] != np.float32 or (detail["index"] not in produced and detail["index"] not in inputs.values()):
            continue
        values[detail["name"]] = interpreter.get_tensor(detail["index"])
    return values, tensors, ops


def input_indices(interpreter) -> dict[str, int]:
    """Signature input name -> tensor index (the signature runner itself pins tensor buffers,
    which would forbid resizing, so it is dropped at once)."""
    signature = interpreter.get_signature_runner()
    indices = {name: detail["index"] for name, detail in signature_inputs(signature).items()}
    del signature
    return indices


def _signature(values: np.ndarray) -> np.ndarray:
    return np.sort(values.reshape(-1).astype(np.float64))


def map_ranges(float_tflite: bytes, fp32: onnx.ModelProto, table: CalibrationTable, feeds: Feeds,
               more_feeds: Iterable[Feeds] = ()) -> RangeMap:
    """Match every float activation of `float_tflite` to an FP32 ONNX tensor with a table entry
    on `feeds`; a tensor left without a twin takes its min-max over `feeds` and `more_feeds`
    (more calibration samples, in small batches: two samples alone give a range too narrow for
    the samples that follow). Every batch is also searched for mask sentinels (`masks`)."""
    names = sorted(table.tensors)
    reference = {name: _signature(v) for name, v in onnx_activations(fp32, names, feeds).items()}
    by_size: dict[int, list[str]] = {}
    for name, signature in reference.items():
        by_size.setdefault(signature.size, []).append(name)
    values, tensors, ops = tflite_activations(float_tflite, feeds)
    result = RangeMap()
    result.masks = [name for name, value in values.items() if value.size and has_mask_sentinels(value)]
    for name, value in values.items():
        signature = _signature(value)
        scale = float(np.abs(signature).max()) if signature.size else 0.0
        best, best_error = None, np.inf
        for candidate in by_size.get(signature.size, ()):
            error = float(np.abs(reference[candidate] - signature).max())
            if error < best_error:
                best, best_error = candidate, error
        if best is not None and best_error <= MATCH_TOLERANCE * max(scale, 1e-6):
            result.matched[name] = best
            result.ranges[name] = tflite_range(table.tensors[best])
    index_name = {d["index"]: d["name"] for d in tensors}
    name_index = {name: index for index, name in index_name.items()}
    producer = {out: op for op in ops for out in op["outputs"]}
    result.producers = {index_name[index]: op["op_name"] for index, op in producer.items() if index in index_name}
    result.inputs_of = {index_name[index]: [index_name[i] for i in op["inputs"] if i in index_name]
                        for index, op in producer.items() if index in index_name}
    for name in values:
        if name in result.ranges:
            continue
        current = name_index[name]
        while current in producer and producer[current]["op_name"] in _SAME_RANGE_OPS:
            current = producer[current]["inputs"][0]
            if index_name.get(current) in result.ranges:
                result.ranges[name] = result.ranges[index_name[current]]
                result.inherited[name] = index_name[current]
                break
    for name in values:
        scaled = None if name in result.ranges else _scaled_source(name, values, producer.get(name_index[name]), index_name, result.ranges)
        if scaled is not None:
            source, factor = scaled
            low, high = result.ranges[source]
            result.ranges[name] = (low * factor, high * factor)
            result.scaled[name] = source
    missing = [name for name in values if name not in result.ranges]
    bounds = {name: _finite_bounds(values[name]) for name in missing}
    for batch in more_feeds:  # every batch: a mask may show its sentinels only on samples with padding
        seen = tflite_activations(float_tflite, batch)[0]
        result.masks += [name for name, value in seen.items() if name not in result.masks and value.size and has_mask_sentinels(value)]
        for name in missing:
            low, high = _finite_bounds(seen[name])
            bounds[name] = (min(bounds[name][0], low), max(bounds[name][1], high))
    for name in missing:
        low, high = bounds[name] if bounds[name][0] <= bounds[name][1] else (0.0, 0.0)  # no finite value seen
        result.ranges[name] = tflite_range(TensorRange(low, high, max(abs(low), abs(high)), low < 0))
        result.measured.append(name)
    _clip_softmax_inputs(result, ops, index_name, producer)
    _choose_input_grids(result, fp32, feeds)
    return result


MASK_SENTINEL = 1e30  # beyond any activation: float32's lowest (-3.4e38, PyTorch's masked_fill) or -inf marks a masked position


def has_mask_sentinels(values: np.ndarray) -> bool:
    """Whether `values` hold a masked-position marker: -inf, NaN, or a magnitude of MASK_SENTINEL or more."""
    return bool(np.any(~np.isfinite(values)) or np.any(np.abs(values) >= MASK_SENTINEL))


def _finite_bounds(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values ((inf, -inf) when there are none): an attention mask of
    -inf has no grid, as in calibration (calibration/histogram.py)."""
    finite = values[np.isfinite(values)] if values.size else values
    return (float(finite.min()), float(finite.max())) if finite.size else (np.inf, -np.inf)


def _scaled_source(name: str, values: dict[str, np.ndarray], op: dict | None, index_name: dict[int, str],
                   ranges: dict[str, tuple[float, float]]) -> tuple[str, float] | None:
    """The input of which `name` is a positive multiple, and the factor, where a MUL by a
    constant made it from a tensor with a range. Why: its int8 kernel can only ever output that input's grid times the
    constant, so that is its range; min-max of the float values would also count values the
    int8 input has already clipped away. The lowering's HardSwish, (x / 6) * relu6(x + 3), read
    PP-OCRv4 det's Conv outputs, whose ranges are cut to their live span (calibration/live_ranges.py):
    measured, x / 6 kept the dead values' range."""
    if op is None or op["op_name"] != "MUL" or len(op["inputs"]) != 2:
        return None
    names = [index_name.get(i) for i in op["inputs"]]
    data = [n for n in names if n in values and n in ranges]
    constants = [n for n in names if n is not None and n not in values]
    if len(data) != 1 or len(constants) != 1 or values[data[0]].shape != values[name].shape:
        return None
    factor = _positive_factor(values[name], values[data[0]])
    return (data[0], factor) if factor is not None else None


def _positive_factor(output: np.ndarray, source: np.ndarray) -> float | None:
    """c > 0 with output == c * source (to float rounding), or None."""
    a, b = source.astype(np.float64).ravel(), output.astype(np.float64).ravel()
    energy = float(a @ a)
    if energy == 0.0:
        return None
    factor = float(a @ b) / energy
    scale = float(np.abs(b).max()) or 1.0
    return factor if factor > 0 and float(np.abs(b - factor * a).max()) <= 1e-5 * scale else None


def int8_rounding_error(values: np.ndarray, low: float, high: float) -> float:
    """Mean squared error of `values` quantized as TFLite does with the range (low, high): scale
    (high - low) / 255, the zero point rounded to an integer (which shifts the grid)."""
    scale = max((high - low) / 255.0, 1e-12)
    zero_point = int(np.clip(np.round(-128.0 - low / scale), -128, 127))
    restored = dequantize(quantize(values, scale, zero_point, np.int8), scale, zero_point)
    return float(np.mean((restored.astype(np.float64) - values) ** 2))


def zero_centred_range(low: float, high: float) -> tuple[float, float]:
    """The range whose TFLite grid has zero point 0 and step max(|low|, |high|) / 127."""
    amax = max(abs(low), abs(high))
    return -128.0 / 127.0 * amax, amax


def _choose_input_grids(result: RangeMap, fp32: onnx.ModelProto, feeds: Feeds) -> None:
    """A signed graph input takes the grid (table range, or zero point 0 and step amax/127) that
    rounds its calibration values least. Why: inputs sit on a grid of their own, and TFLite's
    integer zero point can land the two grids half a step apart on every value: images scaled
    by (x - 127.5) / 127.5 over [-1, 1] got step 2/255 and zero point -1, each pixel off by half
    a step, and the first layer of efficientnet_lite0 lost 7 dB against the Q/DQ graph's
    zero-point-0 grid (top-1 agreement 0.943 -> 0.952 with it). The tensors that copy the input
    (its NHWC transpose) take the same grid."""
    inputs = {value.name for value in fp32.graph.input}
    for name, onnx_name in result.matched.items():
        if onnx_name not in inputs or onnx_name not in feeds or name not in result.ranges:
            continue
        values = np.asarray(feeds[onnx_name])
        low, high = result.ranges[name]
        if values.dtype.kind != "f" or low >= 0:
            continue
        centred = zero_centred_range(low, high)
        if int8_rounding_error(values, *centred) < int8_rounding_error(values, low, high):
            result.ranges[name] = centred
            result.zero_centred_inputs.append(name)


def _clip_softmax_inputs(result: RangeMap, ops: list[dict], index_name: dict[int, str], producer: dict[int, dict]) -> None:
    """Each masked softmax input keeps only its top SOFTMAX_SPAN; where an ADD makes it (scores + mask),
    its operands lose what can only land below that (a -1e9 mask operand would otherwise need a
    requantization multiplier LiteRT aborts on)."""
    for op in ops:
        if op["op_name"] != "SOFTMAX" or index_name.get(op["inputs"][0]) not in result.ranges:
            continue
        name = index_name[op["inputs"][0]]
        low, high = result.ranges[name]
        if high - low <= MASKED_WIDTH:
            continue
        floor = min(high - SOFTMAX_SPAN, 0.0)
        result.ranges[name] = (max(low, floor), high)
        result.softmax_clipped.append(name)
        adder = producer.get(op["inputs"][0])
        operands = [index_name.get(i) for i in adder["inputs"]] if adder and adder["op_name"] == "ADD" else []
        if len(operands) == 2 and all(o in result.ranges for o in operands):
            for this, other in (operands, operands[::-1]):
                this_low, this_high = result.ranges[this]
                result.ranges[this] = (min(max(this_low, floor - result.ranges[other][1]), 0.0), this_high)
