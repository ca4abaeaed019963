"""ONNX Runtime INT8: narrow Q/DQ convolutions widened to 16 output channels, bit for bit
(enginekit/targets/onnxruntime_channels.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginekit.quantization.placement import plan_quantization
from enginekit.quantization.qdq import insert_qdq
from enginekit.targets.onnxruntime import artifact_graph, integer_op_report
from enginekit.targets.onnxruntime_channels import ALIGNED_CHANNELS, align_output_channels
from tests.conftest import minmax_table


def _narrow_model(rng: np.random.Generator, also_returned: bool = False) -> onnx.ModelProto:
    """x (3 channels) -> narrow Conv (10) -> PRelu (a slope per channel) -> MaxPool -> depthwise
    Conv -> Relu -> Conv (10 -> 16) -> y; with `also_returned`, the PRelu's output is a second
    graph output, which cannot take extra channels."""
    def constant(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    inits = [constant("narrow_w", (10, 3, 3, 3)), constant("narrow_b", (10,), 0.1), constant("slope", (10, 1, 1), 0.2),
             constant("dw_w", (10, 1, 3, 3)), constant("dw_b", (10,), 0.1), constant("wide_w", (16, 10, 1, 1)), constant("wide_b", (16,), 0.1)]
    nodes = [helper.make_node("Conv", ["x", "narrow_w", "narrow_b"], ["n"], name="narrow", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["n", "slope"], ["p"], name="prelu"),
             helper.make_node("MaxPool", ["p"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["m", "dw_w", "dw_b"], ["d"], name="dw", group=10, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wide_w", "wide_b"], ["y"], name="wide")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])]
    if also_returned:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 10, 16, 16]))
    graph = helper.make_graph(nodes, "narrow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _qdq(model: onnx.ModelProto, rng: np.random.Generator, weight_type: str = "int8") -> onnx.ModelProto:
    feeds = [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    table = minmax_table(model, [o for n in model.graph.node for o in n.output] + ["x"], feeds)
    return insert_qdq(model, plan_quantization(model, placement="outputs"), table, "uint8", weight_type=weight_type).model


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {t.name: t for t in model.graph.initializer}
    return {n.name: tuple(initializers[producers[n.input[1]].input[0]].dims) for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in producers}


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_a_narrow_convolution_is_widened_through_channel_wise_ops_bit_for_bit(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    model = _narrow_model(rng)
    qdq = _qdq(model, rng)
    artifact, rewrites = artifact_graph(qdq, "uint8")
    assert rewrites["widened_convolutions"] == 1
    shapes = _weight_shapes(artifact)
    # the narrow Conv writes 16 channels (its 3 input channels aligned to 4 as before), the
    # depthwise Conv and its PRelu follow, the last Conv reads the 6 new channels with zero weights
    assert shapes["narrow"] == (ALIGNED_CHANNELS, 4, 3, 3)
    assert shapes["dw"] == (ALIGNED_CHANNELS, 1, 3, 3)
    assert shapes["wide"] == (16, ALIGNED_CHANNELS, 1, 1)
    assert next(a.i for n in artifact.graph.node if n.name == "dw" for a in n.attribute if a.name == "group") == ALIGNED_CHANNELS
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    monkeypatch.setattr("enginekit.targets.onnxruntime.align_output_channels", lambda graph: 0)
    unwidened, _ = artifact_graph(qdq, "uint8")  # every other rewrite of the artifact, the same
    assert _weight_shapes(unwidened)["narrow"] == (10, 4, 3, 3)
    batch = [np.concatenate([_run(graph, x[i:i + 1])[0] for i in range(2)]) for graph in (unwidened, artifact)]
    np.testing.assert_array_equal(batch[0], batch[1])
    integer = []
    for name, graph in (("unwidened", unwidened), ("widened", artifact)):
        onnx.save(graph, str(tmp_path / f"{name}.onnx"))
        integer.append(integer_op_report(tmp_path / f"{name}.onnx", model)["integer_compute_ops"])
    assert integer[1] == integer[0] == 2  # both widened Convs still fuse into QLinearConvs (the last one writes the float output)


@pytest.mark.parametrize("why", ["returned", "wide enough", "uint8 weights"])
def test_a_convolution_is_left_alone_where_extra_channels_could_not_flow(why):
    """A returned tensor cannot grow; a 16-channel Conv needs nothing; uint8 weights (zero point
    128, for CPUs without VNNI) would not dequantize an added integer 0 to 0."""
    rng = np.random.default_rng(8)
    model = _narrow_model(rng, also_returned=why == "returned")
    if why == "wide enough":
        for tensor in model.graph.initializer:
            if tensor.name in ("narrow_w", "narrow_b", "slope", "dw_w", "dw_b"):  # 16 channels throughout
                array = numpy_helper.to_array(tensor)
                tensor.CopyFrom(numpy_helper.from_array(np.concatenate([array, array[:6]]), tensor.name))
            if tensor.name == "wide_w":
                tensor.CopyFrom(numpy_helper.from_array(rng.normal(0, 0.3, (16, 16, 1, 1)).astype(np.float32), tensor.name))
        next(a for n in model.graph.node if n.name == "dw" for a in n.attribute if a.name == "group").i = 16
    qdq = _qdq(model, rng, "uint8" if why == "uint8 weights" else "int8")
    before = _weight_shapes(qdq)
    assert align_output_channels(qdq) == 0
    assert _weight_shapes(qdq) == before
