"""Graph preparation ONNX Runtime's folding leaves undone: a ConvTranspose absorbs the bias Add
and BatchNormalization that follow it (PP-OCRv4 det's head), the output unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from enginekit.onnx.folding import fold_into_conv_transpose
from enginekit.onnx.graph import finalize
from enginekit.onnx.session import Session

RNG = np.random.default_rng(4)


def _head(shared_add: bool = False) -> onnx.ModelProto:
    """x -> ConvTranspose (no bias, stride 2) -> Add(per-channel) -> BatchNormalization -> Relu -> y;
    `shared_add`: the Add's output is also a graph output (then only the chain after it may fold)."""
    channels = 3
    inits = [numpy_helper.from_array(RNG.normal(0, 0.4, (4, channels, 2, 2)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.normal(0, 0.3, (1, channels, 1, 1)).astype(np.float32), "add_bias"),
             numpy_helper.from_array(RNG.uniform(0.5, 1.5, channels).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.normal(0, 0.2, channels).astype(np.float32), "beta"),
             numpy_helper.from_array(RNG.normal(0, 0.2, channels).astype(np.float32), "mean"),
             numpy_helper.from_array(RNG.uniform(0.5, 2.0, channels).astype(np.float32), "var")]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="deconv", strides=[2, 2]),
             helper.make_node("Add", ["t", "add_bias"], ["a"], name="bias"),
             helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["n"], name="bn", epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_add:
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_bias_add_and_batch_norm_fold_into_the_conv_transpose():
    model = _head()
    x = RNG.normal(0, 1, (2, 4, 8, 8)).astype(np.float32)
    expected = Session(model).run({"x": x})["y"]
    folded = fold_into_conv_transpose(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [node.op_type for node in folded.graph.node] == ["ConvTranspose", "Relu"]
    assert len(folded.graph.node[0].input) == 3  # the absorbed shifts became its bias
    assert sorted(t.name for t in folded.graph.initializer) == ["deconv_folded_bias", "deconv_folded_weight"]  # nothing left unread
    np.testing.assert_allclose(Session(folded).run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    exported = finalize(model, "head.onnx")  # every export goes through it
    assert [node.op_type for node in exported.graph.node if node.op_type in ("Add", "BatchNormalization")] == []


def test_a_tensor_read_elsewhere_is_not_folded_away():
    model = _head(shared_add=True)
    x = RNG.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)
    expected = Session(model).run({"x": x})
    folded = fold_into_conv_transpose(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [node.op_type for node in folded.graph.node] == ["ConvTranspose", "BatchNormalization", "Relu"]  # the Add folded, its output kept
    got = Session(folded).run({"x": x})
    for name in ("y", "a"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_a_float16_conv_transpose_is_left_as_it_is():
    model = _head()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    before = [node.op_type for node in model.graph.node]
    assert [node.op_type for node in fold_into_conv_transpose(model).graph.node] == before
