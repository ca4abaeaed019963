"""The FP32 ONNX model every later stage starts from: an export artifact folder, an .onnx file,
or a zoo name (exported once into the enginekit cache and reused)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from enginekit.core.artifacts import read_manifest, sha256_file, verify_files
from enginekit.core.errors import InputError
from enginekit.onnx.graph import graph_inputs, tensor_specs
from enginekit.core.loaders import load_onnx
from enginekit.models.spec import ModelSpec
from enginekit.core.tensors import TensorSpec


@dataclass
class Fp32Model:
    name: str
    path: Path
    proto: onnx.ModelProto
    sha256: str
    spec: ModelSpec | None
    inputs: list[TensorSpec]
    keras_file: dict | None = None  # {"keras": path, "unsafe_allow_lambda": bool} when exported from a Keras file

    @property
    def is_keras(self) -> bool:
        return self.keras_file is not None or (self.spec is not None and self.spec.framework == "keras")

    def keras_model(self):
        """The Keras source (KerasModel) this ONNX was exported from, with the ONNX's input shapes;
        None when it is not a Keras model or the file is gone."""
        from enginekit.exporter.keras_export import from_keras_model, load_keras_source, with_shapes

        if self.spec is not None and self.spec.framework == "keras":
            source = from_keras_model(self.spec.build())
        elif self.keras_file is not None and Path(self.keras_file["keras"]).exists():
            source = load_keras_source(Path(self.keras_file["keras"]), bool(self.keras_file.get("unsafe_allow_lambda")))
        else:
            return None
        shapes = {s.name: s for s in self.inputs}
        return with_shapes(source, tuple(shapes.get(s.name, s) for s in source.inputs), str(self.path))


def load_fp32(model: str | Path, allow_unsafe_keras: bool = False) -> Fp32Model:
    from enginekit.exporter.keras_export import is_keras_path
    from enginekit.models import get_spec

    path = Path(model)
    if is_keras_path(path):
        return _cached_file_export(path, "keras", allow_unsafe_keras)
    if path.is_dir():
        manifest = read_manifest(path)
        onnx_path = path / "model.onnx"
        if not onnx_path.is_file():
            raise InputError("export artifact has no model.onnx", path)
        source = manifest.get("source", {})
        zoo = source.get("zoo")
        fp32 = _load(onnx_path, manifest.get("model", path.name), get_spec(zoo) if zoo else None)
        if source.get("kind") == "keras" and source.get("keras"):
            fp32.keras_file = {"keras": source["keras"], "unsafe_allow_lambda": bool(source.get("unsafe_allow_lambda"))}
        return fp32
    if path.suffix.lower() == ".onnx" or path.exists() or "/" in str(model):
        return _cached_file_export(path, "onnx", False)
    spec = get_spec(str(model))
    return _load(_cached_export(spec.name), spec.name, spec)


def export_cache_key(name: str) -> str:
    """Everything that changes what the export of a zoo model is: enginekit, the exporter stack,
    and the source of the model's module."""
    import hashlib
    import importlib

    from enginekit.core.machine import toolchain

    module = importlib.import_module(get_spec_module(name))
    material = json.dumps(toolchain("torch", "tensorflow", "keras", "tf2onnx", "onnx", "onnxscript", "onnxruntime"), sort_keys=True).encode()
    material += Path(module.__file__).read_bytes()
    return hashlib.sha256(material).hexdigest()[:16]


def get_spec_module(name: str) -> str:
    from enginekit.models import get_spec

    return get_spec(name).architecture.__module__


def _cached(folder: Path, export: Callable[[Path], Any]) -> Path:
    """The export at `folder` in the cache, verified; an absent, corrupt or incomplete entry is
    (reported and) exported again."""
    if folder.exists():
        try:
            verify_files(folder, read_manifest(folder))
            return folder
        except InputError as exc:
            warnings.warn(f"cached export is unusable ({exc}); exporting again", stacklevel=3)
    export(folder)
    return folder


def _cached_export(name: str) -> Path:
    """The zoo model's export in the enginekit cache, keyed on what changes it."""
    from enginekit.core.cache import cache_dir
    from enginekit.exporter.pipeline import export_model

    folder = cache_dir() / "exports" / f"{name}-{export_cache_key(name)}"
    return _cached(folder, lambda out: export_model(name, out)) / "model.onnx"


def _cached_file_export(path: Path, kind: str, allow_unsafe: bool) -> Fp32Model:
    """A Keras file, SavedModel folder or ONNX file given straight to calibrate/build: exported
    (checked, shape-inferred, parity-gated) once into the cache, keyed by its content and the
    exporter stack, and reused; every later stage starts from that export."""
    import hashlib

    from enginekit.core.cache import cache_dir
    from enginekit.core.loaders import require_file
    from enginekit.core.machine import toolchain
    from enginekit.exporter.pipeline import export_model

    stack = ("tensorflow", "keras", "tf2onnx") if kind == "keras" else ("onnxruntime",)
    digest = hashlib.sha256(json.dumps(toolchain(*stack, "onnx", "onnxscript"), sort_keys=True).encode())
    if kind == "onnx":
        digest.update(load_onnx(path).SerializeToString())  # external data included, checked by the loader
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [require_file(path)]
        for item in files:
            digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode() + sha256_file(item).encode())
    folder = cache_dir() / "exports" / f"{path.stem or path.name}-{kind}-{digest.hexdigest()[:16]}"
    return load_fp32(_cached(folder, lambda out: export_model(str(path), out, allow_unsafe_keras=allow_unsafe)))


def _load(path: Path, name: str, spec: ModelSpec | None) -> Fp32Model:
    proto = load_onnx(path)
    return Fp32Model(name, path, proto, sha256_file(path), spec, tensor_specs(graph_inputs(proto)))
