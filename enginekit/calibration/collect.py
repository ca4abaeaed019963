"""The one streaming pass: run the FP32 graph with every tensor to be quantized exposed as an
output (the reference executor's probe), and fold each batch into that tensor's histogram."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx

from enginekit.calibration.histogram import DEFAULT_BINS, TensorHistogram
from enginekit.core.errors import InputError
from enginekit.core.progress import report
from enginekit.core.tensors import ChannelMeans, Feeds
from enginekit.onnx.probe import probe


def collect_histograms(
    model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Feeds], threads: int | None = None,
    bins: int = DEFAULT_BINS, total: int | None = None, means: ChannelMeans | None = None,
    mean_tensors: Mapping[str, int] | None = None, binned: bool = True,
) -> dict[str, TensorHistogram]:
    """Histograms of `tensors` over the batches; with `means`, the same pass also accumulates the
    channel means of `mean_tensors` (name -> channel axis: bias correction's FP32 reference, so it
    needs no pass of its own)."""
    histograms = {name: TensorHistogram(bins) for name in tensors}
    extra = dict(mean_tensors or {}) if means is not None else {}
    sizes: list[int] = []

    def counted(source: Iterable[Feeds]) -> Iterator[Feeds]:
        for feeds in source:
            sizes.append(len(next(iter(feeds.values()))))
            yield feeds

    done = 0
    with ThreadPoolExecutor(max_workers=histogram_workers()) as pool:
        pending: tuple[int, int, list[tuple[str, Future]]] = (0, 0, [])  # a batch's first sample, size, updates
        for values in probe(model, list(dict.fromkeys([*tensors, *extra])), counted(batches), threads):
            _finish(*pending)
            # this batch is binned on the pool while the next one runs in ONNX Runtime; each
            # tensor's histogram still takes its batches in order (the table is the same)
            updates = [(name, pool.submit(histograms[name].update, values[name], binned)) for name in tensors]
            updates += [(name, pool.submit(means.add, name, values[name], axis)) for name, axis in extra.items()]
            pending = (done, sizes[-1], updates)
            done += sizes[-1]
            report("calibrating", done, total, "samples")
        _finish(*pending)
    _refuse_infinite_outputs(model, histograms)
    return histograms


def _refuse_infinite_outputs(model: onnx.ModelProto, histograms: Mapping[str, TensorHistogram]) -> None:
    """An infinity inside the model may be meant (an attention mask of -inf: histogram.py leaves it
    out), but one in a graph output means the data overflowed what the model computes in float32."""
    for output in model.graph.output:
        histogram = histograms.get(output.name)
        if histogram is not None and histogram.infinite:
            raise InputError(f"output '{output.name}' of the model holds {histogram.infinite} infinite value(s) on the calibration data; "
                             "the data is out of the range the model computes in float32")


def histogram_workers() -> int:
    """Threads that bin histograms (numpy releases the GIL in the big array operations)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _finish(first: int, count: int, updates: list[tuple[str, Future]]) -> None:
    """Wait for a batch's histogram updates; a NaN names the tensor and the samples."""
    for name, future in updates:
        try:
            future.result()
        except ValueError as exc:
            raise InputError(f"tensor '{name}' of the model holds {exc} on the calibration data (samples {first}..{first + count - 1}); "
                             "the data is out of the range the model computes in float32") from None


def collect_channel_peaks(model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Feeds],
                          threads: int | None = None) -> dict[str, np.ndarray]:
    """Per tensor, the largest |value| of each channel (last axis) over the batches: what
    SmoothQuant balances against the weights before the one calibration pass."""
    peaks: dict[str, np.ndarray] = {}
    for values in probe(model, list(tensors), batches, threads):
        for name in tensors:
            value = np.abs(values[name].astype(np.float32, copy=False))
            peak = value.reshape(-1, value.shape[-1]).max(axis=0)
            if not np.all(np.isfinite(peak)):
                raise InputError(f"tensor '{name}' of the model holds NaN or Inf on the calibration data")
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks
