"""ONNX LSTM and GRU lowered for the tflite target (unrolled over the sequence): the float
flatbuffer matches ONNX Runtime for every direction, layout and initial state, and GRU's two
reset forms; a symbolic sequence length and what is not lowered are refused naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tensorflow", reason="the tflite extra (tensorflow-cpu) is not installed")
pytest.importorskip("ai_edge_litert", reason="the tflite extra (ai-edge-litert) is not installed")

from enginekit.core.errors import InputError  # noqa: E402
from enginekit.onnx.session import Session  # noqa: E402
from enginekit.targets.tflite.convert import convert_function, op_types  # noqa: E402
from enginekit.targets.tflite.lowering import to_tf_function  # noqa: E402
from enginekit.targets.tflite.runner import TfliteRunner  # noqa: E402

RNG = np.random.default_rng(3)
STEPS, BATCH, FEATURES, HIDDEN = 5, 2, 6, 4


def _recurrent_model(op: str, direction: str = "forward", initial: bool = False, steps: int | str = STEPS, **attributes) -> onnx.ModelProto:
    """x -> `op` -> Y, Y_h (and Y_c for LSTM), with random weights and biases (peepholes for an
    LSTM when `attributes` asks for them), the initial state a graph input when `initial`."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    directions = 2 if direction == "bidirectional" else 1
    peepholes = attributes.pop("peepholes", False)
    x_shape, state_shape = [steps, BATCH, FEATURES], [directions, BATCH, HIDDEN]
    inits = [numpy_helper.from_array(RNG.normal(0, 0.5, (directions, gates * HIDDEN, FEATURES)).astype(np.float32), "W"),
             numpy_helper.from_array(RNG.normal(0, 0.5, (directions, gates * HIDDEN, HIDDEN)).astype(np.float32), "R"),
             numpy_helper.from_array(RNG.normal(0, 0.3, (directions, 2 * gates * HIDDEN)).astype(np.float32), "B")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x", "W", "R", "B", "", "", ""]
    if initial:
        names[5] = "h0"
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape))
        if op == "LSTM":
            names[6] = "c0"
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, state_shape))
    if peepholes:
        names.append("P")
        inits.append(numpy_helper.from_array(RNG.normal(0, 0.5, (directions, 3 * HIDDEN)).astype(np.float32), "P"))
    outputs = ["y", "y_h", "y_c"] if op == "LSTM" else ["y", "y_h"]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op, names, outputs, name="rnn", hidden_size=HIDDEN, direction=direction, **attributes)
    graph = helper.make_graph([node], "rnn", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))


def _batch_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same node with layout=1: inputs [batch, seq, ...] and states [batch, directions, hidden]."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    twin.graph.node[0].attribute.append(helper.make_attribute("layout", 1))
    for value in twin.graph.input:
        dims = value.type.tensor_type.shape.dim
        first, second = dims[0].dim_value, dims[1].dim_value
        dims[0].dim_value, dims[1].dim_value = second, first
    return twin


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {value.name: RNG.normal(0, 1, [d.dim_value for d in value.type.tensor_type.shape.dim]).astype(np.float32)
            for value in model.graph.input}


def _assert_float_matches_onnxruntime(model: onnx.ModelProto, layout: int = 0) -> bytes:
    """The lowering of `model` (or of its batch-first twin) against ONNX Runtime on `model`
    (ONNX Runtime has no layout=1 kernels: the twin's feeds and outputs are transposed)."""
    feeds = _feeds(model)
    expected = Session(model).run(feeds)
    if layout:
        model = _batch_first(model)
        feeds = {name: value.transpose(1, 0, 2) for name, value in feeds.items()}
        expected = {name: value.transpose(2, 0, 1, 3) if value.ndim == 4 else value.transpose(1, 0, 2) for name, value in expected.items()}
    flatbuffer = convert_function(to_tf_function(model, "rnn.onnx"), "rnn.onnx")
    got = TfliteRunner(flatbuffer).infer(feeds)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    return flatbuffer


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("initial", [False, True])
def test_an_lstm_lowers_and_matches_onnxruntime(direction, layout, initial):
    flatbuffer = _assert_float_matches_onnxruntime(_recurrent_model("LSTM", direction, initial), layout)
    assert "FULLY_CONNECTED" in {op["op"] for op in op_types(flatbuffer)}  # the projections are plain matrix products


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("initial", [False, True])
def test_a_gru_lowers_and_matches_onnxruntime_in_both_reset_forms(direction, linear_before_reset, initial):
    _assert_float_matches_onnxruntime(_recurrent_model("GRU", direction, initial=initial, linear_before_reset=linear_before_reset))


