"""Thread-count tuning (builder/threads.py): each CPU artifact is timed at its runtime's default
thread count and at fewer, and opens at the fastest unless the caller names a count."""

from __future__ import annotations

import json
import os
import time

import pytest

from enginekit.builder import BuildOptions, build, threads
from enginekit.core.artifacts import read_manifest
from enginekit.targets.registry import artifact_threads, open_artifact


class _Timed:
    """A stand-in runner whose every run takes a fixed time per thread count."""

    def __init__(self, seconds: float, opened: list):
        self.seconds, self.closed = seconds, False
        opened.append(self)

    def infer(self, feeds):
        time.sleep(self.seconds)
        return {}

    def close(self):
        self.closed = True


def _opener(seconds_by_count: dict, opened: list):
    return lambda count: _Timed(seconds_by_count[count], opened)


def test_the_fastest_count_is_chosen_and_every_runner_closed(monkeypatch):
    monkeypatch.setattr(threads, "SLICE_SECONDS", 0.01)
    opened: list = []
    record = threads.fastest_threads(_opener({None: 0.004, 2: 0.003, 1: 0.002}, opened), {}, cores=4)
    assert record["chosen"] == 1 and record["cores"] == 4
    assert set(record["median_us"]) == {"default", "2", "1"} and record["median_us"]["1"] < record["median_us"]["default"]
    assert "faster than the runtime's default" in record["why"]
    assert len(opened) == 3 and all(runner.closed for runner in opened)


def test_a_count_within_noise_of_the_default_keeps_the_default(monkeypatch):
    monkeypatch.setattr(threads, "SLICE_SECONDS", 0.01)
    record = threads.fastest_threads(_opener({None: 0.003, 1: 0.003}, []), {}, cores=2)
    assert record["chosen"] is None and "default thread count was fastest" in record["why"]


def test_a_failed_measurement_keeps_the_default_and_says_why():
    opened: list = []

    def opener(count):
        if count == 1:
            raise RuntimeError("no such\nthread count")
        return _Timed(0.001, opened)

    record = threads.fastest_threads(opener, {}, cores=2)
    assert record["chosen"] is None and record["why"] == "not measured: no such thread count"
    assert all(runner.closed for runner in opened)


