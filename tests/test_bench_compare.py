"""`enginekit bench` measures artifacts into a versioned report; `enginekit compare` judges
changes against the spread of the runs and gates CI with its exit code."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from enginekit.benchmark.compare import compare_reports, latency_verdict
from enginekit.benchmark.report import REPORT_SCHEMA, markdown


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory):
    from enginekit.benchmark.harness import BenchSettings, bench_artifact
    from enginekit.benchmark.report import make_report
    from enginekit.builder import build_many, BuildOptions

    root = tmp_path_factory.mktemp("bench")
    outcomes = build_many("digits_cnn", ["onnxruntime"], ["fp32", "int8"], root, BuildOptions(num_samples=64))
    settings = BenchSettings(batch_sizes=(1, 8), min_iterations=20, min_seconds=0.2)
    return make_report([bench_artifact(o.folder, settings) for o in outcomes], settings)


def test_report_holds_the_measurements(digits_report):
    assert digits_report["schema"] == REPORT_SCHEMA and digits_report["machine"]["cores"] >= 1
    fp32, int8 = digits_report["artifacts"]
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    for entry in (fp32, int8):
        latency = entry["latency_ms"]
        assert latency["iterations"] >= 20 and latency["min_ms"] <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert [s["batch"] for s in entry["throughput"]] == [1, 8] and entry["best_throughput_per_s"] > 0
        assert entry["size_mb"] > 0 and entry["load_s"] > 0 and entry["first_inference_ms"] > 0
        assert len(entry["latency_samples_ms"]) >= 20
    assert int8["accuracy"]["accuracy"] > 0.9
    table = markdown(digits_report)
    assert "speed-up vs FP32" in table and "1.00x" in table


def test_bench_cli_writes_json_and_markdown(run_cli, tmp_path):
    from enginekit.builder import build

    build("digits_cnn", "onnxruntime", "fp32", tmp_path / "a")
    result = run_cli("bench", tmp_path / "a", "-o", tmp_path / "r.json", "--min-seconds", "0.1", "--min-iterations", "10", "--batch-sizes", "1")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == REPORT_SCHEMA
    assert "| digits_cnn" in (tmp_path / "r.md").read_text()
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") == 3 and "<script" not in page and "http" not in page


def test_bench_isolates_each_artifact_and_interleaves_their_latency_slices(tmp_path):
    """Each artifact in its own process, latency in rounds A B A B ... so machine drift hits both."""
    from enginekit.benchmark.harness import BenchSettings, bench_artifacts
    from enginekit.builder import BuildOptions, build_many

    outcomes = build_many("digits_cnn", ["onnxruntime"], ["fp32", "int8"], tmp_path, BuildOptions(num_samples=64))
    settings = BenchSettings(batch_sizes=(1,), min_iterations=30, min_seconds=0.3, rounds=3)
    first, second = bench_artifacts([o.folder for o in outcomes], settings)
    assert (first["precision"], second["precision"]) == ("fp32", "int8")
    for entry in (first, second):
        assert entry["latency_ms"]["iterations"] >= 30 and len(entry["latency_slices"]) == 3
    order = sorted([(start, "A") for start, _ in first["latency_slices"]] + [(start, "B") for start, _ in second["latency_slices"]])
    assert "".join(label for _, label in order) == "ABABAB"
    assert first["rss_mb"] is not None and first["load_s"] > 0  # measured in the worker, not here
    assert first["peak_rss_mb"] > first["rss_mb"] > 0


def _timed(slice_p50s: list[float], starts: list[float], pooled_p50: float) -> dict:
    return {"latency_slice_p50_ms": slice_p50s, "latency_slices": [[start, start + 1.0] for start in starts],
            "latency_ms": {"p50_ms": pooled_p50}}


def test_a_speed_up_is_the_median_of_the_ratios_of_interleaved_rounds():
    """One round that a neighbour slowed (FP32 twice as slow, INT8 on one thread not) does not
    decide the speed-up: the rounds' ratios are 0.7, 0.7 and 1.4, their median 0.7; the pooled p50s
    (what the rounds' samples read together) would say 1.2."""
    from enginekit.benchmark.report import speedup

    fp32 = _timed([0.5, 0.5, 1.0], [0.0, 2.0, 4.0], pooled_p50=0.84)
    int8 = _timed([0.714, 0.714, 0.714], [1.0, 3.0, 5.0], pooled_p50=0.7)
    assert speedup(fp32, int8) == pytest.approx(0.7, abs=0.001)
    assert speedup(int8, fp32) == pytest.approx(1 / 0.7, abs=0.001)


def test_rounds_that_did_not_interleave_fall_back_to_the_pooled_p50s():
    """Slices measured one artifact after the other (or in different counts) were not under the
    same load, so their ratios are not paired."""
    from enginekit.benchmark.report import speedup

    fp32 = _timed([0.5, 0.5, 1.0], [0.0, 1.0, 2.0], pooled_p50=0.84)
    after = _timed([0.714, 0.714, 0.714], [3.0, 4.0, 5.0], pooled_p50=0.7)
    assert speedup(fp32, after) == pytest.approx(1.2)
    fewer = _timed([0.714, 0.714], [1.0, 3.0], pooled_p50=0.7)
    assert speedup(fp32, fewer) == pytest.approx(1.2)


def test_bench_cli_on_a_folder_that_is_no_artifact_says_so_in_one_line(run_cli, tmp_path):
    """The per-artifact benchmark process passes its one-line error on; no report is written."""
    (tmp_path / "empty").mkdir()
    result = run_cli("bench", tmp_path / "empty", "-o", tmp_path / "r.json")
    assert result.code == 2 and "empty" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def _report(samples_by_key: dict[str, np.ndarray], accuracy: float = 0.98) -> dict:
    artifacts = []
    for key, samples in samples_by_key.items():
        model, target, precision = key.split("/")
        artifacts.append({"model": model, "target": target, "precision": precision, "latency_samples_ms": samples.tolist(),
                          "latency_ms": {"p50_ms": float(np.median(samples)), "p99_ms": float(np.percentile(samples, 99))},
                          "accuracy": {"accuracy": accuracy}, "size_mb": 1.0, "best_throughput_per_s": 1.0})
    return {"schema": REPORT_SCHEMA, "artifacts": artifacts, "machine": {"cpu": "x", "cores": 2}, "created": "now"}


def _noisy(center: float, seed: int, n: int = 300) -> np.ndarray:
    return center * (1 + 0.05 * np.random.default_rng(seed).standard_normal(n))


def test_a_clear_regression_fails(tmp_path):
    old = _report({"m/onnxruntime/int8": _noisy(2.0, 0)})
    new = _report({"m/onnxruntime/int8": _noisy(2.6, 1)})
    result = compare_reports(old, new, max_regression=0.10)
    assert result.rows[0][-1] == "slower" and result.failures


def test_a_change_inside_the_noise_is_no_change():
    old = _report({"m/onnxruntime/int8": _noisy(2.0, 0, n=40) * (1 + 0.3 * np.random.default_rng(5).random(40))})
    new = _report({"m/onnxruntime/int8": _noisy(2.04, 1, n=40) * (1 + 0.3 * np.random.default_rng(6).random(40))})
    result = compare_reports(old, new)
    assert result.rows[0][-1] == "no change" and not result.failures


def test_a_small_but_real_speedup_is_called_faster():
    verdict, ratio, low, high = latency_verdict(_noisy(2.0, 0, 2000).tolist(), _noisy(1.8, 1, 2000).tolist())
    assert verdict == "faster" and high < 0.98 and 0.85 < ratio < 0.95


def test_an_accuracy_drop_fails():
    old = _report({"m/openvino/int8": _noisy(2.0, 0)}, accuracy=0.98)
    new = _report({"m/openvino/int8": _noisy(2.0, 1)}, accuracy=0.95)
    result = compare_reports(old, new, max_accuracy_drop=0.01)
    assert any(row[-1] == "less accurate" for row in result.rows)
    assert any("dropped" in f for f in result.failures)


def test_missing_artifacts_are_listed(run_cli, tmp_path):
    old = _report({"m/onnxruntime/fp32": _noisy(2.0, 0), "m/openvino/int8": _noisy(1.0, 1)})
    new = _report({"m/onnxruntime/fp32": _noisy(2.0, 2), "m/tensorrt/fp16": _noisy(0.5, 3)})
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    result = run_cli("compare", tmp_path / "old.json", tmp_path / "new.json")
    assert result.code == 0, result.err
    assert "only in the old report: m/openvino/int8" in result.out and "only in the new report: m/tensorrt/fp16" in result.out


def test_compare_cli_exit_codes(run_cli, tmp_path):
    old = _report({"m/onnxruntime/int8": _noisy(2.0, 0)})
    slow = copy.deepcopy(_report({"m/onnxruntime/int8": _noisy(3.0, 1)}))
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert run_cli("compare", tmp_path / "old.json", tmp_path / "slow.json").code == 1
    assert run_cli("compare", tmp_path / "old.json", tmp_path / "slow.json", "--max-regression", "0.9").code == 0
    bad = run_cli("compare", tmp_path / "old.json", tmp_path / "missing.json")
    assert bad.code == 2 and "report not found" in bad.error_line


def test_bench_pins_to_the_given_cores_and_records_them(tmp_path):
    import os

    from enginekit.benchmark.harness import BenchSettings, bench_artifact, bench_artifacts
    from enginekit.builder import build
    from enginekit.core.errors import InputError

    build("digits_cnn", "onnxruntime", "fp32", tmp_path / "a")
    before = os.sched_getaffinity(0)
    core = min(before)
    settings = BenchSettings(threads=1, batch_sizes=(1,), min_iterations=10, min_seconds=0.1, rounds=1, cpus=[core])
    assert bench_artifacts([tmp_path / "a"], settings)[0]["cpus"] == [core]  # in the worker process
    assert bench_artifact(tmp_path / "a", settings)["cpus"] == [core]  # in this one, then undone
    assert os.sched_getaffinity(0) == before
    assert bench_artifact(tmp_path / "a", BenchSettings(batch_sizes=(1,), min_iterations=5, min_seconds=0.05, rounds=1))["cpus"] == sorted(before)
    with pytest.raises(InputError, match="cannot pin to core"):
        bench_artifacts([tmp_path / "a"], BenchSettings(cpus=[max(before) + 1000]))


SOURCE_SETTINGS = dict(batch_sizes=(1, 4), min_iterations=10, min_seconds=0.2, rounds=2)


def test_a_pytorch_source_is_the_first_rows_of_its_report_with_speed_ups_over_it(tmp_path, run_cli):
    """`build` measures the model the user started from (PyTorch eager, torch.compile where it
    compiles) by the harness's rules, first in the report, and every artifact's speed-up over it."""
    from enginekit import api
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.builder import BuildOptions, build_many

    cells = build_many("digits_cnn", ["onnxruntime"], ["fp32", "int8"], tmp_path, BuildOptions(num_samples=64))
    report = api.bench([c.folder for c in cells], settings=BenchSettings(**SOURCE_SETTINGS), source="digits_cnn")
    rows = [(e["target"], e["source"]) for e in report["artifacts"]]
    compiled = [s for s in report["skipped"] if s["target"] == "torch.compile"]
    assert rows[0] == ("pytorch", True) and rows[-2:] == [("onnxruntime", False), ("onnxruntime", False)]
    assert len(rows) + len(compiled) == 4  # torch.compile is measured, or skipped with its reason
    eager = report["artifacts"][0]
    assert eager["latency_ms"]["iterations"] >= 10 and [s["batch"] for s in eager["throughput"]] == [1, 4]
    assert eager["size_mb"] == pytest.approx(40394 * 4 / 1e6, rel=0.01)  # the parameters' bytes
    table = markdown(report)
    assert "speed-up vs source" in table
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| digits_cnn")]
    header = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("| model")).split("|")[1:-1]]
    ort_row = next(row for row in cells if row[1:3] == ["onnxruntime", "fp32"])
    ort = report["artifacts"][-2]
    assert len(eager["latency_slice_p50_ms"]) == len(ort["latency_slice_p50_ms"]) == SOURCE_SETTINGS["rounds"]
    expected = float(np.median(np.array(eager["latency_slice_p50_ms"]) / np.array(ort["latency_slice_p50_ms"])))
    assert ort_row[header.index("speed-up vs source")] == f"{expected:.2f}x"
    compare = compare_reports(report, report, 0.1, 0.01, 0.02)
    assert "digits_cnn/pytorch/fp32" in compare.render() and not compare.failures


