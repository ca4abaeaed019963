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


def test_changed_enginekit_source_rebuilds_what_the_old_code_built(tmp_path, monkeypatch):
    """The version string stays the same between commits: the key also hashes enginekit's source."""
    from enginekit.builder import key

    out = tmp_path / "fp32"
    first = build("digits_cnn", "onnxruntime", "fp32", out)
    assert len(key.source_digest()) == 64
    monkeypatch.setattr(key, "source_digest", lambda: "0" * 64)
    changed = build("digits_cnn", "onnxruntime", "fp32", out)
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
    # the grid's one correction on the inputs placement, onnxruntime's outputs graph, one graph for openvino and tflite
    assert calls == ["uint8", "uint8", "mixed"]
    for outcome in outcomes:
        details = outcome.manifest["quantization"]
        assert details["bias_correction"]["layers"] == 5, outcome.target
        assert details["bias_correction"]["corrected_on"] == "uint8 encoding, inputs placement"
        assert outcome.manifest["accuracy"]["metrics"]["accuracy"] >= outcome.manifest["accuracy"]["metrics"]["fp32_accuracy"] - 0.01


def test_an_int8_artifact_does_not_depend_on_the_other_targets_of_the_build(tmp_path):
    """OpenVINO shares ONNX Runtime's integer grid: built alone or after ONNX Runtime (whose graph
    has the outputs placement) it gets the same corrected biases, the same IR, the same build key."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from enginekit.builder import build_many

    options = BuildOptions(num_samples=64)
    together = {c.target: c for c in build_many("digits_cnn", ["onnxruntime", "openvino"], ["int8"], tmp_path / "both", options)}
    alone = build_many("digits_cnn", ["openvino"], ["int8"], tmp_path / "alone", options)[0]
    assert (tmp_path / "both" / "openvino-int8" / "model.bin").read_bytes() == (tmp_path / "alone" / "openvino-int8" / "model.bin").read_bytes()
    assert together["openvino"].manifest["build_key"] == alone.manifest["build_key"]


def test_the_build_profile_shows_where_time_went_and_no_shared_stage_twice(run_cli, tmp_path):
    """issue 21: every stage timed (exclusive seconds), per cell where it belongs to one; what
    the cells share (FP32 load, calibration, reference outputs, one Q/DQ graph per encoding) ran once."""
    result = run_cli("build", "--model", "digits_cnn", "--targets", "onnxruntime,openvino", "--precisions", "fp32,int8",
                     "--num-samples", "64", "--no-bench", "--profile", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert "build profile (wall" in result.out and "| onnxruntime-int8 |" in result.out
    from enginekit.builder import BuildOptions, build_many

    cells = build_many("digits_cnn", ["onnxruntime", "openvino"], ["fp32", "int8"], tmp_path / "again", BuildOptions(num_samples=64))
    profile = cells[0].profile
    counts = profile["counts"]
    assert counts["calibration"] == counts["fp32 reference outputs"] == counts["evaluation data"] == counts["load FP32 (export, hash)"] == 1
    assert counts["conversion"] == counts["evaluation"] == 4 and set(profile["cells"]) == {f"{t}-{p}" for t in ("onnxruntime", "openvino") for p in ("fp32", "int8")}
    assert counts["quantization (uint8, outputs)"] == counts["quantization (mixed, inputs)"] == counts["quantization (uint8, inputs)"] == 1
    # uint8 and mixed put every tensor on the same grid: one bias correction serves both graphs
    assert counts["bias correction"] == 1
    records = {c.target: c.manifest["quantization"]["bias_correction"] for c in cells if c.precision == "int8"}
    assert "corrected_on" in records["onnxruntime"] and "shared" in records["openvino"]
    assert records["openvino"]["layers"] == records["onnxruntime"]["layers"] == 5
    assert 0 < sum(profile["stages"].values()) <= profile["wall_s"] and all(c.profile == profile for c in cells)


def test_an_unexpected_error_in_one_cell_fails_that_cell_and_the_others_are_still_reported(run_cli, tmp_path, monkeypatch):
    """A LiteRT kernel's RuntimeError ended a new user's whole six-cell build: one 'unexpected'
    line, the table of the cells already built lost. Now it is that cell's failure; --debug
    (ENGINEKIT_DEBUG) still raises it where it happens, with its traceback."""
    from enginekit.builder import pipeline

    real = pipeline.build_cell

    def failing_for_openvino(session, target, precision, out, conditions):
        if target.name == "openvino":
            raise RuntimeError("kernel check failed: index out of bounds")
        return real(session, target, precision, out, conditions)

    monkeypatch.setattr(pipeline, "build_cell", failing_for_openvino)
    monkeypatch.delenv("ENGINEKIT_DEBUG", raising=False)
    args = ["build", "-m", "digits_cnn", "--targets", "onnxruntime,openvino", "--precisions", "fp32", "--no-bench"]
    result = run_cli(*args, "-o", tmp_path / "out")
    assert result.code != 0 and "Traceback" not in result.err
    assert "unexpected RuntimeError: kernel check failed: index out of bounds (rerun with --debug" in result.out
    assert (tmp_path / "out" / "onnxruntime-fp32" / "manifest.json").is_file() and not (tmp_path / "out" / "openvino-fp32").exists()
    monkeypatch.setenv("ENGINEKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kernel check failed"):
        build("digits_cnn", "openvino", "fp32", tmp_path / "debug", BuildOptions())
