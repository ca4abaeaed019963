"""Ranges cut to what a tensor's readers tell apart (calibration/live_ranges.py), on small graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginekit.calibration.live_ranges import bound_table, reader_bounds
from enginekit.calibration.table import CalibrationTable
from enginekit.onnx.probe import probe
from enginekit.quantization.placement import plan_quantization
from enginekit.quantization.qdq import insert_qdq
from tests.conftest import minmax_table

RNG = np.random.default_rng(0)


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def affine_hardswish_model(activation: str = "HardSwish", **attributes) -> onnx.ModelProto:
    """conv1 -> Mul(0.5) -> Add(0.25) -> activation -> conv2: PaddlePaddle's learnable affine block
    between a Conv and its activation, the conv's output spread wide on both sides."""
    weights = [numpy_helper.from_array(RNG.normal(0, 1.0, (4, 4, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(RNG.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "half"], ["m1"], name="scale"),
             helper.make_node("Add", ["m1", "shift"], ["a1"], name="shift_add"),
             helper.make_node(activation, ["a1"], ["h1"], name="act", **attributes),
             helper.make_node("Conv", ["h1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "live", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [*weights, _scalar("half", 0.5), _scalar("shift", 0.25)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_hard_swish_input_is_live_from_minus_three_and_the_bound_goes_back_through_the_affine_block():
    bounds = reader_bounds(affine_hardswish_model())
    assert bounds["a1"] == (-3.0, math.inf)
    assert bounds["m1"] == (-3.25, math.inf)  # x + 0.25 <= -3
    assert bounds["c1"] == (-6.5, math.inf)  # 0.5 x <= -3.25
    assert "h1" not in bounds and "y" not in bounds  # a Conv reads every value; a graph output is the user's


@pytest.mark.parametrize("activation, attributes, live", [("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, (-2.5, 2.5)),
                                                          ("Relu", {}, (0.0, math.inf))])
def test_other_saturating_readers_bound_their_input(activation, attributes, live):
    assert reader_bounds(affine_hardswish_model(activation, **attributes))["a1"] == pytest.approx(live)


def test_clip_bounds_come_from_its_constant_inputs_and_a_second_reader_that_sees_everything_lifts_them():
    model = affine_hardswish_model("Clip")
    model.graph.node[3].input.extend(["zero", "six"])
    model.graph.initializer.extend([_scalar("zero", 0.0), _scalar("six", 6.0)])
    assert reader_bounds(model)["a1"] == (0.0, 6.0)
    model.graph.node.append(helper.make_node("Identity", ["a1"], ["seen"]))
    model.graph.output.append(helper.make_tensor_value_info("seen", TensorProto.FLOAT, None))
    assert "a1" not in reader_bounds(model) and "c1" not in reader_bounds(model)


def test_a_negative_scale_on_the_way_leaves_the_tensor_unbounded():
    model = affine_hardswish_model()
    model.graph.initializer[2].CopyFrom(_scalar("half", -0.5))
    assert "m1" in reader_bounds(model) and "c1" not in reader_bounds(model)


def _minmax_table(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> CalibrationTable:
    return minmax_table(model, [o for n in model.graph.node for o in n.output] + ["x"], feeds)


def test_cut_ranges_are_lossless_and_finer_and_dead_values_stay_exactly_dead():
    """The bounded tensors' grids cover the live span only: the network's output is closer to
    float, and every value the HardSwish kills is exactly 0 behind the quantized graph too (the
    grid's end level lies beyond the bound, not half a step inside it)."""
    model = affine_hardswish_model()
    feeds = [{"x": RNG.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)} for _ in range(8)]
    full = _minmax_table(model, feeds)
    cut = _minmax_table(model, feeds)
    assert bound_table(cut, reader_bounds(model)) == 3  # c1, m1, a1
    assert full.tensors["c1"].min < -15 and -6.5 - 0.6 < cut.tensors["c1"].min < -6.5  # one step of margin
    reference = list(probe(model, ["y", "a1"], feeds))
    plan = plan_quantization(model, placement="outputs")
    errors = {}
    for name, table in (("full", full), ("cut", cut)):
        qdq = insert_qdq(model, plan, table, "uint8").model
        got = list(probe(qdq, ["y", "h1"], feeds))
        errors[name] = sum(float(np.sum((r["y"] - g["y"]) ** 2)) for r, g in zip(reference, got))
        if name == "cut":
            for r, g in zip(reference, got):
                assert np.all(g["h1"][r["a1"] <= -3.05] == 0.0)
    assert errors["cut"] < 0.8 * errors["full"], errors


def test_a_tensor_a_subgraph_reads_is_never_bounded():
    """An If body that reads the HardSwish input from the outer scope sees every value of it."""
    model = affine_hardswish_model()
    body = helper.make_graph([helper.make_node("Identity", ["a1"], ["inner"])], "body", [],
                             [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    model.graph.node.append(helper.make_node("If", ["flag"], ["chosen"], then_branch=body, else_branch=body))
    model.graph.output.append(helper.make_tensor_value_info("chosen", TensorProto.FLOAT, None))
    bounds = reader_bounds(model)
    assert "a1" not in bounds and "c1" not in bounds


def test_a_long_chain_of_constant_arithmetic_ends_unbounded_instead_of_recursing_without_end():
    inits = [_scalar("one", 1.0)]
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"t{i}", "one"], [f"t{i + 1}"]) for i in range(3000)]
    nodes.append(helper.make_node("Relu", ["t3000"], ["r"]))
    nodes.append(helper.make_node("Identity", ["r"], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    bounds = reader_bounds(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert bounds["t3000"] == (0.0, math.inf) and bounds["t2999"] == (-1.0, math.inf)