def test_a_keras_source_gets_keras_rows_and_an_onnx_source_says_it_has_none(tmp_path, exported):
    from enginekit import api
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.builder import BuildOptions, build

    pytest.importorskip("keras", reason="the 'keras' extra is not installed")
    built = build("digits_keras", "onnxruntime", "fp32", tmp_path / "k", BuildOptions(num_samples=64))
    report = api.bench([built.folder], settings=BenchSettings(**SOURCE_SETTINGS), source="digits_keras")
    assert [e["target"] for e in report["artifacts"]] == ["keras", "tf.function", "onnxruntime"]
    assert report["artifacts"][0]["size_mb"] > 0.1
    onnx_file = exported("digits_cnn")[0] / "model.onnx"
    report = api.bench([built.folder], settings=BenchSettings(**SOURCE_SETTINGS), source=onnx_file)
    assert [e["target"] for e in report["artifacts"]] == ["onnxruntime"]
    assert "ONNX model: there is no source framework" in report["source_note"] and "source: " in markdown(report)
    report = api.bench([built.folder], settings=BenchSettings(**SOURCE_SETTINGS), source="no_such_module_here:build")
    assert [e["target"] for e in report["artifacts"]] == ["onnxruntime"]  # the artifacts are measured all the same
    assert "cannot be measured here" in report["source_note"] and "no_such_module_here" in report["source_note"]


