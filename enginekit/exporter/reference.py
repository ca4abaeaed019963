"""The FP32 ONNX model every later stage starts from: an export artifact folder, an .onnx file,
or a zoo name (exported once into the enginekit cache and reused)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from enginekit.core.artifacts import read_manifest, sha256_file, verify_files
from enginekit.core.errors import InputError
from enginekit.onnx.graph import graph_inputs, tensor_specs
from enginekit.core.loaders import load_onnx
from enginekit.models.spec import ModelSpec
from enginekit.core.tensors import TensorSpec, with_ranges


@dataclass
class Fp32Model:
    name: str
    path: Path
    proto: onnx.ModelProto
    sha256: str
    spec: ModelSpec | None
    inputs: list[TensorSpec]
    keras_file: dict | None = None  # {"keras": path, "unsafe_allow_lambda": bool} from a Keras file; {"factory", "fingerprint"} from a factory
    origin: str = ""  # what the user named (a file, a factory, a zoo name): errors name it, not the cache
    notes: list[str] = field(default_factory=list)  # what the export changed (opset upgrade, batch made dynamic)
    prequantized: dict | None = None  # the source's own Q/DQ grids (export manifest), for INT8 without calibration

    def __post_init__(self) -> None:
        self.origin = self.origin or str(self.path)

    @property
    def is_keras(self) -> bool:
        return self.keras_file is not None or (self.spec is not None and self.spec.framework == "keras")

    def keras_model(self):
        """The Keras source (KerasModel) this ONNX was exported from, with the ONNX's input shapes;
        None when it is not a Keras model or the file is gone."""
        from enginekit.exporter.keras_export import from_keras_model, load_keras_source, with_shapes

        if self.spec is not None and self.spec.framework == "keras":
            source = from_keras_model(self.spec.build())
        elif self.keras_file is not None and self.keras_file.get("factory"):
            source = _keras_factory_model(self.keras_file["factory"], self.keras_file.get("fingerprint"))
            if source is None:
                return None
        elif self.keras_file is not None and Path(self.keras_file["keras"]).exists():
            source = load_keras_source(Path(self.keras_file["keras"]), bool(self.keras_file.get("unsafe_allow_lambda")))
        else:
            return None
        shapes = {s.name: s for s in self.inputs}
        source = with_shapes(source, tuple(shapes.get(s.name, s) for s in source.inputs), str(self.path))
        exported = tuple(o.name for o in self.proto.graph.output)
        # the exported names: a factory built again names its layers after a process-wide counter
        # (softmax_2 where the export said softmax_1), and a TFLite signature would carry those
        return replace(source, output_names=exported) if len(exported) == len(source.output_names) else source


def _keras_factory_model(factory: str, fingerprint: str | None):
    """The Keras model a factory builds now, when it is the one exported (same config and
    weights): an unseeded factory builds another model every call, which the ONNX export's
    reference outputs would not describe. None otherwise (TFLite then lowers the ONNX)."""
    from enginekit.exporter.keras_export import from_keras_model
    from enginekit.exporter.sources import instantiate_factory, model_fingerprint

    net = instantiate_factory(factory)
    if model_fingerprint(net) != fingerprint:
        warnings.warn(f"{factory} builds another Keras model than the one exported (unseeded weights?): TFLite lowers the exported ONNX instead")
        return None
    return from_keras_model(net)


@dataclass(frozen=True)
class SourceOptions:
    """How a source becomes its FP32 ONNX (what `export` takes, for build and calibrate too)."""

    weights: str | None = None
    input_shapes: tuple[str, ...] = ()
    opset: int | None = None
    allow_unsafe_keras: bool = False

    def given(self) -> bool:
        return bool(self.weights or self.input_shapes or self.opset)


def load_fp32(model: str | Path, source: SourceOptions | bool | None = None) -> Fp32Model:
    """The FP32 model every later stage starts from: an export artifact folder as it is, anything
    else (zoo name, factory, ONNX or Keras file) exported once into the cache (checked,
    normalized, parity-gated), keyed by its content and the export settings, and reused.
    (`source` True/False is the old allow_unsafe_keras flag.)"""
    from enginekit.exporter.keras_export import is_keras_path
    from enginekit.exporter.sources import looks_like_factory
    from enginekit.models import get_spec

    if not isinstance(source, SourceOptions):
        source = SourceOptions(allow_unsafe_keras=bool(source))
    path = Path(model)
    if path.is_dir() and not is_keras_path(path):
        if source.given():
            raise InputError("is an export artifact: weights, input shapes and opset apply to the source it was exported from", path)
        manifest = read_manifest(path)
        onnx_path = path / "model.onnx"
        if not onnx_path.is_file():
            raise InputError("export artifact has no model.onnx", path)
        origin = manifest.get("source", {})
        zoo = origin.get("zoo")
        fp32 = _load(onnx_path, manifest.get("model", path.name), get_spec(zoo) if zoo else None)
        fp32.inputs = with_ranges(fp32.inputs, _recorded_ranges(manifest.get("inputs")))
        fp32.notes = [f"export: {note}" for note in manifest.get("notes") or [] if isinstance(note, str)]
        fp32.prequantized = manifest.get("prequantized") if isinstance(manifest.get("prequantized"), dict) else None
        if origin.get("kind") == "keras" and origin.get("keras"):
            fp32.keras_file = {"keras": origin["keras"], "unsafe_allow_lambda": bool(origin.get("unsafe_allow_lambda"))}
        elif origin.get("kind") == "keras" and origin.get("factory") and origin.get("fingerprint"):
            fp32.keras_file = {"factory": origin["factory"], "fingerprint": origin["fingerprint"]}
        return fp32
    if is_keras_path(path) or path.suffix.lower() == ".onnx" or path.exists() or "/" in str(model) or looks_like_factory(str(model)):
        fp32 = load_fp32(_cached_source_export(str(model), source))
        fp32.origin = str(model)
        return fp32
    spec = get_spec(str(model))  # an unknown name raises with suggestions
    if source.given():
        return _load(_cached_source_export(spec.name, source) / "model.onnx", spec.name, spec)
    return _load(_cached_export(spec.name), spec.name, spec)


def exporter_source_hash() -> str:
    """The exporter's own code: a change in how enginekit exports invalidates cached exports."""
    import hashlib

    root = Path(__file__).parents[1]
    files = sorted([*root.joinpath("exporter").glob("*.py"), *root.joinpath("onnx").glob("*.py")])  # graph preparation: folding too
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def export_cache_key(name: str) -> str:
    """Everything that changes what the export of a zoo model is: enginekit and its exporter, the
    exporter stack, and the source of the model's module."""
    import hashlib
    import importlib

    from enginekit.core.machine import toolchain

    module = Path(importlib.import_module(get_spec_module(name)).__file__)
    material = json.dumps(toolchain("torch", "tensorflow", "keras", "tf2onnx", "onnx", "onnxscript", "onnxruntime"), sort_keys=True).encode()
    for source in [module, *sorted(module.parent.glob(f"{module.stem}_*.py"))]:  # the entry and its network module
        material += source.read_bytes()
    material += exporter_source_hash().encode()
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


