"""Models from the wild: the default gate, per-cell failures, old opsets, declared dtypes and value
ranges, Keras preprocessing layers, batches that are not on axis 0, and dynamic spatial dims
measured at the data's shape."""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import assert_nothing_written


def test_a_broken_quantization_is_never_published_without_a_gate(run_cli, tmp_path):
    """Ranges scaled by 1/100: no --min-accuracy, yet the task-aware default gate stops it, naming the output."""
    table = tmp_path / "r.json"
    assert run_cli("calibrate", "-m", "digits_cnn", "-n", "64", "-o", table).code == 0
    document = json.loads(table.read_text())
    for entry in document["tensors"].values():
        for key in ("min", "max", "amax"):
            entry[key] /= 100
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    result = run_cli("quantize", "-m", "digits_cnn", "-t", broken, "--no-bias-correction", "-o", tmp_path / "q")
    assert result.code == 1 and "default gate" in result.error_line and "output 'logits'" in result.error_line
    assert "--min-accuracy" in result.error_line
    assert_nothing_written(tmp_path / "q")
    opted_out = run_cli("quantize", "-m", "digits_cnn", "-t", broken, "--no-bias-correction", "--min-accuracy", "none", "-o", tmp_path / "q")
    assert opted_out.code == 0, opted_out.err
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["accuracy"]["conditions"] == []