def test_one_core_has_nothing_to_tune():
    assert threads.thread_counts(1) == [None] and threads.fastest_threads(_opener({}, []), {}, cores=1) is None
    assert threads.thread_counts(2) == [None, 1] and threads.thread_counts(16) == [None, 8, 1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: no thread count to compare")
def test_a_build_times_its_artifact_and_records_the_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "TUNE_BY_DEFAULT", True)
    result = build("digits_cnn", "onnxruntime", "int8", tmp_path / "int8", BuildOptions(num_samples=32))
    record = result.manifest["runtime_threads"]
    assert set(record["median_us"]) == {"default", "1"} if os.cpu_count() == 2 else {"default", "1"} <= set(record["median_us"])
    assert all(us > 0 for us in record["median_us"].values()) and record["chosen"] in (None, 1, len(os.sched_getaffinity(0)) // 2)
    runner, _ = open_artifact(tmp_path / "int8")
    assert runner.threads == record["chosen"]
    untuned = build("digits_cnn", "onnxruntime", "int8", tmp_path / "fixed", BuildOptions(num_samples=32, threads=1))
    assert "runtime_threads" not in untuned.manifest  # a count the user named is not second-guessed


def test_an_artifact_opens_and_is_benchmarked_at_its_chosen_count_unless_one_is_asked(tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(threads, "TUNE_BY_DEFAULT", True)
    monkeypatch.setattr("enginekit.builder.pipeline.fastest_threads", lambda open_runner, feeds: {"chosen": 1, "cores": 2, "median_us": {}})
    result = run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime", "--precisions", "fp32,int8", "--num-samples", "32",
                     "--no-source-row", "--bench", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "out" / "onnxruntime-int8")
    assert artifact_threads(manifest) == 1 and artifact_threads(manifest, 2) == 2
    assert open_artifact(tmp_path / "out" / "onnxruntime-int8")[0].threads == 1
    assert open_artifact(tmp_path / "out" / "onnxruntime-int8", threads=2)[0].threads == 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [entry["threads"] for entry in report["artifacts"]] == [1, 1]


def test_no_tune_threads_leaves_the_runtime_default(tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(threads, "TUNE_BY_DEFAULT", True)
    result = run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime", "--precisions", "int8", "--num-samples", "32",
                     "--no-tune-threads", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "out")
    assert "runtime_threads" not in manifest and artifact_threads(manifest) is None


def test_model_servers_are_configured_with_the_chosen_count(tmp_path, monkeypatch, run_cli):
    pytest.importorskip("tritonclient", reason="the 'triton' extra (tritonclient's model_config_pb2) is not installed")
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from enginekit.core.loaders import load_triton_config

    monkeypatch.setattr(threads, "TUNE_BY_DEFAULT", True)
    monkeypatch.setattr("enginekit.builder.pipeline.fastest_threads", lambda open_runner, feeds: {"chosen": 1, "cores": 2, "median_us": {}})
    result = run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime,openvino", "--precisions", "int8", "--num-samples", "32",
                     "--no-bench", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    artifacts = [tmp_path / "out" / "onnxruntime-int8", tmp_path / "out" / "openvino-int8"]
    assert run_cli("deploy", "triton", *artifacts, "-o", tmp_path / "triton").code == 0
    ort = load_triton_config(tmp_path / "triton" / "digits_cnn-onnxruntime-int8" / "config.pbtxt")
    ov = load_triton_config(tmp_path / "triton" / "digits_cnn-openvino-int8" / "config.pbtxt")
    assert ort.parameters["intra_op_thread_count"].string_value == "1" and ov.parameters["INFERENCE_NUM_THREADS"].string_value == "1"
    check = run_cli("deploy", "--check", tmp_path / "triton")
    assert check.code == 0, check.out + check.err
    assert run_cli("deploy", "ovms", *artifacts, "-o", tmp_path / "ovms").code == 0
    entries = json.loads((tmp_path / "ovms" / "config.json").read_text())["model_config_list"]
    assert [entry["config"]["plugin_config"]["INFERENCE_NUM_THREADS"] for entry in entries] == ["1", "1"]


def test_a_matrix_building_cells_side_by_side_does_not_tune_unless_asked():
    """Two workers build two cells at once: each timing would measure the other build."""
    from enginekit.builder.matrix import MatrixModel, untuned_beside_others
    from enginekit.core.executor import LocalExecutor

    models = [MatrixModel("digits_cnn", "a", BuildOptions()), MatrixModel("digits_cnn", "b", BuildOptions(tune_threads=True))]
    side_by_side = untuned_beside_others(models, LocalExecutor(2))
    assert [m.options.tune_threads for m in side_by_side] == [False, True]
    assert [m.options.tune_threads for m in untuned_beside_others(models, LocalExecutor(1))] == [None, True]


@pytest.mark.parametrize("command", [["build", "-m", "digits_cnn", "--targets", "onnxruntime", "--precisions", "fp32"], ["bench", "."],
                                     ["calibrate", "-m", "digits_cnn"], ["demo"]])
def test_a_thread_count_below_one_is_refused_before_any_work(tmp_path, run_cli, command):
    result = run_cli(*command, "--threads", "0", "-o", tmp_path / "out")
    assert result.code == 2 and "--threads" in result.err and "0" in result.err
    assert not (tmp_path / "out").exists()


def test_an_artifact_timed_on_one_cpu_is_rebuilt_on_another_but_an_untimed_one_is_reused(tmp_path, monkeypatch):
    """The thread count (and TFLite's speed check) are measured on the building CPU: the build key
    names that CPU for such artifacts, so a cache copied to another machine does not serve them;
    an artifact that kept nothing timed is reused there."""
    from enginekit.builder import key
    from enginekit.core.machine import machine_info

    other = {**machine_info(), "cpu": "another CPU", "isa": ["avx2", "fma"]}
    tuned, untuned = BuildOptions(tune_threads=True), BuildOptions(tune_threads=False)
    first = build("digits_cnn", "onnxruntime", "fp32", tmp_path / "tuned", tuned)
    plain = build("digits_cnn", "onnxruntime", "fp32", tmp_path / "plain", untuned)
    monkeypatch.setattr(key, "machine_info", lambda: other, raising=False)
    assert not build("digits_cnn", "onnxruntime", "fp32", tmp_path / "tuned", tuned).cache_hit
    assert build("digits_cnn", "onnxruntime", "fp32", tmp_path / "plain", untuned).cache_hit
    assert first.manifest["build_key"] != plain.manifest["build_key"]
