"""Q/DQ placement and encodings on small graphs, checked by the kernels ONNX Runtime really runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from enginekit.calibration.table import CalibrationTable, TensorRange
from enginekit.onnx.probe import probe
from enginekit.quantization.encoding import activation_qparams
from enginekit.quantization.placement import PLACEMENTS, plan_quantization
from enginekit.quantization.qdq import DQ_SUFFIX, insert_qdq
from enginekit.targets.onnxruntime import align_input_channels, integer_op_report
from tests.conftest import minmax_table

RNG = np.random.default_rng(0)


def _conv(name: str, source: str, out: str, channels: int, initializers: list) -> onnx.NodeProto:
    weight = numpy_helper.from_array(RNG.normal(0, 0.3, (channels, channels, 3, 3)).astype(np.float32), f"{name}_w")
    bias = numpy_helper.from_array(RNG.normal(0, 0.1, channels).astype(np.float32), f"{name}_b")
    initializers += [weight, bias]
    return helper.make_node("Conv", [source, weight.name, bias.name], [out], name=name, pads=[1, 1, 1, 1])


def conv_prelu_relu_model() -> onnx.ModelProto:
    """conv1 -> PRelu (float) -> conv2 -> Relu -> conv3 -> GlobalAveragePool (float) -> output."""
    inits: list = []
    slope = numpy_helper.from_array(np.full((4, 1, 1), 0.25, np.float32), "slope")
    nodes = [_conv("conv1", "x", "c1", 4, inits), helper.make_node("PRelu", ["c1", "slope"], ["p1"], name="prelu"),
             _conv("conv2", "p1", "c2", 4, inits), helper.make_node("Relu", ["c2"], ["r2"], name="relu"),
             _conv("conv3", "r2", "c3", 4, inits), helper.make_node("GlobalAveragePool", ["c3"], ["y"], name="gap")]
    graph = helper.make_graph(nodes, "placement", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])], [*inits, slope])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _table(model: onnx.ModelProto, shape: tuple[int, ...] = (1, 4, 8, 8)) -> CalibrationTable:
    feeds = [{"x": RNG.normal(0, 1, shape).astype(np.float32)} for _ in range(8)]
    return minmax_table(model, [o for n in model.graph.node for o in n.output] + ["x"], feeds)


def _ort_report(model: onnx.ModelProto, placement: str, tmp_path) -> tuple[dict, onnx.ModelProto]:
    plan = plan_quantization(model, placement=placement)
    qdq = insert_qdq(model, plan, _table(model), "uint8").model
    path = tmp_path / f"{placement}.onnx"
    onnx.save(qdq, str(path))
    return integer_op_report(path, model), qdq


def test_output_placement_makes_every_conv_an_integer_kernel_in_onnxruntime(tmp_path):
    """With inputs only, a Conv whose reader is float (PReLU, a pooling that is not quantized) has
    no Q after it and ONNX Runtime runs it as a float Conv behind DequantizeLinear; with outputs
    quantized too, all three become QLinearConv."""
    model = conv_prelu_relu_model()
    inputs_only, _ = _ort_report(model, "inputs", tmp_path)
    with_outputs, qdq = _ort_report(model, "outputs", tmp_path)
    assert inputs_only["integer_compute_ops"] == 1  # only conv2, whose Relu output conv3 reads
    assert with_outputs["integer_compute_ops"] == 3
    # what still runs in float on dequantized values is named (the report's "not faster" flag shows it)
    assert with_outputs["float_islands"] == {"PRelu": 1, "GlobalAveragePool": 1}
    assert inputs_only["float_islands"].get("Conv", 0) + inputs_only["float_islands"].get("FusedConv", 0) >= 1
    readers = {name: [n.op_type for n in qdq.graph.node if name in n.input] for name in ("c1", "r2", "c3")}
    assert readers == {"c1": ["QuantizeLinear"], "r2": ["QuantizeLinear"], "c3": ["QuantizeLinear"]}  # every reader reads the DQ
    prelu = next(n for n in qdq.graph.node if n.op_type == "PRelu")
    assert prelu.input[0] == "c1" + DQ_SUFFIX
    assert "y" not in {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}  # graph outputs stay float


def test_a_residual_add_followed_by_a_relu_is_an_integer_add_in_onnx_runtime(tmp_path):
    """A ResNet block ends Add(branch, shortcut) -> Relu, read by the next block's Conv and by its
    Add: the Add sits inside the integer region through the Relu. It was left float (the region
    test did not look through the Relu): Keras ResNet50 ran 16 float Adds and Relus between
    QLinearConvs in ONNX Runtime, and the next block's Add read the float Relu."""
    inits: list = []
    nodes = [_conv("stem", "x", "s", 4, inits), helper.make_node("Relu", ["s"], ["r0"], name="stem_relu"),
             _conv("branch1", "r0", "b1", 4, inits), helper.make_node("Relu", ["b1"], ["rb1"], name="branch_relu"),
             _conv("branch2", "rb1", "b2", 4, inits), helper.make_node("Add", ["b2", "r0"], ["sum"], name="residual"),
             helper.make_node("Relu", ["sum"], ["out"], name="block_relu"),
             _conv("next_branch", "out", "n1", 4, inits), helper.make_node("Add", ["n1", "out"], ["sum2"], name="residual2"),
             helper.make_node("Relu", ["sum2"], ["out2"], name="block2_relu"), _conv("head", "out2", "y", 4, inits)]
    graph = helper.make_graph(nodes, "resnet_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert {"residual", "residual2"} <= set(plan_quantization(model, placement="outputs").nodes)
    report, qdq = _ort_report(model, "outputs", tmp_path)
    ops = report["optimized_op_types"]
    assert ops.get("QLinearAdd", 0) == 2 and "Add" not in ops and "Relu" not in ops, ops
    assert report["float_islands"] == {"Conv": 1}, report  # only the head, whose output is the graph's (float)
    assert [n.op_type for n in qdq.graph.node if "out" in n.input] == ["QuantizeLinear"]  # both readers read the DQ
    feeds = {"x": RNG.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)}
    from enginekit.onnx.session import Session

    reference, quantized = Session(model).run(feeds)["y"], Session(qdq, exact_qdq=False).run(feeds)["y"]
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.99