def _erf_model(path):
    """A small CNN with an Erf (GELU-like) in it: ONNX Runtime and OpenVINO build it, the TFLite
    lowering does not know Erf."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    fc = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32) * 0.3, "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Erf", ["c"], ["e"], name="my_erf"),
             helper.make_node("GlobalAveragePool", ["e"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "erfnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], [weight, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_failed_cell_is_not_a_failed_build(run_cli, tmp_path):
    pytest.importorskip("ai_edge_quantizer", reason="the tflite extra is not installed")
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    _erf_model(tmp_path / "erf.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).random((32, 3, 16, 16), dtype=np.float32))
    import time

    started = time.perf_counter()
    result = run_cli("build", "-m", tmp_path / "erf.onnx", "--targets", "onnxruntime,tflite,openvino", "--precisions", "fp32,int8",
                     "--calib-data", tmp_path / "d.npz", "--eval-data", tmp_path / "d.npz", "-n", "32", "--min-accuracy", "none",
                     "-o", tmp_path / "out")
    assert result.code == 1 and "2 of 6 artifact(s) failed: tflite fp32; tflite int8" in result.error_line
    table = result.out
    assert "cannot lower op Erf (node my_erf)" in table and "| tflite      | int8      | FAILED" in table
    for cell in ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-int8"):
        assert (tmp_path / "out" / cell / "manifest.json").is_file()
    assert not (tmp_path / "out" / "tflite-int8").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["artifacts"]) == 4 and {c["target"] for c in report["failed"]} == {"tflite"}
    assert "failed: tflite int8" in (tmp_path / "out" / "report.md").read_text()
    assert time.perf_counter() - started < 300


def test_a_single_cell_that_fails_names_the_model_as_a_cell_of_several_does(run_cli, tmp_path):
    """One target and precision whose cell fails inside its build (the TFLite lowering meets a
    ScatterND computed from the symbolic batch): the error line starts with the model's path, as
    the FAILED row of a build of several cells does, and nothing is written."""
    pytest.importorskip("ai_edge_quantizer", reason="the tflite extra is not installed")
    node = helper.make_node
    nodes = [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["n"], axis=0), node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             node("Reshape", ["nf", "one"], ["update"]), node("ScatterND", ["base", "index", "update"], ["bias"], name="scatter"),
             node("Add", ["x", "bias"], ["y"])]
    constants = {"zero": np.array(0, np.int64), "one": np.array([1], np.int64), "base": np.zeros((1, 3), np.float32), "index": np.array([[0, 2]], np.int64)}
    graph = helper.make_graph(nodes, "scatter", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "scatter.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32))
    result = run_cli("build", "-m", tmp_path / "scatter.onnx", "--targets", "tflite", "--precisions", "fp32",
                     "--eval-data", tmp_path / "d.npz", "-o", tmp_path / "out")
    assert result.code == 2
    assert result.error_line.startswith(f"enginekit: error: {tmp_path / 'scatter.onnx'}: node scatter (ScatterND)"), result.error_line
    assert_nothing_written(tmp_path / "out")


def _branching_model(path) -> None:
    """x -> Conv -> If(mean > 0: Conv with w_a, else Conv with w_b) -> y: each branch reads its
    weight from the main graph's initializers (as torch.cond exports)."""
    rng = np.random.default_rng(2)
    weights = {name: rng.standard_normal(shape).astype(np.float32) * 0.3 for name, shape in
               (("w_stem", (4, 3, 3, 3)), ("w_a", (2, 4, 1, 1)), ("w_b", (2, 4, 3, 3)))}

    def branch(name: str, weight: str, pads: list[int]) -> onnx.GraphProto:
        conv = helper.make_node("Conv", ["h", weight], [f"{name}_y"], pads=pads)
        return helper.make_graph([conv], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["mean"], keepdims=0), helper.make_node("Greater", ["mean", "threshold"], ["high"]),
             helper.make_node("If", ["high"], ["y"], name="branch", then_branch=branch("then", "w_a", [0, 0, 0, 0]),
                              else_branch=branch("else", "w_b", [1, 1, 1, 1]))]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()] + [numpy_helper.from_array(np.array(0.3, np.float32), "threshold")]
    graph = helper.make_graph(nodes, "branching", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_weights_read_only_inside_an_if_branch_survive_quantization(run_cli, tmp_path):
    """The Q/DQ graph dropped initializers no main-graph node read, the If branches' weights
    among them: ONNX Runtime then refused the INT8 model as invalid ('a.0.weight ... is not
    output of any previous nodes'), blaming the user's file."""
    _branching_model(tmp_path / "branching.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32))
    result = run_cli("build", "-m", tmp_path / "branching.onnx", "--targets", "onnxruntime", "--precisions", "int8", "--input-shape", "x=1x3x8x8",
                     "--calib-data", tmp_path / "d.npz", "--eval-data", tmp_path / "d.npz", "-n", "16", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["accuracy"]["metrics"]["outputs"]["y"]["cosine"] > 0.98


def test_a_boolean_output_is_scored_as_labels_on_every_target(run_cli, tmp_path):
    """A segmentation net ending in a threshold (bool mask) and its arg-max (int64): checking
    whether the FP32 outputs move between samples subtracted booleans, and every cell failed
    with an unexpected TypeError."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Greater", ["c", "zero"], ["mask"]),
             helper.make_node("ArgMax", ["c"], ["classes"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 3, 8, 8]),
                               helper.make_tensor_value_info("classes", TensorProto.INT64, ["batch", 8, 8])],
                              [weight, numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "seg.onnx"))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = run_cli("build", "-m", tmp_path / "seg.onnx", "--targets", "onnxruntime", "--precisions", "fp32,int8", "--no-bench",
                     "--calib-data", tmp_path / "d.npz", "--eval-data", tmp_path / "d.npz", "-n", "16", "-o", tmp_path / "out")
    assert result.code == 0, result.out + result.err
    for cell in ("onnxruntime-fp32", "onnxruntime-int8"):
        outputs = json.loads((tmp_path / "out" / cell / "manifest.json").read_text())["accuracy"]["metrics"]["outputs"]
        assert {outputs[name]["kind"] for name in ("mask", "classes")} == {"labels"}
    assert outputs["mask"]["label_agreement"] > 0.9


def test_an_output_that_vanishes_in_fp32_is_named_as_the_cause_of_a_failed_int8_gate(run_cli, tmp_path):
    """A network whose activations shrink to ~1e-20 (fresh weights of a deep net): its INT8 output
    is 0 on every target, and the failure says the FP32 output is the cause, not a layer; the
    FP32 cell passes and its report row carries the flag."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 1e-20).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["features"])]
    graph = helper.make_graph(nodes, "vanishing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "vanishing.onnx"))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = run_cli("build", "-m", tmp_path / "vanishing.onnx", "--targets", "onnxruntime", "--precisions", "fp32,int8",
                     "--calib-data", tmp_path / "d.npz", "--eval-data", tmp_path / "d.npz", "-n", "16", "-o", tmp_path / "out")
    assert result.code == 1 and "1 of 2 artifact(s) failed: onnxruntime int8" in result.error_line
    assert "the FP32 output 'features' (largest magnitude " in result.out and "vanishes on this data" in result.out
    manifest = json.loads((tmp_path / "out" / "onnxruntime-fp32" / "manifest.json").read_text())
    assert 0 < manifest["vanishing_outputs"]["features"] <= 1e-12
    report = (tmp_path / "out" / "report.md").read_text()
    assert "FP32 output 'features' vanishes on the data" in report
    row = next(line for line in report.splitlines() if "vanishes" in line and line.startswith("|"))
    assert row.count("|") == report.splitlines()[next(i for i, l in enumerate(report.splitlines()) if l.startswith("|"))].count("|")  # no cell split


@pytest.mark.parametrize("batch", [-1, 1], ids=["batch-made-dynamic", "batch-stays-fixed"])
def test_an_old_opset_is_upgraded_and_checked_by_parity(run_cli, tmp_path, batch):
    """A Reshape to a batch of 1 keeps the batch fixed: the upgrade must survive that retreat
    (it was lost, and INT8's per-channel DequantizeLinear then had no 'axis' at opset 11)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([batch, 4 * 8 * 8], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [weight, shape])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    assert run_cli("export", "--model", path, "-o", tmp_path / "out").code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["opset"] == 14 and any("upgraded from opset 11 to 14" in note for note in manifest["notes"])
    assert manifest["parity"]["passed"] and manifest["parity"]["reference"].startswith("onnxruntime")
    assert ("stays fixed" in " ".join(manifest["notes"])) == (batch == 1)
    assert onnx.load(str(tmp_path / "out" / "model.onnx")).opset_import[0].version == 14


def test_a_file_declaring_a_wrong_output_rank_exports_with_the_computed_one(run_cli, tmp_path):
    """ddddocr's CRNNs declare their output [1, seqlen] and compute [seqlen, 1, classes] through a
    Reshape to a shape built from Shape/Gather/Concat. The declared shape, set back on the graph,
    made the export compute [1, seqlen * classes] and fail parity; ONNX's shape inference at
    opset 14 also sees the rank, so the upgrade from 12 failed (at 13 and above the checker
    refuses such a file in one line)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i3"], ["w0"], axis=0),
             helper.make_node("Unsqueeze", ["w0"], ["w"], axes=[0]),
             helper.make_node("Concat", ["w", "one", "minus"], ["shape"], axis=0), helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [numpy_helper.from_array(np.array(3, np.int64), "i3"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus")]
    graph = helper.make_graph(nodes, "crnn_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])], inits)
    path = tmp_path / "declared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7), str(path))
    result = run_cli("export", "--model", path, "-o", tmp_path / "out")
    assert result.code == 0, result.out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["opset"] == 14 and manifest["parity"]["passed"]
    assert len(manifest["outputs"][0]["shape"]) == 3
    assert "the file declares output 'y' of rank 2, but computes rank 3: the computed ranks are kept" in manifest["notes"]


def test_a_token_id_factory_declares_int64_inputs_and_their_range(run_cli, tmp_path, monkeypatch):
    (tmp_path / "textnet.py").write_text(textwrap.dedent("""
        import torch

        class TextNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.embed = torch.nn.Embedding(1000, 16)
                self.proj = torch.nn.Linear(16, 8)

            def forward(self, input_ids, attention_mask):
                hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1).float()
                return self.proj(torch.relu(hidden)).mean(dim=1)

        def build():
            return TextNet().eval()
    """))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tokens.npz", input_ids=rng.integers(0, 1000, (48, 12)), attention_mask=np.ones((48, 12), np.int64))
    shapes = ["--input-shape", "input_ids=batchx12:int64:0..999", "--input-shape", "attention_mask=batchx12:int64:0..1"]
    result = run_cli("build", "-m", "textnet:build", *shapes, "--target", "onnxruntime", "--precision", "int8",
                     "--calib-data", tmp_path / "tokens.npz", "--eval-data", tmp_path / "tokens.npz", "-n", "48", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    inputs = {i["name"]: i for i in manifest["inputs"]}
    assert inputs["input_ids"]["dtype"] == "int64" and inputs["attention_mask"]["dtype"] == "int64"
    from enginekit.core.tensors import TensorSpec, random_feeds

    declared = TensorSpec("input_ids", ("batch", 12), "int64", (0, 999))
    ids = random_feeds([declared], {"batch": 64})["input_ids"]
    assert ids.min() >= 0 and ids.max() <= 999 and ids.dtype == np.int64  # parity and benchmark data stay in the vocabulary
    bad = run_cli("export", "-m", "textnet:build", "--input-shape", "input_ids=batchx12:int64:9..1", "-o", tmp_path / "bad")
    assert bad.code == 2 and "not a value range" in bad.error_line
    # ids past the declared vocabulary: one line naming the file and the range, not a runtime's Gather error
    np.savez(tmp_path / "oov.npz", input_ids=rng.integers(0, 1200, (48, 12)), attention_mask=np.ones((48, 12), np.int64))
    oov = run_cli("build", "-m", "textnet:build", *shapes, "--target", "onnxruntime", "--precision", "int8",
                  "--calib-data", tmp_path / "tokens.npz", "--eval-data", tmp_path / "oov.npz", "-n", "48", "-o", tmp_path / "oov")
    assert oov.code == 2 and str(tmp_path / "oov.npz") in oov.error_line
    assert re.search(r"input 'input_ids' has values \d+\.\.1\d\d\d outside its declared range 0\.\.999$", oov.error_line), oov.error_line


def test_inputs_that_disagree_on_a_shared_symbolic_dim_are_refused_naming_the_file(run_cli, tmp_path):
    """input_ids 32 tokens long, attention_mask 16: ONNX Runtime failed in a Reshape naming no
    input and no file."""
    weight = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["ids", "mask"], ["m"]), helper.make_node("MatMul", ["m", "w"], ["y"])], "pair",
                              [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "sequence", 4]),
                               helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "sequence", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "pair.onnx"))
    np.savez(tmp_path / "d.npz", ids=np.ones((8, 32, 4), np.float32), mask=np.ones((8, 16, 4), np.float32))
    result = run_cli("calibrate", "-m", tmp_path / "pair.onnx", "--data", tmp_path / "d.npz", "-o", tmp_path / "r.json")
    assert result.code == 2 and str(tmp_path / "d.npz") in result.error_line
    assert "inputs 'ids' and 'mask' disagree on their 'sequence' dim (32 and 16)" in result.error_line


def test_a_keras_application_with_a_normalization_layer_exports_and_builds(run_cli, tmp_path, monkeypatch):
    keras = pytest.importorskip("keras", reason="the keras extra is not installed")
    (tmp_path / "apps.py").write_text(textwrap.dedent("""
        def effnet():
            import keras
            keras.utils.set_random_seed(0)
            return keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    """))
    monkeypatch.chdir(tmp_path)
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    assert any(layer.__class__.__name__ == "Normalization" for layer in model.layers)
    exported = run_cli("export", "-m", "apps:effnet", "-o", tmp_path / "onnx")
    assert exported.code == 0, exported.err
    name = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["inputs"][0]["name"]
    np.savez(tmp_path / "pixels.npz", **{name: np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)})
    built = run_cli("build", "-m", tmp_path / "onnx", "--target", "onnxruntime", "--precision", "fp32",
                    "--eval-data", tmp_path / "pixels.npz", "-o", tmp_path / "ort")
    assert built.code == 0, built.err


def test_data_whose_batch_is_not_on_axis_0_and_a_scalar_input(run_cli, tmp_path):
    """A recurrent model: state [2, batch, 8] and a scalar gain that every batch gets."""
    nodes = [helper.make_node("Mul", ["x", "gain"], ["scaled"]), helper.make_node("ReduceMean", ["scaled"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Unsqueeze", ["m", "zero"], ["m3"]), helper.make_node("Add", ["state", "m3"], ["state_out"]),
             helper.make_node("Relu", ["scaled"], ["y"])]
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                                             helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8]),
                                             helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
                               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 8])],
                              [numpy_helper.from_array(np.array([0], np.int64), "zero")])
    path = tmp_path / "rnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((20, 8)).astype(np.float32),
             state=rng.standard_normal((2, 20, 8)).astype(np.float32), gain=np.array(2.0, np.float32))
    result = run_cli("build", "-m", path, "--target", "onnxruntime", "--precision", "fp32", "--eval-data", tmp_path / "d.npz", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "out" / "manifest.json").read_text())["accuracy"]["metrics"]
    assert metrics["samples"] == 20 and metrics["outputs"]["state_out"]["samples"] == 20 and metrics["outputs"]["state_out"]["cosine"] > 0.9999


