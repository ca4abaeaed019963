"""`enginekit export`: source model -> checked, simplified ONNX with a parity-gated manifest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from enginekit.core.artifacts import staged_artifact, write_manifest
from enginekit.core.errors import EnginekitError, GateError, InputError, naming
from enginekit.onnx import graph as onnx_graph
from enginekit.onnx.session import Session
from enginekit.onnx.nodes import subgraphs
from enginekit.exporter.parity import DEFAULT_MAX_ABS, DEFAULT_MIN_COSINE, DEFAULT_RTOL, ParityResult, check_parity
from enginekit.exporter.sources import Source, resolve_source
from enginekit.core.machine import machine_info, toolchain
from enginekit.core.outputs import ARTIFACT, Output, check_outputs
from enginekit.core.tensors import Feeds, random_feed_text, with_ranges

MODEL_FILE = "model.onnx"
# Older ONNX files are upgraded to this opset: per-channel DequantizeLinear (the Q/DQ hub's weights)
# needs 13, and onnxscript's optimizer rewrites Reshape with opset 14's allowzero attribute.
MIN_OPSET = 14
_UNNAMED_DIM_SIZE = 32  # size used for a symbolic dim the parity cases do not name


@dataclass(frozen=True)
class ExportOptions:
    opset: int | None = None  # None: DEFAULT_OPSET for PyTorch sources, the file's own for ONNX sources
    dynamic_batch: bool = True
    max_abs: float = DEFAULT_MAX_ABS
    min_cosine: float = DEFAULT_MIN_COSINE
    rtol: float = DEFAULT_RTOL  # of each output's largest magnitude, added to max_abs

    def __post_init__(self) -> None:
        for option, value in (("max_abs", self.max_abs), ("rtol", self.rtol)):
            if not value >= 0:  # NaN too
                raise InputError(f"the parity tolerance {option} must be 0 or more, not {value:g}", option=option)


def export_model(
    model: str, out_dir: str | Path, weights: str | None = None, input_shapes: Sequence[str] = (),
    options: ExportOptions = ExportOptions(), allow_unsafe_keras: bool = False,
) -> dict[str, Any]:
    """Export `model` into the artifact folder `out_dir`; returns the manifest written there."""
    check_outputs([Output(Path(out_dir), ARTIFACT)], [model, weights])
    try:
        return _export(model, Path(out_dir), weights, input_shapes, options, allow_unsafe_keras)
    except EnginekitError as exc:
        raise naming(exc, model) from None


def _export(model: str, out_dir: Path, weights: str | None, input_shapes: Sequence[str], options: ExportOptions,
            allow_unsafe_keras: bool) -> dict[str, Any]:
    source = resolve_source(model, weights, input_shapes, allow_unsafe_keras)
    if not options.dynamic_batch:
        source = _fix_batch(source)
    notes: list[str] = []
    with staged_artifact(out_dir) as stage:
        path = stage / MODEL_FILE
        if source.onnx_model is not None:
            proto = _normalize_onnx(source, options, notes)
        elif source.keras is not None:
            from enginekit.exporter.keras_export import export_keras

            proto = onnx_graph.finalize(export_keras(source.keras, options.opset, source.name), source.name)
        else:
            from enginekit.exporter.torch_export import MIN_OPSET, export_torch

            if options.opset is not None and options.opset < MIN_OPSET:
                raise InputError(f"opset {options.opset}: the PyTorch exporter writes opset {MIN_OPSET} or newer", option="opset")
            proto = onnx_graph.finalize(export_torch(source, options.opset or onnx_graph.DEFAULT_OPSET, notes), source.name)
        onnx.save(proto, str(path))
        parity = _parity(source, path, proto, options)
        if not parity.passed:
            raise _parity_failure(source, parity)
        manifest = write_manifest(stage, {
            "model": source.name,
            "target": "onnx",
            "precision": "fp32",
            "source": {"kind": source.kind, **source.origin},
            "opset": onnx_graph.opset_of(proto),
            "inputs": [s.to_json() for s in with_ranges(onnx_graph.tensor_specs(onnx_graph.graph_inputs(proto)), source.inputs)],
            "outputs": [s.to_json() for s in onnx_graph.tensor_specs(proto.graph.output)],
            "parity": parity.to_json(),
            **_prequantized_record(source, proto),
            "notes": notes,
            "toolchain": toolchain(*(("tensorflow", "keras", "tf2onnx") if source.keras is not None else ("torch",)),
                                   "onnx", "onnxruntime", "onnxscript", "numpy"),
            "machine": machine_info(),
        })
    return manifest


def _parity_failure(source: Source, parity: ParityResult) -> GateError:
    """The failed parity gate in one line; where it ran on generated inputs, what they were.
    Why: uniform random values are not always inputs the model is defined on. A 0..1 attention
    mask drawn at random masks every key of some query rows in a causal model (GPT-2), and the two
    runtimes fill such rows differently (max |difference| 0.82, while a mask of ones agrees to 1e-5)."""
    if not parity.data.startswith("seeded random"):
        return GateError(f"export parity failed on {parity.data}: {parity.summary()}", source.name)
    ranges = ", ".join(random_feed_text(spec) for spec in source.inputs)
    return GateError(f"export parity failed: {parity.summary()}; it ran on seeded random inputs drawn from {ranges}, "
                     "which may hold values the model never sees (e.g. a 0/1 mask with random holes): "
                     "declare the ranges the real inputs take", source.name, option="input_shapes")


def _fix_batch(source: Source) -> Source:
    """--static-batch: the 'batch' dim becomes 1 everywhere, and parity runs at batch 1 only."""
    fixed = tuple(replace(s, shape=tuple(1 if d == "batch" else d for d in s.shape)) for s in source.inputs)
    outputs = tuple(replace(s, shape=tuple(1 if d == "batch" else d for d in s.shape)) for s in source.outputs)
    keras = replace(source.keras, inputs=fixed) if source.keras is not None else None
    return replace(source, inputs=fixed, outputs=outputs, keras=keras)


def _normalize_onnx(source: Source, options: ExportOptions, notes: list[str]) -> onnx.ModelProto:
    """Validate an existing ONNX file, optionally convert its opset, make its batch dynamic, simplify."""
    origin = str(source.onnx_path)
    proto = onnx.ModelProto()
    proto.CopyFrom(source.onnx_model)
    onnx_graph.check(proto, origin)
    proto = _dequantize_source(proto, source, notes)
    _standard_ml_ops(proto, notes)
    own = onnx_graph.opset_of(proto)
    if options.opset:
        proto = onnx_graph.convert_opset(proto, options.opset, origin)
    elif own < MIN_OPSET:
        proto = onnx_graph.convert_opset(proto, MIN_OPSET, origin)
        notes.append(f"upgraded from opset {own} to {MIN_OPSET} with ONNX's version converter (per-channel "
                     "quantization needs opset 13, the graph optimizer's rewrites 14); parity checked against the original file")
    _apply_input_specs(proto, source)
    _fold_single_valued_inputs(proto, source, notes)
    _outputs_as_run(proto, source, notes)
    if options.dynamic_batch and not _batch_is_dynamic(source):
        fixed_batch = onnx.ModelProto()  # the graph as normalised so far (opset upgraded): kept if the batch must stay fixed
        fixed_batch.CopyFrom(proto)
        if onnx_graph.make_batch_dynamic(proto):
            fixed_inputs = source.inputs
            source.inputs = tuple(replace(s, shape=("batch", *s.shape[1:])) for s in fixed_inputs)
            candidate = onnx_graph.finalize(proto, origin)
            if _runs_at_batch(candidate, source, 2):
                notes.append("the fixed batch dim of the source was made dynamic ('batch'); parity checked at batch 1 and 4")
                return candidate
            source.inputs = fixed_inputs
            notes.append("the batch dim stays fixed: the graph does not run with another batch size")
            proto = fixed_batch
        else:
            notes.append("the batch dim stays fixed: inputs and outputs do not share one leading dim")
    return onnx_graph.finalize(proto, origin)


def _outputs_as_run(proto: onnx.ModelProto, source: Source, notes: list[str]) -> None:
    """Output ranks as one run of the file computes them, where its declarations say otherwise.
    ddddocr's CRNNs declare [1, seqlen] and return [seqlen, 1, classes]: the declared shape, set
    on the graph, let simplification fold the graph into [1, seqlen x classes] (parity failed),
    and ONNX's shape inference at a newer opset refuses the contradiction (`convert_opset`)."""
    try:
        computed = _outputs_at_batch(proto, source, 1)
    except EnginekitError:  # the parity check runs it again and says what fails
        return
    wrong = [spec for spec in source.outputs if spec.name in computed and computed[spec.name].ndim != len(spec.shape)]
    if not wrong:
        return
    fixed = {spec.name: replace(spec, shape=("?",) * computed[spec.name].ndim) for spec in wrong}
    source.outputs = tuple(fixed.get(spec.name, spec) for spec in source.outputs)
    onnx_graph.set_symbolic_dims(proto, fixed)
    notes.append("the file declares " + ", ".join(f"output '{spec.name}' of rank {len(spec.shape)}" for spec in wrong)
                 + ", but computes " + ", ".join(f"rank {computed[spec.name].ndim}" for spec in wrong) + ": the computed ranks are kept")


