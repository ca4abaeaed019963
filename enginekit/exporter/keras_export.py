"""Keras sources: a `.keras`/`.h5` file, a SavedModel folder, a `module:factory` returning a Keras
model, or a Keras zoo entry; exported to ONNX with tf2onnx and traced for TFLite directly.

Both conversions start from one tf.function with a named input signature and a dict of named
outputs, so the ONNX model and the .tflite have the same input and output names, and feeds made
for one run on the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.errors import InputError, MissingDependencyError
from enginekit.core.quiet import quiet_stderr
from enginekit.core.tensors import Feeds, TensorSpec
from enginekit.core.tf_support import input_signature, require_keras, require_tensorflow

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
MAX_TF2ONNX_OPSET = 18  # tf2onnx 1.17 writes opsets up to 18
KERAS_OPSET = 17  # measured: opset 18 leaves a Transpose before ReduceMean that 17 folds into GlobalAveragePool


@dataclass
class KerasModel:
    """A callable Keras (or SavedModel) network with named, shaped inputs and named outputs."""

    call: Callable[..., Any]
    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    owner: Any  # the Keras model or loaded SavedModel (owns the variables)

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        outputs = self.call(*(feeds[s.name] for s in self.inputs))
        outputs = as_list(outputs)
        return [np.asarray(o) for o in outputs]


def is_keras_path(path: Path) -> bool:
    return path.suffix.lower() in KERAS_SUFFIXES or (path.is_dir() and (path / "saved_model.pb").is_file())


def as_list(outputs: Any) -> list[Any]:
    """A Keras call's outputs (a tensor, a list/tuple, or a dict by name) as a list, in order."""
    if isinstance(outputs, dict):
        return list(outputs.values())
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _tf_name(name: str, fallback: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name.split(":")[0]) or fallback
    return cleaned if re.match(r"[A-Za-z0-9.]", cleaned) else f"x{cleaned}"


_KERAS_COUNTER_NAME = re.compile(r"(keras_tensor|input_layer)(_\d+)?")


def _stable_input_name(name: str, index: int, count: int) -> str:
    """An input's name, the same at every load: Keras names an unnamed input "keras_tensor_N"
    after a counter global to the process, so the same factory exported twice in one process
    gave 'keras_tensor', then 'keras_tensor_182', and data keyed by the first name no longer
    matched (the corpus's MobileNetV3Small failed every cell that way). Such a name becomes
    'input_layer' (one input) or 'input_layer_<position>': the name the same model's input has
    when loaded from a .keras file (its InputLayer's default name; a Keras application built by a
    factory called it 'keras_tensor' and from its file 'input_layer', so one data file did not
    serve both)."""
    if _KERAS_COUNTER_NAME.fullmatch(name.split(":")[0]):
        return "input_layer" if count == 1 else f"input_layer_{index}"
    return _tf_name(name, f"input_{index}")


def _shape(dims: Sequence[Any]) -> tuple[int | str, ...]:
    return tuple("batch" if i == 0 and d is None else (d if d is not None else "?") for i, d in enumerate(dims))


def from_keras_model(model: Any) -> KerasModel:
    keras = require_keras()
    if not isinstance(model, keras.Model):
        raise InputError(f"expected a keras.Model, got {type(model).__name__}")
    inputs = tuple(TensorSpec(_stable_input_name(t.name, i, len(model.inputs)), _shape(t.shape), str(np.dtype(t.dtype)))
                   for i, t in enumerate(model.inputs))
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(model.outputs):
        names = [f"output_{i}" for i in range(len(model.outputs))]
    outputs = tuple(_tf_name(n, f"output_{i}") for i, n in enumerate(names))
    return KerasModel(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False), inputs, outputs, model)


def from_saved_model(loaded: Any) -> KerasModel:
    concrete = loaded.serve.get_concrete_function() if hasattr(loaded.serve, "get_concrete_function") else None
    signature = loaded.serve.input_signature if concrete is None else concrete.structured_input_signature[0]
    inputs = tuple(TensorSpec(_tf_name(s.name or f"input_{i}", f"input_{i}"), _shape(s.shape.as_list()), s.dtype.name)
                   for i, s in enumerate(signature))
    structured = concrete.structured_outputs if concrete is not None else None
    if isinstance(structured, dict):
        outputs = tuple(_tf_name(k, f"output_{i}") for i, k in enumerate(structured))
    else:
        outputs = tuple(f"output_{i}" for i in range(len(as_list(structured)) if structured is not None else 1))
    return KerasModel(loaded.serve, inputs, outputs, loaded)


def load_keras_source(path: Path, allow_unsafe: bool) -> KerasModel:
    from enginekit.core.loaders import load_keras, load_saved_model

    require_keras()
    if path.is_dir():
        return from_saved_model(load_saved_model(path))
    return from_keras_model(load_keras(path, allow_unsafe=allow_unsafe))


def with_shapes(model: KerasModel, inputs: tuple[TensorSpec, ...], origin: str) -> KerasModel:
    """Inputs after --input-shape; a dim still unknown (not the batch) is a request for it."""
    unknown = [s.name for s in inputs if "?" in s.shape]
    if unknown:
        raise InputError(f"inputs {unknown} have dynamic dims besides the batch, which the int8 paths cannot calibrate; "
                         "give their shapes, NAME=batchxHxWxC", origin, option="input_shapes")
    return replace(model, inputs=inputs)


def tf_function(model: KerasModel):
    """One tf.function (input signature by name, outputs as a dict by name): what tf2onnx and the
    TFLite converter both trace."""
    tf = require_tensorflow()
    names = model.output_names

    @tf.function(input_signature=input_signature(model.inputs), autograph=False)
    def function(*tensors):
        outputs = as_list(model.call(*tensors))
        return {name: tf.identity(out) for name, out in zip(names, outputs)}

    return function


