"""Look inside the reference graph: run it with intermediate tensors exposed as outputs.

One helper for every stage that needs activations (calibration histograms, bias correction,
the per-layer report, TFLite range matching): `probe(model, tensors, batches)` yields one
{tensor: value} dict per batch from a single session.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx

from enginekit.core.tensors import Feeds
from enginekit.onnx.session import Session


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `tensors` (types from shape inference)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    types = {v.name: v for v in [*augmented.graph.value_info, *augmented.graph.input, *augmented.graph.output]}
    for name in tensors:
        if name in existing:
            continue
        existing.add(name)
        if name in types:
            augmented.graph.output.append(types[name])
        else:
            augmented.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return augmented


def probe(model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Feeds], threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """{tensor: value} of `tensors` for each batch, from one session of `model` (memory arena off:
    many large outputs would otherwise stay pinned in it)."""
    session = Session(with_outputs(model, tensors), threads=threads, memory_arena=False, spinning=False)
    names = list(dict.fromkeys(tensors))
    for feeds in batches:
        yield session.run(feeds, names)
