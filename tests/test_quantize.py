"""Calibrate + quantize on the zoo: accuracy against FP32, the integer kernels ONNX Runtime
runs, encodings, determinism, and the accuracy gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from enginekit.core.artifacts import read_manifest
import enginekit as ek
from enginekit.builder import BuildOptions
from enginekit.calibration.pipeline import write_tables
from enginekit.quantization.pipeline import QuantizeSettings
from tests.conftest import assert_nothing_written


@pytest.fixture(scope="module")
def digits_tables(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits-cal")
    paths = ek.calibrate("digits_cnn", None, methods=["minmax", "percentile", "entropy", "mse"], output=folder / "ranges.json").written
    return {path.stem.split(".")[-1]: path for path in paths}


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_digits_int8_accuracy_within_one_point_for_every_method(digits_tables, tmp_path, method):
    manifest = ek.quantize("digits_cnn", digits_tables[method], tmp_path / "q").manifest
    metrics = manifest["accuracy"]["metrics"]
    assert metrics["samples"] == 540  # the whole labelled test split
    assert metrics["accuracy"] >= metrics["fp32_accuracy"] - 0.01
    assert manifest["integer_ops"]["integer_share"] == 1.0


def test_tables_are_byte_identical_for_the_same_inputs(digits_tables, tmp_path):
    run = ek.calibrate("digits_cnn", None, methods=["entropy"])
    again = write_tables(run.tables, tmp_path / "ranges.json")[0]
    assert again.read_bytes() == digits_tables["entropy"].read_bytes()


def test_a_table_from_another_model_is_refused(run_cli, digits_tables, exported, tmp_path):
    folder, _ = exported("efficientnet_lite0")
    result = run_cli("quantize", "-m", folder, "-t", digits_tables["minmax"], "-o", tmp_path / "q")
    assert result.code == 2 and "made for another model" in result.error_line
    assert_nothing_written(tmp_path / "q")


def _quant_params(model: onnx.ModelProto):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            yield inits[node.input[1]], inits[node.input[2]]


def test_tensorrt_encoding_is_symmetric_int8_with_per_channel_weights(digits_tables, tmp_path):
    options = BuildOptions(quantize=QuantizeSettings(encoding="int8"))  # TensorRT's encoding, run by ONNX Runtime here
    manifest = ek.quantize("digits_cnn", digits_tables["entropy"], tmp_path / "q", options=options).manifest
    assert manifest["quantization"]["encoding"] == "int8"
    model = onnx.load(str(tmp_path / "q" / "model.int8.onnx"))
    for scale, zero_point in _quant_params(model):
        assert zero_point.dtype == np.int8 and zero_point == 0 and scale > 0
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == TensorProto.INT8]
    assert weight_dq and all(next(a.i for a in n.attribute if a.name == "axis") in (0, 1) for n in weight_dq)
    assert not any(inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == TensorProto.INT32 for n in model.graph.node if n.op_type == "DequantizeLinear")


def test_onnxruntime_encoding_uses_uint8_activations(digits_tables, tmp_path):
    ek.quantize("digits_cnn", digits_tables["entropy"], tmp_path / "q")
    model = onnx.load(str(tmp_path / "q" / "model.int8.onnx"))
    assert all(zp.dtype == np.uint8 for _, zp in _quant_params(model))


def test_accuracy_gate_failure_exits_1_and_publishes_nothing(run_cli, digits_tables, tmp_path):
    out = tmp_path / "gated"
    result = run_cli("quantize", "-m", "digits_cnn", "-t", digits_tables["minmax"], "--min-accuracy", "cosine>=1.5", "-o", out)
    assert result.code == 1
    assert "accuracy gate failed" in result.error_line and "cosine=" in result.error_line
    # where to start: the tensors that add the most error, with the SQNR they take in and give out
    assert "the layers adding the most error: " in result.error_line and " dB)" in result.error_line
    assert "by effect on the model's output: enginekit sensitivity" in result.error_line  # the local SQNR is not that
    assert_nothing_written(out)


def test_unknown_gate_metric_is_an_input_error(run_cli, digits_tables, tmp_path):
    result = run_cli("quantize", "-m", "digits_cnn", "-t", digits_tables["minmax"], "--min-accuracy", "bleu>=3", "-o", tmp_path / "q")
    assert result.code == 2 and "bleu" in result.error_line


def test_calibrate_cli_all_methods_side_by_side(run_cli, tmp_path):
    result = run_cli("calibrate", "-m", "digits_cnn", "--method", "all", "-n", "64", "-o", tmp_path / "r.json", "--trt-cache", tmp_path / "cache.txt")
    assert result.code == 0, result.err
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert f"{method} amax" in result.out and (tmp_path / f"r.{method}.json").is_file()
    assert (tmp_path / "cache.txt").read_text().startswith("TRT-")


def test_quantize_cli_report_lists_worst_layers_first(run_cli, digits_tables, tmp_path):
    result = run_cli("quantize", "-m", "digits_cnn", "-t", digits_tables["entropy"], "--report", "-o", tmp_path / "q")
    assert result.code == 0, result.err
    rows = __import__("json").loads((tmp_path / "q" / "layers.json").read_text())
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert "SQNR dB" in result.out and "integer kernels" in result.out


@pytest.mark.slow
def test_efficientnet_int8_beats_nncf_and_runs_integer_kernels(tmp_path):
    table = ek.calibrate("efficientnet_lite0", None, methods=["minmax"], num_samples=256, output=tmp_path / "ranges.json").written[0]
    manifest = ek.quantize("efficientnet_lite0", table, tmp_path / "q").manifest
    metrics = manifest["accuracy"]["metrics"]
    assert metrics["samples"] == 256
    assert metrics["top1_agreement"] >= 0.90 and metrics["top5_overlap"] >= 0.90
    ops = manifest["integer_ops"]
    assert ops["compute_ops"] == 50 and ops["integer_compute_ops"] == 50 and ops["float_compute_ops"] == 0
    assert ops["optimized_op_types"]["QLinearConv"] == 49
    assert read_manifest(tmp_path / "q")["quantization"]["bias_correction"]["layers"] == 50


@pytest.mark.slow
def test_minilm_every_matmul_int8_keeps_cosine_0995(tmp_path):
    """SmoothQuant (on by default) lets every MatMul run INT8, the FFN down-projections after GELU
    included (without it they cost the embedding cosine 0.992 with min-max)."""
    run = ek.calibrate("minilm_l6", None, methods=["minmax", "percentile"], num_samples=160, output=tmp_path / "ranges.json")
    minmax = next(p for p in run.written if "minmax" in p.name)
    manifest = ek.quantize("minilm_l6", minmax, tmp_path / "q").manifest
    assert manifest["accuracy"]["metrics"]["cosine"] >= 0.995
    assert manifest["quantization"]["exclude_after"] == []
    assert manifest["quantization"]["smoothquant"]["tensors"] == 24  # per layer: both LayerNorms, the attention context, GELU
    ops = manifest["integer_ops"]
    assert ops["compute_ops"] == ops["integer_compute_ops"] == 48
    differs = [n for n, r in run.tables["minmax"].tensors.items() if r.amax > 1.2 * run.tables["percentile"].tensors[n].amax]
    assert differs, "percentile should clip some transformer activations that min-max keeps"


def test_bias_correction_reaches_matmul_add_layers(tmp_path):
    """A transformer's Linear layers are MatMul + Add of a constant: their bias (the Add's
    constant) is corrected like a Conv's, and the INT8 output's mean shift shrinks (nearest
    rounding: GPTQ leaves this small graph too little shift for the correction to earn its place)."""
    from dataclasses import replace

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import enginekit as ek
    from enginekit.quantization.pipeline import QuantizeSettings

    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (16, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (16, 16)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"), helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12, 16])], inits)
    path = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = tmp_path / "x.npy"
    x = (rng.normal(0.5, 1.0, (128, 12, 16))).astype(np.float32)
    np.save(data, x)
    reference = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    shifts = {}
    for corrected in (True, False):
        options = ek.BuildOptions(calib_data=data, eval_data=data, num_samples=128, min_accuracy="none",
                                  quantize=replace(QuantizeSettings(), bias_correction=corrected, weight_rounding="nearest"))
        result = ek.build(path, "onnxruntime", "int8", tmp_path / f"int8-{corrected}", options)
        with ek.load(result.folder) as runner:
            shifts[corrected] = np.abs((runner.infer({"x": x})["y"] - reference).mean(axis=(0, 1))).mean()
        if corrected:
            assert result.manifest["quantization"]["bias_correction"]["layers"] == 2
            assert result.manifest["quantization"]["bias_correction"]["kept"], result.manifest["quantization"]["bias_correction"]
    assert shifts[True] < 0.5 * shifts[False], shifts


@pytest.mark.parametrize("corrected", [True, False])
def test_layers_sharing_one_bias_constant_get_their_own(tmp_path, corrected):
    """Exporters merge equal constants (a transformer's zero-initialised Linear biases became 2
    initializers for 24 layers of the corpus ViT): correcting one layer's bias must not move the
    others', and each Conv's int32 bias needs its own scale."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import enginekit as ek
    from enginekit.quantization.pipeline import QuantizeSettings

    rng = np.random.default_rng(11)
    zero = numpy_helper.from_array(np.zeros(8, np.float32), "shared_bias")
    inits = [zero, numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "k1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "k2"),
             numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "k1", "shared_bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "k2", "shared_bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Transpose", ["r2"], ["t"], name="to_last", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "shared_bias"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r3"], name="relu3"),
             helper.make_node("MatMul", ["r3", "w2"], ["m2"], name="fc2"), helper.make_node("Add", ["m2", "shared_bias"], ["y"], name="add2")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, 8])], inits)
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = tmp_path / "x.npy"
    x = rng.normal(0.3, 1.0, (64, 3, 8, 8)).astype(np.float32)
    np.save(data, x)
    reference = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    options = ek.BuildOptions(calib_data=data, eval_data=data, num_samples=64, min_accuracy="none",
                              quantize=QuantizeSettings(bias_correction=corrected))
    result = ek.build(path, "onnxruntime", "int8", tmp_path / "int8", options)
    model = onnx.load(str(result.folder / "model.int8.onnx"))
    constants = {t.name for t in model.graph.initializer}
    convs = [node.input[2] for node in model.graph.node if node.op_type == "Conv" and len(node.input) > 2]
    assert len(set(convs)) == len(convs)  # an int32 bias each, on its own input x weight scale
    if corrected:  # each Linear layer's Add has its own corrected constant
        adds = {node.name: next(i for i in node.input if i in constants) for node in model.graph.node if node.op_type == "Add"}
        assert adds["add1"] != adds["add2"]
    with ek.load(result.folder) as runner:
        out = runner.infer({"x": x})["y"]
    cosine = float((out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference))
    assert cosine > 0.99, cosine


