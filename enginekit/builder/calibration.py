"""Calibration as the build orchestrates it: the quantization plan decides which tensors the Q/DQ
graph quantizes, and calibration collects those (and every other float activation) in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from enginekit.calibration.data import DataArg
from enginekit.calibration.methods import DEFAULT_PERCENTILE
from enginekit.calibration.pipeline import DEFAULT_BATCH, DEFAULT_SAMPLES, CalibrationRun, calibrate
from enginekit.core.errors import InputError
from enginekit.exporter.reference import Fp32Model
from enginekit.quantization.bias_correction import correctable_outputs
from enginekit.quantization.placement import plan_quantization


def calibrate_model(fp32: Fp32Model, data: DataArg, methods: Sequence[str], percentile: float = DEFAULT_PERCENTILE,
                    num_samples: int = DEFAULT_SAMPLES, batch_size: int = DEFAULT_BATCH, skip_nonfinite: bool = False,
                    threads: int | None = None, shards: int = 1, executor: Any = None) -> CalibrationRun:
    """One calibration pass; it also measures the FP32 channel means of every layer output bias
    correction may adjust, its reference (so that needs no FP32 pass of its own)."""
    plan = plan_quantization(fp32.proto)
    if not plan.activations:
        raise InputError("the model has no tensors to quantize (no Conv, Gemm or MatMul with activations)", fp32.origin)
    return calibrate(fp32, data, methods, plan.activations, percentile, num_samples, batch_size, skip_nonfinite, threads,
                     mean_tensors=correctable_outputs(fp32.proto), shards=shards, executor=executor)
