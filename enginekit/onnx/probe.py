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
from enginekit.onnx.nodes import node_inputs, tensor_producers
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


def upstream(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that computes `tensors` alone (its outputs): only the nodes they depend
    on and the initializers those read, so a tensor early in the graph costs a fraction of a run."""
    producers = tensor_producers(model.graph)
    needed, wanted, stack = set(), set(tensors), list(tensors)
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node_inputs(node))
        wanted.update(node_inputs(node))
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    kept = [n for n in model.graph.node if id(n) in needed]
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in wanted]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.output[:]
    return with_outputs(pruned, tensors)


def probe(model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Feeds], threads: int | None = None,
          pruned: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """{tensor: value} of `tensors` for each batch, from one session of `model` (memory arena off:
    many large outputs would otherwise stay pinned in it); `pruned`: of the `upstream` part alone."""
    session = Session(upstream(model, tensors) if pruned else with_outputs(model, tensors), threads=threads,
                      memory_arena=False, spinning=False)
    names = list(dict.fromkeys(tensors))
    for feeds in batches:
        yield session.run(feeds, names)
