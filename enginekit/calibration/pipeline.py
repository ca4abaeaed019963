"""`enginekit calibrate`: one streaming pass, every requested method, CalibrationTables on disk.

The pass can be split into shards (windows of the samples on batch boundaries) that workers of
an executor (core.executor: local processes or Ray) run; their histograms, sample digests and
channel sums merge on the driver. Histograms depend only on the values (calibration.histogram)
and the data digest only on the samples (calibration.data), so the tables are byte-identical to
one process's, whatever the number of shards and the order they finish in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from enginekit.core.artifacts import atomic_write_all
from enginekit.calibration.collect import collect_histograms
from enginekit.calibration.data import (DataArg, DataSource, DataStats, batch_size_for, joined_digest, open_data,
                                        short_data_warning, stream)
from enginekit.calibration.histogram import TensorHistogram
from enginekit.calibration.live_ranges import bound_table, reader_bounds
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
    model: Fp32Model  # the graph the pass ran through (with SmoothQuant: the smoothed twin)
    tables: dict[str, CalibrationTable]
    histograms: dict[str, TensorHistogram]
    warnings: list[str]
    channel_means: dict[str, np.ndarray] = field(default_factory=dict)  # of `mean_tensors`, over the same samples
    shards: int = 1  # windows of the data the pass was split into
    smoothed: dict[str, int] | None = None  # what SmoothQuant did to make `model` (None: not smoothed)


@dataclass
class Collected:
    """What a pass over one window of the data yields; windows merge (`merge_windows`)."""

    histograms: dict[str, TensorHistogram]
    stats: DataStats
    means: ChannelMeans


@dataclass(frozen=True)
class PassSettings:
    """Everything a shard's worker needs besides the model and its window."""

    tensors: tuple[str, ...]
    batch_size: int
    skip_nonfinite: bool
    threads: int | None
    mean_tensors: tuple[tuple[str, int], ...]
    binned: bool
    smoothing: tuple[tuple[str, tuple[float, ...]], ...] = ()  # SmoothQuant divisors the worker applies to its model


def calibrate(
    fp32: Fp32Model, data: DataArg, methods: Sequence[str], tensors: Sequence[str], percentile: float = DEFAULT_PERCENTILE,
    num_samples: int = DEFAULT_SAMPLES, batch_size: int = DEFAULT_BATCH, skip_nonfinite: bool = False,
    threads: int | None = None, mean_tensors: Mapping[str, int] | None = None, shards: int = 1, executor: Any = None,
    smoothing: Mapping[str, Sequence[float]] | None = None, twin: Fp32Model | None = None,
) -> CalibrationRun:
    """One pass over `data` through `fp32`: histograms of `tensors` (the ones the Q/DQ graph will
    quantize, chosen by the caller) and of every other float activation, then each method's table.
    With `shards` > 1 the pass is split over the workers of `executor` (core.executor; local
    processes by default): the same tables, byte for byte. With `smoothing` (SmoothQuant divisors
    per MatMul input), the pass runs through the smoothed twin of `fp32`, and every table records
    the divisors (`tensors` then name the twin's tensors); `twin`: that twin, where the caller
    has already made it (each is a full copy of the model)."""
    smoothing = {name: tuple(float(v) for v in values) for name, values in sorted((smoothing or {}).items())}
    smoothed = None
    if smoothing:
        fp32, smoothed = (twin, None) if twin is not None else smoothed_twin(fp32, smoothing)
    if num_samples < 1:
        raise InputError("the number of calibration samples must be at least 1", option="num_samples")
    if shards < 1:
        raise InputError("the number of shards must be at least 1", option="shards")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"unknown calibration method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})", option="method")
    source = open_data(data, fp32.inputs, fp32.spec, "calibration")
    batch_size = batch_size_for(fp32.inputs, batch_size)
    settings = PassSettings(tuple(calibration_tensors(fp32.proto, tensors)), batch_size, skip_nonfinite, threads,
                            tuple(sorted((mean_tensors or {}).items())), set(methods) != {"minmax"}, tuple(smoothing.items()))
    available = source.count()
    total = min(num_samples, available) if available is not None else num_samples
    if shards == 1:
        collected = collect_window(fp32, source, settings, 0, num_samples, total)
    else:
        collected = _sharded_pass(fp32, data, source, settings, total, shards, executor)
        if total < num_samples:  # each window lies inside the data: the one pass's warning, said here
            collected.stats.warnings.insert(0, short_data_warning(num_samples, source.origin, total))
    histograms, stats, means = collected.histograms, collected.stats, collected.means
    parameters = {"percentile": percentile, "bins": next(iter(histograms.values())).bins, "batch_size": batch_size}
    bounds = reader_bounds(fp32.proto)  # what the readers of each tensor tell apart (live_ranges.py)
    tables = {}
    for method in methods:
        table = CalibrationTable(
            method, {"percentile": percentile} if method == "percentile" else {}, stats.used, source.description,
            stats.sha256, fp32.sha256, model=fp32.name, smoothing={name: list(values) for name, values in smoothing.items()},
        )
        table.parameters.update({k: v for k, v in parameters.items() if k != "percentile"})
        for name, hist in histograms.items():
            amax = compute_amax(hist, method, percentile)
            table.tensors[name] = TensorRange(hist.minimum, hist.maximum, amax, hist.signed, hist.fraction_above(amax))
        narrowed = bound_table(table, bounds)
        if narrowed:
            table.parameters["cut_to_live_span"] = narrowed
        tables[method] = table
    notes = list(stats.warnings)
    if stats.skipped_nonfinite:
        notes.append(f"skipped {stats.skipped_nonfinite} sample(s) with NaN or Inf")
    return CalibrationRun(fp32, tables, histograms, notes, means.means(), shards, smoothed)


