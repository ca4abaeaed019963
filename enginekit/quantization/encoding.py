"""Integer encodings: how one symmetric range (amax) becomes scale, zero point and type.

The same CalibrationTable serves every target; only the encoding differs:
- "int8"  (TensorRT): signed int8, zero point 0, scale amax/127, everywhere.
- "uint8" (ONNX Runtime CPU, whose u8 x s8 kernels are the fast ones): non-negative tensors as
  uint8 zero point 0 with scale amax/255; signed tensors as uint8 zero point 128 on the int8 grid
  (scale amax/127), i.e. the same grid as "int8" shifted.
- "mixed" (OpenVINO): non-negative tensors uint8 zero point 0 (scale amax/255), signed tensors
  int8 zero point 0 (scale amax/127); measured here to run as fast as NNCF's own INT8.
In "uint8" and "mixed", a signed tensor whose range is one-sided (a detector's pre-sigmoid logits,
hard-swish outputs in [-0.375, 6]: most of [-amax, amax] is never used) is encoded asymmetric
uint8 instead: the method's [-amax, amax] cut to what calibration saw ([min, max]) and widened to
hold 0. Clipping is the same either way, and the step shrinks; this is done where it saves at
least half a bit of step (asymmetric step <= symmetric step / sqrt 2), so near-symmetric tensors
keep the symmetric grid. Both targets run any u8 zero point at the same speed (measured on
PP-OCR det: OpenVINO 2.3x FP32 either way).
Weights are symmetric per output channel (scale max|w|/127): int8 zero point 0, or the same grid
as uint8 zero point 128 where a CPU's u8 x s8 kernels would saturate (see `weight_type`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from enginekit.calibration.table import TensorRange
from enginekit.core import machine

ENCODINGS = ("int8", "uint8", "mixed")
# Encodings that put every tensor on the same integer grid (uint8 zero point 128 and int8 zero
# point 0 are one grid shifted; the non-negative and one-sided rules are shared), so a graph in
# one has the same quantized values as in the other and one bias correction serves both.
GRID_FAMILY = {"int8": "int8", "uint8": "u8-grid", "mixed": "u8-grid"}
TARGET_ENCODING = {"tensorrt": "int8", "onnxruntime": "uint8", "openvino": "mixed", "tflite": "mixed"}
WEIGHT_TYPES = ("auto", "int8", "uint8")
VANISHING = 1e-12  # a range no wider than this is taken as constant zero (scale 1.0)
ONE_SIDED_STEP_RATIO = 2 ** -0.5  # asymmetric where its step is at most this share of the symmetric one (half a bit)


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    onnx_type: int  # TensorProto.INT8 or UINT8

    @property
    def numpy_type(self) -> type:
        return np.int8 if self.onnx_type == TensorProto.INT8 else np.uint8


def activation_qparams(name: str, rng: TensorRange, encoding: str) -> QParams:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
    if rng.grid is not None:
        exact = grid_qparams(rng.grid, encoding)
        if exact is not None:
            return exact
    amax = rng.amax
    if not np.isfinite(amax) or amax <= VANISHING:
        warnings.warn(f"tensor '{name}' is constant zero in the calibration data; using scale 1.0", stacklevel=2)
        amax = 127.0
    non_negative = not rng.signed
    if encoding == "int8":
        return QParams(np.float32(amax / 127.0).item(), 0, TensorProto.INT8)
    if non_negative:
        return QParams(np.float32(amax / 255.0).item(), 0, TensorProto.UINT8)
    asymmetric = _asymmetric_uint8(rng, amax)
    if asymmetric.scale <= ONE_SIDED_STEP_RATIO * amax / 127.0:
        return asymmetric
    if encoding == "uint8":
        return QParams(np.float32(amax / 127.0).item(), 128, TensorProto.UINT8)
    return QParams(np.float32(amax / 127.0).item(), 0, TensorProto.INT8)


def grid_qparams(grid: dict, encoding: str) -> QParams | None:
    """A pre-quantized source's own grid in `encoding`: exactly, where the encoding has room for
    it (uint8 holds any grid, an int8 one shifted by 128; "mixed" keeps symmetric int8 as is);
    None where the encoding needs another grid (TensorRT's symmetric int8 from an asymmetric
    one), which is then re-encoded from the range."""
    scale, zero_point, kind = np.float32(grid["scale"]).item(), int(grid["zero_point"]), grid["type"]
    if kind == "int8" and zero_point == 0 and encoding in ("int8", "mixed"):
        return QParams(scale, 0, TensorProto.INT8)
    if encoding == "int8":
        return None
    return QParams(scale, zero_point if kind == "uint8" else zero_point + 128, TensorProto.UINT8)


def asymmetric_range(rng: TensorRange, amax: float) -> tuple[float, float]:
    """The method's [-amax, amax] cut to what calibration saw ([min, max]) and widened to hold 0
    (its zero point must be exact): the range of an asymmetric grid, TFLite's included."""
    return min(max(rng.min, -amax), 0.0), max(min(rng.max, amax), 0.0)


