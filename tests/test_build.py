"""`enginekit build`: several targets at once, a YAML config, and the content-addressed cache."""

from __future__ import annotations

import json

import pytest

from enginekit.core.artifacts import read_manifest
from enginekit.builder import BuildOptions, build


def test_config_file_builds_and_reports(run_cli, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(f"""
model: digits_cnn
targets: [onnxruntime]
precisions: [fp32, int8]
num_samples: 64
min_accuracy: "accuracy>=0.9"
output: {tmp_path / 'out'}
""")
    result = run_cli("build", "-c", config)
    assert result.code == 0, result.err
    for folder in ("onnxruntime-fp32", "onnxruntime-int8"):
        assert read_manifest(tmp_path / "out" / folder)["accuracy"]["passed"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [a["precision"] for a in report["artifacts"] if not a["source"]] == ["fp32", "int8"]
    assert report["artifacts"][0]["target"] == "pytorch" and report["artifacts"][0]["source"]  # the source model comes first
    assert (tmp_path / "out" / "report.html").is_file() and "speed-up vs FP32" in result.out and "speed-up vs source" in result.out


def test_command_line_flags_override_the_config(run_cli, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(f"model: digits_cnn\ntargets: onnxruntime\nprecisions: int8\noutput: {tmp_path / 'out'}\n")
    result = run_cli("build", "-c", config, "--precisions", "fp32", "--no-bench")
    assert result.code == 0, result.err
    assert read_manifest(tmp_path / "out")["precision"] == "fp32"


def test_unknown_config_key_is_refused(run_cli, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("model: digits_cnn\ntargets: onnxruntime\ncolour: blue\n")
    result = run_cli("build", "-c", config, "-o", tmp_path / "out")
    assert result.code == 2 and "unknown option(s) colour" in result.error_line


def test_unchanged_inputs_reuse_the_artifact_and_changes_rebuild(tmp_path):
    out = tmp_path / "int8"
    options = BuildOptions(num_samples=64)
    first = build("digits_cnn", "onnxruntime", "int8", out, options)
    again = build("digits_cnn", "onnxruntime", "int8", out, options)
    assert again.cache_hit and again.manifest["build_key"] == first.manifest["build_key"]
    assert read_manifest(out) == first.manifest and "cache_hit" not in first.manifest
    changed = build("digits_cnn", "onnxruntime", "int8", out, BuildOptions(num_samples=32))
    assert not changed.cache_hit and changed.manifest["build_key"] != first.manifest["build_key"]


def test_a_corrupted_cached_artifact_is_rebuilt(tmp_path):
    out = tmp_path / "fp32"
    build("digits_cnn", "onnxruntime", "fp32", out)
    (out / "model.onnx").write_bytes(b"tampered")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = build("digits_cnn", "onnxruntime", "fp32", out)
    assert not rebuilt.cache_hit and (out / "model.onnx").stat().st_size > 1000


def test_targets_sharing_an_encoding_share_one_bias_corrected_graph(tmp_path, monkeypatch):
    """OpenVINO and TFLite both take the "mixed" Q/DQ graph: build_many corrects its biases once,
    and each artifact still gets the corrected graph (the TFLite one folds it into its weights)."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pytest.importorskip("ai_edge_quantizer", reason="the tflite extra is not installed")
    import enginekit.builder.session as session_module
    from enginekit.builder import build_many

    calls = []
    real = session_module.build_qdq
    monkeypatch.setattr(session_module, "build_qdq", lambda *args: calls.append(args[3]) or real(*args))
    outcomes = build_many("digits_cnn", ["onnxruntime", "openvino", "tflite"], ["int8"], tmp_path, BuildOptions(num_samples=64))
    assert calls == ["uint8", "mixed"]  # onnxruntime's encoding, then one graph for openvino and tflite
    for outcome in outcomes:
        details = outcome.manifest["quantization"]
        assert details["bias_correction"]["layers"] == 5, outcome.target
        assert outcome.manifest["accuracy"]["metrics"]["accuracy"] >= outcome.manifest["accuracy"]["metrics"]["fp32_accuracy"] - 0.01