@pytest.mark.parametrize("correction_helps", [True, False])
def test_a_bias_correction_is_kept_only_where_it_brings_the_outputs_closer(correction_helps):
    """On some models (PP-OCRv4 rec) the per-channel mean fix moved the outputs further from FP32 on
    the very calibration samples it was fitted on: such a correction is undone, and the manifest
    says so with both figures."""
    from onnx import TensorProto, helper, numpy_helper

    from enginekit.quantization.bias_correction import keep_if_closer, layer_biases
    from enginekit.quantization.qdq import QdqGraph

    rng = np.random.default_rng(3)
    bias = rng.normal(0, 0.5, 8).astype(np.float32)

    def model(conv_bias):  # the weight is named as a Q/DQ graph names a dequantized weight
        inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "k__dq"),
                 numpy_helper.from_array(conv_bias, "b")]
        graph = helper.make_graph([helper.make_node("Conv", ["x", "k__dq", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    rng_state = rng.bit_generator.state
    fp32 = model(bias)
    rng.bit_generator.state = rng_state  # the same weights
    wrong = (bias + 1.0).astype(np.float32)
    qdq = QdqGraph(model(bias if correction_helps else wrong))  # the graph after its correction
    before = {"conv": wrong if correction_helps else bias}  # the biases it had before
    batches = [{"x": rng.normal(size=(4, 3, 6, 6)).astype(np.float32)}]
    record = keep_if_closer(fp32, qdq, before, batches)
    assert record["kept"] is correction_helps and record["checked_on"] == 4
    corrected, uncorrected = record["output_sqnr_db"]["corrected"], record["output_sqnr_db"]["uncorrected"]
    assert (corrected > uncorrected) is correction_helps
    np.testing.assert_array_equal(layer_biases(qdq)["conv"], bias)  # the closer of the two stays


def test_bias_correction_counts_samples_along_each_input_batch_axis():
    """A sequence-first input ([time, batch, features]) is batched on axis 1: the samples the
    correction used, and the first samples kept when the carried activations must be bounded,
    are counted and cut along that axis, not along time."""
    from onnx import TensorProto, helper, numpy_helper

    from enginekit.onnx.session import Session
    from enginekit.quantization.bias_correction import correct_biases
    from enginekit.quantization.qdq import QdqGraph

    rng = np.random.default_rng(5)
    weight = rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    bias = rng.normal(0, 0.5, 8).astype(np.float32)

    def model(linear_weight):  # the weight is named as a Q/DQ graph names a dequantized weight
        inits = [numpy_helper.from_array(linear_weight, "w__dq"), numpy_helper.from_array(bias, "b")]
        nodes = [helper.make_node("MatMul", ["x", "w__dq"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["y"], name="add")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, "batch", 16])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    batches = [{"x": rng.normal(1.0, 1.0, (3, 4, 16)).astype(np.float32)}, {"x": rng.normal(1.0, 1.0, (3, 6, 16)).astype(np.float32)}]
    fp32 = model(weight)
    for max_bytes, used in ((None, 10), (1, 1)):
        qdq = QdqGraph(model(weight + np.float32(0.05)))  # every output shifted: the correction takes the mean shift back
        corrections, samples = correct_biases(fp32, qdq, batches, max_bytes=max_bytes, axes={"x": 1})
        assert samples == used and corrections["fc"] > 0.1
        x = np.concatenate([b["x"] for b in batches], axis=1)[:, :used]  # the samples it measured on
        expected, got = Session(fp32).run({"x": x})["y"], Session(qdq.model).run({"x": x})["y"]
        np.testing.assert_allclose(got.mean(axis=(0, 1)), expected.mean(axis=(0, 1)), atol=1e-4)


def test_a_dead_channels_bias_fits_int32_and_onnx_runtime_runs_it_like_fp32(tmp_path):
    """Channels with ~0 weights and a real bias (a batch norm folded over dead filters): their
    per-channel weight scale was ~1e-11, the int32 bias was clipped at +-2^31 and ONNX Runtime's
    QLinearConv wrapped around adding the products to it. The channel now gets the weight scale
    its bias needs (|bias| / (input scale x 2^24)) and runs as in FP32."""
    from onnx import helper

    from enginekit.quantization.qdq import BIAS_HEADROOM

    rng = np.random.default_rng(5)
    weight = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    weight[1] *= 1e-10
    weight[3] *= 1e-10
    bias = np.array([0.1, -3.0, 0.2, 2.5], np.float32)  # channel 1 is relu'd to 0, channel 3 is a constant 2.5
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"], name="relu")], "dead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "dead.onnx"))
    data = rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=data)
    options = BuildOptions(calib_data=str(tmp_path / "data.npz"), eval_data=str(tmp_path / "data.npz"), num_samples=32, min_accuracy="none",
                           quantize=QuantizeSettings(bias_correction=False))
    ek.build(str(tmp_path / "dead.onnx"), "onnxruntime", "int8", tmp_path / "out", options)
    model = onnx.load(str(tmp_path / "out" / "model.int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    int32_bias = next(v for name, v in inits.items() if v.dtype == np.int32 and name.endswith("__int32"))
    assert np.abs(int32_bias).max() <= BIAS_HEADROOM
    assert np.allclose(int32_bias[[1, 3]] * inits[next(n for n in inits if n.endswith("__int32_scale"))][[1, 3]], bias[[1, 3]], rtol=1e-3)
    runner = ek.load(tmp_path / "out")
    got = runner.infer({"x": data[:4]})["y"]
    assert np.allclose(got[:, 1], 0.0, atol=1e-3) and np.allclose(got[:, 3], 2.5, atol=0.02)  # dead channels as in FP32


def test_a_generator_as_calibration_and_evaluation_data_serves_every_pass_of_the_build(tmp_path):
    """The calibration, bias correction and evaluation each read the data: a generator handed to
    BuildOptions was spent by the first and the INT8 cell failed with "the data set is empty".
    The build from generators is the build from lists, byte for byte."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], [weight])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)

    def batches():
        for start in range(0, 64, 8):
            yield {"x": x[start:start + 8]}

    built = {}
    for kind, data in (("generator", batches), ("list", lambda: list(batches()))):
        options = ek.BuildOptions(calib_data=data(), eval_data=data(), num_samples=64, min_accuracy="cosine>=0.99")
        result = ek.build(path, "onnxruntime", "int8", tmp_path / kind, options)
        built[kind] = (result.folder / "model.int8.onnx").read_bytes()
        assert result.manifest["accuracy"]["metrics"]["samples"] == 64
    assert built["generator"] == built["list"]