def test_onnx_runtime_gets_convs_with_input_channels_padded_to_its_kernels_alignment_and_the_same_outputs(tmp_path):
    """A 3-channel Conv (an image model's first layer) takes MLAS's generic im2col path; padded to 4
    channels (zero weights, the activation padded with its zero point) it runs in the symmetric
    kernels, with bit-identical outputs. A grouped Conv, one with 8 channels and one reading another
    Conv's output are left alone."""
    import onnxruntime as ort

    inits: list = []
    for name, shape in (("rgb_w", (8, 3, 3, 3)), ("dw_w", (8, 1, 3, 3)), ("narrow_w", (6, 8, 1, 1)), ("pw_w", (4, 6, 1, 1))):
        inits.append(numpy_helper.from_array(RNG.normal(0, 0.3, shape).astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "rgb_w"], ["c1"], name="rgb", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "dw_w"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
             helper.make_node("Conv", ["c2", "narrow_w"], ["c3"], name="narrow"),
             helper.make_node("Conv", ["c3", "pw_w"], ["y"], name="pw")]
    graph = helper.make_graph(nodes, "rgb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    qdq = insert_qdq(model, plan_quantization(model, placement="outputs"), _table(model, (1, 3, 16, 16)), "uint8").model
    aligned = onnx.ModelProto()
    aligned.CopyFrom(qdq)
    assert align_input_channels(aligned) == 1
    onnx.checker.check_model(aligned)
    weights = {n.name: numpy_helper.to_array(i).shape for n in aligned.graph.node if n.op_type == "Conv"
               for i in aligned.graph.initializer if i.name in {p.input[0] for p in aligned.graph.node if p.output[0] == n.input[1]}}
    # 6 channels inside the graph stay: a Pad there would split "narrow" from its QuantizeLinear
    assert weights == {"rgb": (8, 4, 3, 3), "dw": (8, 1, 3, 3), "narrow": (6, 8, 1, 1), "pw": (4, 6, 1, 1)}
    x = {"x": RNG.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0] for m in (qdq, aligned)]
    np.testing.assert_array_equal(runs[0], runs[1])
    integer = []
    for name, graph_ in (("qdq", qdq), ("aligned", aligned)):
        onnx.save(graph_, str(tmp_path / f"{name}.onnx"))
        integer.append(integer_op_report(tmp_path / f"{name}.onnx", model)["integer_compute_ops"])
    assert integer[1] == integer[0] >= 3  # the padded Conv still fuses into a QLinearConv, and nothing else changed


def test_output_placement_quantizes_after_a_relu_that_is_the_only_reader():
    plan = plan_quantization(conv_prelu_relu_model(), placement="outputs")
    assert "r2" in plan.outputs and "c2" not in plan.activations  # ORT drops the Relu in front of the Q
    assert plan.outputs == {"c1", "r2", "c3"}