def test_an_lstm_with_peepholes_and_a_clip_matches_onnxruntime():
    _assert_float_matches_onnxruntime(_recurrent_model("LSTM", "bidirectional", initial=True, peepholes=True, clip=0.8))


def test_a_gru_in_batch_first_layout_matches_onnxruntime():
    _assert_float_matches_onnxruntime(_recurrent_model("GRU", "bidirectional", initial=True, linear_before_reset=1), layout=1)


def test_a_symbolic_sequence_length_is_refused_naming_the_node_and_the_input_shape_option():
    with pytest.raises(InputError) as refused:
        to_tf_function(_recurrent_model("LSTM", steps="time"), "rnn.onnx").get_concrete_function()
    assert "node rnn (LSTM)" in str(refused.value) and "symbolic" in str(refused.value)
    assert refused.value.option == "input_shapes"


def test_an_activation_the_lowering_lacks_is_refused_naming_the_node():
    model = _recurrent_model("GRU", activations=["HardSigmoid", "Tanh"])
    with pytest.raises(InputError, match=r"node rnn \(GRU\): the tflite target lowers the activations relu, sigmoid, tanh only"):
        to_tf_function(model, "rnn.onnx").get_concrete_function()


def _stacked_model() -> onnx.ModelProto:
    """x -> MatMul -> bidirectional LSTM -> its last states -> MatMul."""
    rnn = _recurrent_model("LSTM", "bidirectional")
    node = rnn.graph.node[0]
    node.input[0] = "projected"
    del node.output[2]
    node.output[1] = "y_h_raw"
    project = helper.make_node("MatMul", ["x", "w_in"], ["projected"], name="project")
    flatten = helper.make_node("Reshape", ["y_h", "flat"], ["state"], name="flatten")
    head = helper.make_node("MatMul", ["state", "w_out"], ["out"], name="head")
    inits = [*rnn.graph.initializer, numpy_helper.from_array(RNG.normal(0, 0.5, (FEATURES, FEATURES)).astype(np.float32), "w_in"),
             numpy_helper.from_array(np.array([BATCH, -1], np.int64), "flat"),
             numpy_helper.from_array(RNG.normal(0, 0.5, (2 * HIDDEN, 3)).astype(np.float32), "w_out")]
    graph = helper.make_graph([project, node, helper.make_node("Transpose", ["y_h_raw"], ["y_h"], perm=[1, 0, 2]), flatten, head], "stack",
                              list(rnn.graph.input), [helper.make_tensor_value_info("out", TensorProto.FLOAT, [BATCH, 3])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))


