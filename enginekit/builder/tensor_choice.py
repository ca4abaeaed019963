"""`--calib-method per-tensor`: for each quantized tensor, the range of the
method (min-max, percentile, entropy, MSE: all from the one pass's histograms) whose
quantization error reaches its readers' outputs the least.

Why per tensor: no method wins on every tensor of a model, and a tensor's own squared error (what
MSE minimises) weighs every channel alike, where what matters is what its readers make of it: an
outlier channel a convolution all but ignores can be clipped, one it amplifies cannot. Each
reader (the ops that read the tensor quantized, in every placement the build uses) runs alone in
the reference executor on calibration samples, its other inputs at their FP32 values, with the
tensor fake-quantized on each encoding's grid; the candidate with the least error relative to the
reader's FP32 output, summed over readers and encodings, wins (ties: the earlier method, min-max
first).

Not one of `auto`'s candidates (it was for a stop): judged end to end on the Q/DQ graph it beat
min-max on the corpus's ViT and won a crop on ONNX Runtime (top-1 0.984 -> 0.992), but LiteRT's
full-integer graph, which quantizes more than the Q/DQ graph, lost four (0.914 -> 0.883, below the
gate); on efficientnet_lite0 it scored level with percentile. The issue's rule: on by default only
where it helps on the zoo and the corpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from enginekit.calibration.methods import METHODS
from enginekit.calibration.table import CalibrationTable
from enginekit.exporter.reference import Fp32Model
from enginekit.onnx.nodes import tensor_readers
from enginekit.onnx.probe import probe
from enginekit.onnx.session import Session
from enginekit.quantization.encoding import activation_qparams
from enginekit.quantization.pipeline import plan_for

PER_TENSOR = "per-tensor"
TENSOR_SAMPLES = 16  # calibration samples each reader is run on
PROBE_TENSORS = 48  # tensors captured per pass of the model (bounds the memory of one pass)


def per_tensor_table(session: Any, fp32: Fp32Model, tables: Mapping[str, CalibrationTable],
                     pairs: Sequence[tuple[str, str]]) -> CalibrationTable:
    """A table holding, per tensor, the range of the method in `tables` (same pass, same model
    `fp32`) whose error reaches that tensor's readers the least; `parameters[PER_TENSOR]` counts
    the tensors each method won."""
    methods = [m for m in METHODS if m in tables]
    base = tables[methods[0]]
    readers = quantized_readers(fp32, session.options.quantize, {placement for _, placement in pairs})
    readers = {t: r for t, r in readers.items() if all(t in tables[m].tensors for m in methods)}
    encodings = sorted({encoding for encoding, _ in pairs})
    batch = next(session.calibration_samples(TENSOR_SAMPLES, TENSOR_SAMPLES))
    chosen: dict[str, str] = {}
    for tensor, errors in reader_errors(fp32.proto, readers, tables, methods, encodings, batch, session.options.threads):
        chosen[tensor] = methods[int(np.argmin(errors))]  # argmin takes the first of equals: min-max
    table = dataclasses.replace(base, method=PER_TENSOR, parameters=dict(base.parameters),
                                tensors={name: tables[chosen.get(name, methods[0])].tensors[name] for name in base.tensors})
    table.parameters[PER_TENSOR] = {m: sum(c == m for c in chosen.values()) for m in methods}
    return table


def quantized_readers(fp32: Fp32Model, settings: Any, placements: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """Per quantized activation, the nodes that read it quantized in any of `placements` (a
    tensor quantized at its producer is read quantized by every reader); nodes holding subgraphs
    are left out (they cannot run alone)."""
    graph = fp32.proto.graph
    named = {node.name: node for node in graph.node}
    every = tensor_readers(graph)
    found: dict[str, dict[str, onnx.NodeProto]] = {}
    for placement in sorted(placements):
        plan, _ = plan_for(fp32, dataclasses.replace(settings, bias_correction=False), placement)
        for tensor in plan.activations:
            nodes = every.get(tensor, []) if tensor in plan.outputs else [named[n] for n in plan.consumers.get(tensor, ()) if n in named]
            for node in nodes:
                if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                    found.setdefault(tensor, {})[node.name] = node
    return {tensor: list(nodes.values()) for tensor, nodes in found.items() if nodes}


def reader_errors(model: onnx.ModelProto, readers: Mapping[str, Sequence[onnx.NodeProto]], tables: Mapping[str, CalibrationTable],
                  methods: Sequence[str], encodings: Sequence[str], batch: Mapping[str, np.ndarray],
                  threads: int | None) -> Iterator[tuple[str, list[float]]]:
    """(tensor, error per method): the readers' output error relative to FP32, summed over
    readers and encodings, with the tensor fake-quantized on the method's range."""
    initializers = {init.name: init for init in model.graph.initializer}
    names = list(readers)
    for start in range(0, len(names), PROBE_TENSORS):
        chunk = names[start : start + PROBE_TENSORS]
        needed = {t for tensor in chunk for node in readers[tensor] for t in [*node.input, *node.output]
                  if t and t not in initializers and t not in batch}
        values = {**batch, **next(probe(model, sorted(needed), [batch], threads))}
        for tensor in chunk:
            errors = [0.0] * len(methods)
            for node in readers[tensor]:
                runner = Session(_alone(model, node, values, initializers), threads=threads, spinning=False)
                feeds = {name: values[name] for name in dict.fromkeys(node.input) if name and name not in initializers}
                outputs = [o for o in node.output if o and np.issubdtype(values[o].dtype, np.floating)]
                for index, method in enumerate(methods):
                    for encoding in encodings:
                        quantized = {**feeds, tensor: fake_quantize(values[tensor], tensor, tables[method].tensors[tensor], encoding)}
                        got = runner.run(quantized, outputs)
                        errors[index] += sum(_relative_error(got[o], values[o]) for o in outputs)
            yield tensor, errors


def fake_quantize(values: np.ndarray, name: str, rng: Any, encoding: str) -> np.ndarray:
    """`values` through QuantizeLinear and DequantizeLinear on the grid `encoding` gives `rng`."""
    params = activation_qparams(name, rng, encoding)
    info = np.iinfo(params.numpy_type)
    levels = np.clip(np.round(values / np.float32(params.scale)) + params.zero_point, info.min, info.max)
    return ((levels - params.zero_point) * np.float32(params.scale)).astype(values.dtype)


def _relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    energy = float(np.sum(np.square(reference, dtype=np.float64)))
    return float(np.sum(np.square(got.astype(np.float64) - reference))) / max(energy, np.finfo(np.float32).tiny)


def _alone(model: onnx.ModelProto, node: onnx.NodeProto, values: Mapping[str, np.ndarray],
           initializers: Mapping[str, onnx.TensorProto]) -> onnx.ModelProto:
    """`node` as a model of its own: its activations as inputs, its constants as initializers."""
    def info(name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype), None)

    inputs = [info(n) for n in dict.fromkeys(node.input) if n and n not in initializers]
    outputs = [info(n) for n in node.output if n]
    graph = onnx.helper.make_graph([node], "reader", inputs, outputs, [initializers[n] for n in dict.fromkeys(node.input) if n in initializers])
    alone = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    alone.ir_version = model.ir_version
    return alone