def test_matmul_outputs_stay_float_integer_to_float_kernels_need_no_q():
    weight = numpy_helper.from_array(RNG.normal(0, 1, (8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Tanh", ["m"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [weight])
    plan = plan_quantization(helper.make_model(graph), placement="outputs")
    assert plan.activations == ["x"] and not plan.outputs


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="placement"):
        plan_quantization(conv_prelu_relu_model(), placement="everywhere")


@pytest.mark.parametrize("encoding", ["uint8", "mixed"])
def test_a_one_sided_signed_tensor_gets_an_asymmetric_grid(encoding):
    """Hard-swish output in [-0.375, 6]: the symmetric grid would leave half its levels unused."""
    one_sided = activation_qparams("hswish", TensorRange(-0.375, 6.0, 6.0, True), encoding)
    assert one_sided.onnx_type == TensorProto.UINT8
    assert one_sided.scale == pytest.approx(6.375 / 255, rel=1e-6) and one_sided.zero_point == round(0.375 / one_sided.scale)
    # clipping is that of the method's amax: the grid ends where the symmetric one would
    clipped = activation_qparams("logits", TensorRange(-20.0, 2.0, 8.0, True), encoding)
    assert clipped.scale == pytest.approx(10.0 / 255, rel=1e-6)
    assert -clipped.zero_point * clipped.scale == pytest.approx(-8.0, abs=clipped.scale)


@pytest.mark.parametrize("encoding, zero_point, onnx_type", [("uint8", 128, TensorProto.UINT8), ("mixed", 0, TensorProto.INT8)])
def test_a_near_symmetric_tensor_keeps_the_symmetric_grid(encoding, zero_point, onnx_type):
    """Asymmetric only where it saves at least half a bit of step: [-5, 4] saves less."""
    params = activation_qparams("residual", TensorRange(-5.0, 4.0, 5.0, True), encoding)
    assert (params.zero_point, params.onnx_type) == (zero_point, onnx_type)
    assert params.scale == pytest.approx(5.0 / 127, rel=1e-6)


def test_tensorrt_encoding_never_goes_asymmetric():
    params = activation_qparams("hswish", TensorRange(-0.375, 6.0, 6.0, True), "int8")
    assert (params.zero_point, params.onnx_type) == (0, TensorProto.INT8)


def test_an_int8_artifact_not_faster_than_fp32_names_its_float_islands():
    from enginekit.benchmark.report import flags

    entry = {"precision": "int8", "integer_share": 1.0, "float_islands": {"HardSwish": 40, "Resize": 3}}
    assert flags(entry, 0.8) == ["not faster than FP32 (0.80x); float ops between integer ones: HardSwish x40, Resize x3"]
    assert flags(entry, 1.4) == []
    tflite = {"precision": "int8", "integer_share": 1.0, "outside_delegate": {"HARD_SWISH": 18, "SOFTMAX": 1}}
    assert flags(tflite, 0.5) == ["not faster than FP32 (0.50x); ops LiteRT runs outside XNNPACK: HARD_SWISH x18, SOFTMAX x1"]
    all_integer = {"precision": "int8", "integer_share": 1.0, "float_islands": {}, "requantizing_ops": {"QLinearAdd": 34, "QLinearMul": 27}}
    assert flags(all_integer, 0.7) == ["not faster than FP32 (0.70x); requantizing ops: QLinearAdd x34, QLinearMul x27"]


def conv_batchnorm_model() -> onnx.ModelProto:
    """conv1 -> BatchNormalization -> Relu -> conv2 -> BatchNormalization -> GlobalAveragePool, as
    a PaddlePaddle or an un-fused PyTorch export leaves it."""
    inits: list = []
    nodes = []
    for index, (source, out) in enumerate((("x", "r1"), ("r1", "b1"))):
        conv = _conv(f"conv{index}", source, f"c{index}", 4, inits)
        stats = [numpy_helper.from_array(RNG.uniform(0.5, 1.5, 4).astype(np.float32), f"bn{index}_{k}") for k in ("scale", "bias", "mean", "var")]
        inits += stats
        nodes += [conv, helper.make_node("BatchNormalization", [f"c{index}", *[s.name for s in stats]], [f"b{index}"], name=f"bn{index}")]
    nodes.insert(2, helper.make_node("Relu", ["b0"], ["r1"], name="relu0"))
    nodes.append(helper.make_node("GlobalAveragePool", ["b1"], ["y"], name="gap"))
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batchnorm_is_folded_into_its_conv_at_export_and_both_convs_run_in_integer(tmp_path):
    import enginekit as ek
    from enginekit.core.loaders import load_onnx

    source = tmp_path / "bn.onnx"
    original = conv_batchnorm_model()
    onnx.save(original, str(source))
    manifest = ek.export(str(source), tmp_path / "exported")
    folded = load_onnx(tmp_path / "exported" / "model.onnx")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "GlobalAveragePool"]
    assert manifest["parity"]["cosine"] > 0.99999  # the folded graph is checked against the file as given
    assert [o.domain for o in folded.opset_import] == [o.domain for o in original.opset_import]
    report, _ = _ort_report(folded, "outputs", tmp_path)
    unfolded, _ = _ort_report(original, "outputs", tmp_path)
    assert report["integer_compute_ops"] == 2 and "BatchNormalization" not in report["float_islands"]
    assert unfolded["float_islands"].get("BatchNormalization") == 2  # dequantize, normalize in float, quantize again


_HARD_SWISH_FORMS = {  # after Add(c, 3) -> a and Clip(a, 0, 6) -> k: the tail that ends in y
    "(x * relu6) / 6 (PaddlePaddle)": [("Mul", ["c", "k"], "m"), ("Div", ["m", "six"], "y")],
    "x * (relu6 * 1/6) (tf2onnx, Keras)": [("Mul", ["k", "sixth"], "g"), ("Mul", ["c", "g"], "y")],
    "(relu6 * x) * 1/6": [("Mul", ["k", "c"], "m"), ("Mul", ["sixth", "m"], "y")],
}


@pytest.mark.parametrize("form", sorted(_HARD_SWISH_FORMS))
def test_a_decomposed_hard_swish_becomes_one_op_at_export(tmp_path, form):
    """x * clip(x + 3, 0, 6) / 6 in the associations exporters write: one HardSwish after export
    (TFLite's int8 path needs to see it to lower it in a form XNNPACK runs)."""
    import enginekit as ek
    from enginekit.core.loaders import load_onnx

    inits: list = [_const_scalar("three", 3.0), _const_scalar("zero", 0.0), _const_scalar("six", 6.0), _const_scalar("sixth", 1 / 6)]
    nodes = [_conv("conv", "x", "c", 4, inits), helper.make_node("Add", ["c", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["k"], name="clip"),
             *(helper.make_node(op, inputs, [out], name=f"tail{i}") for i, (op, inputs, out) in enumerate(_HARD_SWISH_FORMS[form]))]
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], inits)
    source = tmp_path / "hswish.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    manifest = ek.export(str(source), tmp_path / "exported")
    assert [n.op_type for n in load_onnx(tmp_path / "exported" / "model.onnx").graph.node] == ["Conv", "HardSwish"]
    assert manifest["parity"]["cosine"] > 0.99999