def _dynamic_detector(path):
    """A fully convolutional map model with dynamic height and width."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((1, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["map"])]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "height", "width"])],
                              [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["n", 1, "height", "width"])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_dynamic_spatial_dims_are_measured_at_the_datas_shape_and_compare_refuses_other_shapes(run_cli, tmp_path):
    _dynamic_detector(tmp_path / "det.onnx")
    reports = {}
    for size in (48, 64):
        data = tmp_path / f"d{size}.npz"
        np.savez(data, x=np.random.default_rng(size).random((16, 3, size, size), dtype=np.float32))
        out = tmp_path / f"out{size}"
        result = run_cli("build", "-m", tmp_path / "det.onnx", "--targets", "onnxruntime", "--precisions", "fp32,int8",
                         "--calib-data", data, "--eval-data", data, "-n", "16", "-o", out)
        assert result.code == 0, result.err
        manifest = json.loads((out / "onnxruntime-fp32" / "manifest.json").read_text())
        assert manifest["inputs"][0]["shape"] == ["batch", 3, "height", "width"]  # the leading dim is called "batch"
        assert manifest["data_shapes"] == {"x": [1, 3, size, size]}
        assert manifest["accuracy"]["metrics"]["outputs"]["map"]["kind"] == "dense"
        report = json.loads((out / "report.json").read_text())
        for entry in report["artifacts"]:
            assert entry["latency_shapes"] == {"x": [1, 3, size, size]}
            assert all(s["shapes"]["x"][2:] == [size, size] for s in entry["throughput"])
        assert f"x 1x3x{size}x{size}" in (out / "report.md").read_text()
        reports[size] = out / "report.json"
    compared = run_cli("compare", reports[48], reports[64])
    assert compared.code == 1 and "not compared: measured at other input shapes" in compared.out


def test_an_input_declared_to_take_one_value_folds_the_branch_on_it(tmp_path):
    """silero-vad's shape: the compute sits in an If on the sample rate. Declared as one value,
    the branch folds, the Conv comes out where quantization sees it, and the input is still fed."""
    import enginekit as ek
    from enginekit.core.loaders import load_onnx
    from enginekit.quantization.placement import plan_quantization

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((2, 1, 3)).astype(np.float32), "w")

    def branch(name: str, op: str) -> onnx.GraphProto:
        inputs, attributes = (["x", "w"], {"pads": [1, 1]}) if op == "Conv" else (["x"], {})
        return helper.make_graph([helper.make_node(op, inputs, [f"{name}_y"], **attributes)], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["batch", "c", 16])])

    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=branch("then", "Conv"), else_branch=branch("else", "Relu"))]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 16]),
                                             helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "c", 16])],
                              [weight, numpy_helper.from_array(np.array(16000, np.int64), "rate")])
    path = tmp_path / "vad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    manifest = ek.export(str(path), tmp_path / "out", input_shapes=["sr=scalar:int64:16000..16000"])
    exported = load_onnx(tmp_path / "out" / "model.onnx")
    assert "If" not in {n.op_type for n in exported.graph.node} and [i.name for i in exported.graph.input] == ["x", "sr"]
    assert plan_quantization(exported).weights  # the Conv is in the main graph now
    assert any("declared to take only the value 16000" in note for note in manifest["notes"])
    assert manifest["parity"]["cosine"] > 0.99999


def test_a_branch_nested_in_a_folded_branch_folds_on_the_shapes_it_reads(tmp_path):
    """silero-vad 5 (faster-whisper's copy): inside the branch taken on the sample rate, the audio
    is padded (torch's F.pad: pads computed from constants) and convolved, then `if
    conv_out.shape[-1] == 1: squeeze`. That condition is known only once shapes are inferred on
    the inlined branch; it folds too, so no If is left for TFLite to refuse (fails without the
    second preparation pass)."""
    import enginekit as ek
    from enginekit.core.loaders import load_onnx

    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal((2, 1, 24)).astype(np.float32), "w"),
                    *(numpy_helper.from_array(np.array(value, np.int64), name)
                      for name, value in (("rate", 16000), ("last", [2]), ("one", [1]), ("flat", [-1])))]

    def graph(name: str, nodes: list[onnx.NodeProto], output: str, dims: list) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, dims)])

    def constant(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))

    squeeze = helper.make_node("If", ["single"], ["inner_y"], name="squeeze_if",
                               then_branch=graph("squeezed", [helper.make_node("Squeeze", ["c", "last"], ["sq"])], "sq", ["batch", 2]),
                               else_branch=graph("kept", [helper.make_node("ReduceMax", ["c", "last"], ["mx"], keepdims=0)], "mx", ["batch", 2]))
    pads = [constant("torch_pad", [0, 8]), constant("rest", [4]), helper.make_node("ConstantOfShape", ["rest"], ["zeros"],
                                                                                   value=numpy_helper.from_array(np.array([0], np.int64))),
            helper.make_node("Concat", ["torch_pad", "zeros"], ["pads6"], axis=0), constant("pairs", [-1, 2]),
            helper.make_node("Reshape", ["pads6", "pairs"], ["by_dim"]), constant("start", [-1]), constant("end", [-(2 ** 62)]),
            constant("axis0", [0]), constant("back", [-1]), helper.make_node("Slice", ["by_dim", "start", "end", "axis0", "back"], ["reversed"]),
            helper.make_node("Transpose", ["reversed"], ["begin_end"], perm=[1, 0]), helper.make_node("Reshape", ["begin_end", "flat"], ["onnx_pads"]),
            helper.make_node("Pad", ["x", "onnx_pads"], ["padded"], mode="reflect")]  # torch.nn.functional.pad as PyTorch exports it
    taken = graph("then", [*pads, helper.make_node("Conv", ["padded", "w"], ["c"]), helper.make_node("Shape", ["c"], ["shape"]),
                           helper.make_node("Gather", ["shape", "last"], ["steps"], axis=0), helper.make_node("Equal", ["steps", "one"], ["single"]), squeeze],
                  "inner_y", ["batch", 2])
    other = graph("else", [helper.make_node("ReduceMean", ["x", "last"], ["m"], keepdims=0), helper.make_node("Concat", ["m", "m"], ["mm"], axis=1)],
                  "mm", ["batch", 2])
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"]), helper.make_node("If", ["is16k"], ["y"], then_branch=taken, else_branch=other)]
    main = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 16]),
                                            helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], initializers)
    path = tmp_path / "vad5.onnx"
    onnx.save(helper.make_model(main, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    manifest = ek.export(str(path), tmp_path / "out", input_shapes=["sr=scalar:int64:16000..16000"])
    ops = {n.op_type for n in load_onnx(tmp_path / "out" / "model.onnx").graph.node}
    assert "If" not in ops and "Conv" in ops
    assert manifest["parity"]["cosine"] > 0.99999


def _tabular_classifier(path, zipmap: bool = False) -> None:
    """A scikit-learn pipeline as skl2onnx converts it: ColumnTransformer's column pick and the
    label lookup as ai.onnx.ml ArrayFeatureExtractor (2-D and 1-D data), StandardScaler as Scaler,
    a linear layer and softmax; with `zipmap` the probabilities leave as ZipMap's list of maps."""
    rng = np.random.default_rng(0)
    ml = {"domain": "ai.onnx.ml"}
    constants = [numpy_helper.from_array(np.array([0, 2, 4, 5], np.int64), "columns"), numpy_helper.from_array(np.array([3, 7, 9], np.int64), "classes"),
                 numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"), numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                 numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")]
    nodes = [helper.make_node("ArrayFeatureExtractor", ["X", "columns"], ["picked"], name="pick", **ml),
             helper.make_node("Scaler", ["picked"], ["scaled"], name="scaler", offset=[1.0, -2.0, 0.5, 3.0], scale=[0.5, 2.0, 10.0, 0.1], **ml),
             helper.make_node("MatMul", ["scaled", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1), helper.make_node("ArgMax", ["probabilities"], ["best"], axis=1),
             helper.make_node("ArrayFeatureExtractor", ["classes", "best"], ["looked_up"], name="label_of", **ml),
             helper.make_node("Reshape", ["looked_up", "flat"], ["label"])]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])]
    if zipmap:
        nodes.append(helper.make_node("ZipMap", ["probabilities"], ["output_probability"], classlabels_int64s=[3, 7, 9], **ml))
        maps = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
        outputs.append(helper.make_value_info("output_probability", maps))
    else:
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]))
    graph = helper.make_graph(nodes, "pipeline", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 6])], outputs, constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]), str(path))


def test_a_scikit_learn_pipelines_ml_ops_become_standard_ops_every_target_reads(run_cli, tmp_path):
    """OpenVINO has no conversion rule for ai.onnx.ml ops and TFLite cannot lower them: the whole
    model was refused there. Rewritten exactly (Cast/Sub/Mul, Gather), it builds; the label output
    equals the original file's as ONNX Runtime runs it."""
    import onnxruntime as ort

    import enginekit as ek
    from enginekit.core.loaders import load_onnx

    _tabular_classifier(tmp_path / "pipeline.onnx")
    manifest = ek.export(str(tmp_path / "pipeline.onnx"), tmp_path / "out")
    exported = load_onnx(tmp_path / "out" / "model.onnx")
    assert not [n.op_type for n in exported.graph.node if n.domain == "ai.onnx.ml"]
    assert any("ArrayFeatureExtractor, Scaler rewritten" in note for note in manifest["notes"])
    features = np.random.default_rng(1).normal(0, 3, (64, 6)).astype(np.float32)
    original = ort.InferenceSession(str(tmp_path / "pipeline.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": features})
    rewritten = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": features})
    np.testing.assert_array_equal(original[0], rewritten[0])
    np.testing.assert_allclose(original[1], rewritten[1], rtol=1e-6, atol=1e-7)
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("the openvino extra is not installed: the rewrite is checked on ONNX Runtime only")
    np.savez(tmp_path / "d.npz", X=features)
    result = run_cli("build", "-m", tmp_path / "pipeline.onnx", "--targets", "openvino", "--calib-data", tmp_path / "d.npz",
                     "--eval-data", tmp_path / "d.npz", "-o", tmp_path / "ov")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "ov" / "manifest.json").read_text())["accuracy"]["metrics"]["outputs"]["label"]["label_agreement"] == 1.0


def test_a_zipmap_output_is_refused_naming_the_converter_option(run_cli, tmp_path):
    _tabular_classifier(tmp_path / "zipped.onnx", zipmap=True)
    result = run_cli("build", "-m", tmp_path / "zipped.onnx", "--targets", "onnxruntime", "-o", tmp_path / "out")
    assert result.code == 2 and "zipped.onnx" in result.error_line and "ZipMap" in result.error_line
    assert "'zipmap': False" in result.error_line and "Traceback" not in result.err
    assert_nothing_written(tmp_path / "out")


def test_a_factory_whose_checkpoint_changed_is_exported_again_not_served_from_the_cache(tmp_path, monkeypatch):
    """The factory's file is the same; the checkpoint it loads is not. The cached export of the
    old weights must not stand in for the new model (found by a new user retraining)."""
    pytest.importorskip("torch", reason="PyTorch factories need torch")
    from enginekit.exporter.reference import SourceOptions, load_fp32
    from enginekit.onnx.session import Session

    (tmp_path / "ckptnet.py").write_text(textwrap.dedent("""
        import pathlib
        import torch

        def build():
            torch.manual_seed(int((pathlib.Path(__file__).parent / "seed.txt").read_text()))
            return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ENGINEKIT_CACHE", str(tmp_path / "cache"))
    source = SourceOptions(input_shapes=("input=batchx8",))
    x = {"input": np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)}
    outputs = []
    for seed in ("0", "1", "0"):
        (tmp_path / "seed.txt").write_text(seed)
        fp32 = load_fp32("ckptnet:build", source)
        outputs.append((fp32.path, next(iter(Session(fp32.path).run(x).values()))))
    assert outputs[0][0] != outputs[1][0] and not np.allclose(outputs[0][1], outputs[1][1])
    assert outputs[2][0] == outputs[0][0] and np.array_equal(outputs[2][1], outputs[0][1])  # the first export, reused


def _one_conv_build(run_cli, tmp_path, weight_scale: float):
    """A 3->4 Conv whose weights are `weight_scale` times N(0, 1) and whose biases are large,
    built for ONNX Runtime INT8 from 8 samples (calibration = evaluation data, -n 32)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((weight_scale * rng.normal(0, 1, (4, 3, 3, 3))).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.array([0.5, -1.0, 2.0, 0.7], np.float32), "b")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "dead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], [weight, bias])
    path = tmp_path / "dead.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "x.npz", x=rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32))
    result = run_cli("build", "-m", path, "--target", "onnxruntime", "--precision", "int8", "--calib-data", tmp_path / "x.npz",
                     "--eval-data", tmp_path / "x.npz", "-n", "32", "--no-bench", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.startswith("enginekit: warning: ")]
    return result, warnings, json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_a_build_says_when_an_fp32_output_is_constant_and_when_the_calibration_data_is_short(run_cli, tmp_path):
    """A new user's MobileViT (fresh weights) output exact zeros: every INT8 cell 'passed' at
    cosine 1.0000 and only the benchmark report's flags said why that means nothing. And the
    calibration's 'asked for 256 samples but ... has 8' was printed by calibrate, never by build."""
    result, warnings, manifest = _one_conv_build(run_cli, tmp_path, 0.0)
    assert any("FP32 output 'y' is the same for every evaluation sample" in line for line in warnings), result.err
    assert manifest["constant_outputs"] == ["y"] and "nearly_constant_outputs" not in manifest  # said once, not twice
    assert any("asked for 32 samples" in line for line in warnings), result.err
    # the same file for both: not held-out samples, and the build says so (it printed "held-out")
    assert any("the evaluation data is the calibration data" in line for line in warnings), result.err
    assert "on 8 samples of the calibration data" in result.out and "held-out" not in result.out
    assert manifest["accuracy"]["held_out"] is False


@pytest.mark.parametrize("weight_scale", [1e-7, 1.0])
def test_a_build_says_when_an_fp32_output_barely_changes_between_samples(run_cli, tmp_path, weight_scale):
    """Untrained Keras EfficientNetB0: softmax 0.001 +- 1e-9, top-1 decided by float noise, and the
    INT8 cells failed or passed on it with nothing said. Outputs that move with the input are not flagged."""
    result, warnings, manifest = _one_conv_build(run_cli, tmp_path, weight_scale)
    flagged = [line for line in warnings if "FP32 output 'y' barely changes between evaluation samples" in line]
    assert bool(flagged) == (weight_scale < 1e-3), result.err
    assert ("nearly_constant_outputs" in manifest) == (weight_scale < 1e-3)
    if flagged:
        from enginekit.benchmark.report import flags

        assert 0 < manifest["nearly_constant_outputs"]["y"] < 1e-5
        entry = {"precision": "int8", "nearly_constant_outputs": manifest["nearly_constant_outputs"]}
        assert any(text.startswith("FP32 output 'y' barely changes on the data") for text in flags(entry, None))


def test_a_factory_returning_a_dict_exports_its_values_named_by_their_keys(run_cli, tmp_path, monkeypatch):
    """A module returning {"logits": ..., "probs": ...} ended in "'dict' object has no attribute
    'detach'" after the export itself had worked (a new user's GPT-2 wrapper). A key holding a
    tuple names its tensors KEY_0, KEY_1 (one such key made every output output_N, and logits were
    then scored as a generic tensor, without their top-1 gate)."""
    pytest.importorskip("torch", reason="PyTorch factories need torch")
    (tmp_path / "dictnet.py").write_text(textwrap.dedent("""
        import torch

        class Net(torch.nn.Linear):
            def forward(self, x):
                logits = super().forward(x)
                return {"logits": logits, "probs": torch.softmax(logits, -1), "aux": (logits * 2, logits + 1)}

        def build():
            torch.manual_seed(0)
            return Net(8, 5).eval()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGINEKIT_CACHE", str(tmp_path / "cache"))
    result = run_cli("export", "-m", "dictnet:build", "--input-shape", "x=batchx8", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "probs", "aux_0", "aux_1"]
    assert manifest["parity"]["passed"]  # each ONNX output checked against the dict value of its name
    from enginekit.onnx.session import Session

    outputs = Session(tmp_path / "out" / "model.onnx").run({"x": np.ones((2, 8), np.float32)})
    np.testing.assert_allclose(outputs["probs"].sum(axis=1), 1.0, rtol=1e-5)


def test_a_recurrent_layer_left_float_counts_against_the_integer_share(run_cli, tmp_path):
    """A GRU classifier's INT8 artifacts quantize only the head: ONNX Runtime and OpenVINO both
    reported integer_share 1.0 because a GRU was not counted as a compute op (a new user's
    GRU/LSTM models). Now the share is 1 of 2 compute ops and the GRU is named as float."""
    rng = np.random.default_rng(0)
    hidden, features = 8, 6
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name) for name, shape in
             (("W", (1, 3 * hidden, features)), ("R", (1, 3 * hidden, hidden)), ("B", (1, 6 * hidden)), ("head", (hidden, 4)))]
    inits.append(numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat"))
    nodes = [helper.make_node("GRU", ["x", "W", "R", "B"], ["", "h"], name="gru", hidden_size=hidden),
             helper.make_node("Reshape", ["h", "flat"], ["hf"], name="flatten"), helper.make_node("MatMul", ["hf", "head"], ["y"], name="classify")]
    graph = helper.make_graph(nodes, "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, "batch", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    path = tmp_path / "gru.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    for name in ("calibration", "evaluation"):
        np.savez(tmp_path / f"{name}.npz", x=rng.normal(0, 1, (10, 32, features)).astype(np.float32))
    targets = "onnxruntime,openvino" if _has("openvino") else "onnxruntime"
    result = run_cli("build", "-m", path, "--targets", targets, "--precisions", "int8", "--calib-data", tmp_path / "calibration.npz",
                     "--eval-data", tmp_path / "evaluation.npz", "--min-accuracy", "none", "--no-bench", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    ort = json.loads((tmp_path / "out" / "onnxruntime-int8" / "manifest.json").read_text())
    assert ort["integer_ops"]["compute_ops"] == 2 and ort["integer_ops"]["integer_share"] == 0.5
    assert ort["integer_ops"]["optimized_op_types"]["GRU"] == 1 and ort["integer_ops"]["float_compute_ops"] == 1
    if _has("openvino"):
        executed = json.loads((tmp_path / "out" / "openvino-int8" / "manifest.json").read_text())["openvino"]["executed"]
        assert executed["compute_layers"] == 2 and executed["integer_share"] == 0.5


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_symbolic_dim_the_model_needs_larger_is_traced_at_the_size_declared_with_it(run_cli, tmp_path, monkeypatch):
    """A raw-audio model (wav2vec2's feature convolutions) cannot be traced at 16 samples, the size
    every symbolic dim but the batch was traced at: `samples@400` keeps the dim dynamic and traces
    (and checks parity) at 400; without it the failure says how."""
    pytest.importorskip("torch", reason="PyTorch factories need torch")
    (tmp_path / "audionet.py").write_text(textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv1d(1, 4, 10, stride=5), torch.nn.GELU(), torch.nn.Conv1d(4, 4, 10, stride=5),
                                       torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten()).eval()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGINEKIT_CACHE", str(tmp_path / "cache"))
    short = run_cli("export", "-m", "audionet:build", "--input-shape", "audio=batchx1xsamples", "-o", tmp_path / "short")
    assert short.code == 2 and "traced at audio [2, 1, 16]" in short.error_line and "samples@16000" in short.error_line
    result = run_cli("export", "-m", "audionet:build", "--input-shape", "audio=batchx1xsamples@400", "-o", tmp_path / "long")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "long" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == ["batch", 1, "samples"] and manifest["parity"]["passed"]
    from enginekit.onnx.session import Session

    for length in (400, 1000):  # dynamic: any length the convolutions can take
        out = Session(tmp_path / "long" / "model.onnx").run({"audio": np.ones((2, 1, length), np.float32)})
        assert next(iter(out.values())).shape == (2, 4)
    bad = run_cli("export", "-m", "audionet:build", "--input-shape", "audio=batchx1xsamples@0", "-o", tmp_path / "bad")
    assert bad.code == 2 and "NAME@SIZE" in bad.error_line


def test_a_model_fixed_at_batch_4_builds_tflite_int8(run_cli, tmp_path, monkeypatch):
    """Declared `x=4x8`, the model takes 4 samples at a time: TFLite's range matching asked the
    calibration data for 2 samples and ONNX Runtime refused them ("Got: 2 Expected: 4"), while
    ONNX Runtime's and OpenVINO's INT8 cells built. The data stream now gives whole batches."""
    pytest.importorskip("torch", reason="PyTorch factories need torch")
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")
    (tmp_path / "fixednet.py").write_text(textwrap.dedent("""
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 5)

            def forward(self, x):
                return self.b(torch.relu(self.a(x)))

        def build():
            torch.manual_seed(0)
            return Net().eval()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGINEKIT_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(0, 1, (64, 8)).astype(np.float32))
    result = run_cli("build", "-m", "fixednet:build", "--input-shape", "x=4x8", "--calib-data", tmp_path / "d.npz",
                     "--eval-data", tmp_path / "d.npz", "--targets", "tflite", "--precisions", "int8", "--no-bench", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [4, 8]
    assert manifest["accuracy"]["metrics"]["cosine"] > 0.99
