"""GPTAQ-style weight rounding (quantization/compensation.py, `--weight-rounding gptaq`): the
least-squares weight undoes an error its inputs carry and leaves exact inputs alone, the pruned
probe it measures with computes what the whole graph does, and a build of a small CNN with it has
a lower output error than GPTQ's on held-out data, on the same weight grid."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import enginekit as ek
from enginekit.onnx.probe import probe, upstream
from enginekit.quantization.compensation import compensated_weight
from enginekit.quantization.rounding import Layer
from tests.conftest import weight_integers
from tests.test_weight_rounding import _correlated_inputs, _smooth_cnn, _smooth_images


def _gemm_layer() -> Layer:
    return Layer(onnx.helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1), "w", 1)


def _moments(x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C = sum x q^T, H~ = sum q q^T), one group."""
    return (x.T @ q)[None].astype(np.float64), (q.T @ q)[None].astype(np.float64)


def test_the_compensated_weight_undoes_a_gain_error_and_keeps_exact_inputs_as_they_are():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, size=(8, 16)).astype(np.float32)  # Gemm transB=1: (out, in)
    x = _correlated_inputs(5000, 16, seed=1)
    same = compensated_weight(_gemm_layer(), weight, *_moments(x, x))
    np.testing.assert_allclose(same, weight, rtol=1e-4, atol=1e-6)
    gain = np.linspace(0.8, 1.2, 16).astype(np.float32)  # each input arrives scaled by its own gain
    moved = compensated_weight(_gemm_layer(), weight, *_moments(x, x * gain))
    held_out = _correlated_inputs(2000, 16, seed=2)
    error = lambda w: np.linalg.norm(held_out @ weight.T - (held_out * gain) @ w.T)  # noqa: E731
    assert error(moved) < 0.1 * error(weight), (error(moved), error(weight))


def test_the_pruned_probe_computes_what_the_whole_graph_does(tmp_path):
    _smooth_cnn(tmp_path / "cnn.onnx")
    model = onnx.load(tmp_path / "cnn.onnx")
    batches = [{"x": _smooth_images(4, seed=3)}]
    pruned = upstream(model, ["r1"])
    assert [n.name for n in pruned.graph.node] == ["conv1", "relu1"]
    assert {t.name for t in pruned.graph.initializer} == {"w1", "b1"} and [o.name for o in pruned.graph.output] == ["r1"]
    whole, part = next(probe(model, ["r1"], batches)), next(probe(model, ["r1"], batches, pruned=True))
    np.testing.assert_array_equal(whole["r1"], part["r1"])


def _coarse_cnn(path) -> None:
    """Three convolutions on smooth images, each channel of the first two with one large tap: a
    coarse weight grid, whose rounding error reaches the next layer as a systematic (input-
    dependent, not random) distortion, which that layer's weights can partly undo."""
    rng = np.random.default_rng(0)
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    w1, w2 = rng.normal(0, 0.3, (16, 3, 3, 3)), rng.normal(0, 0.1, (32, 16, 3, 3))
    w1[:, 0, 0, 0] *= 10
    w2[:, 0, 0, 0] *= 10
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flatten")]
    inits = [const("w1", w1), const("b1", rng.normal(0, 0.1, 16)), const("w2", w2), const("b2", rng.normal(0, 0.1, 32)),
             const("w3", rng.normal(0, 0.2, (10, 32, 1, 1))), const("b3", np.zeros(10))]
    graph = helper.make_graph(nodes, "coarse_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_build_with_gptaq_has_a_lower_output_error_than_gptq_on_the_same_grid(tmp_path):
    _coarse_cnn(tmp_path / "cnn.onnx")
    np.save(tmp_path / "calib.npy", _smooth_images(64, seed=7))
    np.save(tmp_path / "eval.npy", _smooth_images(128, seed=8))

    def build(rounding: str):
        return ek.build(str(tmp_path / "cnn.onnx"), "onnxruntime", "int8", tmp_path / rounding, ek.BuildOptions(
            calib_data=str(tmp_path / "calib.npy"), eval_data=str(tmp_path / "eval.npy"), num_samples=64, min_accuracy="none",
            quantize=ek.QuantizeSettings(weight_rounding=rounding))).manifest

    gptq, gptaq = build("gptq"), build("gptaq")
    assert gptaq["quantization"]["weight_rounding"] == {"method": "gptaq", "samples": 64, "compensated_on": 64, "layers": 3}
    assert gptaq["build_key"] != gptq["build_key"]
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "cnn.onnx").graph.initializer}
    before, after = weight_integers(tmp_path / "gptq" / "model.int8.onnx"), weight_integers(tmp_path / "gptaq" / "model.int8.onnx")
    for name in ("w2", "w3"):  # the first layer's inputs are the images, quantized alike either way
        assert not np.array_equal(before[name], after[name]), name
    for name in ("w1", "w2", "w3"):
        width = fp32[name].shape[1]  # ONNX Runtime pads the first Conv's 3 input channels to 4
        channels = np.abs(after[name][:, :width].reshape(len(after[name]), -1))
        largest = np.abs(fp32[name]).reshape(len(fp32[name]), -1).argmax(axis=1)
        assert np.all(channels[np.arange(len(channels)), largest] == 127)  # each channel's largest weight still ends the grid
    sqnr = {m["quantization"]["weight_rounding"]["method"]: m["accuracy"]["metrics"]["sqnr_db"] for m in (gptq, gptaq)}
    print(f"output SQNR on held-out images: {sqnr}")
    assert sqnr["gptaq"] > sqnr["gptq"] + 0.4, sqnr  # 48.7 -> 49.3 dB measured


def test_gptaq_with_the_automatic_fallback_is_refused_in_one_line_naming_the_flag(tmp_path, run_cli):
    """A float fallback changes the inputs gptaq fitted the later layers to: refused before any work."""
    _coarse_cnn(tmp_path / "cnn.onnx")
    np.save(tmp_path / "calib.npy", _smooth_images(16, seed=7))
    result = run_cli("build", "--model", tmp_path / "cnn.onnx", "--targets", "onnxruntime", "--precisions", "int8",
                     "--calib-data", tmp_path / "calib.npy", "--auto-fallback", "--weight-rounding", "gptaq", "-o", tmp_path / "out")
    assert result.code == 2
    line = result.error_line
    assert "fallback cannot use gptaq" in line and "--weight-rounding" in line, line
    assert not (tmp_path / "out").exists()