def test_a_gate_read_twice_is_not_fused(tmp_path):
    """relu6(x + 3) / 6 read by a second op as well: fusing would drop a value still needed."""
    from enginekit.onnx.graph import _fuse_hard_swish_products

    inits = [_const_scalar("three", 3.0), _const_scalar("zero", 0.0), _const_scalar("six", 6.0), _const_scalar("sixth", 1 / 6)]
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["k"]),
             helper.make_node("Mul", ["k", "sixth"], ["g"]), helper.make_node("Mul", ["x", "g"], ["y"]), helper.make_node("Add", ["g", "y"], ["z"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])], inits)
    model = _fuse_hard_swish_products(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in model.graph.node] == ["Add", "Clip", "Mul", "Mul", "Add"]


def _const_scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def test_exclude_after_looks_through_data_movement():
    """PP-OCR's recognizer reshapes its attention Softmax before the MatMul: still 'after Softmax'."""
    v = numpy_helper.from_array(RNG.normal(0, 1, (8, 8)).astype(np.float32), "v")
    shape = numpy_helper.from_array(np.array([2, 8], np.int64), "shape")
    nodes = [helper.make_node("Softmax", ["x"], ["p"], name="softmax"), helper.make_node("Reshape", ["p", "shape"], ["pr"], name="reshape"),
             helper.make_node("MatMul", ["pr", "v"], ["y"], name="attention")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [v, shape])
    model = helper.make_model(graph)
    assert plan_quantization(model).nodes == ["attention"]
    assert plan_quantization(model, exclude_after=["Softmax"]).nodes == []


