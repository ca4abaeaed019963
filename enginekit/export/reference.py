"""The FP32 ONNX model every later stage starts from: an export artifact folder, an .onnx file,
or a zoo name (exported once into the enginekit cache and reused)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from enginekit.artifacts import read_manifest, sha256_file
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


def _cached_export(name: str) -> Path:
    from enginekit.export.pipeline import export_model
    from enginekit.models.cache import cache_dir

    folder = cache_dir() / "exports" / name
    try:
        read_manifest(folder)
        if (folder / "model.onnx").is_file():
            return folder / "model.onnx"
    except InputError:
        pass
    export_model(name, folder)
    return folder / "model.onnx"


def _load(path: Path, name: str, spec: ModelSpec | None) -> Fp32Model:
    proto = load_onnx(path)
    return Fp32Model(name, path, proto, sha256_file(path), spec, tensor_specs(graph_inputs(proto)))