def _standard_ml_ops(proto: onnx.ModelProto, notes: list[str]) -> None:
    from enginekit.onnx.ml_ops import standard_ml_ops

    rewritten = standard_ml_ops(proto)
    if rewritten:
        notes.append(f"ai.onnx.ml {', '.join(rewritten)} rewritten as standard ONNX ops (exact: Cast/Sub/Mul, Gather), "
                     "which every target reads; parity checked against the original file")


def _dequantize_source(proto: onnx.ModelProto, source: Source, notes: list[str]) -> onnx.ModelProto:
    """A source already in the QDQ format becomes its float twin (weights on their grid, ReLUs a
    quantizer folded into a grid restored), which is exported and parity-checked like any
    source; its activation grids go into the manifest for every INT8 build."""
    from enginekit.onnx.prequantized import has_qdq, strip_qdq

    if not has_qdq(proto):
        return proto
    stripped = strip_qdq(proto, str(source.onnx_path))
    source.onnx_model = stripped.model  # parity compares the export with the float twin
    source.prequantized = stripped
    notes.append(f"pre-quantized source (QDQ): {len(stripped.activations)} activation grids and {stripped.weights} "
                 "quantized weights read; its float twin is exported, and INT8 builds use its grids (no calibration)")
    return stripped.model


def _prequantized_record(source: Source, proto: onnx.ModelProto) -> dict[str, Any]:
    """The manifest's record of a pre-quantized source: the grids of the tensors the exported
    graph still has (folding may remove some)."""
    if source.prequantized is None:
        return {}
    present = {name for node in proto.graph.node for name in node.output} | {i.name for i in proto.graph.input}
    grids = source.prequantized.activations
    return {"prequantized": {"format": "QDQ", "weights": source.prequantized.weights,
                             "activations": {name: grid.to_json() for name, grid in sorted(grids.items()) if name in present},
                             "dropped": sorted(name for name in grids if name not in present)}}


