"""Resolve what the user passed as --model into a source enginekit can export.

A source is a zoo name (`efficientnet_lite0`), a Python factory (`pkg.module:build`, weights
from --weights), or an existing `.onnx` file. Each resolves to a network plus the I/O specs and
representative inputs that the parity check runs on.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from enginekit.core.errors import InputError
from enginekit.core.optional import require_torch
from enginekit.core.quiet import quiet_stderr
from enginekit.core.tensors import Dim, Feeds, TensorSpec, random_feeds

_FACTORY = re.compile(r"^(?:[A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_]\w*$")  # module:function or path/to/file.py:function
DEFAULT_PARITY_DIMS: tuple[Mapping[str, int], ...] = ({"batch": 1}, {"batch": 4})


@dataclass
class Source:
    """What export needs from any source: a name, I/O specs, and inputs for a given set of dims."""

    name: str
    kind: str  # "zoo" | "factory" | "onnx" | "keras"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dataset: Any = None  # a models.spec.Dataset, or None when the source brings no data
    parity_dims: tuple[Mapping[str, int], ...] = DEFAULT_PARITY_DIMS
    dim_max: Mapping[str, int] = field(default_factory=dict)
    module: Any = None  # the torch.nn.Module of zoo and factory sources
    keras: Any = None  # the export.keras_export.KerasModel of Keras sources
    onnx_model: Any = None  # the parsed onnx.ModelProto of ONNX sources
    onnx_path: Path | None = None
    origin: dict[str, Any] = field(default_factory=dict)
    prequantized: Any = None  # onnx.prequantized.Dequantized of an ONNX source that holds Q/DQ
    dim_sizes: Mapping[str, int] = field(default_factory=dict)  # symbolic dims' trace and parity size (--input-shape NAME@SIZE)

    def sample(self, dims: Mapping[str, int]) -> tuple[Feeds, str]:
        """Inputs of the current specs at `dims`, from the evaluation data when it fits, with a
        description of where they came from."""
        shapes = {s.name: s.concrete_shape(dims) for s in self.inputs}
        if self.dataset is not None:
            count = next(iter(shapes.values()))[0]
            feeds = self.dataset.samples("evaluation", count, dims)
            if all(feeds[name].shape == shape for name, shape in shapes.items()):
                return feeds, f"{self.name} evaluation split"
            return random_feeds(self.inputs, dims), "seeded random inputs (the input shape differs from the dataset's)"
        return random_feeds(self.inputs, dims), f"seeded random inputs (a {self.kind} source brings no data)"


def looks_like_factory(model: str) -> bool:
    return bool(_FACTORY.match(model)) and not Path(model).exists()


def resolve_source(model: str, weights: str | None, input_shapes: Sequence[str], allow_unsafe_keras: bool = False) -> Source:
    overrides = parse_input_shapes(input_shapes)
    sizes = {dim: size for declared in overrides.values() for dim, size in declared.sizes.items()}
    return replace(_source_of_kind(model, weights, overrides, allow_unsafe_keras), dim_sizes=sizes)


def _source_of_kind(model: str, weights: str | None, overrides: Mapping[str | None, InputDeclaration],
                    allow_unsafe_keras: bool) -> Source:
    from enginekit.exporter.keras_export import is_keras_path
    from enginekit.models import get_spec

    if looks_like_factory(model):
        return _factory_source(model, weights, overrides)
    path = Path(model)
    if is_keras_path(path):
        if weights:
            raise InputError("weights apply to PyTorch zoo and factory models; a Keras file carries its own", model, option="weights")
        return _keras_file_source(path, overrides, allow_unsafe_keras)
    if path.suffix.lower() == ".onnx" or path.exists() or "/" in model or "\\" in model:
        if weights:
            raise InputError("weights apply to zoo and factory models, not to an ONNX file", model, option="weights")
        return _onnx_source(path, overrides)
    return _zoo_source(get_spec(model), weights, overrides)  # an unknown name raises with suggestions


@dataclass(frozen=True)
class InputDeclaration:
    """What `--input-shape NAME=DIMS[:DTYPE[:LOW..HIGH]]` declares about one input."""

    shape: tuple[Dim, ...]
    dtype: str | None = None
    range: tuple[float, float] | None = None
    sizes: Mapping[str, int] = field(default_factory=dict)  # symbolic dim -> the size it is traced and checked at (NAME@SIZE)


_DTYPES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"}


def parse_input_shapes(values: Sequence[str]) -> dict[str | None, InputDeclaration]:
    """`NAME=1x3x224x224` (or just `1x3x224x224` for a single-input model); symbols such as
    `batch` or `sequence` keep a dim dynamic, `samples@16000` too, traced and parity-checked at
    16000 instead of 16 (a raw-audio model whose convolutions need more); `scalar` is a rank-0
    input. A dtype and a value range may follow: `input_ids=batchxsequence:int64:0..30521`."""
    declared: dict[str | None, InputDeclaration] = {}
    for value in values:
        name, _, spec = value.rpartition("=")
        dims, _, rest = spec.partition(":")
        dtype_text, _, range_text = rest.partition(":")
        parts = [p.strip() for p in re.split(r"[x,]", dims) if p.strip()]
        if not parts:
            raise InputError(f"input shape '{value}' has no dims (expected e.g. image=1x3x224x224)", option="input_shapes")
        parsed: list[Dim] = []
        sizes: dict[str, int] = {}
        for part in [] if parts == ["scalar"] else parts:
            sized = re.fullmatch(r"([A-Za-z_]\w*)@([1-9]\d*)", part)
            if part.isdigit() and int(part) > 0:
                parsed.append(int(part))
            elif re.fullmatch(r"[A-Za-z_]\w*", part):
                parsed.append(part)
            elif sized:
                parsed.append(sized.group(1))
                sizes[sized.group(1)] = int(sized.group(2))
            else:
                raise InputError(f"input shape '{value}': '{part}' is neither a positive size, a dim name nor NAME@SIZE",
                                 option="input_shapes")
        dtype = dtype_text.strip() or None
        if dtype is not None and dtype not in _DTYPES:
            raise InputError(f"input shape '{value}': dtype '{dtype}' is not one of {', '.join(sorted(_DTYPES))}", option="input_shapes")
        declared[name or None] = InputDeclaration(tuple(parsed), dtype, _value_range(range_text.strip(), value) if range_text.strip() else None,
                                                  sizes)
    return declared


def _value_range(text: str, value: str) -> tuple[float, float]:
    low, sep, high = text.partition("..")
    try:
        bounds = (float(low), float(high))
    except ValueError:
        bounds = None
    if not sep or bounds is None or not bounds[0] <= bounds[1] or not all(map(math.isfinite, bounds)):
        raise InputError(f"input shape '{value}': '{text}' is not a value range LOW..HIGH", option="input_shapes")
    return bounds


def apply_shapes(inputs: tuple[TensorSpec, ...], overrides: Mapping[str | None, InputDeclaration], origin: str,
                 fixed_dtypes: bool = True) -> tuple[TensorSpec, ...]:
    """The input specs with the declarations applied; `fixed_dtypes`: the model's own dtypes stand
    (an ONNX or Keras file), and a declared dtype must agree with them."""
    if not overrides:
        return inputs
    names = {spec.name for spec in inputs}
    if None in overrides:
        if len(inputs) != 1:
            raise InputError(f"the model has inputs {sorted(names)}; name the one an input shape applies to (NAME=dims)", origin, option="input_shapes")
        overrides = {inputs[0].name: overrides[None]}
    unknown = set(overrides) - names
    if unknown:
        raise InputError(f"input shapes name {sorted(unknown)}, but the model's inputs are {sorted(names)}", origin, option="input_shapes")
    updated = []
    for spec in inputs:
        declared = overrides.get(spec.name)
        if declared is None:
            updated.append(spec)
            continue
        if fixed_dtypes and declared.dtype and declared.dtype != spec.dtype:
            raise InputError(f"input '{spec.name}' is {spec.dtype} in the model, not {declared.dtype}", origin, option="input_shapes")
        updated.append(replace(spec, shape=declared.shape, dtype=declared.dtype or spec.dtype, range=declared.range or spec.range))
    return tuple(updated)


# --------------------------------------------------------------------------------------- zoo


def _zoo_source(spec, weights: str | None, overrides) -> Source:
    if spec.framework == "keras":
        from enginekit.exporter.keras_export import from_keras_model

        if weights:
            raise InputError("weights apply to PyTorch models", spec.name, option="weights")
        keras_model = from_keras_model(spec.build())
        inputs = apply_shapes(spec.inputs, overrides, spec.name)
        return Source(spec.name, "zoo", inputs, spec.outputs, spec.dataset(), spec.parity_dims, spec.dim_max,
                      keras=keras_model, origin={"zoo": spec.name, "weights": spec.weights_source, "framework": "keras"})
    module = spec.architecture()
    if weights:
        load_weights_strict(module, weights)
        origin = {"zoo": spec.name, "weights": str(weights)}
    else:
        spec.load_weights(module)
        origin = {"zoo": spec.name, "weights": spec.weights_source}
    module.eval()
    inputs = apply_shapes(spec.inputs, overrides, spec.name)
    return Source(spec.name, "zoo", inputs, spec.outputs, spec.dataset(), spec.parity_dims, spec.dim_max, module, origin=origin)


# ----------------------------------------------------------------------------------- factory


def factory_parts(target: str) -> tuple[str, str]:
    """The module to import and the function of `module:function` or `path/to/file.py:function`;
    for a file, its folder goes first on the path (its own helper imports resolve as they would
    when run there). The working folder is on the path too."""
    module_name, _, attr = target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise InputError(f"no such Python file '{module_name}'", target)
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = path.stem
    return module_name, attr


def instantiate_factory(target: str):
    """Import `module:function` (or `file.py:function`, the working folder on the path) and call
    it: the model it builds now (a torch.nn.Module or a keras.Model, unchecked); failures of the
    user's code are a bad --model."""
    module_name, attr = factory_parts(target)
    try:
        py_module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a bad --model
        raise InputError(f"cannot import module '{module_name}' ({type(exc).__name__}: {exc})", target) from None
    factory = getattr(py_module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"module '{module_name}' has no callable '{attr}'", target)
    try:
        with quiet_stderr():  # a factory that imports TensorFlow would print its start-up lines
            net = factory()
    except Exception as exc:
        raise InputError(f"factory raised {type(exc).__name__}: {exc}", target) from None
    return net