def _source_identity(model: str) -> tuple[str, str]:
    """(kind, content hash) of a source that is not an export artifact."""
    import hashlib
    import importlib.util

    from enginekit.core.loaders import require_file
    from enginekit.exporter.keras_export import is_keras_path
    from enginekit.exporter.sources import factory_fingerprint, factory_parts, looks_like_factory

    path = Path(model)
    digest = hashlib.sha256()
    if is_keras_path(path):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [require_file(path)]
        for item in files:
            digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode() + sha256_file(item).encode())
        return "keras", digest.hexdigest()
    if looks_like_factory(model):
        module_name = factory_parts(model)[0]
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            spec = None
        origin = Path(spec.origin) if spec is not None and spec.origin and Path(spec.origin).is_file() else None
        digest.update(model.encode() + (origin.read_bytes() if origin else b"unresolved") + factory_fingerprint(model).encode())
        return "factory", digest.hexdigest()
    if path.suffix.lower() == ".onnx" or path.exists() or "/" in model:
        digest.update(load_onnx(path).SerializeToString())  # external data included, checked by the loader
        return "onnx", digest.hexdigest()
    digest.update(export_cache_key(model).encode())
    return "zoo", digest.hexdigest()


def _cached_source_export(model: str, source: SourceOptions) -> Path:
    """The export of `model` with `source`'s settings in the cache, keyed by the source's content,
    the settings (weights by hash), the exporter and its stack; exported on first use."""
    import hashlib

    from enginekit.core.cache import cache_dir
    from enginekit.core.machine import toolchain
    from enginekit.exporter.pipeline import ExportOptions, export_model

    kind, content = _source_identity(model)
    stack = toolchain("torch", "tensorflow", "keras", "tf2onnx", "onnx", "onnxscript", "onnxruntime")
    settings = {"weights": sha256_file(source.weights) if source.weights and Path(source.weights).is_file() else source.weights,
                "input_shapes": list(source.input_shapes), "opset": source.opset, "unsafe": source.allow_unsafe_keras}
    key = hashlib.sha256(json.dumps([kind, content, settings, stack, exporter_source_hash()], sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(model).stem if kind in ("onnx", "keras") else model.replace(":", "_").rsplit(".", 1)[-1]
    folder = cache_dir() / "exports" / f"{stem or 'model'}-{kind}-{key}"
    options = ExportOptions(opset=source.opset)
    return _cached(folder, lambda out: export_model(model, out, source.weights, source.input_shapes, options,
                                                   allow_unsafe_keras=source.allow_unsafe_keras))


def _recorded_ranges(recorded: Any) -> list[TensorSpec]:
    """The value ranges an export manifest recorded for its inputs (--input-shape ...:int64:0..999),
    as specs that carry only them; malformed entries are passed over."""
    return [TensorSpec(entry["name"], (), range=(float(entry["range"][0]), float(entry["range"][1]))) for entry in recorded or []
            if isinstance(entry, dict) and isinstance(entry.get("range"), list) and len(entry["range"]) == 2 and "name" in entry]


def _load(path: Path, name: str, spec: ModelSpec | None) -> Fp32Model:
    proto = load_onnx(path)
    return Fp32Model(name, path, proto, sha256_file(path), spec, tensor_specs(graph_inputs(proto)))
