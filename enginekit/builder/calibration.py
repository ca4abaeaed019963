"""Calibration as the build orchestrates it: the quantization plan decides which tensors the Q/DQ
graph quantizes, and calibration collects those (and every other float activation) in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from enginekit.calibration.collect import collect_channel_peaks
from enginekit.calibration.data import DataArg, batch_size_for, open_data, reusable, stream
from enginekit.calibration.methods import DEFAULT_PERCENTILE
from enginekit.calibration.pipeline import DEFAULT_BATCH, DEFAULT_SAMPLES, CalibrationRun, calibrate, smoothed_twin
from enginekit.core.errors import InputError
from enginekit.core.profile import stage
from enginekit.exporter.reference import Fp32Model
from enginekit.onnx.equalization import equalization_divisors
from enginekit.onnx.prequantized import quantized_operators
from enginekit.onnx.smoothing import smoothable_inputs, smoothing_scales
from enginekit.quantization.bias_correction import correctable_outputs
from enginekit.quantization.placement import plan_quantization


def calibrate_model(fp32: Fp32Model, data: DataArg, methods: Sequence[str], percentile: float = DEFAULT_PERCENTILE,
                    num_samples: int = DEFAULT_SAMPLES, batch_size: int = DEFAULT_BATCH, skip_nonfinite: bool = False,
                    threads: int | None = None, shards: int = 1, executor: Any = None, smoothquant: float = 0.0,
                    equalize: bool = False) -> CalibrationRun:
    """One calibration pass; it also measures the FP32 channel means of every layer output bias
    correction may adjust, its reference (so that needs no FP32 pass of its own). With
    `smoothquant` (alpha > 0) and token MatMuls in the model, a pass for their inputs' channel
    peaks comes first, and the calibration runs through the smoothed graph (onnx.smoothing); with
    `equalize`, consecutive convolutions are cross-layer equalised first (onnx.equalization, from
    the weights alone), and the divisors travel in the table beside SmoothQuant's."""
    data = reusable(data, fp32.inputs)  # read by the SmoothQuant pass and the calibration pass
    smoothing = smoothing_divisors(fp32, data, smoothquant, num_samples, batch_size, threads) if smoothquant > 0 else {}
    equalized = equalization_divisors(fp32.proto) if equalize and not fp32.is_keras else {}
    smoothing.update(equalized)
    smoothing = dict(sorted(smoothing.items()))  # the table's order: a twin remade from a table is this one, byte for byte
    graph, record = smoothed_twin(fp32, smoothing) if smoothing else (fp32, None)
    plan = plan_quantization(graph.proto)
    if not plan.activations:
        quantized = quantized_operators(graph.proto)
        if quantized:
            raise InputError(f"the model is quantized already ({', '.join(quantized)}): INT8 starts from its float original, "
                             "or from a QDQ model (QuantizeLinear/DequantizeLinear around float ops)", fp32.origin)
        raise InputError("the model has no tensors to quantize (no Conv, Gemm or MatMul with activations)", fp32.origin)
    run = calibrate(fp32, data, methods, plan.activations, percentile, num_samples, batch_size, skip_nonfinite, threads,
                    mean_tensors=correctable_outputs(graph.proto), shards=shards, executor=executor, smoothing=smoothing,
                    twin=graph if smoothing else None)
    run.smoothed = record
    if equalize and fp32.is_keras:
        run.warnings.append("--equalize was not applied: a Keras source's TFLite INT8 is converted from Keras, which the "
                            "equalised ONNX graph would no longer match")
    for table in run.tables.values():
        if len(smoothing) > len(equalized):
            table.parameters["smoothquant"] = smoothquant
        if equalize:
            table.parameters["equalization"] = {"pairs": len(equalized)}
    return run


def smoothing_divisors(fp32: Fp32Model, data: DataArg, alpha: float, num_samples: int, batch_size: int,
                       threads: int | None) -> dict[str, np.ndarray]:
    """SmoothQuant's per-channel divisors for the model's token MatMul inputs, from their channel
    peaks on the calibration data (none for a model traced from Keras or without such MatMuls)."""
    tensors = list(smoothable_inputs(fp32.proto)) if not fp32.is_keras else []
    if not tensors:
        return {}
    with stage("smoothquant"):
        source = open_data(data, fp32.inputs, fp32.spec, "calibration")
        batches, _ = stream(source, fp32.inputs, num_samples, batch_size_for(fp32.inputs, batch_size))
        peaks = collect_channel_peaks(fp32.proto, tensors, batches, threads)
    return smoothing_scales(fp32.proto, peaks, alpha)
