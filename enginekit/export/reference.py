"""The FP32 ONNX model every later stage starts from: an export artifact folder, an .onnx file,
or a zoo name (exported once into the enginekit cache and reused)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from enginekit.artifacts import read_manifest, sha256_file, verify_files
from enginekit.errors import InputError
from enginekit.export.onnx_graph import graph_inputs, tensor_specs
from enginekit.loaders import load_onnx
from enginekit.models.spec import ModelSpec, TensorSpec


@dataclass
class Fp32Model:
    name: str
    path: Path
    proto: onnx.ModelProto
    sha256: str
    spec: ModelSpec | None
    inputs: list[TensorSpec]


def load_fp32(model: str | Path) -> Fp32Model:
    from enginekit.models import get_spec

    path = Path(model)
    if path.is_dir():
        manifest = read_manifest(path)
        onnx_path = path / "model.onnx"
        if not onnx_path.is_file():
            raise InputError("export artifact has no model.onnx", path)
        zoo = manifest.get("source", {}).get("zoo")
        return _load(onnx_path, manifest.get("model", path.name), get_spec(zoo) if zoo else None)
    if path.suffix.lower() == ".onnx" or path.exists() or "/" in str(model):
        return _load(path, path.stem, None)
    spec = get_spec(str(model))
    return _load(_cached_export(spec.name), spec.name, spec)


def export_cache_key(name: str) -> str:
    """Everything that changes what the export of a zoo model is: enginekit, the exporter stack,
    and the source of the model's module."""
    import hashlib
    import importlib

    from enginekit.machine import toolchain

    module = importlib.import_module(get_spec_module(name))
    material = json.dumps(toolchain("torch", "onnx", "onnxscript", "onnxruntime"), sort_keys=True).encode()
    material += Path(module.__file__).read_bytes()
    return hashlib.sha256(material).hexdigest()[:16]


def get_spec_module(name: str) -> str:
    from enginekit.models import get_spec

    return get_spec(name).architecture.__module__


def _cached_export(name: str) -> Path:
    """The zoo model's export in the enginekit cache, keyed on what changes it; a corrupt or
    incomplete entry is reported and rebuilt."""
    from enginekit.export.pipeline import export_model
    from enginekit.models.cache import cache_dir

    folder = cache_dir() / "exports" / f"{name}-{export_cache_key(name)}"
    if folder.exists():
        try:
            verify_files(folder, read_manifest(folder))
            return folder / "model.onnx"
        except InputError as exc:
            warnings.warn(f"cached export is unusable ({exc}); exporting again", stacklevel=2)
    export_model(name, folder)
    return folder / "model.onnx"


def _load(path: Path, name: str, spec: ModelSpec | None) -> Fp32Model:
    proto = load_onnx(path)
    return Fp32Model(name, path, proto, sha256_file(path), spec, tensor_specs(graph_inputs(proto)))