def _asymmetric_uint8(rng: TensorRange, amax: float) -> QParams:
    low, high = asymmetric_range(rng, amax)
    if not (np.isfinite(low) and np.isfinite(high)) or high - low <= VANISHING:
        low, high = -amax, amax
    scale = np.float32((high - low) / 255.0).item()
    zero_point = int(np.clip(np.round(-low / scale), 0, 255))
    return QParams(scale, zero_point, TensorProto.UINT8)


def weight_type(requested: str, encoding: str) -> str:
    """The integer type of a graph's weights: "int8", or "uint8" zero point 128 — the same grid
    shifted, so the dequantized weights (and every accuracy figure computed on them) are the
    same. "auto" picks uint8 for the CPU encodings ("uint8", "mixed") on a CPU whose u8 x s8
    pairs saturate (`machine.int8_pairs_saturate`): there ONNX Runtime and OpenVINO then run
    u8 x u8 kernels, which widen to int16 before multiplying. Measured on a 2-core AVX2 EPYC,
    efficientnet_lite0 INT8 top-1 agreement: int8 weights 0.637 (ORT) / 0.551 (OpenVINO),
    uint8 weights 0.930 / 0.926, as on a VNNI CPU. The price is speed there (ORT 12.4 -> 16.4
    ms, OpenVINO 6.2 -> 10.3 ms; FP32 9.1 / 14.0 ms). TensorRT ("int8") takes int8 weights only."""
    if requested not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {requested!r}; choose one of {WEIGHT_TYPES}")
    if encoding == "int8":
        if requested == "uint8":
            raise ValueError("the int8 encoding (TensorRT) takes symmetric int8 weights only, not uint8")
        return "int8"
    if requested == "auto":
        return "uint8" if machine.int8_pairs_saturate() else "int8"
    return requested


def symmetric_weight_scale(amax: np.ndarray) -> np.ndarray:
    """The symmetric int8 weight grid's step for the largest magnitude `amax` (per channel or
    per tensor): amax/127, so the largest weight is +-127; 1.0 where the weights vanish."""
    return np.where(amax > VANISHING, amax / 127.0, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int | None, kind: str = "int8",
                    rounded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric per channel along `axis` (per tensor when None), as `kind` ("int8", or "uint8"
    zero point 128: the same grid): (integer values, float32 scales, zero points). `rounded`:
    the signed values chosen on that grid by another rounding (quantization.rounding), instead
    of nearest."""
    weight = weight.astype(np.float32)
    if axis is None:
        amax = np.array(np.abs(weight).max(), np.float32)
    else:
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
        amax = np.abs(weight).max(axis=reduce_axes).astype(np.float32)
    scale = symmetric_weight_scale(amax)
    shaped = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(weight.ndim)])
    values = np.clip(np.round(weight / shaped), -127, 127).astype(np.int8) if rounded is None else rounded.astype(np.int8)
    if kind == "uint8":
        return (values.astype(np.int16) + 128).astype(np.uint8), scale, np.full(scale.shape, 128, np.uint8)
    return values, scale, np.zeros(scale.shape, np.int8)
