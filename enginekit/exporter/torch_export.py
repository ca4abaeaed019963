"""PyTorch -> ONNX through torch's dynamo exporter (torch.export + onnxscript).

Symbolic dims of the input specs ("batch", "sequence") become torch.export Dims shared across
inputs, so the ONNX graph keeps them dynamic. Example sizes are 2+ because torch.export
specialises dims it sees as 0 or 1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from enginekit.core.errors import InputError
from enginekit.core.loaders import parse_exported_onnx
from enginekit.core.optional import require_torch
from enginekit.core.quiet import EXPORT_LOGGERS, quiet_loggers
from enginekit.onnx.graph import rename_values, set_symbolic_dims
from enginekit.exporter.sources import Source
from enginekit.core.tensors import random_feeds

MIN_OPSET = 18  # the dynamo exporter's oldest opset
_EXAMPLE_SIZE = {"batch": 2}
_DEFAULT_EXAMPLE_SIZE = 16


def _matched_to_parameters(module: Any, shapes: tuple) -> tuple:
    """`shapes` (one per input) as torch.export matches them, to forward's parameters: a `*args`
    parameter takes one entry, the tuple of the specs of the inputs it collects. A flat tuple
    made every `forward(*args)` wrapper fail the dynamo exporter ("inputs has 1 elements, but
    dynamic_shapes has 2") and fall back to TorchScript."""
    import inspect

    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the flat tuple, as before
        return shapes
    named = 0
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            return (*shapes[:named], tuple(shapes[named:]))
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            named += 1
    return shapes


TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


def export_torch(source: Source, opset: int, notes: list[str] | None = None) -> onnx.ModelProto:
    """The module as ONNX through the dynamo exporter; where that fails, through torch's
    TorchScript exporter (`notes` says so, with the dynamo exporter's reason). Why the second
    route: torch.export still fails on some published architectures whose TorchScript export
    works (transformers' Swin: a view of a transposed attention output cannot be decomposed;
    exported by TorchScript, its parity is 4e-7)."""
    torch = require_torch("exporting PyTorch models")

    symbols = sorted({d for spec in source.inputs for d in spec.symbolic_dims})
    example_dims = {s: source.dim_sizes.get(s) or min(_EXAMPLE_SIZE.get(s, _DEFAULT_EXAMPLE_SIZE), source.dim_max.get(s, 1 << 30))
                    for s in symbols}
    feeds = random_feeds(source.inputs, example_dims)
    args = tuple(torch.from_numpy(feeds[spec.name]) for spec in source.inputs)
    dims = {s: torch.export.Dim(s, min=1, max=source.dim_max.get(s, 1 << 20)) for s in symbols}
    dynamic_shapes = tuple({axis: dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in source.inputs)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers(), \
                quiet_loggers(EXPORT_LOGGERS, logging.CRITICAL + 1):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                source.module, args, None, opset_version=opset, dynamo=True,
                dynamic_shapes=_matched_to_parameters(source.module, dynamic_shapes) if symbols else None,
                external_data=False, optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "this model did not export"
        reason = exporter_problem(exc)
        model, frozen, keys = _torchscript_export(source, args, opset, reason)
        if notes is not None:
            notes.append(f"exported by torch's TorchScript exporter: the dynamo exporter failed ({reason[:200]})"
                         + (f"; the trace fixed {len(frozen)} Python decision(s) on tensor values (first at {frozen[0]}), "
                            "which the parity check tests at its shapes only" if frozen else ""))
    else:
        model, keys = program.model_proto, _keys(_forward(source, args), source)
    _name_io(model, source, keys)
    return model


def exporter_problem(exc: Exception) -> str:
    """The exporter's own reason in one line: torch.onnx wraps it in boilerplate ("Next steps:
    create an issue ..."), with the actual exception after '## Exception summary'."""
    text = str(exc)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].split("(Refer to the full stack trace", 1)[0]
        text = text.split("Original traceback:", 1)[0]
    return f"{type(exc).__name__}: {' '.join(text.split())}"[:400]


def _torchscript_export(source: Source, args: tuple, opset: int, dynamo_reason: str) -> tuple[onnx.ModelProto, list[str], list[str] | None]:
    """The TorchScript exporter's graph (symbolic dims as dynamic axes, inputs and outputs named
    as the specs), where its trace fixed a Python decision on a tensor (TracerWarning:
    "file:line", distinct) and a dict output's keys; an InputError with both exporters' reasons
    where it fails too."""
    torch = require_torch("exporting PyTorch models")
    dynamic_axes = {spec.name: {axis: d for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in source.inputs}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), quiet_loggers():
            warnings.simplefilter("always")
            output_names, batched, keys = _output_batches(source, args)  # runs the module: inside the one-line failure
            dynamic_axes.update({name: {0: "batch"} for name in batched})
            torch.onnx.export(source.module, args, buffer, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET), dynamo=False,
                              input_names=[spec.name for spec in source.inputs], output_names=output_names,
                              dynamic_axes={name: axes for name, axes in dynamic_axes.items() if axes})
    except Exception as exc:
        traced = ", ".join(f"{spec.name} {list(a.shape)}" for spec, a in zip(source.inputs, args))
        hint = ("" if not any(d != "batch" for spec in source.inputs for d in spec.symbolic_dims) or source.dim_sizes else
                f"; traced at {traced}: a symbolic dim the model needs larger takes its size as NAME@SIZE in --input-shape "
                "(e.g. samples@16000)")
        raise InputError(f"torch.onnx.export failed ({dynamo_reason}); the TorchScript exporter too ({exporter_problem(exc)}){hint}",
                         source.name) from None
    frozen = [f"{Path(w.filename).name}:{w.lineno}" for w in caught
              if issubclass(w.category, torch.jit.TracerWarning) and "Python boolean" in str(w.message)]
    return parse_exported_onnx(buffer.getvalue(), source.name), list(dict.fromkeys(frozen)), keys


