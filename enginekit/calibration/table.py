"""CalibrationTable: the ranges one method chose for every activation tensor, saved as JSON.

The table is what every target consumes: it names the FP32 model it belongs to (by hash) and
the data it came from (by hash), so rebuilding a target reuses it without another pass, and a
table from another model is refused. Written deterministically (sorted keys, repr floats):
the same model, data and options give a byte-identical file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.core.errors import InputError

TABLE_SCHEMA = "enginekit.calibration/1"


@dataclass
class TensorRange:
    min: float
    max: float
    amax: float
    signed: bool
    clipped: float = 0.0  # fraction of values with |x| > amax
    grid: dict[str, Any] | None = None  # a pre-quantized source's own {scale, zero_point, type} (calibration.imported)

    def to_json(self) -> dict[str, Any]:
        entry = {"min": self.min, "max": self.max, "amax": self.amax, "signed": self.signed, "clipped": self.clipped}
        return {**entry, "grid": self.grid} if self.grid else entry


def _valid_grid(grid: Any) -> bool:
    if not isinstance(grid, dict) or set(grid) != {"scale", "zero_point", "type"} or grid["type"] not in ("int8", "uint8"):
        return False
    scale, zero = grid["scale"], grid["zero_point"]
    low, high = (-128, 127) if grid["type"] == "int8" else (0, 255)
    return (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
            and isinstance(zero, int) and not isinstance(zero, bool) and low <= zero <= high)


@dataclass
class CalibrationTable:
    method: str
    parameters: dict[str, Any]
    num_samples: int
    data: str
    data_sha256: str
    model_sha256: str
    tensors: dict[str, TensorRange] = field(default_factory=dict)
    model: str = ""
    # SmoothQuant: per MatMul input tensor, the divisor of each channel; the ranges are those of
    # the model smoothed by them (onnx/smoothing.py), so a given table rebuilds that graph
    smoothing: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        extra = {"smoothing": dict(sorted(self.smoothing.items()))} if self.smoothing else {}
        return {**extra,
            "schema": TABLE_SCHEMA,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "method": self.method,
            "parameters": self.parameters,
            "num_samples": self.num_samples,
            "data": self.data,
            "data_sha256": self.data_sha256,
            "tensors": {name: r.to_json() for name, r in sorted(self.tensors.items())},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        from enginekit.core.loaders import load_json_document

        raw = load_json_document(path, TABLE_SCHEMA, "calibration table")
        try:
            tensors = {str(name): TensorRange(**entry) for name, entry in raw["tensors"].items()}
            table = cls(raw["method"], raw["parameters"], raw["num_samples"], raw["data"], raw["data_sha256"],
                        raw["model_sha256"], tensors, raw.get("model", ""), raw.get("smoothing") or {})
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"calibration table is missing or has a malformed field ({exc})", path) from None
        problem = table.problem()
        if problem:
            raise InputError(f"calibration table is unusable: {problem}", path)
        return table

    def problem(self) -> str | None:
        """What makes this table unusable (wrong types, non-finite or negative ranges), or None."""
        if not all(isinstance(v, str) for v in (self.method, self.data, self.data_sha256, self.model_sha256)):
            return "method, data and hashes must be text"
        if not isinstance(self.parameters, dict) or isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            return "parameters must be an object and num_samples a positive integer"
        if not self.tensors:
            return "it has no tensors"
        for name, entry in self.tensors.items():
            values = (entry.min, entry.max, entry.amax, entry.clipped)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                return f"tensor '{name}' has a range that is not a finite number"
            if entry.amax < 0 or entry.min > entry.max or not 0 <= entry.clipped <= 1 or not isinstance(entry.signed, bool):
                return f"tensor '{name}' has an impossible range (amax {entry.amax}, min {entry.min}, max {entry.max})"
            if entry.grid is not None and not _valid_grid(entry.grid):
                return f"tensor '{name}' has a malformed grid {entry.grid!r}"
        if not isinstance(self.smoothing, dict):
            return "smoothing must be an object"
        for name, divisors in self.smoothing.items():
            if not isinstance(divisors, list) or not divisors or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in divisors):
                return f"the smoothing of tensor '{name}' is not a list of positive finite numbers"
        return None

    def check_model(self, model_sha256: str, origin: str | Path) -> None:
        if self.model_sha256 != model_sha256:
            raise InputError(
                f"calibration table was made for another model (sha256 {self.model_sha256[:12]}..., "
                f"this model is {model_sha256[:12]}...); calibrate this model again", origin)

    def tensorrt_cache(self, version: str = "TRT-10000-EntropyCalibration2") -> str:
        """TensorRT's calibration cache text: one line per tensor, the int8 scale (amax/127)
        as the hex of its big-endian float32 bits. For TensorRT < 11 implicit-quantization
        workflows; enginekit's own TensorRT path uses the Q/DQ graph instead."""
        lines = [version]
        for name, r in sorted(self.tensors.items()):
            scale = max(r.amax, 1e-12) / 127.0
            lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
        return "\n".join(lines) + "\n"
