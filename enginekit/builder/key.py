"""The content address of an artifact: everything that changes what `build` would produce."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.builder.options import BuildOptions
from enginekit.calibration.data import DataArg
from enginekit.core.artifacts import sha256_file
from enginekit.core.machine import machine_info, toolchain
from enginekit.exporter.reference import Fp32Model
from enginekit.quantization.pipeline import resolved_weight_type
from enginekit.targets.base import Target


def data_identity(data: DataArg, fp32: Fp32Model) -> str:
    """What calibration/evaluation data is: a file's hash, a folder's hashes, the zoo code that
    generates the split, or the bytes of feeds given in Python (a one-shot iterator cannot be
    hashed without consuming it: its builds are never reused)."""
    if data is None or (isinstance(data, str) and data == "zoo"):
        if fp32.spec is None:
            return "none"
        module = importlib.import_module(fp32.spec.architecture.__module__)
        models = Path(module.__file__).parent
        sources = [Path(module.__file__)] + sorted(models.glob("*.py"))
        return "zoo:" + hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            digest = hashlib.sha256()
            for item in sorted(p for p in path.iterdir() if p.is_file()):
                digest.update(item.name.encode() + sha256_file(item).encode())
            return f"folder:{digest.hexdigest()}"
        return f"file:{sha256_file(path)}" if path.is_file() else f"missing:{data}"
    if isinstance(data, Sequence):
        digest = hashlib.sha256()
        for feeds in data:
            for name in sorted(feeds):
                array = np.ascontiguousarray(feeds[name])
                digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode() + array.tobytes())
        return f"feeds:{digest.hexdigest()}"
    return f"iterator:{uuid.uuid4().hex}"


def _metric_identity(metric: Any) -> str | None:
    """A user metric by name and the source of its module (a changed metric re-evaluates)."""
    if metric is None:
        return None
    if callable(metric):
        module = importlib.import_module(metric.__module__)
        return f"{metric.__module__}:{metric.__qualname__}:" + _source_hash(module)
    module_name = str(metric).partition(":")[0]
    try:
        return f"{metric}:" + _source_hash(importlib.import_module(module_name))
    except Exception:
        return str(metric)


def _source_hash(module: Any) -> str:
    path = getattr(module, "__file__", None)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else "builtin"


@functools.cache
def source_digest() -> str:
    """sha256 over enginekit's own source files. The version string does not change between
    commits of a checkout, so without this a changed placement rule or calibration fix was served
    the artifact the code before it had built under the same key (seen here: a new Q/DQ rule's
    OpenVINO INT8 came back from the cache with the old graph)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _timed_here(target: Target, precision: str, options: BuildOptions, target_options: Mapping[str, Any]) -> bool:
    """Whether the artifact keeps choices timed on the building CPU: the thread count it runs at
    (builder/threads.py) or TFLite's layers kept float where their int8 kernel is slower
    (speed_float.py). Such an artifact is rebuilt, not served from the cache, on another CPU."""
    return options.measures_threads(target) or (precision == "int8" and bool(target_options.get("speed_check")))


def build_key(fp32: Fp32Model, target: Target, precision: str, options: BuildOptions, target_options: Mapping[str, Any],
              encoding: str, table_sha256: str | None) -> str:
    """`table_sha256`: the hash of a given table file (None when the table is made from the
    calibration settings, which the key then names instead)."""
    material: dict[str, Any] = {
        "fp32": fp32.sha256, "target": target.name, "precision": precision,
        "toolchain": toolchain("onnx", "onnxruntime", "numpy"), "source": source_digest(), "target_material": target.key_material(target_options),
        "min_accuracy": [str(c) for c in options.min_accuracy] if isinstance(options.min_accuracy, (list, tuple)) else options.min_accuracy,
        "eval": data_identity(options.eval_data, fp32), "eval_samples": options.eval_samples,
        "output_kinds": dict(sorted(options.output_kinds.items())), "metric": _metric_identity(options.metric),
    }
    if _timed_here(target, precision, options, target_options):
        info = machine_info()
        material["timed_on"] = {"cpu": info["cpu"], "isa": info["isa"], "cores": info["cores"]}
    if precision == "int8":
        # the calibration data makes the table, unless one is given, and bias correction runs on it either way
        material["calibration"] = ({"table": table_sha256} if table_sha256 else {"method": options.calib_method, "samples": options.num_samples})
        material["calibration"]["data"] = data_identity(options.calib_data, fp32)
        material["quantize"] = {"encoding": encoding, "placement": target.placement, **options.quantize.key(),
                                "weight_type": resolved_weight_type(options.quantize, encoding),  # "auto" as this machine resolves it
                                "layer_report": options.quantize.layer_report}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
