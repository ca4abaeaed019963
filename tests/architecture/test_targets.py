"""A new target is one class registered at run time: build, the build key, the CLI, bench and
load all work with it, with no edit anywhere in enginekit."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import enginekit as ek
from enginekit.core.tensors import Feeds
from enginekit.onnx.session import Session
from enginekit.targets import Built, BuildInputs, Runner, Target, get_target, register, target_names, unregister

TOY_FILE = "toy.onnx"


class ToyRunner(Runner):
    """ONNX Runtime again, standing in for another execution provider."""

    def __init__(self, path: Path, threads: int | None = None):
        self.session = Session(path, threads=threads)
        self.inputs, self.outputs = self.session.inputs, self.session.outputs
        self.closed = False

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        values = self.session.run(feeds)
        return [values[name] for name in self.output_names]

    def close(self) -> None:
        self.closed = True


class ToyTarget(Target):
    name = "toy-ort"
    precisions = ("fp32", "int8")
    encoding = "int8"  # another encoding than ONNX Runtime's own, so its INT8 graph differs
    option_defaults = {"provider": "CPUExecutionProvider"}

    def build(self, inputs: BuildInputs) -> Built:
        path = inputs.stage / TOY_FILE
        if inputs.precision == "int8":
            onnx.save(inputs.qdq(inputs.encoding).model, str(path))
        else:
            path.write_bytes(inputs.fp32.path.read_bytes())
        return Built(ToyRunner(path, inputs.threads), {"toy": {"provider": inputs.options["provider"]}})

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        return ToyRunner(folder / TOY_FILE, threads)


@pytest.fixture
def toy():
    register(ToyTarget())
    yield get_target("toy-ort")
    unregister("toy-ort")


def test_a_registered_target_builds_reuses_and_loads(toy, tmp_path):
    options = ek.BuildOptions(num_samples=32)
    first = ek.build("digits_cnn", "toy-ort", "int8", tmp_path / "toy", options)
    assert first.manifest["target"] == "toy-ort" and first.manifest["toy"] == {"provider": "CPUExecutionProvider"}
    assert first.manifest["quantization"]["encoding"] == "int8" and (tmp_path / "toy" / TOY_FILE).is_file()
    assert first.manifest["accuracy"]["metrics"]["accuracy"] >= first.manifest["accuracy"]["metrics"]["fp32_accuracy"] - 0.02
    again = ek.build("digits_cnn", "toy-ort", "int8", tmp_path / "toy", options)
    assert again.cache_hit
    other = ek.build("digits_cnn", "onnxruntime", "int8", tmp_path / "ort", options)
    assert other.manifest["build_key"] != first.manifest["build_key"]
    changed = ek.build("digits_cnn", "toy-ort", "int8", tmp_path / "toy", ek.BuildOptions(num_samples=32, target_options={"toy-ort": {"provider": "X"}}))
    assert not changed.cache_hit and changed.manifest["build_key"] != first.manifest["build_key"]
    with ek.load(tmp_path / "toy") as runner:
        outputs = runner.infer({"image": np.zeros((2, 1, 8, 8), np.float32)})
    assert isinstance(runner, ToyRunner) and runner.closed and outputs["logits"].shape == (2, 10)


def test_the_cli_and_bench_know_a_registered_target(toy, run_cli, tmp_path):
    listing = run_cli("targets")
    assert listing.code == 0 and "toy-ort" in listing.out and "toy-ort" in target_names()
    result = run_cli("build", "-m", "digits_cnn", "--targets", "toy-ort,onnxruntime", "--precisions", "fp32", "-o", tmp_path / "all", "--no-bench")
    assert result.code == 0, result.err
    assert (tmp_path / "all" / "toy-ort-fp32" / TOY_FILE).is_file()
    settings = ek.BenchSettings(batch_sizes=(1,), min_iterations=5, min_seconds=0.05, rounds=1)
    report = ek.bench([tmp_path / "all" / "toy-ort-fp32"], settings=settings)  # measured in a worker process
    assert report["artifacts"][0]["target"] == "toy-ort" and report["artifacts"][0]["latency_ms"]["iterations"] >= 5


def test_an_unknown_target_lists_the_known_ones(run_cli, tmp_path):
    result = run_cli("build", "-m", "digits_cnn", "--target", "tpu", "-o", tmp_path / "x")
    assert result.code == 2 and "unknown target 'tpu'" in result.error_line and "onnxruntime" in result.error_line