def _output_batches(source: Source, args: tuple) -> tuple[list[str] | None, list[str], list[str] | None]:
    """The output names the export should write and those whose axis 0 is the batch (its size
    there is the example's batch), as the TorchScript exporter needs them declared (the dynamo
    exporter finds them itself; an output without a "batch" dim would count as unbatched), and
    a dict output's keys: one forward serves all three."""
    torch = require_torch()
    batch = next((a.shape[axis] for a, spec in zip(args, source.inputs) for axis, d in enumerate(spec.shape) if d == "batch"), None)
    produced = _forward(source, args)
    outputs, keys = flat_outputs(produced), _keys(produced, source)
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        return None, [], keys
    names = _names_for(len(outputs), source, keys)
    return names, [name for name, out in zip(names, outputs) if batch is not None and out.ndim and out.shape[0] == batch], keys


def _forward(source: Source, args: tuple) -> Any:
    """The module's output on the example inputs (inference mode)."""
    torch = require_torch()
    with torch.inference_mode():
        return source.module(*args)


def _keys(produced: Any, source: Source) -> list[str] | None:
    """The keys of a module output that is a dict (a transformers ModelOutput too), as its output
    names: a key holding several tensors (a tuple of hidden states) names them KEY_0, KEY_1...
    (all of them lost their keys before). None for any other output, or names that would clash
    with an input's name or with each other."""
    if not isinstance(produced, Mapping) or not produced:
        return None
    keys = []
    for key, value in produced.items():
        if value is None:
            continue
        count = len(flat_outputs(value))
        keys += [str(key)] if count == 1 else [f"{key}_{index}" for index in range(count)]
    clash = len(set(keys)) != len(keys) or set(keys) & {spec.name for spec in source.inputs}
    return None if clash else keys


def _names_for(count: int, source: Source, keys: list[str] | None) -> list[str]:
    """Output names: the declared specs', else a dict output's keys, else output / output_N."""
    if source.outputs and len(source.outputs) == count:
        return [spec.name for spec in source.outputs]
    if keys is not None and len(keys) == count:
        return keys
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _name_io(model: onnx.ModelProto, source: Source, keys: list[str] | None = None) -> None:
    """Inputs take the spec names (in forward order); outputs the spec names, else a dict
    output's `keys`, else output/output_N."""
    graph_inputs = [v.name for v in model.graph.input]
    named = set(graph_inputs) <= {spec.name for spec in source.inputs}  # the TorchScript route names them (and drops unused ones)
    mapping = {} if named else {old: spec.name for old, spec in zip(graph_inputs, source.inputs)}
    outputs = [v.name for v in model.graph.output]
    mapping.update(dict(zip(outputs, _names_for(len(outputs), source, keys))))
    rename_values(model, mapping)
    set_symbolic_dims(model, {spec.name: spec for spec in (*source.inputs, *source.outputs)})


def torch_call(module: Any, compiled: bool = False) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """The module as a function of numpy arrays (positional inputs, inference mode, every output
    as an array); `compiled`: through torch.compile, which compiles on the first call."""
    torch = require_torch()
    module.eval()
    target = torch.compile(module) if compiled else module

    def call(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = target(*(torch.from_numpy(a) for a in arrays))
        return [o.detach().numpy() for o in flat_outputs(out)]

    return call


def flat_outputs(out: Any) -> list[Any]:
    """A module's outputs in the order the ONNX exporters flatten them: tuples and lists in
    order, a dict's (or a transformers ModelOutput's) values in key order, Nones dropped."""
    if out is None:
        return []
    if isinstance(out, Mapping):
        return [item for value in out.values() for item in flat_outputs(value)]
    if isinstance(out, (tuple, list)):
        return [item for value in out for item in flat_outputs(value)]
    return [out]

