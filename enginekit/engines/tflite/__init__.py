"""TFLite target: float32, float16 and full-integer int8 flatbuffers run by LiteRT.

Keras sources convert directly (their own graph, traced by TensorFlow); PyTorch and ONNX
sources go through our ONNX -> TensorFlow lowering (lowering.py says why). INT8 takes the
activation ranges from the shared CalibrationTable, mapped onto the TFLite tensors by value
(ranges.py), and the bias-corrected biases of the Q/DQ hub, so every target gets the same
calibration and correction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.engines.tflite.runner import MODEL_FILE, TfliteRunner, io_parameters

__all__ = ["MODEL_FILE", "TfliteRunner", "build_flatbuffer", "keep_biases_representable"]


BIAS_HEADROOM = 2**24  # |int32 bias| bound kept, far inside int32 so accumulation cannot overflow


def keep_biases_representable(model: onnx.ModelProto, table) -> list[str]:
    """Rewrite, in place, Conv/Gemm output channels whose weights are (nearly) all zero.

    TFLite stores a bias as int32 at scale input_scale x weight_scale. A channel whose weights
    are ~0 (a dead channel after batch-norm folding: EfficientNet-Lite0 has dozens) gets a ~1e-11
    weight scale, and its bias overflows int32 into garbage, saturating a channel that should be
    constant. Such a channel becomes zeros plus one weight delta = 127 |b| / (input_scale x 2^24):
    its bias then fits in 24 bits, and the output moves by at most delta x max|input|, about
    0.2 % of the bias."""
    from enginekit.engines.tflite.ranges import tflite_range

    initializers = {t.name: t for t in model.graph.initializer}
    changed = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        if node.input[1] not in initializers or node.input[0] not in table.tensors:
            continue
        low, high = tflite_range(table.tensors[node.input[0]])
        input_scale = (high - low) / 255.0
        axis = 0 if node.op_type == "Conv" or next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
        weight = numpy_helper.to_array(initializers[node.input[1]])
        bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
        channels = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).astype(np.float64)
        weight_scale = np.maximum(np.abs(channels).max(axis=1), 1e-9) / 127.0
        bad = np.flatnonzero(np.abs(bias) / (input_scale * weight_scale) >= BIAS_HEADROOM)
        if bad.size == 0:
            continue
        for channel in bad:
            channels[channel] = 0.0
            channels[channel, channels.shape[1] // 2] = 127.0 * max(abs(bias[channel]), 1e-6) / (input_scale * BIAS_HEADROOM)
        shaped = np.moveaxis(channels.reshape(np.moveaxis(weight, axis, 0).shape), 0, axis).astype(weight.dtype)
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(shaped, node.input[1]))
        changed.append(f"{node.name}: {bad.size} channel(s)")
    return changed


def build_flatbuffer(precision: str, function, origin: str, *, table=None, reference: onnx.ModelProto | None = None,
                     feeds=None, io_type: str = "int8", owner: Any = None) -> tuple[bytes, dict[str, Any]]:
    """The flatbuffer of `function` (a tf.function) at `precision`, with what the manifest records.
    INT8 needs the CalibrationTable, the FP32 ONNX graph `function` computes and calibration feeds."""
    from enginekit.engines.tflite.convert import convert_function, quantize_int8, type_summary
    from enginekit.engines.tflite.ranges import map_ranges

    if precision in ("fp32", "fp16"):
        model = convert_function(function, origin, precision, owner)
        return model, {"types": type_summary(model)}
    float_model = convert_function(function, origin, "fp32", owner)
    ranges = map_ranges(float_model, reference, table, feeds)
    model = quantize_int8(float_model, ranges.ranges, io_type)
    info = {"io": io_parameters(model), "ranges": ranges.summary(), "types": type_summary(model)}
    return model, info


def write_artifact(model: bytes, stage: Path, threads: int | None) -> TfliteRunner:
    (stage / MODEL_FILE).write_bytes(model)
    return TfliteRunner(model, threads=threads)
