"""`--calib-method per-tensor` judges a tensor's range by what its readers make of it, not by the
tensor's own error."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from enginekit.builder.tensor_choice import fake_quantize, reader_errors
from enginekit.calibration.table import CalibrationTable, TensorRange

RNG = np.random.default_rng(5)


def _conv(channel_weights):
    """x (2 channels) -> 1x1 Conv with `channel_weights` -> y."""
    weight = numpy_helper.from_array(np.array(channel_weights, np.float32).reshape(1, 2, 1, 1), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 8, 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), node


def _tables():
    """min-max sized for channel 0's outliers; percentile clipped to the bulk of the values."""
    def table(method, amax):
        return CalibrationTable(method, {}, 16, "", "", "", {"x": TensorRange(-amax, amax, amax, True)})
    return {"minmax": table("minmax", 1000.0), "percentile": table("percentile", 4.0)}


def _batch():
    x = RNG.normal(0, 1, (16, 2, 8, 8)).astype(np.float32)
    x[:, 0, 0, 0] = 1000.0  # one outlier pixel per sample, all in channel 0
    return {"x": x}


def _winner(channel_weights):
    model, node = _conv(channel_weights)
    (tensor, errors), = reader_errors(model, {"x": [node]}, _tables(), ["minmax", "percentile"], ["int8"], _batch(), 1)
    assert tensor == "x"
    return ["minmax", "percentile"][int(np.argmin(errors))], errors


def test_an_outlier_channel_the_reader_all_but_ignores_is_clipped():
    winner, errors = _winner([1e-4, 1.0])
    assert winner == "percentile" and errors[1] < 0.05 < errors[0], errors


def test_an_outlier_channel_the_reader_passes_on_keeps_the_full_range():
    winner, errors = _winner([1.0, 1.0])
    assert winner == "minmax" and errors[0] < errors[1], errors


def test_fake_quantize_rounds_to_the_encodings_grid_and_saturates():
    rng = TensorRange(-2.54, 2.54, 2.54, True)  # int8 step 0.02
    got = fake_quantize(np.array([0.011, -0.029, 9.0], np.float32), "t", rng, "int8")
    np.testing.assert_allclose(got, [0.02, -0.02, 2.54], rtol=1e-6)


def test_build_with_calib_method_per_tensor_clips_what_the_reader_ignores(tmp_path):
    """End to end: one calibration pixel of 32768 is a spike of 1000 in channel 0, which the Conv
    weighs by 1e-4. Min-max sizes the input's grid for the spike (every other value a few levels);
    the per-tensor choice judges by the Conv's output, takes a range that clips it, and INT8 agrees
    better with FP32 on held-out data without spikes."""
    import enginekit as ek

    model, _ = _conv([1e-4, 1.0])
    onnx.save(model, tmp_path / "conv.onnx")
    calibration = RNG.normal(0, 1, (256, 2, 8, 8)).astype(np.float32)
    calibration[0, 0, 0, 0] = 1000.0
    np.savez(tmp_path / "calibration.npz", x=calibration)
    np.savez(tmp_path / "evaluation.npz", x=RNG.normal(0, 1, (64, 2, 8, 8)).astype(np.float32))

    def build(method: str) -> dict:
        options = ek.BuildOptions(calib_data=str(tmp_path / "calibration.npz"), eval_data=str(tmp_path / "evaluation.npz"),
                                  num_samples=256, calib_method=method, min_accuracy="none", output_kinds={"y": "embedding"},
                                  quantize=ek.QuantizeSettings(bias_correction=False))
        return ek.build(str(tmp_path / "conv.onnx"), "onnxruntime", "int8", tmp_path / method, options).manifest

    chosen, plain = build("per-tensor"), build("minmax")
    record = chosen["calibration"]
    assert record["method"] == "per-tensor" and "auto" not in record["parameters"]
    assert record["parameters"]["per-tensor"]["minmax"] == 0 and sum(record["parameters"]["per-tensor"].values()) == 1  # x, won by a clipping method
    assert chosen["accuracy"]["metrics"]["cosine"] > plain["accuracy"]["metrics"]["cosine"] + 0.01