def _int8_build(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[bytes, dict]:
    pytest.importorskip("ai_edge_quantizer", reason="the tflite extra (ai-edge-quantizer) is not installed")
    from enginekit.calibration.pipeline import calibration_tensors
    from enginekit.targets.tflite import build_flatbuffer
    from tests.conftest import minmax_table

    table = minmax_table(model, calibration_tensors(model, []), feeds)
    return build_flatbuffer("int8", to_tf_function(model, "stack.onnx"), "stack.onnx", table=table,
                            reference=model, feeds=feeds[0], more_feeds=feeds[1:4])


def test_in_int8_the_recurrence_stays_float_between_integer_layers_as_on_the_hub():
    """The two products are int8, every op the LSTM was unrolled into stays float, and the
    flatbuffer stays close to FP32."""
    model = _stacked_model()
    feeds = [_feeds(model) for _ in range(8)]
    flatbuffer, info = _int8_build(model, feeds)
    products = [op for op in op_types(flatbuffer) if op["op"] == "FULLY_CONNECTED"]
    assert sum("float32" not in op["inputs"] + op["outputs"] for op in products) == 2  # project and head
    assert info["recurrence_float_ops"] > 2 * STEPS  # each step of each direction: its product, gates and state
    expected = Session(model).run(feeds[5])["out"]
    got = TfliteRunner(flatbuffer).infer(feeds[5])["out"]
    cosine = float(np.dot(got.ravel(), expected.ravel()) / (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert cosine > 0.98


def test_a_flatbuffer_xnnpack_cannot_prepare_is_one_line_not_a_runtime_error(monkeypatch):
    """The recurrence quantized (as before it was kept float): XNNPACK refuses to prepare its
    gate SPLITs, and that is an InputError naming LiteRT, which fails the cell in one line."""
    from enginekit.targets.tflite import float_layers

    monkeypatch.setattr(float_layers, "recurrence_outputs", lambda ranges: [])
    model = _stacked_model()
    with pytest.raises(InputError, match="LiteRT cannot prepare the model: .*SPLIT"):
        _int8_build(model, [_feeds(model) for _ in range(8)])


def test_a_sequence_length_tensorflow_lost_is_restored_from_onnx_shape_inference():
    """A PyTorch CRNN's squeeze and permute after a pooling leave TF knowing no dim of the LSTM's
    input, though ONNX shape inference knows the length (the width was fixed): the length comes
    back, so the recurrence unrolls; a length neither knows stays unknown (and is refused)."""
    import tensorflow as tf

    from enginekit.targets.tflite.recurrent import _with_known_length
    from enginekit.targets.tflite.values import Value

    shapes = {}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32)], autograph=False)
    def lowered(x):
        shapes["known"] = _with_known_length(Value(x, onnx_dims=(STEPS, None, FEATURES)), 0, FEATURES).shape.as_list()
        shapes["batch first"] = _with_known_length(Value(x, onnx_dims=(None, STEPS, FEATURES)), 1, FEATURES).shape.as_list()
        shapes["unknown"] = _with_known_length(Value(x, onnx_dims=(None, None, FEATURES)), 0, FEATURES).shape.as_list()
        return x

    lowered.get_concrete_function()
    assert shapes == {"known": [STEPS, None, FEATURES], "batch first": [None, STEPS, FEATURES], "unknown": [None, None, None]}


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("initial", [False, True])
def test_a_plain_rnn_lowers_and_matches_onnxruntime(direction, initial):
    _assert_float_matches_onnxruntime(_recurrent_model("RNN", direction, initial=initial))
    _assert_float_matches_onnxruntime(_recurrent_model("RNN", direction, initial=initial, activations=["Relu"] * (2 if direction == "bidirectional" else 1)), layout=1)


def test_in_a_several_cell_table_a_cell_refused_for_a_symbolic_dim_names_the_flag_that_fixes_it(run_cli, tmp_path):
    """The refusal comes from inside the TFLite cell's lowering; its table row ends with the flag,
    as the error line of a one-cell build does (the table dropped it: the row kept only the text)."""
    model = _recurrent_model("LSTM", steps="time")
    onnx.save(model, tmp_path / "rnn.onnx")
    np.savez(tmp_path / "eval.npz", x=RNG.normal(0, 1, (STEPS, BATCH, FEATURES)).astype(np.float32))
    result = run_cli("build", "--model", tmp_path / "rnn.onnx", "--eval-data", tmp_path / "eval.npz", "--targets", "onnxruntime,tflite",
                     "--precisions", "fp32", "--no-bench", "-o", tmp_path / "out")
    rows = {line.split("|")[1].strip(): line for line in result.out.splitlines() if line.startswith("| ")}
    assert "FAILED" in rows["tflite"] and "symbolic" in rows["tflite"] and rows["tflite"].rstrip(" |").endswith("(see --input-shape)"), rows
    assert "FAILED" not in rows["onnxruntime"] and result.code != 0
    # a matrix build's table (an executor, or -c matrix.yaml) names it too
    result = run_cli("build", "--model", tmp_path / "rnn.onnx", "--eval-data", tmp_path / "eval.npz", "--targets", "onnxruntime,tflite",
                     "--precisions", "fp32", "--executor", "local", "--workers", "1", "-o", tmp_path / "matrix")
    rows = {line.split("|")[2].strip(): line for line in result.out.splitlines() if line.startswith("| ") and "rnn" in line}
    assert "failed" in rows["tflite"] and "symbolic" in rows["tflite"] and "(see --input-shape) |" in rows["tflite"], result.out
