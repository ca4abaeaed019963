"""Shared fixtures: the CLI run in-process (real exit codes and stderr), and zoo exports made once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from enginekit.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one error line; warnings before it may stand beside it, each one `enginekit: warning:` line."""
        lines = [line for line in self.err.splitlines() if line.strip() and not line.startswith("enginekit: warning: ")]
        assert len(lines) == 1, f"expected one line on stderr, got: {self.err!r}"
        return lines[0]


@pytest.fixture
def run_cli(capsys):
    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Export a zoo model once per session; returns (folder, manifest)."""
    from enginekit.exporter.pipeline import export_model

    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"export-{name}") / "onnx"
            export_model(name, folder)
            cache[name] = (folder, json.loads((folder / "manifest.json").read_text()))
        return cache[name]

    return get


def assert_nothing_written(folder: Path) -> None:
    """No artifact at the final path and no staging leftovers beside it."""
    assert not folder.exists(), f"{folder} was written"
    if folder.parent.exists():
        leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
        assert not leftovers, f"staging leftovers: {leftovers}"


def weight_integers(path: Path) -> dict[str, np.ndarray]:
    """A Q/DQ ONNX file's weight integers (value minus zero point) by weight name ("__int8" cut).
    ONNX Runtime's artifact pads a first Conv's input channels with zero weights
    (targets.onnxruntime.align_input_channels, weight named "<name>_aligned"): cut the padding
    off with `[:, :channels]` where the original channel count matters."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        weight = node.input[0] if node.op_type == "DequantizeLinear" else None
        if weight in initializers and initializers[weight].ndim >= 2 and len(node.input) > 2:
            value = initializers[weight].astype(np.int32)
            zero_point = initializers[node.input[2]].astype(np.int32).reshape([-1] + [1] * (value.ndim - 1))
            found[weight.removesuffix("_aligned").removesuffix("__int8")] = value - zero_point
    return found


def minmax_table(model, names: list[str], feeds: list[dict[str, np.ndarray]]):
    """A min-max CalibrationTable of `names` in `model` over `feeds`, for tests on small graphs."""
    from enginekit.calibration.table import CalibrationTable, TensorRange
    from enginekit.onnx.probe import probe

    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for outputs in probe(model, names, feeds):
        for name in names:
            values[name].append(outputs[name].ravel())
    table = CalibrationTable("minmax", {}, len(feeds), "random", "", "")
    for name, chunks in values.items():
        data = np.concatenate(chunks)
        table.tensors[name] = TensorRange(float(data.min()), float(data.max()), float(np.abs(data).max()), bool(data.min() < 0))
    return table


@pytest.fixture(scope="session", autouse=True)
def tflite_layers_stay_int8():
    """TFLite's speed check (targets/tflite/speed_float.py) keeps float the layers whose int8 kernel
    is slower on the CPU running the tests, so what an int8 flatbuffer holds would depend on the
    machine; the tests of placement and accuracy build with it off, and test_tflite_speed turns it
    on where it is what is tested."""
    from enginekit.targets.tflite import TfliteTarget

    patch = pytest.MonkeyPatch()
    patch.setitem(TfliteTarget.option_defaults, "speed_check", False)
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def runtimes_keep_default_threads():
    """The thread-count tuning (builder/threads.py) times every artifact at several counts: seconds
    per test build, and manifests that depend on the machine's load. The tests build without it;
    test_thread_tuning turns it on where it is what is tested."""
    from enginekit.builder import threads

    patch = pytest.MonkeyPatch()
    patch.setattr(threads, "TUNE_BY_DEFAULT", False)
    yield
    patch.undo()
