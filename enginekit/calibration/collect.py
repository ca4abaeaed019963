"""The one streaming pass: run the FP32 graph with every tensor to be quantized exposed as an
output (the reference executor's probe), and fold each batch into that tensor's histogram."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import onnx

from enginekit.calibration.histogram import DEFAULT_BINS, TensorHistogram
from enginekit.core.errors import InputError
from enginekit.core.progress import report
from enginekit.core.tensors import Feeds
from enginekit.onnx.probe import probe


def collect_histograms(
    model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Feeds], threads: int | None = None,
    bins: int = DEFAULT_BINS, total: int | None = None,
) -> dict[str, TensorHistogram]:
    histograms = {name: TensorHistogram(bins) for name in tensors}
    sizes: list[int] = []

    def counted(source: Iterable[Feeds]) -> Iterator[Feeds]:
        for feeds in source:
            sizes.append(len(next(iter(feeds.values()))))
            yield feeds

    done = 0
    for values in probe(model, tensors, counted(batches), threads):
        for name in tensors:
            try:
                histograms[name].update(values[name])
            except ValueError as exc:
                raise InputError(f"tensor '{name}' of the model holds {exc} on the calibration data (samples {done}..{done + sizes[-1] - 1}); "
                                 "the data is out of the range the model computes in float32") from None
        done += sizes[-1]
        report("calibrating", done, total, "samples")
    return histograms
