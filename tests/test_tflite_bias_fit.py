"""Every int32 bias of an int8 flatbuffer fits (targets/tflite/bias_fit.py): a Conv whose input is
tiny next to its bias, and a Conv with a dead channel, run on LiteRT like FP32 (ai-edge-quantizer
alone cast their biases to -2^31)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tensorflow", reason="the tflite extra (tensorflow-cpu) is not installed")
pytest.importorskip("ai_edge_litert", reason="the tflite extra (ai-edge-litert) is not installed")
pytest.importorskip("ai_edge_quantizer", reason="the tflite extra (ai-edge-quantizer) is not installed")

from enginekit.calibration.pipeline import calibration_tensors  # noqa: E402
from enginekit.onnx.session import Session  # noqa: E402
from enginekit.targets.tflite.bias_fit import INT32_LIMIT, PRODUCT_BOUND, bias_safe_weight_ranges  # noqa: E402
from enginekit.targets.tflite.convert import convert_function, quantize_int8  # noqa: E402
from enginekit.targets.tflite.lowering import to_tf_function  # noqa: E402
from enginekit.targets.tflite.ranges import map_ranges  # noqa: E402
from enginekit.targets.tflite.runner import TfliteRunner  # noqa: E402
from tests.conftest import minmax_table  # noqa: E402

BIAS = np.array([3.0, -2.0, 0.5, 1.0], np.float32)


def _conv(input_factor: float, dead_channel: int | None) -> onnx.ModelProto:
    """x [1,3,16,16] -> Mul(input_factor) -> Conv(3->4, 3x3, bias BIAS) -> y; the dead channel's
    weights are 1e-12 (a batch-norm folded onto a filter that never fires)."""
    rng = np.random.default_rng(5)
    weight = rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    if dead_channel is not None:
        weight[dead_channel] = 1e-12
    nodes = [helper.make_node("Mul", ["x", "factor"], ["small"], name="scale"),
             helper.make_node("Conv", ["small", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(np.array(input_factor, np.float32), "factor"), numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(BIAS, "b")]
    graph = helper.make_graph(nodes, "bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _int8(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]):
    table = minmax_table(model, calibration_tensors(model, []), feeds)
    float_model = convert_function(to_tf_function(model, "bias.onnx"), "bias.onnx")
    ranges = map_ranges(float_model, model, table, feeds[0], feeds[1:])
    return float_model, ranges.ranges, quantize_int8(float_model, ranges.ranges)


def _int32_bias(model: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The Conv's int32 bias and its per-channel scales, as stored in the flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    bias = next(t for t in interpreter.get_tensor_details() if t["dtype"] == np.int32 and tuple(t["shape"]) == (4,))
    return interpreter.get_tensor(bias["index"]).astype(np.int64), bias["quantization_parameters"]["scales"]


@pytest.mark.parametrize("input_factor, dead_channel", [(1e-6, None), (1.0, 2)], ids=["tiny input", "dead channel"])
def test_a_bias_too_large_for_input_x_weight_scale_still_reaches_the_int8_output(input_factor, dead_channel):
    model = _conv(input_factor, dead_channel)
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    float_model, ranges, int8 = _int8(model, feeds)

    assert len(bias_safe_weight_ranges(float_model, ranges)) == 1  # the one Conv's weight gets per-channel bounds
    values, scales = _int32_bias(int8)
    assert np.abs(values).max() <= INT32_LIMIT - PRODUCT_BOUND * 27  # room for the 3x3x3 products the kernel adds
    np.testing.assert_allclose(values * scales, BIAS, rtol=1e-3)

    expected = Session(model).run(feeds[0])["y"]
    got = TfliteRunner(int8).infer(feeds[0])["y"]
    step = (expected.max() - min(expected.min(), 0.0)) / 255.0
    # within a few output steps everywhere; an overflowed bias (-2^31) pins its channel at the grid's low end
    assert float(np.abs(got - expected).max()) < 4 * step
