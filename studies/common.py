"""What the studies share: reference tools' outputs wrapped as artifact folders (so the product
harness measures them exactly like enginekit's own), accuracy through the product metrics, and
the JSON + table each study prints."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.accuracy import collect_outputs, compare_outputs
from enginekit.core.artifacts import write_manifest
from enginekit.core.tensors import Feeds
from enginekit.targets.base import Runner


def work_folder(prefix: str) -> Path:
    """A scratch folder for a study's builds, removed when the study exits (a full study writes
    hundreds of MB of artifacts that nothing reads afterwards)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def wrap_artifact(folder: Path, files: Mapping[str, Path | bytes], model: str, target: str, precision: str,
                  inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]], made_by: str) -> Path:
    """An artifact folder (files + manifest) around what another tool produced."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, content in files.items():
        target_path = folder / name
        if isinstance(content, bytes):
            target_path.write_bytes(content)
        else:
            shutil.copyfile(content, target_path)
    write_manifest(folder, {"model": model, "target": target, "precision": precision, "inputs": list(inputs),
                            "outputs": list(outputs), "source": {"made_by": made_by}, "notes": []})
    return folder


def score(reference: Mapping[str, np.ndarray], runner: Runner, batches: Sequence[Feeds], labels: np.ndarray | None = None) -> dict[str, float]:
    """The product's accuracy metrics of `runner` against FP32 reference outputs on `batches`."""
    try:
        return compare_outputs(reference, collect_outputs(runner.infer, batches), labels)
    finally:
        runner.close()


def write_json(path: str | Path, results: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def latency_by_name(report: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The harness report's entries, keyed by the names the study gave the folders (same order)."""
    return dict(zip(names, report["artifacts"]))


def ort_calibration_reader(name: str, samples: np.ndarray) -> Any:
    """An ONNX Runtime CalibrationDataReader feeding `samples` one at a time as input `name`."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples[i : i + 1] for i in range(len(samples)))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {name: item}

    return Reader()