def factory_fingerprint(target: str) -> str:
    """A digest of what the factory builds now: the module's structure and every parameter and
    buffer (torch), or its config and weights (Keras). The factory's file alone does not say when
    a checkpoint it loads, a seed or a helper module has changed the model; this does, so a cached
    export of an older model is not served for a new one."""
    return model_fingerprint(instantiate_factory(target))


def model_fingerprint(net) -> str:
    """factory_fingerprint of a model already built."""
    import hashlib

    digest = hashlib.sha256(type(net).__qualname__.encode())
    if hasattr(net, "state_dict"):  # torch.nn.Module
        import torch

        digest.update(repr(net).encode())
        for name, value in net.state_dict().items():
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype, bfloat16 included
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode() + raw.numpy().tobytes())
    elif hasattr(net, "get_weights"):  # keras.Model
        for layer in getattr(net, "layers", []):  # each layer's config but the names a process-wide counter sets
            try:
                config = _without_names(layer.get_config())
            except Exception:  # a custom layer without a config: its weights still tell
                config = {}
            digest.update(type(layer).__qualname__.encode() + json.dumps(config, sort_keys=True, default=str).encode())
        for array in net.get_weights():
            digest.update(str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def _without_names(config: Any) -> Any:
    """A Keras config without its "name" entries, nested ones too (a Bidirectional's wrapped layer)."""
    if isinstance(config, dict):
        return {key: _without_names(value) for key, value in config.items() if key != "name"}
    if isinstance(config, (list, tuple)):
        return [_without_names(value) for value in config]
    return config


def _factory_source(target: str, weights: str | None, overrides) -> Source:
    torch = require_torch("PyTorch factories")
    net = instantiate_factory(target)
    module_name, attr = factory_parts(target)
    if not isinstance(net, torch.nn.Module):
        if type(net).__module__.split(".")[0] == "keras":
            return _keras_factory_source(net, target, weights, overrides)
        raise InputError(f"factory returned {type(net).__name__}, not a torch.nn.Module or keras.Model", target)
    if weights:
        load_weights_strict(net, weights)
    net.eval()
    if not overrides:
        raise InputError("a factory model needs its input shapes, NAME=dims (e.g. input=batchx3x224x224)", target, option="input_shapes")
    names = _forward_arg_names(net)
    if None in overrides:
        overrides = {(names[0] if names else "input"): overrides[None]}
    inputs = tuple(TensorSpec(name, d.shape, d.dtype or "float32", d.range) for name, d in overrides.items())
    origin = {"factory": target, "weights": str(weights) if weights else None}
    return Source(module_name.rsplit(".", 1)[-1] + "_" + attr, "factory", inputs, (), module=net, origin=origin)


def _forward_arg_names(net) -> list[str]:
    import inspect

    params = inspect.signature(net.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def load_weights_strict(module, weights: str) -> None:
    """Load a state_dict with strict key matching; a mismatch names the keys involved."""
    from enginekit.core.loaders import load_state_dict

    state = load_state_dict(weights)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = " ".join(str(exc).split("\n\t")[1:2]) or str(exc).splitlines()[0]
        raise InputError(f"weights do not match the architecture: {detail.strip()[:300]}", weights) from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise InputError(f"weights do not match the architecture: keys {'; '.join(parts)}", weights)


# ------------------------------------------------------------------------------------- keras


def _keras_source(keras_model, name: str, overrides, origin: dict[str, Any], where: str) -> Source:
    from enginekit.exporter.keras_export import with_shapes

    inputs = apply_shapes(keras_model.inputs, overrides, where)
    keras_model = with_shapes(keras_model, inputs, where)
    return Source(name, "keras", inputs, (), keras=keras_model, origin=origin)


def _keras_file_source(path: Path, overrides, allow_unsafe: bool) -> Source:
    from enginekit.exporter.keras_export import load_keras_source
    from enginekit.core.loaders import require_file

    if not path.is_dir():
        require_file(path)
    elif not path.exists():
        raise InputError("no such file or folder", path)
    keras_model = load_keras_source(path, allow_unsafe)
    origin = {"keras": str(path.resolve()), "unsafe_allow_lambda": allow_unsafe}
    return _keras_source(keras_model, path.stem or path.name, overrides, origin, str(path))


def _keras_factory_source(net, target: str, weights: str | None, overrides) -> Source:
    from enginekit.exporter.keras_export import from_keras_model

    if weights:
        raise InputError("weights apply to PyTorch factories; build the Keras model with its weights", target, option="weights")
    module_name, attr = factory_parts(target)
    # the fingerprint lets TFLite convert the Keras model itself later, from the factory, only while it builds this model
    return _keras_source(from_keras_model(net), module_name.rsplit(".", 1)[-1] + "_" + attr, overrides,
                         {"factory": target, "framework": "keras", "fingerprint": model_fingerprint(net)}, target)


# -------------------------------------------------------------------------------------- onnx


def name_the_batch(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Call the batch "batch": when every input's leading dim is dynamic (whatever an exporter
    named it, p2o.DynamicDimension.0 or -1), that dim of every input, and the dynamic leading dim
    of every output, is the batch. Other dynamic dims keep their names."""
    if not inputs or "batch" in {d for s in (*inputs, *outputs) for d in s.shape}:
        return inputs, outputs
    if not all(s.shape and isinstance(s.shape[0], str) for s in inputs):
        return inputs, outputs

    def renamed(spec: TensorSpec) -> TensorSpec:
        return replace(spec, shape=("batch", *spec.shape[1:])) if spec.shape and isinstance(spec.shape[0], str) else spec

    return tuple(map(renamed, inputs)), tuple(map(renamed, outputs))


def _onnx_source(path: Path, overrides) -> Source:
    from enginekit.onnx.graph import graph_inputs, tensor_specs
    from enginekit.onnx.ml_ops import zipmap_outputs
    from enginekit.core.loaders import load_onnx

    model = load_onnx(path)
    maps = zipmap_outputs(model)
    if maps:
        raise InputError(f"output(s) {maps} are lists of maps written by an ai.onnx.ml ZipMap (a scikit-learn classifier's probabilities), "
                         "which no inference engine returns; convert the model without it (skl2onnx: options={'zipmap': False})", path)
    inputs = tuple(tensor_specs(graph_inputs(model), str(path)))
    outputs = tuple(tensor_specs(model.graph.output, str(path)))
    if not inputs:
        raise InputError("the graph has no inputs", path)
    inputs, outputs = name_the_batch(inputs, outputs)
    if any(d == "?" for spec in inputs for d in spec.shape) and not overrides:
        unnamed = [s.name for s in inputs if "?" in s.shape]
        raise InputError(f"inputs {unnamed} have unnamed dynamic dims; give their shapes", path, option="input_shapes")
    inputs = apply_shapes(inputs, overrides, str(path))
    return Source(path.stem, "onnx", inputs, outputs, onnx_model=model, onnx_path=path, origin={"onnx": str(path)})
