"""The calibration table of a pre-quantized source: its own grids, read from its Q/DQ nodes at
export (`onnx.prequantized`), instead of ranges measured on data.

Each entry keeps the exact grid (`TensorRange.grid`), so an encoding of the same integer type
reproduces the source's scale and zero point; its min/max/amax describe the same range, so an
encoding that needs another type (TensorRT's symmetric int8 from an asymmetric uint8 grid) is
re-encoded from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from enginekit.calibration.table import CalibrationTable, TensorRange
from enginekit.core.errors import InputError
from enginekit.onnx.prequantized import QuantGrid

METHOD = "imported"


def grid_range(grid: QuantGrid) -> TensorRange:
    """The range a grid represents; a symmetric int8 grid's amax is 127 steps (its encoding as
    int8 then gives back the same scale)."""
    low, high = grid.bounds()
    symmetric = grid.type == "int8" and grid.zero_point == 0
    amax = 127 * grid.scale if symmetric else max(abs(low), abs(high))
    return TensorRange(min=low, max=high, amax=amax, signed=low < 0, grid=grid.to_json())


def imported_table(prequantized: Mapping[str, Any], model_sha256: str, model: str, origin: str = "") -> CalibrationTable:
    """A CalibrationTable from an export manifest's `prequantized` record (checked like a table
    read from disk: a tampered record is one line, not a crash)."""
    try:
        tensors = {str(name): grid_range(QuantGrid.from_json(entry)) for name, entry in prequantized["activations"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"the export's record of its pre-quantized grids is malformed ({exc})", origin) from None
    table = CalibrationTable(METHOD, {"format": "QDQ", "weights": prequantized.get("weights", 0)}, 1,
                             "the Q/DQ nodes of the pre-quantized source (no calibration data)", "", model_sha256, tensors, model)
    problem = table.problem()
    if problem:
        raise InputError(f"the export's pre-quantized grids are unusable: {problem}", origin)
    return table
