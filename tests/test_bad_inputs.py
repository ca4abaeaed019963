"""Every bad input to `enginekit export`: one line on stderr naming the file and the problem,
exit code 2, and nothing written."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from tests.conftest import assert_nothing_written


def _expect_refusal(run_cli, out, *args, needle: str, names: str | None = None):
    result = run_cli("export", *args, "-o", out)
    assert result.code == 2, (result.code, result.err)
    line = result.error_line
    assert line.startswith("enginekit: error: ")
    assert needle in line, line
    if names is not None:
        assert names in line, line
    assert_nothing_written(out)
    return line


def test_missing_path(run_cli, tmp_path):
    missing = tmp_path / "nowhere" / "model.onnx"
    _expect_refusal(run_cli, tmp_path / "out", "--model", missing, needle="file not found", names=str(missing))


def test_a_missing_data_file_is_refused_even_where_no_cell_reads_it(run_cli, tmp_path):
    """An FP32-only build never opens --calib-data: a typo in its path went by without a word."""
    missing, out = tmp_path / "calib.npz", tmp_path / "out"
    result = run_cli("build", "--model", "digits_cnn", "--targets", "onnxruntime", "--precisions", "fp32", "--calib-data", missing, "-o", out)
    assert result.code == 2, (result.code, result.err)
    assert result.error_line == f"enginekit: error: {missing}: data not found"
    assert_nothing_written(out)


def test_a_model_from_outside_the_zoo_without_eval_data_stops_in_one_line_naming_the_flag(run_cli, tmp_path):
    """Every cell is judged on held-out data: without --eval-data each cell failed on its own
    (exit 1, the code of a failed gate) and no line said which flag gives it."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model, data, out = tmp_path / "relu.onnx", tmp_path / "calib.npy", tmp_path / "out"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.save(data, np.ones((4, 4), np.float32))
    result = run_cli("build", "--model", model, "--targets", "onnxruntime", "--precisions", "fp32,int8", "--calib-data", data, "-o", out)
    assert result.code == 2, (result.code, result.err)
    assert "evaluation data is required" in result.error_line and "--eval-data" in result.error_line, result.error_line
    assert_nothing_written(out)

def test_file_that_is_not_onnx(run_cli, tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("this is a shopping list, not a model\n" * 20)
    _expect_refusal(run_cli, tmp_path / "out", "--model", bogus, needle="ONNX", names=str(bogus))


def test_truncated_onnx(run_cli, exported, tmp_path):
    folder, _ = exported("efficientnet_lite0")
    data = (folder / "model.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    _expect_refusal(run_cli, tmp_path / "out", "--model", truncated, needle="ONNX", names=str(truncated))


def _model_with_external_data(folder, location: str):
    """A one-Add model whose weight lives in external data at `location` (written by hand)."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_external_data_outside_the_folder(run_cli, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = _model_with_external_data(model_dir, "../secret.bin")
    _expect_refusal(run_cli, tmp_path / "out", "--model", path, needle="outside the model folder", names=str(path))


def test_factory_that_does_not_import(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect_refusal(run_cli, tmp_path / "out", "--model", "no_such_pkg.nets:build", "--input-shape", "1x3x8x8",
                    needle="cannot import module 'no_such_pkg.nets'", names="no_such_pkg.nets:build")


def test_weights_that_do_not_match_the_architecture(run_cli, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(weights))
    _expect_refusal(run_cli, tmp_path / "out", "--model", "digits_cnn", "--weights", weights,
                    needle="weights do not match the architecture", names=str(weights))


def test_weights_with_wrong_shapes(run_cli, tmp_path):
    from enginekit.models import get_spec

    state = get_spec("digits_cnn").architecture().state_dict()
    state["classifier.3.weight"] = torch.zeros(7, 64)
    weights = tmp_path / "shapes.pt"
    torch.save(state, weights)
    _expect_refusal(run_cli, tmp_path / "out", "--model", "digits_cnn", "--weights", weights,
                    needle="weights do not match the architecture", names=str(weights))


def test_full_pickle_checkpoint_is_refused_with_advice(run_cli, tmp_path):
    from enginekit.models import get_spec

    checkpoint = tmp_path / "full.pt"
    torch.save(get_spec("digits_cnn").architecture(), checkpoint)  # the whole module, pickled
    line = _expect_refusal(run_cli, tmp_path / "out", "--model", "digits_cnn", "--weights", checkpoint,
                           needle="full pickle", names=str(checkpoint))
    assert "state_dict()" in line


class _Payload:
    """Unpickling this would create a marker file: the test proves it never runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_never_runs(run_cli, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(marker)}, checkpoint)
    _expect_refusal(run_cli, tmp_path / "out", "--model", "digits_cnn", "--weights", checkpoint, needle="full pickle")
    assert not marker.exists()


def test_unknown_zoo_name_suggests_close_names(run_cli, tmp_path):
    line = _expect_refusal(run_cli, tmp_path / "out", "--model", "efficientnet", needle="unknown zoo model 'efficientnet'")
    assert "did you mean efficientnet_lite0" in line


def test_input_shape_for_an_unknown_input(run_cli, tmp_path):
    _expect_refusal(run_cli, tmp_path / "out", "--model", "digits_cnn", "--input-shape", "pixels=1x1x8x8",
                    needle="input shapes name ['pixels']", names="--input-shape")


def test_factory_returning_something_else(run_cli, tmp_path, monkeypatch):
    (tmp_path / "notanet.py").write_text(textwrap.dedent("""
        def build():
            return {"not": "a module"}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _expect_refusal(run_cli, tmp_path / "out", "--model", "notanet:build", "--input-shape", "1x3", needle="not a torch.nn.Module")