def _fold_single_valued_inputs(proto: onnx.ModelProto, source: Source, notes: list[str]) -> None:
    """An input declared to take one value (`sr=scalar:int64:16000..16000`) is computed as that
    constant, so what depends on it folds: silero-vad's `If` on the sample rate becomes the
    taken branch, and its convolutions become quantizable. The input stays in the signature
    (callers still feed it); the manifest notes it."""
    from onnx import numpy_helper

    for spec in source.inputs:
        if spec.range is None or spec.range[0] != spec.range[1] or not all(isinstance(d, int) for d in spec.shape):
            continue
        constant = f"{spec.name}__declared_value"
        value = np.full(spec.shape, spec.range[0], dtype=np.dtype(spec.dtype))
        proto.graph.initializer.append(numpy_helper.from_array(value, constant))
        _replace_reads(proto.graph, spec.name, constant)
        notes.append(f"input '{spec.name}' was declared to take only the value {spec.range[0]:g}: the graph computes with "
                     "that constant (branches on it fold away); the input is still accepted")


def _replace_reads(graph: onnx.GraphProto, name: str, replacement: str) -> None:
    """Every read of `name` in `graph` and its subgraphs (If/Loop bodies) reads `replacement`."""
    for node in graph.node:
        node.input[:] = [replacement if value == name else value for value in node.input]
        for subgraph in subgraphs(node):
            _replace_reads(subgraph, name, replacement)


def _apply_input_specs(proto: onnx.ModelProto, source: Source) -> None:
    onnx_graph.set_symbolic_dims(proto, {s.name: s for s in (*source.inputs, *source.outputs)})
    del proto.graph.value_info[:]  # inferred again by finalize(), with the dims just set


def _batch_is_dynamic(source: Source) -> bool:
    return all(s.shape and isinstance(s.shape[0], str) for s in source.inputs)


def _runs_at_batch(proto: onnx.ModelProto, source: Source, batch: int) -> bool:
    """Whether the graph runs at `batch` and gives each sample the outputs it gives that sample
    alone. A graph that mixes its samples (a mean over every axis, openwakeword's score gate)
    runs at any batch, and its export then failed parity instead of keeping the batch fixed."""
    try:
        feeds = _feeds_at_batch(source, batch)
        session = Session(proto)
        together = session.run(feeds)
        alone = [session.run({name: value[i:i + 1] for name, value in feeds.items()}) for i in range(batch)]
    except Exception:  # any failure means "not batch-polymorphic"
        return False
    for name, value in together.items():
        if value.shape[:1] != (batch,):
            return False
        if not all(_same_outputs(value[i:i + 1], single[name]) for i, single in enumerate(alone)):
            return False
    return True


