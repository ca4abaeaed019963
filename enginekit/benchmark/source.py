"""The model the user started from, measured like an artifact: the baseline row of a report.

A PyTorch source (zoo model or factory) runs in eager mode and, where it compiles here, under
`torch.compile`; a Keras source runs as a Keras model called eagerly, and traced into a
`tf.function` (graph mode, what a TensorFlow service runs). Each row is measured by the same harness
(its own process, interleaved latency rounds, the same threads and batch sweep), so "how much
faster than my PyTorch model" is read off the same table as the artifacts. ONNX sources have no
framework to compare with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.errors import EnginekitError, InputError, one_line
from enginekit.core.tensors import Feeds, TensorSpec
from enginekit.exporter.reference import SourceOptions
from enginekit.targets.base import Runner

EAGER, COMPILED, KERAS, KERAS_FUNCTION = "pytorch", "torch.compile", "keras", "tf.function"
PREFIX = "source:"  # how a source is named to a benchmark worker process


@dataclass(frozen=True)
class SourceSpec:
    """Enough to rebuild the source in another process and to name its row."""

    model: str  # zoo name, module:factory, or Keras file
    runtime: str  # EAGER | COMPILED | KERAS
    name: str  # the model name the artifacts' rows carry
    weights: str | None = None
    input_shapes: tuple[str, ...] = ()
    allow_unsafe_keras: bool = False
    outputs: tuple[str, ...] = field(default_factory=tuple)  # output names of the FP32 ONNX, in order
    # the input shapes the artifacts were evaluated and measured at (their manifests' data_shapes),
    # so the row is measured at the same sentence length or image size as they are
    data_shapes: tuple[tuple[str, tuple[int | str, ...]], ...] = ()

    def to_argument(self) -> str:
        return PREFIX + json.dumps(asdict(self))

    @classmethod
    def from_argument(cls, text: str) -> "SourceSpec":
        fields = json.loads(text[len(PREFIX):])
        return cls(**{**fields, "input_shapes": tuple(fields["input_shapes"]), "outputs": tuple(fields["outputs"]),
                      "data_shapes": tuple((name, tuple(shape)) for name, shape in fields.get("data_shapes", ()))})

    def __str__(self) -> str:  # how errors name the row
        return f"the {self.runtime} row of {self.model}"


def source_rows(model: str | Path, options: SourceOptions | None, manifest: dict[str, Any]) -> tuple[list[SourceSpec], str | None]:
    """The framework rows for a build of `model` (whose artifacts carry `manifest`): PyTorch eager
    and torch.compile, or Keras; none (with the reason) for an ONNX source."""
    options = options or SourceOptions()
    origin, weights = _origin(model, options)
    if origin is None:
        return [], weights or f"{model} is an ONNX model: there is no source framework to compare with"
    framework, source = origin
    common = dict(model=source, name=str(manifest.get("model") or Path(str(model)).stem), weights=weights,
                  input_shapes=tuple(options.input_shapes), allow_unsafe_keras=options.allow_unsafe_keras,
                  outputs=tuple(o["name"] for o in manifest.get("outputs") or []),
                  data_shapes=tuple((name, tuple(shape)) for name, shape in (manifest.get("data_shapes") or {}).items()))
    if framework == "keras":
        return [SourceSpec(runtime=KERAS, **common), SourceSpec(runtime=KERAS_FUNCTION, **common)], None
    return [SourceSpec(runtime=EAGER, **common), SourceSpec(runtime=COMPILED, **common)], None


def _origin(model: str | Path, options: SourceOptions) -> tuple[tuple[str, str] | None, str | None]:
    """((framework, source string), weights) of what the user built from; (None, reason) when the
    source is an ONNX file or cannot be traced back."""
    from enginekit.exporter.keras_export import is_keras_path
    from enginekit.exporter.sources import looks_like_factory
    from enginekit.models import get_spec, zoo_names

    text, path = str(model), Path(model)
    if path.is_dir() and not is_keras_path(path):  # an export artifact: its manifest says where it came from
        from enginekit.core.artifacts import read_manifest

        source = read_manifest(path).get("source") or {}
        weights = source.get("weights") if source.get("weights") and Path(str(source["weights"])).is_file() else None
        if source.get("zoo") in zoo_names():
            return (_zoo_framework(source["zoo"]), source["zoo"]), weights
        if source.get("keras"):
            return ("keras", source["keras"]), None
        if source.get("factory"):
            return (_factory_framework(source["factory"], weights, options), source["factory"]), weights
        return None, f"{model} was exported from an ONNX file: there is no source framework to compare with"
    if is_keras_path(path):
        return ("keras", text), None
    if looks_like_factory(text):
        return (_factory_framework(text, options.weights, options), text), options.weights
    if path.suffix.lower() == ".onnx" or path.exists():
        return None, None
    return (_zoo_framework(text), get_spec(text).name), options.weights


def _zoo_framework(name: str) -> str:
    from enginekit.models import get_spec

    return "keras" if get_spec(name).framework == "keras" else "pytorch"


def _factory_framework(factory: str, weights: str | None, options: SourceOptions) -> str:
    """What a `module:factory` builds (PyTorch or Keras), found by building it."""
    from enginekit.exporter.sources import resolve_source

    source = resolve_source(factory, weights, options.input_shapes, options.allow_unsafe_keras)
    return "keras" if source.keras is not None else "pytorch"


class SourceRunner(Runner):
    """The source model behind the Runner contract: float in, float out, by name."""

    def __init__(self, spec: SourceSpec, threads: int | None = None):
        from enginekit.exporter.sources import resolve_source
        from enginekit.exporter.torch_export import torch_call

        self.spec = spec
        if spec.runtime not in (KERAS, KERAS_FUNCTION):
            import torch

            if threads:
                torch.set_num_threads(threads)
        source = resolve_source(spec.model, spec.weights, spec.input_shapes, spec.allow_unsafe_keras)
        self.inputs = list(source.inputs)
        names = spec.outputs or tuple(o.name for o in source.outputs)
        self.outputs = [TensorSpec(name, ()) for name in names]
        self.keras = source.keras is not None
        if self.keras:
            self._run, self.weights_bytes = _keras_call(source.keras, spec.runtime == KERAS_FUNCTION), _keras_bytes(source.keras.owner)
        else:
            self._run, self.weights_bytes = torch_call(source.module, spec.runtime == COMPILED), _torch_bytes(source.module)

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return self._run([feeds[s.name] for s in self.inputs])

    def check_feeds(self, feeds):  # the source takes what its specs say; shapes are the harness's own
        return {name: np.asarray(value) for name, value in feeds.items()}


def _keras_call(keras_model: Any, traced: bool):
    import tensorflow as tf

    from enginekit.exporter.keras_export import as_list

    target = tf.function(keras_model.call) if traced else keras_model.call
    return lambda arrays: [np.asarray(o) for o in as_list(target(*arrays))]


def _torch_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _keras_bytes(owner: Any) -> int:
    """The bytes of a Keras model's (or SavedModel's) variables."""
    variables = getattr(owner, "weights", None) or getattr(owner, "variables", None) or []
    return sum(int(np.prod(v.shape)) * np.dtype(str(getattr(v.dtype, "name", v.dtype))).itemsize for v in variables)


def open_source(spec: SourceSpec, threads: int | None = None) -> tuple[SourceRunner, dict[str, Any]]:
    """(runner, manifest-like description of its row) of a source."""
    try:
        runner = SourceRunner(spec, threads)
    except EnginekitError:
        raise
    except Exception as exc:  # a factory or Keras raising its own error types
        raise unrunnable(spec, exc) from None
    manifest = {"model": spec.name, "target": spec.runtime, "precision": "fp32", "source": True,
                "inputs": [s.to_json() for s in runner.inputs], "outputs": [{"name": o.name, "shape": [], "dtype": "float32"} for o in runner.outputs],
                "files": [], "weights_bytes": runner.weights_bytes, "data_shapes": {name: list(shape) for name, shape in spec.data_shapes}}
    return runner, manifest


def unrunnable(spec: SourceSpec, exc: BaseException) -> InputError:
    """torch.compile compiles on the first call (inductor needs a working C++ compiler): where it
    cannot, the row is skipped with this one line."""
    return InputError(f"{spec.runtime} cannot run {spec.model} here ({one_line(exc)})")
