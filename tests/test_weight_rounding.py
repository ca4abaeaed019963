"""GPTQ weight rounding (quantization/rounding.py): the rows it measures H on are what each layer
multiplies (checked against ONNX Runtime's Conv for strides, pads, dilations, groups and
auto_pad), its integers give a smaller layer-output error than nearest rounding on correlated
inputs while staying on the same grid, and a build records it, shares it across encodings and
honours --weight-rounding nearest."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import enginekit as ek
from enginekit.onnx.session import Session
from enginekit.quantization.placement import QuantPlan, WeightSpec
from enginekit.quantization.rounding import gptq, input_rows, round_layer, roundable_layers
from tests.conftest import weight_integers


def _conv_graph(weight: np.ndarray, **attributes) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attributes)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONVS = [
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]}, 4, 1),
    ({"kernel_shape": [5, 5], "dilations": [2, 2], "pads": [4, 4, 4, 4], "group": 6}, 6, 6),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER", "group": 2}, 4, 2),
    ({"kernel_shape": [2, 2], "strides": [2, 1], "auto_pad": "SAME_LOWER"}, 3, 1),
    ({"kernel_shape": [1, 1]}, 5, 1),
]


@pytest.mark.parametrize("attributes,out_channels,groups", CONVS)
def test_conv_rows_times_the_weight_give_the_conv_output(attributes, out_channels, groups):
    rng = np.random.default_rng(0)
    channels = 6
    kh, kw = attributes["kernel_shape"]
    weight = rng.normal(size=(out_channels, channels // groups, kh, kw)).astype(np.float32)
    model = _conv_graph(weight, **attributes)
    x = rng.normal(size=(2, channels, 9, 11)).astype(np.float32)
    y = Session(model).run({"x": x})["y"]  # (N, O, OH, OW)
    layer = roundable_layers(model, QuantPlan(nodes=["conv"], weights=[WeightSpec("w", "conv", 0)]))[0]
    assert layer.groups == groups
    rows = input_rows(layer, x, list(weight.shape))  # every position: fewer than the per-batch limit
    expected = y.transpose(0, 2, 3, 1).reshape(-1, out_channels)
    per_group = out_channels // groups
    got = np.concatenate([rows[g] @ weight[g * per_group:(g + 1) * per_group].reshape(per_group, -1).T for g in range(groups)], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _correlated_inputs(rows: int, width: int, seed: int) -> np.ndarray:
    """Inputs driven by a few shared factors (as neighbouring pixels and channels are): the same
    loadings for every seed, other samples."""
    loadings = np.random.default_rng(0).normal(size=(4, width))
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, 4)) @ loadings + 0.1 * rng.normal(size=(rows, width))).astype(np.float32)


def test_gptq_lowers_the_layer_output_error_on_the_same_grid():
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.05, size=(16, 64)).astype(np.float32)
    x = _correlated_inputs(4000, 64, seed=2)
    scale = np.abs(weight).max(axis=1) / 127
    values = gptq(weight[None], (x.T @ x)[None].astype(np.float64), scale[None])[0]
    assert np.array_equal(values, np.round(values)) and np.abs(values).max() <= 127
    nearest = np.round(weight / scale[:, None])
    held_out = _correlated_inputs(4000, 64, seed=3)  # judged on other samples than H was made of

    def output_error(integers):
        return np.linalg.norm(held_out @ (weight - integers * scale[:, None]).T)

    assert output_error(values) < 0.5 * output_error(nearest), (output_error(values), output_error(nearest))


def test_each_channel_keeps_its_largest_weight_on_the_grid_end():
    """A target that requantizes the dequantized weights (TFLite: max|w|/127 per channel) finds the
    same scale, hence the same integers."""
    rng = np.random.default_rng(4)
    weight = rng.normal(0, 0.05, size=(32, 24)).astype(np.float32)  # Gemm, transB=1: (out, in)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    graph = helper.make_graph([node], "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph)
    layer = roundable_layers(model, QuantPlan(nodes=["fc"], weights=[WeightSpec("w", "fc", 0)]))[0]
    x = _correlated_inputs(2000, 24, seed=5)
    values = round_layer(layer, weight, (x.T @ x)[None].astype(np.float64))
    assert values.dtype == np.int8 and values.shape == weight.shape
    assert np.all(np.abs(values).max(axis=1) == 127)
    scale = np.abs(weight).max(axis=1, keepdims=True) / 127
    requantized = np.round(values * scale / (np.abs(values * scale).max(axis=1, keepdims=True) / 127))
    assert np.array_equal(requantized, values)


def _smooth_cnn(path) -> None:
    """Two 3x3 convolutions and a linear head on spatially smooth images: neighbouring inputs are
    correlated, which nearest rounding ignores."""
    rng = np.random.default_rng(6)
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="head", transB=1)]
    inits = [const("w1", rng.normal(0, 0.3, (16, 3, 3, 3))), const("b1", rng.normal(0, 0.1, 16)),
             const("w2", rng.normal(0, 0.1, (32, 16, 3, 3))), const("b2", rng.normal(0, 0.1, 32)),
             const("w3", rng.normal(0, 0.2, (10, 32))), const("b3", np.zeros(10))]
    graph = helper.make_graph(nodes, "smooth_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _smooth_images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(count, 3, 4, 4)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3) + 0.01 * rng.normal(size=(count, 3, 16, 16)).astype(np.float32)


def _weights(folder) -> dict[str, np.ndarray]:
    return weight_integers(folder / "model.int8.onnx")


def test_a_build_rounds_with_gptq_by_default_and_nearest_on_request(tmp_path):
    _smooth_cnn(tmp_path / "cnn.onnx")
    np.save(tmp_path / "calib.npy", _smooth_images(64, seed=7))
    np.save(tmp_path / "eval.npy", _smooth_images(128, seed=8))

    def build(name: str, rounding: str):
        return ek.build(str(tmp_path / "cnn.onnx"), "onnxruntime", "int8", tmp_path / name, ek.BuildOptions(
            calib_data=str(tmp_path / "calib.npy"), eval_data=str(tmp_path / "eval.npy"), num_samples=64, min_accuracy="none",
            quantize=ek.QuantizeSettings(weight_rounding=rounding))).manifest

    gptq_manifest, nearest_manifest = build("gptq", "gptq"), build("nearest", "nearest")
    # the head sees one row per sample: 64 rows for 32 columns are too few to trust H, so it keeps nearest
    assert gptq_manifest["quantization"]["weight_rounding"] == {"method": "gptq", "samples": 64, "layers": 2}  # all it was given
    assert nearest_manifest["quantization"]["weight_rounding"] == {"method": "nearest", "layers": 0}
    assert gptq_manifest["build_key"] != nearest_manifest["build_key"]
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "cnn.onnx").graph.initializer}
    nearest, rounded = _weights(tmp_path / "nearest"), _weights(tmp_path / "gptq")
    for weights in (nearest, rounded):  # ONNX Runtime's first Conv has its 3 input channels padded to 4
        weights["w1"] = weights["w1"][:, :fp32["w1"].shape[1]]
    for name in ("w1", "w2", "w3"):
        scale = np.abs(fp32[name]).reshape(len(fp32[name]), -1).max(axis=1) / 127
        assert np.array_equal(nearest[name], np.round(fp32[name] / scale.reshape([-1] + [1] * (fp32[name].ndim - 1))))
        if name == "w3":
            assert np.array_equal(rounded[name], nearest[name])
        else:
            assert np.abs(rounded[name] - nearest[name]).max() <= 4 and not np.array_equal(rounded[name], nearest[name])
    gain = gptq_manifest["accuracy"]["metrics"]["sqnr_db"] - nearest_manifest["accuracy"]["metrics"]["sqnr_db"]
    print(f"output SQNR: gptq {gptq_manifest['accuracy']['metrics']['sqnr_db']:.2f} dB, "
          f"nearest {nearest_manifest['accuracy']['metrics']['sqnr_db']:.2f} dB")
    assert gain > 0.5, gain  # 1.2 dB measured
