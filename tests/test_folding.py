"""Graph preparation ONNX Runtime's folding leaves undone: a ConvTranspose absorbs the bias Add
and BatchNormalization that follow it (PP-OCRv4 det's head), a Conv the scalar Mul and Add of
PaddlePaddle's LearnableAffineBlock, the output unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginekit.onnx.folding import fold_affine_into_convolutions
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
    folded = fold_affine_into_convolutions(onnx.ModelProto.FromString(model.SerializeToString()))
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
    folded = fold_affine_into_convolutions(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [node.op_type for node in folded.graph.node] == ["ConvTranspose", "BatchNormalization", "Relu"]  # the Add folded, its output kept
    got = Session(folded).run({"x": x})
    for name in ("y", "a"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_a_float16_conv_transpose_is_left_as_it_is():
    model = _head()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    before = [node.op_type for node in model.graph.node]
    assert [node.op_type for node in fold_affine_into_convolutions(model).graph.node] == before


def _affine_block(group: int, scale_shape: tuple[int, ...], second: str = "Add") -> onnx.ModelProto:
    """x -> Conv (grouped or not, padded) -> Mul(scale) -> Add/Sub/Mul/Div(constant) -> HardSwish -> y."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.4, (6, 6 // group, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.normal(0, 0.1, 6).astype(np.float32), "b"),
             numpy_helper.from_array(RNG.uniform(0.5, 2.0, scale_shape).astype(np.float32), "scale"),
             numpy_helper.from_array(RNG.uniform(0.3, 1.0, (1,)).astype(np.float32), "shift")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             helper.make_node("Mul", ["scale", "c"], ["m"], name="lab_scale"),  # the constant first: either order folds
             helper.make_node(second, ["m", "shift"], ["a"], name="lab_bias"),
             helper.make_node("HardSwish", ["a"], ["y"], name="act")]
    graph = helper.make_graph(nodes, "lab", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("group, scale_shape, second", [(1, (1,), "Add"), (6, (1,), "Sub"), (1, (6, 1, 1), "Div"), (6, (1, 6, 1, 1), "Mul")])
def test_a_conv_absorbs_the_scales_of_an_affine_block_and_keeps_its_shift(group, scale_shape, second):
    """Scales fold into the Conv; a shift stays after it (folded, the Conv's quantized output
    would be rounded around the shift: PP-OCRv4 det lost 0.007 cosine on ONNX Runtime)."""
    model = _affine_block(group, scale_shape, second)
    x = RNG.normal(0, 1, (2, 6, 8, 8)).astype(np.float32)
    expected = Session(model).run({"x": x})["y"]
    folded = fold_affine_into_convolutions(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [node.op_type for node in folded.graph.node] == ["Conv", "HardSwish"] if second in ("Mul", "Div") else ["Conv", second, "HardSwish"]
    np.testing.assert_allclose(Session(folded).run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_an_affine_step_that_would_broadcast_the_output_is_not_folded():
    model = _affine_block(1, (8,))  # a Mul along the width, not the channels
    before = [node.op_type for node in model.graph.node]
    assert [node.op_type for node in fold_affine_into_convolutions(model).graph.node] == before


@pytest.mark.parametrize("opset, axes, keepdims, becomes_pool, tokens", [(17, [2, 3], 1, True, False), (18, [-1, -2], 1, True, False),
                                                                         (17, [2, 3], 0, False, False), (17, [1], 1, False, False),
                                                                         (17, [2], 1, False, True)])
def test_a_spatial_mean_becomes_a_global_average_pool(opset, axes, keepdims, becomes_pool, tokens):
    """x.mean((2, 3), keepdim=True) is GlobalAveragePool, which ONNX Runtime runs on integers;
    a mean over other axes, one that drops them, or the last axis of [N, tokens, C] (a
    LayerNorm's mean, which the TFLite lowering failed on as a pooling) stays a ReduceMean."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32), "w")]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        mean = helper.make_node("ReduceMean", ["r", "axes"], ["y"], name="mean", keepdims=keepdims)
    else:
        mean = helper.make_node("ReduceMean", ["r"], ["y"], name="mean", axes=axes, keepdims=keepdims)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r4"]),
             helper.make_node("Reshape", ["r4", "tokens"], ["r"]) if tokens else helper.make_node("Identity", ["r4"], ["r"]), mean]
    inits.append(numpy_helper.from_array(np.array([0, 6, 64], np.int64), "tokens"))
    graph = helper.make_graph(nodes, "mean", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    expected = Session(model).run({"x": x})["y"]
    exported = finalize(onnx.ModelProto.FromString(model.SerializeToString()), "mean.onnx")
    assert ("GlobalAveragePool" in [n.op_type for n in exported.graph.node]) == becomes_pool
    np.testing.assert_allclose(Session(exported).run({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool, becomes_global", [({"kernel_shape": [640, 640], "strides": [640, 640], "ceil_mode": 1, "count_include_pad": 1}, True),
                                                  ({"kernel_shape": [4, 4]}, True),
                                                  ({"kernel_shape": [4, 4], "pads": [1, 1, 1, 1], "count_include_pad": 1}, False),
                                                  ({"kernel_shape": [2, 2], "strides": [2, 2]}, False)])
def test_an_average_pool_whose_window_covers_its_whole_input_becomes_global(pool, becomes_global):
    """transformers' EfficientNet pools its 2x2 map with AveragePool(kernel 640, ceil_mode=1):
    OpenVINO refused the kernel and TFLite the ceil mode. One window over the whole map is
    GlobalAveragePool; a window that counts padding, or several windows, stay as they are."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[4, 4]),
             helper.make_node("AveragePool", ["c"], ["y"], name="pooler", **pool)]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = RNG.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    expected = Session(model).run({"x": x})["y"]
    exported = finalize(onnx.ModelProto.FromString(model.SerializeToString()), "pool.onnx")
    assert ("GlobalAveragePool" in [n.op_type for n in exported.graph.node]) == becomes_global
    np.testing.assert_allclose(Session(exported).run({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)


def test_einsum_products_become_matmuls_and_other_einsums_stay():
    """torch.einsum attention: the two products (one with its output axes swapped) become
    Transpose + MatMul, which every quantizer here places as an activation x activation product
    (as Einsum ORT ran them in float between integer ops); an equation that would need a reshape
    stays an Einsum. Same outputs as the original graph."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Einsum", ["k", "q"], ["scores_t"], equation="bhkd,bhqd->bhqk"),
             helper.make_node("Softmax", ["scores_t"], ["weights"], axis=-1),
             helper.make_node("Einsum", ["weights", "k"], ["mixed"], equation="bhqk,bhkd->bhqd"),
             helper.make_node("Einsum", ["mixed", "w"], ["y"], equation="bhqd,de->bhqe")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, 8, 16]) for n in ("q", "k")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 8, 4])],
                              [numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prepared = finalize(model, "attention.onnx")
    ops = [n.op_type for n in prepared.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Einsum") == 1
    feeds = {n: rng.standard_normal((3, 2, 8, 16)).astype(np.float32) for n in ("q", "k")}
    np.testing.assert_allclose(Session(prepared).run(feeds)["y"], Session(model).run(feeds)["y"], rtol=1e-5, atol=1e-5)
