"""The one streaming pass: run the FP32 graph in ONNX Runtime with every tensor to be quantized
exposed as an output, and fold each batch into that tensor's histogram."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence

import onnx

from enginekit.calibrate.histogram import DEFAULT_BINS, TensorHistogram
from enginekit.models.spec import Feeds


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `tensors` (types from shape inference)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    types = {v.name: v for v in [*augmented.graph.value_info, *augmented.graph.input, *augmented.graph.output]}
    for name in tensors:
        if name in existing:
            continue
        if name in types:
            augmented.graph.output.append(types[name])
        else:
            augmented.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return augmented


def collect_histograms(
    model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Feeds], threads: int | None = None,
    bins: int = DEFAULT_BINS, progress: bool = True, total: int | None = None,
) -> dict[str, TensorHistogram]:
    from enginekit.engines.onnxruntime import OrtRunner

    runner = OrtRunner(with_outputs(model, tensors).SerializeToString(), threads=threads, memory_arena=False)
    positions = {o.name: i for i, o in enumerate(runner.outputs)}
    histograms = {name: TensorHistogram(bins) for name in tensors}
    progress = progress and sys.stderr.isatty()
    done, start = 0, time.perf_counter()
    for feeds in batches:
        outputs = runner.infer(feeds)
        for name in tensors:
            histograms[name].update(outputs[positions[name]])
        done += len(next(iter(feeds.values())))
        if progress:
            _progress(done, total, time.perf_counter() - start)
    if progress:
        sys.stderr.write("\n")
    return histograms


def _progress(done: int, total: int | None, seconds: float) -> None:
    rate = done / seconds if seconds > 0 else 0.0
    if total:
        filled = int(30 * done / total)
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\rcalibrating [{bar}] {done}/{total} samples, {rate:.1f} samples/s")
    else:
        sys.stderr.write(f"\rcalibrating {done} samples, {rate:.1f} samples/s")
    sys.stderr.flush()