def _same_outputs(batched: np.ndarray, alone: np.ndarray) -> bool:
    """A sample's output computed in a batch against computed alone: equal (integers, booleans)
    or within the batched kernels' rounding (floats: the parity check's own allowance)."""
    if batched.shape != alone.shape:
        return False
    if alone.dtype.kind != "f":
        return bool(np.array_equal(batched, alone))
    limit = DEFAULT_MAX_ABS + DEFAULT_RTOL * float(np.nanmax(np.abs(alone), initial=0.0))
    return bool(np.allclose(batched, alone, rtol=1e-3, atol=limit, equal_nan=True))


def _feeds_at_batch(source: Source, batch: int) -> dict[str, np.ndarray]:
    """The source's sample inputs at `batch` (other dims at their sizes)."""
    feeds, _ = source.sample(_fill_dims(source, {"batch": batch}))
    return feeds


def _outputs_at_batch(proto: onnx.ModelProto, source: Source, batch: int) -> dict[str, np.ndarray]:
    """The graph's outputs on the source's sample inputs at `batch`."""
    return Session(proto).run(_feeds_at_batch(source, batch))


def _fill_dims(source: Source, dims: Mapping[str, int]) -> dict[str, int]:
    symbols = {d for s in source.inputs for d in s.symbolic_dims}
    return {s: int(dims.get(s, source.dim_sizes.get(s, _UNNAMED_DIM_SIZE))) for s in symbols}


def parity_cases(source: Source) -> list[dict[str, int]]:
    """The distinct dims the parity check runs at, restricted to the symbols the inputs still have."""
    cases: list[dict[str, int]] = []
    for dims in source.parity_dims:
        case = _fill_dims(source, dims)
        if case not in cases:
            cases.append(case)
    return cases


def _parity(source: Source, path: Path, proto: onnx.ModelProto, options: ExportOptions) -> ParityResult:
    exported = Session(path)
    cases, descriptions = [], set()
    for dims in parity_cases(source):
        feeds, description = source.sample(dims)
        cases.append((dims, feeds))
        descriptions.add(description)
    if source.module is not None:
        reference, name = _torch_reference(source), "torch"
    elif source.keras is not None:
        reference, name = source.keras.run, "keras"
    else:
        reference, name = _onnx_reference(source), "onnxruntime (source ONNX file)"
    try:
        return check_parity(reference, lambda feeds: list(exported.run(feeds).values()), cases, name, "; ".join(sorted(descriptions)),
                            options.max_abs, options.min_cosine, options.rtol)
    except InputError as exc:
        if all(d.startswith("seeded random") for d in descriptions) and exc.option is None:
            shapes = ", ".join(f"{n}={'x'.join(map(str, a.shape)) or 'scalar'}" for n, a in cases[-1][1].items())
            raise InputError(f"{exc} (parity ran on generated inputs {shapes}: declare the real shapes, dtypes and value ranges)",
                             exc.path, option="input_shapes") from None
        raise


def _torch_reference(source: Source):
    from enginekit.exporter.torch_export import torch_call

    call = torch_call(source.module)
    return lambda feeds: call([feeds[s.name] for s in source.inputs])


def _onnx_reference(source: Source):
    """The original file in ONNX Runtime; a fixed-batch original runs chunk by chunk, a chunk
    short of its batch padded with copies of its last sample (the export made the batch dynamic
    only where samples are independent, so the copies change nothing) and cut back."""
    original = Session(source.onnx_model)
    fixed = original.inputs[0].shape[0] if original.inputs and original.inputs[0].shape else None

    def infer(feeds: Feeds) -> list[np.ndarray]:
        return list(original.run(feeds).values())

    def run(feeds: Feeds) -> list[np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        if not isinstance(fixed, int) or fixed == batch:
            return infer(feeds)
        chunks = []
        for start in range(0, batch, fixed):
            count = min(fixed, batch - start)
            chunk = {k: v[start : start + count] for k, v in feeds.items()}
            padded = {k: np.concatenate([v, np.repeat(v[-1:], fixed - count, axis=0)]) for k, v in chunk.items()}
            chunks.append([value[:count] for value in infer(padded)])
        return [np.concatenate(parts) for parts in zip(*chunks)]

    return run