def _convert_frozen(function, model: KerasModel, opset: int, tf2onnx) -> Any:
    """The function with every variable and captured tensor frozen into a constant, then
    converted (a converter that sees captures, e.g. a Normalization layer's mean and variance,
    turns them into extra graph inputs). Inputs and outputs keep the model's names and order."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from enginekit.onnx.graph import rename_values

    concrete = function.get_concrete_function()
    # a recurrent layer's loop kept as a While, which tf2onnx converts (to a Loop, or an LSTM/GRU it
    # recognises); lowered, it became TensorList ops tf2onnx cannot convert, and no Keras LSTM exported
    loops = any(op.type in ("While", "StatelessWhile") for op in concrete.graph.get_operations())
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=not loops)
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    proto, _ = tf2onnx.convert.from_graph_def(for_tf2onnx(frozen.graph.as_graph_def()), input_names=inputs, output_names=outputs, opset=opset)
    flat_names = sorted(model.output_names)  # a returned dict flattens in sorted key order
    mapping = {tf_name: spec.name for tf_name, spec in zip(inputs, model.inputs)}
    mapping.update({tf_name: name for tf_name, name in zip(outputs, flat_names)})
    rename_values(proto, mapping)
    by_name = {value.name: value for value in proto.graph.output}
    ordered = [by_name[name] for name in model.output_names]
    del proto.graph.output[:]
    proto.graph.output.extend(ordered)
    return proto


XLA_ONLY_ATTRIBUTES = ("_XlaMustCompile", "_noinline")


def for_tf2onnx(graph_def: Any) -> Any:
    """`graph_def` made convertible by tf2onnx, in place (what it lacks, written with what it has):
    - XLA-only marks dropped from function calls and functions, so that tf2onnx's grappler pass
      inlines them. Keras's TensorFlow backend wraps every grouped convolution (ConvNeXt's
      depthwise, RegNet's group convs: Conv2D(groups=...)) in a tf.function(jit_compile=True),
      because TF's CPU kernels lack it; the call stayed a StatefulPartitionedCall and the ONNX
      checker refused the graph. Inlined, it is a Conv2D that tf2onnx writes as a Conv with `group`.
    - Erfc(x) as 1 - Erf(x): Keras's exact GELU (ConvNeXt) is 0.5 x erfc(-x / sqrt 2)."""
    bodies = [(graph_def.node, False), *((function.node_def, True) for function in graph_def.library.function)]
    for function in graph_def.library.function:
        for name in XLA_ONLY_ATTRIBUTES:
            function.attr.pop(name, None)
    for nodes, in_function in bodies:
        for node in list(nodes):
            for name in XLA_ONLY_ATTRIBUTES:
                node.attr.pop(name, None)
            if node.op == "Erfc":
                _erfc_as_one_minus_erf(nodes, node, in_function)
    return graph_def


def _erfc_as_one_minus_erf(nodes: Any, node: Any, in_function: bool) -> None:
    """Rewrite `node` (Erfc) into Sub(1, Erf(x)) under the same name, so its readers are unchanged
    (inside a function body a node's output is named `node:output_arg:index`)."""
    tf = require_tensorflow()
    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    erf = nodes.add(name=f"{node.name}/erf", op="Erf", input=[node.input[0]])
    erf.attr["T"].CopyFrom(node.attr["T"])
    one = nodes.add(name=f"{node.name}/one", op="Const")
    one.attr["dtype"].type = dtype.as_datatype_enum
    one.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(1.0, dtype=dtype))
    node.op = "Sub"
    del node.input[:]
    node.input.extend([f"{one.name}:output:0", f"{erf.name}:y:0"] if in_function else [one.name, erf.name])


def _converter_problem(text: str) -> str:
    """The converter's message, naming the Keras layer when it names one of its TF ops
    ('model/layer_name/Op')."""
    flat = " ".join(text.split())
    match = re.search(r"([A-Za-z0-9_.\-]+)/([A-Za-z0-9_.\-]+)/[A-Za-z0-9_:]+", flat)
    where = f"layer '{match.group(2)}': " if match else ""
    return (where + flat)[:300]


def export_keras(model: KerasModel, opset: int | None, origin: str):
    """ONNX via tf2onnx; the batch dim is named 'batch' like the PyTorch exports."""
    opset = opset or KERAS_OPSET
    if opset > MAX_TF2ONNX_OPSET:
        raise InputError(f"opset {opset}: Keras models are exported with tf2onnx, which writes opset {MAX_TF2ONNX_OPSET} at most", option="opset")
    try:
        import tf2onnx
    except ImportError:
        raise MissingDependencyError("exporting Keras models needs the 'keras' extra (pip install 'enginekit[keras]')") from None
    function = tf_function(model)
    try:
        with quiet_stderr():
            proto = _convert_frozen(function, model, opset, tf2onnx)
    except Exception as exc:  # tf2onnx and TF raise ValueError/KeyError/RuntimeError for unsupported graphs
        raise InputError(f"tf2onnx could not export the Keras model ({_converter_problem(str(exc))})", origin) from None
    dims = {s.name: s.shape for s in model.inputs}
    for value in [*proto.graph.input, *proto.graph.output]:
        shape = value.type.tensor_type.shape.dim
        if shape and not shape[0].HasField("dim_value"):
            shape[0].dim_param = "batch"
        if value.name in dims:
            for dim, size in zip(shape, dims[value.name]):
                if isinstance(size, int) and not dim.HasField("dim_value"):
                    dim.dim_value = size
    del proto.graph.value_info[:]  # finalize() infers shapes again, with the dims fixed above
    return proto
