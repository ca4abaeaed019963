"""`enginekit calibrate`: one streaming pass, every requested method, CalibrationTables on disk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from enginekit.core.artifacts import atomic_write_all
from enginekit.calibration.collect import collect_histograms
from enginekit.calibration.data import DataArg, batch_size_for, open_data, stream
from enginekit.calibration.histogram import TensorHistogram
from enginekit.calibration.methods import DEFAULT_PERCENTILE, METHODS, compute_amax
from enginekit.calibration.table import CalibrationTable, TensorRange
from enginekit.core.console import markdown_table
from enginekit.core.errors import InputError
from enginekit.core.outputs import TABLE, TRT_CACHE, Output, check_outputs
from enginekit.core.tensors import ChannelMeans
from enginekit.exporter.reference import Fp32Model

DEFAULT_SAMPLES = 256
DEFAULT_BATCH = 4  # measured: batch 16 peaks at 2.3 GiB on efficientnet_lite0, batch 4 at 0.8 GiB, same speed


@dataclass
class CalibrationRun:
    model: Fp32Model
    tables: dict[str, CalibrationTable]
    histograms: dict[str, TensorHistogram]
    warnings: list[str]
    channel_means: dict[str, np.ndarray] = field(default_factory=dict)  # of `mean_tensors`, over the same samples


def calibrate(
    fp32: Fp32Model, data: DataArg, methods: Sequence[str], tensors: Sequence[str], percentile: float = DEFAULT_PERCENTILE,
    num_samples: int = DEFAULT_SAMPLES, batch_size: int = DEFAULT_BATCH, skip_nonfinite: bool = False,
    threads: int | None = None, mean_tensors: Mapping[str, int] | None = None,
) -> CalibrationRun:
    """One pass over `data` through `fp32`: histograms of `tensors` (the ones the Q/DQ graph will
    quantize, chosen by the caller) and of every other float activation, then each method's table."""
    if num_samples < 1:
        raise InputError("the number of calibration samples must be at least 1", option="num_samples")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"unknown calibration method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})", option="method")
    source = open_data(data, fp32.inputs, fp32.spec, "calibration")
    batch_size = batch_size_for(fp32.inputs, batch_size)
    batches, stats = stream(source, fp32.inputs, num_samples, batch_size, skip_nonfinite)
    available = source.count()
    means = ChannelMeans()
    histograms = collect_histograms(fp32.proto, calibration_tensors(fp32.proto, tensors), batches, threads,
                                    total=min(num_samples, available) if available is not None else num_samples,
                                    means=means, mean_tensors=mean_tensors, binned=set(methods) != {"minmax"})
    parameters = {"percentile": percentile, "bins": next(iter(histograms.values())).bins, "batch_size": batch_size}
    tables = {}
    for method in methods:
        table = CalibrationTable(
            method, {"percentile": percentile} if method == "percentile" else {}, stats.used, source.description,
            stats.sha256, fp32.sha256, model=fp32.name,
        )
        table.parameters.update({k: v for k, v in parameters.items() if k != "percentile"})
        for name, hist in histograms.items():
            amax = compute_amax(hist, method, percentile)
            table.tensors[name] = TensorRange(hist.minimum, hist.maximum, amax, hist.signed, hist.fraction_above(amax))
        tables[method] = table
    notes = list(stats.warnings)
    if stats.skipped_nonfinite:
        notes.append(f"skipped {stats.skipped_nonfinite} sample(s) with NaN or Inf")
    return CalibrationRun(fp32, tables, histograms, notes, means.means())


def calibration_tensors(model: onnx.ModelProto, quantized: Sequence[str]) -> list[str]:
    """What the table covers: the tensors the Q/DQ graph quantizes, then every other float
    activation (graph inputs, op outputs and graph outputs). Full-integer targets (TFLite)
    quantize every tensor, and they must get the user's method for those too, not a converter's
    own min-max."""
    from onnx import TensorProto

    if not model.graph.value_info:  # a file that never went through export: infer the types first
        model = onnx.shape_inference.infer_shapes(model)

    constants = {t.name for t in model.graph.initializer}
    float_values = {v.name for v in [*model.graph.value_info, *model.graph.output]
                    if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    tensors = list(quantized)
    seen = set(tensors)
    for value in model.graph.input:
        if value.name not in constants and value.name not in seen and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            tensors.append(value.name)
            seen.add(value.name)
    for node in model.graph.node:
        if node.op_type == "Constant" or all(not name or name in constants for name in node.input):
            constants.update(node.output)
            continue
        for name in node.output:
            if name in float_values and name not in seen:
                tensors.append(name)
                seen.add(name)
    return tensors


def table_path(output: Path, method: str, methods: Sequence[str]) -> Path:
    """ranges.json for one method; ranges.<method>.json each for several."""
    return output if len(methods) == 1 else output.with_name(f"{output.stem}.{method}{output.suffix or '.json'}")


def table_outputs(output: Path, methods: Sequence[str], trt_cache: Path | None = None) -> list[Output]:
    """Every file `write_tables` would write, for checking before any work starts."""
    outputs = [Output(table_path(output, m, methods), TABLE) for m in methods]
    return outputs + ([Output(trt_cache, TRT_CACHE)] if trt_cache is not None else [])


def write_tables(tables: Mapping[str, CalibrationTable], output: Path, trt_cache: Path | None = None,
                 inputs: Sequence[Path] = ()) -> list[Path]:
    """ranges.json for one method; ranges.<method>.json for several. Each write is atomic, and
    none replaces a file enginekit did not write (or one of `inputs`)."""
    methods = list(tables)
    check_outputs(table_outputs(output, methods, trt_cache), inputs)
    items = [(table_path(output, method, methods), lambda p, t=table: t.save(p)) for method, table in tables.items()]
    if trt_cache is not None:
        first = next(iter(tables.values()))
        items.append((trt_cache, lambda p: p.write_text(first.tensorrt_cache())))
    atomic_write_all(items)  # all tables or none: a full disk leaves no partial set
    return [Path(path) for path, _ in items]


def side_by_side(tables: Mapping[str, CalibrationTable], histograms: Mapping[str, TensorHistogram], rows: int = 12) -> str:
    """The tensors where the methods disagree most, each method's amax and clipped share."""
    methods = list(tables)
    names = list(histograms)
    if len(methods) > 1:
        def spread(name: str) -> float:
            values = [tables[m].tensors[name].amax for m in methods]
            return max(values) / max(min(values), 1e-12)
        names.sort(key=spread, reverse=True)
    headers = ["tensor", "min", "max"] + [f"{m} amax" for m in methods] + [f"{m} clipped %" for m in methods]
    table_rows = []
    for name in names[:rows]:
        hist = histograms[name]
        row = [name[-40:], hist.minimum, hist.maximum]
        row += [tables[m].tensors[name].amax for m in methods]
        row += [100 * tables[m].tensors[name].clipped for m in methods]
        table_rows.append(row)
    return markdown_table(headers, table_rows)
