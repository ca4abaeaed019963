"""PyTorch -> ONNX through torch's dynamo exporter (torch.export + onnxscript).

Symbolic dims of the input specs ("batch", "sequence") become torch.export Dims shared across
inputs, so the ONNX graph keeps them dynamic. Example sizes are 2+ because torch.export
specialises dims it sees as 0 or 1.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from enginekit.core.errors import InputError
from enginekit.core.optional import require_torch
from enginekit.core.quiet import quiet_loggers
from enginekit.onnx.graph import rename_values, set_symbolic_dims
from enginekit.exporter.sources import Source
from enginekit.core.tensors import random_feeds

MIN_OPSET = 18  # the dynamo exporter's oldest opset
_EXAMPLE_SIZE = {"batch": 2}
_DEFAULT_EXAMPLE_SIZE = 16


def export_torch(source: Source, opset: int) -> onnx.ModelProto:
    torch = require_torch("exporting PyTorch models")

    symbols = sorted({d for spec in source.inputs for d in spec.symbolic_dims})
    example_dims = {s: min(_EXAMPLE_SIZE.get(s, _DEFAULT_EXAMPLE_SIZE), source.dim_max.get(s, 1 << 30)) for s in symbols}
    feeds = random_feeds(source.inputs, example_dims)
    args = tuple(torch.from_numpy(feeds[spec.name]) for spec in source.inputs)
    dims = {s: torch.export.Dim(s, min=1, max=source.dim_max.get(s, 1 << 20)) for s in symbols}
    dynamic_shapes = tuple({axis: dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in source.inputs)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                source.module, args, None, opset_version=opset, dynamo=True,
                dynamic_shapes=dynamic_shapes if symbols else None,
                external_data=False, optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "this model did not export"
        message = " ".join(str(exc).split())[:400]
        raise InputError(f"torch.onnx.export failed ({type(exc).__name__}): {message}", source.name) from None
    model = program.model_proto
    _name_io(model, source)
    return model


def _name_io(model: onnx.ModelProto, source: Source) -> None:
    """Inputs take the spec names (in forward order); outputs the spec names, else output/output_N."""
    graph_inputs = [v.name for v in model.graph.input]
    mapping = {old: spec.name for old, spec in zip(graph_inputs, source.inputs)}
    outputs = [v.name for v in model.graph.output]
    if source.outputs and len(source.outputs) == len(outputs):
        mapping.update({old: spec.name for old, spec in zip(outputs, source.outputs)})
    else:
        mapping.update({old: ("output" if len(outputs) == 1 else f"output_{i}") for i, old in enumerate(outputs)})
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
        return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    return call

