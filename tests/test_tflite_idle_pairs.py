"""Data movement that only carries a QUANTIZE's values to DEQUANTIZEs (left behind by the choices
that keep ops float) runs float in the int8 flatbuffer instead (float_layers.dequantized_only)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tensorflow", reason="the tflite extra (tensorflow-cpu) is not installed")
pytest.importorskip("ai_edge_litert", reason="the tflite extra (ai-edge-litert) is not installed")
pytest.importorskip("ai_edge_quantizer", reason="the tflite extra (ai-edge-quantizer) is not installed")

from enginekit.builder import BuildOptions, build  # noqa: E402
from enginekit.quantization.pipeline import QuantizeSettings  # noqa: E402
from enginekit.targets.tflite.convert import op_types  # noqa: E402
from enginekit.targets.tflite.float_layers import dequantized_only  # noqa: E402
from enginekit.targets.tflite.runner import MODEL_FILE  # noqa: E402


def _pooled_net(folder):
    """NCHW input (the lowering transposes it first), conv -> relu -> max-pool -> conv -> relu,
    pooled, a Gemm head."""
    rng = np.random.default_rng(5)
    constants = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.2, (16, 8, 3, 3)),
                 "b2": rng.normal(0, 0.1, 16), "wg": rng.normal(0, 0.3, (16, 4)), "bg": rng.normal(0, 0.1, 4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="first"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["m1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["m1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="second"), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "pooled.onnx"))
    np.savez(folder / "d.npz", x=rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32))


@pytest.mark.parametrize("kept_float, float_until", [(("first",), "CONV_2D"), (("first", "second"), "MEAN")])
def test_movement_between_float_ops_runs_float_without_a_quantize_dequantize_pair(tmp_path, kept_float, float_until):
    """With the first convolution kept float, the input's TRANSPOSE was quantized and dequantized
    straight away (QUANTIZE -> TRANSPOSE -> DEQUANTIZE -> CONV_2D); with both convolutions kept
    float, the MAX_POOL_2D between them too. Now everything up to the first integer op is float,
    with one QUANTIZE in front of it, and the output is at least as close to FP32."""
    _pooled_net(tmp_path)
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none",
                           quantize=QuantizeSettings(exclude_nodes=kept_float))
    result = build(str(tmp_path / "pooled.onnx"), "tflite", "int8", tmp_path / "int8", options)
    model = (result.folder / MODEL_FILE).read_bytes()
    ops = op_types(model)
    first_integer = next(index for index, op in enumerate(ops) if op["outputs"][0] in ("int8", "uint8"))
    assert ops[first_integer]["op"] == "QUANTIZE" and ops[first_integer + 1]["op"] != "DEQUANTIZE"
    assert not any(op["op"] in ("QUANTIZE", "DEQUANTIZE") for op in ops[:first_integer])
    assert [op["op"] for op in ops[:first_integer]][:2] == ["TRANSPOSE", "CONV_2D"] and ops[first_integer - 1]["op"] != "TRANSPOSE"
    assert float_until in [op["op"] for op in ops[first_integer:]]
    assert dequantized_only(model) == [] and result.manifest["tflite"]["float_pass_through"]
    if len(kept_float) == 2:
        assert any(op["op"] == "MAX_POOL_2D" and op["outputs"] == ["float32"] for op in ops)


def test_movement_that_feeds_an_integer_op_stays_integer(tmp_path):
    """Full-integer: the input's QUANTIZE -> TRANSPOSE feeds an int8 convolution; nothing moves."""
    _pooled_net(tmp_path)
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none")
    result = build(str(tmp_path / "pooled.onnx"), "tflite", "int8", tmp_path / "int8", options)
    ops = op_types((result.folder / MODEL_FILE).read_bytes())
    assert [(op["op"], op["outputs"]) for op in ops[:3]] == [("QUANTIZE", ["int8"]), ("TRANSPOSE", ["int8"]), ("CONV_2D", ["int8"])]
    assert "float_pass_through" not in result.manifest["tflite"]


def test_a_requantization_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """Moving the pairs is an improvement, never a reason for a build to fail: a quantizer that
    refuses the float TRANSPOSE leaves the flatbuffer the earlier choices made."""
    from enginekit.targets.tflite import convert

    quantize, refused = convert.quantize_int8, []

    def refusing(float_model, ranges, io_type, tensors, *rest):
        if "transpose" in tensors:
            refused.append(list(tensors))
            raise RuntimeError("refused")
        return quantize(float_model, ranges, io_type, tensors, *rest)

    monkeypatch.setattr(convert, "quantize_int8", refusing)
    _pooled_net(tmp_path)
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none",
                           quantize=QuantizeSettings(exclude_nodes=("first",)))
    result = build(str(tmp_path / "pooled.onnx"), "tflite", "int8", tmp_path / "int8", options)
    ops = op_types((result.folder / MODEL_FILE).read_bytes())
    assert refused and "float_pass_through" not in result.manifest["tflite"]
    assert [op["op"] for op in ops[:3]] == ["QUANTIZE", "TRANSPOSE", "DEQUANTIZE"]  # as the earlier choices left it