def conv_deconv_model(group: int = 1) -> onnx.ModelProto:
    """conv1 -> Relu -> deconv1 (stride 2, 4 -> 8 channels) -> Relu -> deconv2 (8 -> 2) -> y: a
    detector's upsampling head."""
    inits: list = []
    for name, (c_in, channels) in (("deconv1", (4, 8)), ("deconv2", (8, 2))):
        inits += [numpy_helper.from_array(RNG.normal(0, 0.3, (c_in, channels // group, 2, 2)).astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array(RNG.normal(0, 0.1, channels).astype(np.float32), f"{name}_b")]
    nodes = [_conv("conv1", "x", "c1", 4, inits), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "deconv1_w", "deconv1_b"], ["d1"], name="deconv1", strides=[2, 2], group=group),
             helper.make_node("Relu", ["d1"], ["r2"], name="relu2"),
             helper.make_node("ConvTranspose", ["r2", "deconv2_w", "deconv2_b"], ["y"], name="deconv2", strides=[2, 2], group=group)]
    graph = helper.make_graph(nodes, "deconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_transpose_is_quantized_per_output_channel_inside_an_integer_region_where_the_placement_is_inputs():
    """Its weight is [C_in, C_out, kH, kW]: the per-channel axis is 1. Only a ConvTranspose whose
    output reaches a quantized compute op (deconv1, through its Relu) is quantized: the last one
    writes the float map (slower in int8 on OpenVINO). ONNX Runtime's CPU provider has no Q/DQ
    ConvTranspose kernel, so its "outputs" placement leaves both float; grouped ones have no
    per-output-channel scale and stay float everywhere."""
    inputs = plan_quantization(conv_deconv_model(), placement="inputs")
    assert inputs.nodes == ["conv1", "deconv1"] and inputs.activations == ["x", "r1"]
    assert [(w.tensor, w.axis) for w in inputs.weights if w.node.startswith("deconv")] == [("deconv1_w", 1)]
    outputs = plan_quantization(conv_deconv_model(), placement="outputs")
    assert outputs.nodes == ["conv1"] and not any(w.node.startswith("deconv") for w in outputs.weights)
    assert plan_quantization(conv_deconv_model(group=2), placement="inputs").nodes == ["conv1"]


def test_a_quantized_conv_transpose_matches_float_and_runs_as_an_integer_deconvolution_in_openvino(tmp_path):
    model = conv_deconv_model()
    qdq = insert_qdq(model, plan_quantization(model, placement="inputs"), _table(model), "mixed").model
    scales = next(t for t in qdq.graph.initializer if t.name == "deconv1_w__scale")
    assert list(scales.dims) == [8]  # one scale per output channel (axis 1), not per input channel
    feeds = [{"x": RNG.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    for reference, quantized in zip(probe(model, ["y"], feeds), probe(qdq, ["y"], feeds)):
        error = reference["y"] - quantized["y"]
        assert 10 * np.log10(np.sum(reference["y"] ** 2) / np.sum(error**2)) > 20.0  # SQNR in dB: the right axis
    openvino = pytest.importorskip("openvino", reason="openvino is not installed")
    path = tmp_path / "deconv.onnx"
    onnx.save(qdq, str(path))
    compiled = openvino.Core().compile_model(str(path), "CPU")
    precisions = {op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "Deconvolution"}
    assert len(precisions) == 2 and sorted(precisions.values()) == ["f32", "u8"]  # deconv1 integer, deconv2 float


def test_excluded_nodes_are_named_by_node_or_by_the_tensor_they_write_and_unknown_names_are_refused():
    """A failed gate names the tensors adding the most error; passed to --exclude-node they kept
    nothing float, without a word. A tensor name now keeps its writer float; a name that is
    neither a node nor a node's output is refused in one line naming it."""
    from enginekit.core.errors import InputError

    model = conv_prelu_relu_model()
    assert "conv2" in plan_quantization(model).nodes
    assert "conv2" not in plan_quantization(model, exclude_nodes=["conv2"]).nodes
    by_tensor = plan_quantization(model, exclude_nodes=["c2"])  # conv2's output
    assert "conv2" not in by_tensor.nodes and "conv3" in by_tensor.nodes
    with pytest.raises(InputError, match="'conv_9'") as refused:
        plan_quantization(model, exclude_nodes=["conv2", "conv_9"])
    assert refused.value.option == "exclude_nodes"


def hard_sigmoid_model() -> onnx.ModelProto:
    """The three spellings of a hard sigmoid between integer convolutions: conv1 -> HardSwish; a
    squeeze-excitation gate HardSigmoid(alpha 0.2, beta 0.5) (PP-LCNet); and tf2onnx's Keras
    hard sigmoid Mul(Clip(Add(x, 3), 0, 6), 1/6) multiplying conv2's output."""
    inits: list = [numpy_helper.from_array(np.array(value, np.float32), name)
                   for name, value in (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1 / 6))]
    se = numpy_helper.from_array(RNG.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "se_w")
    inits.append(se)
    nodes = [_conv("conv1", "x", "c1", 8, inits), helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish"),
             helper.make_node("GlobalAveragePool", ["h1"], ["pooled"], name="gap"),
             helper.make_node("Conv", ["pooled", "se_w"], ["squeezed"], name="se"),
             helper.make_node("HardSigmoid", ["squeezed"], ["gate"], name="hsigmoid", alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["h1", "gate"], ["excited"], name="excite"),
             _conv("conv2", "excited", "c2", 8, inits), helper.make_node("Add", ["c2", "three"], ["shifted"], name="add3"),
             helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"], name="relu6"),
             helper.make_node("Mul", ["clipped", "sixth"], ["keras_gate"], name="over6"),
             helper.make_node("Mul", ["c2", "keras_gate"], ["swished"], name="keras_swish"),
             _conv("conv3", "swished", "y", 8, inits)]
    graph = helper.make_graph(nodes, "hard_sigmoids", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gates_rewritten(model: onnx.ModelProto, tmp_path) -> dict:
    """The hub's Q/DQ graph of `model` ("outputs" placement, uint8) and ONNX Runtime's artifact
    graph of it: the gate counts, ORT's integer op reports of both, and each one's relative
    output error to FP32 on 16 random inputs (with the FP32 output)."""
    import onnxruntime as ort

    from enginekit.targets.onnxruntime import artifact_graph

    qdq = insert_qdq(model, plan_quantization(model, placement="outputs"), _table(model, (1, 8, 8, 8)), "uint8").model
    rewritten, rewrites = artifact_graph(qdq)
    counts = rewrites["integer_gates"]
    onnx.checker.check_model(rewritten)
    reports = []
    for name, graph_ in (("hub", qdq), ("artifact", rewritten)):
        onnx.save(graph_, str(tmp_path / f"{name}.onnx"))
        reports.append(integer_op_report(tmp_path / f"{name}.onnx", model))
    x = {"x": RNG.normal(0, 1, (16, 8, 8, 8)).astype(np.float32)}
    reference, hub_out, ours = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                                for m in (model, qdq, rewritten))
    errors = [float(np.linalg.norm(out - reference) / np.linalg.norm(reference)) for out in (hub_out, ours)]
    return {"counts": counts, "hub": reports[0], "artifact": reports[1], "errors": errors, "reference": reference}



def test_onnx_runtime_runs_hard_sigmoids_and_hard_swishes_as_integer_adds_and_muls(tmp_path):
    """ORT has no integer HardSigmoid/HardSwish: in the hub's graph each runs DequantizeLinear ->
    float op(s) -> QuantizeLinear between QLinearConvs. The ONNX Runtime artifact writes each as
    an Add of the constant (QLinearAdd) quantized on [0, m] (saturation is the clip) and read
    with gain times that step, and the products as QLinearMul: none of them runs float, and
    the outputs stay as close to FP32 as the hub's (the last Conv, which computes the graph's
    output, is float in both)."""
    found = _gates_rewritten(hard_sigmoid_model(), tmp_path)
    hub, artifact, error = found["hub"], found["artifact"], found["errors"]
    assert found["counts"] == {"hard_sigmoids": 3, "sigmoids": 0, "prelus": 0}
    assert {"HardSigmoid", "Mul"} <= hub["float_islands"].keys()  # what the hub's graph alone leaves float
    # conv3 computes the graph output, which stays float in the hub (its own float Conv)
    assert artifact["float_islands"] == {"Conv": 1} and artifact["integer_compute_ops"] == hub["integer_compute_ops"] == 3
    ops = artifact["optimized_op_types"]
    assert ops.get("QLinearMul", 0) == 3 and ops.get("QLinearAdd", 0) == 3 and not {"HardSigmoid", "HardSwish", "Clip", "Mul"} & ops.keys()
    # each of them requantizes a tensor that FP32 computes inside its convolutions: named for the "not faster" flag
    assert {op: artifact["requantizing_ops"].get(op) for op in ("QLinearAdd", "QLinearMul")} == {"QLinearAdd": 3, "QLinearMul": 3}
    assert not {"QLinearConv", "QGemm"} & artifact["requantizing_ops"].keys()
    assert float(np.abs(found["reference"][:, :, 2:6, 2:6]).max()) > 3  # values beyond the clip: a missing saturation would show
    assert error[1] < max(1.5 * error[0], 0.02), error


def test_the_onnx_runtime_artifacts_rescaled_pairs_read_back_as_clip_and_gain():
    """A QuantizeLinear -> DequantizeLinear pair on two grids (the artifact's integer hard
    sigmoid) reads back as the float ops it computes: the clip to the written grid and the gain
    to the read one. Renamed as an ordinary pair, the hard swish would lose its saturation."""
    import onnxruntime as ort

    from enginekit.onnx.prequantized import strip_qdq
    from enginekit.targets.onnxruntime import artifact_graph

    model = hard_sigmoid_model()
    qdq = insert_qdq(model, plan_quantization(model, placement="outputs"), _table(model, (1, 8, 8, 8)), "uint8").model
    twin = strip_qdq(artifact_graph(qdq)[0]).model
    assert sum(n.op_type == "Clip" for n in twin.graph.node) == 3
    x = {"x": RNG.normal(0, 1, (16, 8, 8, 8)).astype(np.float32)}
    reference, floating = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                           for m in (model, twin))
    assert np.corrcoef(reference.ravel(), floating.ravel())[0, 1] > 0.999


def swish_model() -> onnx.ModelProto:
    """conv1 -> swish x * Sigmoid(x) (EfficientNet, SiLU) -> squeeze-excitation gate Sigmoid ->
    x * gate -> conv2 (the graph output)."""
    inits: list = [numpy_helper.from_array(RNG.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "se_w")]
    nodes = [_conv("conv1", "x", "c1", 8, inits), helper.make_node("Sigmoid", ["c1"], ["s1"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "s1"], ["swish"], name="swish"),
             helper.make_node("GlobalAveragePool", ["swish"], ["pooled"], name="gap"),
             helper.make_node("Conv", ["pooled", "se_w"], ["squeezed"], name="se"),
             helper.make_node("Sigmoid", ["squeezed"], ["gate"], name="se_sigmoid"),
             helper.make_node("Mul", ["swish", "gate"], ["excited"], name="excite"), _conv("conv2", "excited", "y", 8, inits)]
    graph = helper.make_graph(nodes, "swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_runtime_runs_swish_and_squeeze_excitation_sigmoids_as_qlinear_sigmoid_and_mul(tmp_path):
    """The hub keeps a swish's and an SE gate's Sigmoid float; the artifact quantizes its output
    on [0, 1], which ORT fuses into QLinearSigmoid, and the products become QLinearMul: no float
    island is left, at the hub's error."""
    found = _gates_rewritten(swish_model(), tmp_path)
    hub, artifact, error = found["hub"], found["artifact"], found["errors"]
    assert found["counts"] == {"hard_sigmoids": 0, "sigmoids": 2, "prelus": 0}
    assert {"Sigmoid", "Mul"} <= hub["float_islands"].keys()
    assert artifact["float_islands"] == {"Conv": 1}  # conv2 computes the graph output, float in both
    ops = artifact["optimized_op_types"]
    assert ops.get("QLinearSigmoid", 0) == 2 and ops.get("QLinearMul", 0) == 2 and not {"Sigmoid", "Mul"} & ops.keys()
    assert error[1] < max(1.5 * error[0], 0.02), error


def prelu_model() -> onnx.ModelProto:
    """conv1 -> PRelu (a slope per channel, one above 1, one negative) -> conv2 -> PRelu (every
    slope below 1, [1, C, 1, 1] as PyTorch exports it) -> conv3 -> PRelu (one slope, nn.PReLU()'s
    default) -> conv4 (the graph output)."""
    inits: list = [numpy_helper.from_array(np.array([0.25, -0.5, 1.2, 0.0, 0.1, 0.9, 0.3, 0.6], np.float32).reshape(8, 1, 1), "slope1"),
                   numpy_helper.from_array(RNG.uniform(-0.3, 0.8, (1, 8, 1, 1)).astype(np.float32), "slope2"),
                   numpy_helper.from_array(np.array([0.25], np.float32), "slope3")]
    nodes = [_conv("conv1", "x", "c1", 8, inits), helper.make_node("PRelu", ["c1", "slope1"], ["p1"], name="prelu1"),
             _conv("conv2", "p1", "c2", 8, inits), helper.make_node("PRelu", ["c2", "slope2"], ["p2"], name="prelu2"),
             _conv("conv3", "p2", "c3", 8, inits), helper.make_node("PRelu", ["c3", "slope3"], ["p3"], name="prelu3"),
             _conv("conv4", "p3", "y", 8, inits)]
    graph = helper.make_graph(nodes, "prelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_runtime_runs_prelus_as_an_integer_depthwise_convolution_and_an_add(tmp_path):
    """ORT has no integer PRelu: in the hub's graph each runs DequantizeLinear -> PRelu ->
    QuantizeLinear, channels-last between QLinearConvs. The artifact writes x + (slope - 1) *
    min(x, 0): the product a depthwise 1x1 QLinearConv (whose grid does the min where the slopes
    are all below 1; x requantized onto its negative half first where they are not), the sum a
    QLinearAdd: no float op is left between the convolutions, at the hub's error."""
    found = _gates_rewritten(prelu_model(), tmp_path)
    hub, artifact, error = found["hub"], found["artifact"], found["errors"]
    assert found["counts"]["prelus"] == 3
    assert hub["float_islands"].get("PRelu") == 3
    assert artifact["float_islands"] == {"Conv": 1}  # conv4 computes the graph output, float in both
    ops = artifact["optimized_op_types"]
    assert "PRelu" not in ops and ops.get("QLinearAdd", 0) == 2 and ops.get("QLinearLeakyRelu", 0) == 1
    assert ops.get("QLinearConv", 0) == 3 + 2  # conv1-3 and the two per-channel PRelus' products
    assert artifact["integer_compute_ops"] == 3  # the products are not the model's compute ops: the share stays 3 of 4
    assert error[1] < 1.1 * error[0], error


def swish_max_pool_model() -> onnx.ModelProto:
    """conv1 -> swish -> MaxPool 5x5 stride 1 (YOLO's SPPF) -> MaxPool 2x2 stride 2 with ceil_mode
    on an odd size -> conv2 (the graph output): pools that no QLinearConv reads or writes."""
    inits: list = []
    nodes = [_conv("conv1", "x", "c1", 8, inits), helper.make_node("Sigmoid", ["c1"], ["s1"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "s1"], ["swish"], name="swish"),
             helper.make_node("MaxPool", ["swish"], ["pooled"], name="sppf_pool", kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
             helper.make_node("MaxPool", ["pooled"], ["halved"], name="halving_pool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             _conv("conv2", "halved", "y", 8, inits)]
    graph = helper.make_graph(nodes, "swish_pools", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("encoding", ["uint8", "int8"])
def test_onnx_runtime_runs_8bit_max_pools_channels_last_with_the_same_values(tmp_path, encoding):
    """ORT fuses DequantizeLinear -> MaxPool -> QuantizeLinear into an 8-bit MaxPool, channels-first
    (a slow generic loop: 5.1 ms against 0.12 ms channels-last at 256 x 20 x 20) unless a
    QLinearConv is next to it. The artifact writes each as NhwcMaxPool between transposes: the
    optimized graph runs no channels-first MaxPool, the outputs are the hub's bit for bit, and
    the artifact reads back as a pre-quantized model with MaxPools again."""
    import onnxruntime as ort

    from enginekit.onnx.prequantized import strip_qdq
    from enginekit.targets.onnxruntime import artifact_graph
    from enginekit.targets.onnxruntime_graph import channels_last_max_pools

    model = swish_max_pool_model()
    qdq = insert_qdq(model, plan_quantization(model, placement="outputs"), _table(model, (1, 8, 9, 9)), encoding).model
    rewritten, rewrites = artifact_graph(qdq)
    onnx.checker.check_model(rewritten)
    assert rewrites["channels_last_max_pools"] == 2  # the second pool shares the first's grid, which shares the swish's
    ops = []
    for name, graph_ in (("hub", qdq), ("artifact", rewritten)):
        onnx.save(graph_, str(tmp_path / f"{name}.onnx"))
        ops.append(integer_op_report(tmp_path / f"{name}.onnx", model)["optimized_op_types"])
    assert ops[0].get("MaxPool", 0) == 2 and "NhwcMaxPool" not in ops[0]  # what ORT makes of the hub's graph alone
    assert ops[1].get("NhwcMaxPool", 0) == 2 and "MaxPool" not in ops[1]
    pools_only = onnx.ModelProto()
    pools_only.CopyFrom(qdq)
    assert channels_last_max_pools(pools_only) == 2
    x = {"x": RNG.normal(0, 1, (4, 8, 9, 9)).astype(np.float32)}
    hub_out, ours, reference = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                                for m in (qdq, pools_only, model))
    assert np.array_equal(hub_out, ours)
    twin = strip_qdq(rewritten)
    assert [n.op_type for n in twin.model.graph.node].count("MaxPool") == 2
    assert all(o.domain != "com.microsoft" for o in twin.model.opset_import)
    assert {"pooled", "halved"} <= twin.activations.keys()
    floating = ort.InferenceSession(twin.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.corrcoef(reference.ravel(), floating.ravel())[0, 1] > 0.999  # the float model, with weights on their grid


def test_a_max_pool_whose_output_leaves_the_graph_or_changes_grid_stays_as_the_hub_wrote_it():
    """Only a pool between one grid's DequantizeLinear and QuantizeLinear is rewritten: a pool
    writing the graph's output keeps its float MaxPool."""
    from enginekit.targets.onnxruntime_graph import channels_last_max_pools

    inits: list = []
    nodes = [_conv("conv1", "x", "c1", 4, inits), helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("MaxPool", ["r1"], ["y"], name="last_pool", kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "last_pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    qdq = insert_qdq(model, plan_quantization(model, placement="outputs"), _table(model), "uint8").model
    before = qdq.SerializeToString()
    assert channels_last_max_pools(qdq) == 0 and qdq.SerializeToString() == before


def test_a_chain_of_same_scale_ops_shares_its_first_tensors_grid():
    """MaxPool -> MaxPool (YOLO's SPPF runs three): each pool's output reuses the grid of the
    tensor the chain starts from, not its own measured range; a pool on another grid than its
    input cannot run as an 8-bit pool."""
    model = swish_max_pool_model()
    plan = plan_quantization(model, placement="outputs")
    assert plan.same_scale["pooled"] == "swish" and plan.same_scale["halved"] == "swish"
    qdq = insert_qdq(model, plan, _table(model, (1, 8, 9, 9)), "uint8").model
    values = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    assert values["halved__scale"] == values["pooled__scale"] == values["swish__scale"]



def test_a_tensor_behind_ops_that_keep_its_grid_shares_the_nearest_quantized_ones():
    """r1 (read by conv2) -> Transpose -> Transpose -> conv3: the second Transpose's output takes
    r1's grid although the tensor between them is never quantized (ORT drops Q/DQ pairs around
    data movement only where both sides are on one grid); a Reshape's shape is not data."""
    inits: list = [numpy_helper.from_array(RNG.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "conv2_w"),
                   numpy_helper.from_array(np.array([0, 4, 8, 8], np.int64), "shape")]
    nodes = [_conv("conv1", "x", "c1", 4, inits), helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "conv2_w"], ["side"], name="conv2"),
             helper.make_node("Transpose", ["r1"], ["t1"], name="swap", perm=[0, 1, 3, 2]),
             helper.make_node("Transpose", ["t1"], ["t2"], name="swap_back", perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["t2", "shape"], ["t3"], name="reshape"), _conv("conv3", "t3", "c3", 4, inits),
             helper.make_node("Add", ["c3", "side"], ["y"], name="join")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for placement in PLACEMENTS:
        plan = plan_quantization(model, placement=placement)
        assert plan.same_scale["t3"] == "r1" and "t1" not in plan.activations and "shape" not in plan.activations
