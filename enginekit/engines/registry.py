"""Open any artifact folder as a Runner, whatever its target: the harness and the accuracy
checks only ever talk to runners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginekit.artifacts import read_manifest, verify_files
from enginekit.errors import InputError

ONNX_FILES = ("model.int8.onnx", "model.onnx")


def load_runner(folder: str | Path, threads: int | None = None, hint: str = "LATENCY", streams: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(runner, manifest) for an artifact folder; files are checked against the manifest hashes."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    target = manifest.get("target")
    if target in ("onnx", "onnxruntime"):
        path = next((folder / name for name in ONNX_FILES if (folder / name).is_file()), None)
        if path is None:
            raise InputError("artifact has no ONNX model", folder)
        from enginekit.engines.onnxruntime import OrtRunner

        return OrtRunner(path, threads=threads), manifest
    if target == "openvino":
        from enginekit.engines.openvino import OpenVinoRunner

        return OpenVinoRunner(folder, manifest["precision"], hint=hint, streams=streams, threads=threads), manifest
    if target == "tflite":
        from enginekit.engines.tflite.runner import MODEL_FILE, TfliteRunner

        return TfliteRunner(folder / MODEL_FILE, threads=threads, io=manifest.get("tflite", {}).get("io")), manifest
    if target == "tensorrt":
        from enginekit.engines.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(folder), manifest
    raise InputError(f"unknown artifact target {target!r}", folder)
