"""Cross-layer equalisation (onnx/equalization.py): which convolution pairs it takes (through
homogeneous ops only), that the equalised graph computes the same function with matched ranges,
and that INT8 gets closer to FP32 with it where a channel is tiny in the activation but weighed
heavily by the next layer (the case it exists for); the divisors travel in the table."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import enginekit as ek
from enginekit.calibration.table import CalibrationTable
from enginekit.onnx.equalization import equalizable_pairs, equalization_divisors
from enginekit.onnx.session import Session
from enginekit.onnx.smoothing import apply_smoothing
from enginekit.quantization.pipeline import QuantizeSettings

C1, C2 = 8, 6


def _net(seed: int = 0) -> onnx.ModelProto:
    """x [b,3,16,16] -> conv1 -> PRelu -> MaxPool -> conv2 (1x1) -> Relu -> dw (3x3, group C2)
    -> Clip(0, 6) -> conv4 -> y. conv1's channel 0 is tiny and conv2 reads it with large weights;
    conv4's output is the graph's. Pairs: conv1 -> conv2 (through PRelu, MaxPool), conv2 -> dw
    (through Relu); not dw -> conv4 (a clip is not homogeneous), not conv4 (a graph output)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (C1, 3, 3, 3))
    w1[0] *= 0.01
    w2 = rng.normal(0, 0.3, (C2, C1, 1, 1))
    w2[:, 0] *= 60
    tensors = {"w1": w1, "b1": rng.normal(0, 0.1, C1), "slope": rng.uniform(0.05, 0.3, (C1, 1, 1)),
               "w2": w2, "b2": rng.normal(0, 0.1, C2), "w3": rng.normal(0, 0.5, (C2, 1, 3, 3)), "b3": rng.normal(0, 0.1, C2),
               "w4": rng.normal(0, 0.3, (4, C2, 1, 1)), "b4": np.zeros(4), "lo": np.float32(0), "hi": np.float32(6)}
    node = helper.make_node
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             node("PRelu", ["c1", "slope"], ["p1"], name="prelu"),
             node("MaxPool", ["p1"], ["m1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["m1", "w2", "b2"], ["c2"], name="conv2"),
             node("Relu", ["c2"], ["r2"], name="relu"),
             node("Conv", ["r2", "w3", "b3"], ["c3"], name="dw", group=C2, pads=[1, 1, 1, 1]),
             node("Clip", ["c3", "lo", "hi"], ["k3"], name="clip"),
             node("Conv", ["k3", "w4", "b4"], ["y"], name="conv4")]
    graph = helper.make_graph(nodes, "cle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, 3, 16, 16)).astype(np.float32)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_pairs_are_convolutions_joined_by_homogeneous_ops_only():
    pairs = equalizable_pairs(_net())
    assert sorted(pairs) == ["c1", "c2"]
    assert [n.name for n in pairs["c1"].between] == ["prelu", "pool"] and [n.name for n in pairs["c1"].seconds] == ["conv2"]
    assert [n.name for n in pairs["c2"].between] == ["relu"] and [n.name for n in pairs["c2"].seconds] == ["dw"]


def test_the_equalised_graph_computes_the_same_function_with_matched_ranges():
    model = _net()
    divisors = equalization_divisors(model)
    assert sorted(divisors) == ["c1", "c2"] and all(np.all(d > 0) for d in divisors.values())
    equalized, record = apply_smoothing(model, divisors)
    assert record["equalized_pairs"] == 2 and record["tensors"] == 0
    x = _samples(4, 1)
    before, after = Session(model).run({"x": x})["y"], Session(equalized).run({"x": x})["y"]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    weights = _weights(equalized)
    w1_range = np.abs(weights["w1"]).reshape(C1, -1).max(axis=1)
    w2_range = np.abs(weights["w2"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(w1_range, w2_range, rtol=1e-3)  # matched, at the fixed point of both pairs
    original = _weights(model)
    spread = lambda ranges: ranges.max() / ranges.min()  # noqa: E731
    assert spread(np.abs(original["w2"]).max(axis=(0, 2, 3))) > 10 * spread(w2_range)  # conv2's input channels: far closer
    np.testing.assert_array_equal(weights["w4"], original["w4"])  # behind the clip: untouched
    np.testing.assert_array_equal(weights["slope"], original["slope"])  # PRelu(x / s) == PRelu(x) / s


def test_equalisation_brings_int8_closer_to_fp32_and_its_table_rebuilds_the_same_graph(tmp_path):
    path = tmp_path / "cle.onnx"
    onnx.save(_net(), str(path))
    np.savez(tmp_path / "calib.npz", x=_samples(64, 10))
    np.savez(tmp_path / "eval.npz", x=_samples(64, 11))

    def build(name: str, equalize: bool, **options):
        return ek.build(path, "onnxruntime", "int8", tmp_path / name, ek.BuildOptions(
            calib_data=str(tmp_path / "calib.npz"), eval_data=str(tmp_path / "eval.npz"), num_samples=64, min_accuracy="none",
            quantize=QuantizeSettings(equalize=equalize), **options)).manifest

    plain, equalized = build("plain", False), build("cle", True)
    before, after = plain["accuracy"]["metrics"]["cosine"], equalized["accuracy"]["metrics"]["cosine"]
    print(f"INT8 cosine to FP32 without equalisation {before:.5f}, with {after:.5f}")
    assert 1 - after < (1 - before) / 2, f"cosine {before:.5f} -> {after:.5f}"
    assert "equalization" not in plain["quantization"] and equalized["quantization"]["equalization"] == {"pairs": 2}
    assert "smoothquant" not in equalized["quantization"]  # no token MatMul here: nothing smoothed
    assert plain["build_key"] != equalized["build_key"]
    table = CalibrationTable.load(tmp_path / "cle" / "calibration.json")
    assert sorted(table.smoothing) == ["c1", "c2"] and table.parameters["equalization"] == {"pairs": 2}
    again = build("again", False, table=str(tmp_path / "cle" / "calibration.json"))  # the table carries the divisors
    assert (tmp_path / "again" / "model.int8.onnx").read_bytes() == (tmp_path / "cle" / "model.int8.onnx").read_bytes()
    assert again["quantization"]["equalization"] == {"pairs": 2}


def test_calibrate_equalize_writes_the_divisors_into_the_table(tmp_path, run_cli):
    path = tmp_path / "cle.onnx"
    onnx.save(_net(), str(path))
    np.savez(tmp_path / "calib.npz", x=_samples(16, 10))
    result = run_cli("calibrate", "--model", path, "--data", tmp_path / "calib.npz", "-n", "16", "--equalize", "-o", tmp_path / "t.json")
    assert result.code == 0, result.err
    assert "cross-layer equalisation: 2 convolution pairs rescaled" in result.out
    table = CalibrationTable.load(tmp_path / "t.json")
    assert sorted(table.smoothing) == ["c1", "c2"] and table.parameters["equalization"] == {"pairs": 2}
    np.testing.assert_allclose(table.smoothing["c1"], equalization_divisors(_net())["c1"])


def test_a_keras_source_is_not_equalised_and_the_calibration_says_so(tmp_path):
    import dataclasses

    from enginekit.builder.calibration import calibrate_model
    from enginekit.exporter.reference import load_fp32

    path = tmp_path / "cle.onnx"
    onnx.save(_net(), str(path))
    keras_like = dataclasses.replace(load_fp32(str(path)), keras_file=tmp_path / "model.keras")  # its TFLite comes from Keras
    run = calibrate_model(keras_like, [{"x": _samples(8, 3)}], ["minmax"], num_samples=8, equalize=True)
    assert not run.tables["minmax"].smoothing and run.tables["minmax"].parameters["equalization"] == {"pairs": 0}
    assert any("--equalize was not applied" in warning for warning in run.warnings)