def collect_window(fp32: Fp32Model, source: DataSource, settings: PassSettings, start: int, stop: int,
                   total: int | None = None) -> Collected:
    """The pass over samples start..stop-1 of `source`."""
    batches, stats = stream(source, fp32.inputs, stop, settings.batch_size, settings.skip_nonfinite, start)
    means = ChannelMeans()
    histograms = collect_histograms(fp32.proto, settings.tensors, batches, settings.threads, total=total,
                                    means=means, mean_tensors=dict(settings.mean_tensors), binned=settings.binned)
    return Collected(histograms, stats, means)


def shard_windows(total: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """`shards` windows of about equal size covering samples 0..total-1, each starting on a batch
    boundary (the batches are the ones a single pass reads); empty ones left out."""
    batches = -(-total // batch_size)
    edges = [i * batches // shards * batch_size for i in range(shards)] + [total]
    return [(start, min(stop, total)) for start, stop in zip(edges, edges[1:]) if start < min(stop, total)]


def merge_windows(parts: Sequence[Collected]) -> Collected:
    """The windows' results, merged in window order: histograms exactly, digests and channel sums
    in sample order."""
    first = parts[0]
    histograms = {name: TensorHistogram(hist.bins) for name, hist in first.histograms.items()}
    stats = DataStats(requested=sum(p.stats.requested for p in parts))
    means = ChannelMeans()
    for part in parts:
        for name, hist in part.histograms.items():
            histograms[name].merge(hist)
        stats.used += part.stats.used
        stats.skipped_nonfinite += part.stats.skipped_nonfinite
        stats.sample_digests += part.stats.sample_digests
        stats.shapes = stats.shapes or part.stats.shapes
        stats.warnings += [w for w in part.stats.warnings if w not in stats.warnings]
        means.merge(part.means)
    if stats.used == 0:
        raise InputError("no usable samples (every sample had NaN or Inf)")
    stats.sha256 = joined_digest(stats.sample_digests)
    return Collected(histograms, stats, means)


def _sharded_pass(fp32: Fp32Model, data: DataArg, source: DataSource, settings: PassSettings, total: int, shards: int,
                  executor: Any) -> Collected:
    from enginekit.core.executor import Task, get_executor
    from enginekit.core.progress import report

    if source.count() is None or not (data is None or isinstance(data, (str, Path))):
        raise InputError("sharded calibration needs data every worker can open (a file, an image folder or zoo data), "
                         f"not {source.description}", option="shards")
    executor = executor or get_executor("local")
    windows = shard_windows(total, settings.batch_size, shards)
    folder = fp32.path.parent  # the export artifact (the cache): what each worker loads
    tasks = [Task(f"shard {i}", calibration_shard, (str(folder), fp32.sha256, str(data) if data is not None else None,
                                                   settings, start, stop))
             for i, (start, stop) in enumerate(windows)]
    parts: dict[str, Collected] = {}
    for outcome in executor.run(tasks):
        if outcome.failed or outcome.skipped:
            raise InputError(f"calibration {outcome.key} failed: {outcome.failed or outcome.skipped}", option="shards")
        if isinstance(outcome.value, str):  # the worker's own one-line error
            raise InputError(f"calibration {outcome.key}: {outcome.value}")
        parts[outcome.key] = outcome.value
        report("calibrating", len(parts), len(tasks), "shards")
    return merge_windows([parts[task.key] for task in tasks])


def calibration_shard(export_folder: str, sha256: str, data: str | None, settings: PassSettings, start: int, stop: int
                      ) -> Collected | str:
    """A worker's shard: the FP32 model from its export folder (checked against the driver's
    hash), the window of the data, its histograms. An error comes back as its one line."""
    from enginekit.core.errors import EnginekitError
    from enginekit.exporter.reference import load_fp32

    try:
        fp32 = load_fp32(export_folder)
        if fp32.sha256 != sha256:
            return f"the FP32 model in {export_folder} changed while calibrating (sha256 {fp32.sha256[:12]}...)"
        if settings.smoothing:
            fp32, _ = smoothed_twin(fp32, dict(settings.smoothing))
        source = open_data(data, fp32.inputs, fp32.spec, "calibration")
        return collect_window(fp32, source, settings, start, stop)
    except EnginekitError as exc:
        return str(exc)


def smoothed_twin(fp32: Fp32Model, smoothing: Mapping[str, Sequence[float]]) -> tuple[Fp32Model, dict[str, int]]:
    """`fp32` with its MatMul inputs smoothed by `smoothing` (onnx.smoothing): the same function,
    the graph INT8 is calibrated and quantized from. It keeps the source's hash (a table names the
    model it was made for, and carries the divisors that make the twin from it) and is never
    traced from Keras (the divisors live in the ONNX graph). Also: what the smoothing did."""
    import dataclasses

    from enginekit.onnx.smoothing import apply_smoothing

    try:
        proto, record = apply_smoothing(fp32.proto, {name: np.asarray(v, dtype=np.float32) for name, v in smoothing.items()})
    except ValueError as exc:
        raise InputError(f"the calibration table's smoothing does not fit this model: {exc}", fp32.origin) from None
    return dataclasses.replace(fp32, proto=proto, keras_file=None), record


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