def test_the_source_row_is_measured_at_the_shapes_the_artifacts_were(tmp_path, monkeypatch):
    """A sentence model with 32 positions, evaluated on 20-token sentences: the artifacts are
    measured at 20 tokens (their manifests' data_shapes); the PyTorch row was measured at the
    harness's default 128 and skipped ("index out of range in self", a GPT-2 of 64 positions)."""
    import textwrap

    from enginekit import api
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.builder import BuildOptions, build

    (tmp_path / "posnet.py").write_text(textwrap.dedent("""
        import torch

        class PositionNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.tokens, self.positions = torch.nn.Embedding(100, 8), torch.nn.Embedding(32, 8)

            def forward(self, input_ids):
                where = torch.arange(input_ids.shape[1]).unsqueeze(0)
                return (self.tokens(input_ids) + self.positions(where)).mean(dim=1)

        def build():
            return PositionNet().eval()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    np.savez(tmp_path / "tokens.npz", input_ids=np.random.default_rng(0).integers(0, 100, (16, 20)))
    shapes = ("input_ids=batchxsequence:int64:0..99",)
    built = build("posnet:build", "onnxruntime", "fp32", tmp_path / "fp32", BuildOptions(eval_data=tmp_path / "tokens.npz", input_shapes=shapes))
    source = BuildOptions(input_shapes=shapes).source_options()
    report = api.bench([built.folder], settings=BenchSettings(batch_sizes=(1,), min_iterations=5, min_seconds=0.05, rounds=1),
                       source="posnet:build", source_options=source)
    eager = next(e for e in report["artifacts"] if e["target"] == "pytorch")
    artifact = next(e for e in report["artifacts"] if e["target"] == "onnxruntime")
    assert eager["latency_shapes"] == artifact["latency_shapes"] == {"input_ids": [1, 20]}, report["skipped"]

@pytest.mark.parametrize("n", [1, 2, 7, 250, 2001, 2500])
def test_bootstrap_medians_follow_the_resampled_medians(n):
    """The exact draw of a bootstrap median (order statistics of uniforms) against materialised
    resamples: the same quantiles within Monte-Carlo noise, on skewed latency-like samples."""
    from enginekit.benchmark.compare import bootstrap_medians

    samples = np.random.default_rng(n).lognormal(0.0, 0.3, n)
    brute = np.median(np.random.default_rng(1).choice(samples, (20000, n)), axis=1)
    drawn = bootstrap_medians(samples, np.random.default_rng(2), 20000)
    assert drawn.min() >= samples.min() and drawn.max() <= samples.max()
    spread = np.percentile(brute, 97.5) - np.percentile(brute, 2.5)
    for q in (5, 50, 95):
        assert abs(np.percentile(drawn, q) - np.percentile(brute, q)) <= 0.05 * spread + 1e-12, q
