"""TFLite target: full-integer int8 flatbuffers that carry the CalibrationTable's ranges, float
builds, the LiteRT runner, and the converter's error messages."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tensorflow", reason="the tflite extra (tensorflow-cpu) is not installed")
pytest.importorskip("ai_edge_litert", reason="the tflite extra (ai-edge-litert) is not installed")
pytest.importorskip("ai_edge_quantizer", reason="the tflite extra (ai-edge-quantizer) is not installed")

from enginekit.builder import BuildOptions, build  # noqa: E402
from enginekit.targets.tflite.convert import convert_function, op_types, quantize_int8  # noqa: E402
from enginekit.targets.tflite.lowering import to_tf_function  # noqa: E402
from enginekit.targets.tflite.ranges import map_ranges, tflite_range  # noqa: E402
from enginekit.targets.tflite.runner import MODEL_FILE, TfliteRunner  # noqa: E402
from enginekit.core.errors import InputError  # noqa: E402
from tests.conftest import weight_integers  # noqa: E402

# Ops allowed to touch float32 in an int8 flatbuffer, and why: Keras' Flatten reads the dynamic
# batch size with SHAPE, and ai-edge-quantizer hands SHAPE a DEQUANTIZE'd copy of the tensor.
# Only the shape (int32) leaves that branch; no arithmetic happens in float.
SHAPE_ONLY_FLOAT_OPS = {"DEQUANTIZE", "SHAPE"}


@pytest.fixture(scope="module")
def int8_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite")
    cache: dict[str, tuple] = {}

    def get(model: str, **options):
        key = model + json.dumps(options, sort_keys=True)
        if key not in cache:
            folder = root / f"{model}-{len(cache)}"
            precision = options.pop("precision", "int8")
            tflite = {key: options.pop(f"tflite_{key}") for key in ("io", "output_bits") if f"tflite_{key}" in options}
            if tflite:
                options["target_options"] = {"tflite": tflite}
            manifest = build(model, "tflite", precision, folder, BuildOptions(**options)).manifest
            cache[key] = (folder, manifest)
        return cache[key]

    return get


def _float_ops(model: bytes) -> list[str]:
    return [op["op"] for op in op_types(model) if "float32" in op["inputs"] + op["outputs"]]


@pytest.mark.parametrize("model", ["digits_cnn", "digits_keras", "efficientnet_lite0"])
def test_int8_flatbuffer_is_full_integer(int8_builds, model):
    folder, manifest = int8_builds(model)
    flatbuffer = (folder / MODEL_FILE).read_bytes()
    ops = op_types(flatbuffer)
    compute = [op for op in ops if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MEAN")]
    assert compute, "no compute ops found"
    for op in compute:
        assert op["inputs"][0] == "int8" and op["outputs"] == ["int8"], op
        if len(op["inputs"]) > 2 and op["op"] != "ADD":
            assert op["inputs"][1:] == ["int8", "int32"], op  # int8 weights, int32 bias
    # float I/O (the default): the file's first op quantizes the input, its last dequantizes the output
    assert (ops[0]["op"], ops[0]["outputs"], ops[-1]["op"], ops[-1]["inputs"]) == ("QUANTIZE", ["int8"], "DEQUANTIZE", ["int8"]), ops
    float_ops = _float_ops(flatbuffer)
    assert float_ops[:1] == ["QUANTIZE"] and float_ops[-1:] == ["DEQUANTIZE"], float_ops
    if model == "digits_keras":
        assert set(float_ops[1:-1]) <= SHAPE_ONLY_FLOAT_OPS, float_ops
    else:
        assert float_ops[1:-1] == [], float_ops
    io = manifest["tflite"]["io"]
    assert {p["dtype"] for p in io.values()} == {"float32"}
    assert manifest["tflite"]["types"]["float32_compute_ops"] == []


def test_int8_io_option_leaves_no_float_op(int8_builds):
    folder, manifest = int8_builds("digits_cnn", tflite_io="int8")
    assert _float_ops((folder / MODEL_FILE).read_bytes()) == []
    io = manifest["tflite"]["io"]
    assert {p["dtype"] for p in io.values()} == {"int8"}
    assert all(p["scale"] > 0 and -128 <= p["zero_point"] <= 127 for p in io.values())
    metrics = manifest["accuracy"]["metrics"]
    assert metrics["accuracy"] >= metrics["fp32_accuracy"] - 0.01


def test_float_io_quantizes_inside_the_file_as_the_int8_io_runner_does(int8_builds):
    """The same calibration, two I/O types: the float-I/O file's QUANTIZE takes the int8 input's
    own scale and zero point, so both files compute the same integers (outputs equal within one
    output step: a rounding tie may break differently in C++ and numpy)."""
    int8_folder, int8_manifest = int8_builds("digits_cnn", tflite_io="int8")
    float_folder, _ = int8_builds("digits_cnn")
    feeds = {"image": np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)}
    by_int8_io = TfliteRunner((int8_folder / MODEL_FILE).read_bytes(), threads=1).infer(feeds)["logits"]
    by_float_io = TfliteRunner((float_folder / MODEL_FILE).read_bytes(), threads=1).infer(feeds)["logits"]
    step = int8_manifest["tflite"]["io"]["logits"]["scale"]
    assert np.abs(by_int8_io - by_float_io).max() <= step * 1.01
    assert np.mean(by_int8_io == by_float_io) > 0.9


@pytest.mark.parametrize("model", ["digits_cnn", "digits_keras"])
def test_digits_int8_within_one_point_of_fp32(int8_builds, model):
    _, manifest = int8_builds(model)
    metrics = manifest["accuracy"]["metrics"]
    assert metrics["samples"] == 540
    assert metrics["accuracy"] >= metrics["fp32_accuracy"] - 0.01, metrics


def test_efficientnet_int8_top1_agreement(int8_builds):
    _, manifest = int8_builds("efficientnet_lite0")
    assert manifest["accuracy"]["metrics"]["top1_agreement"] >= 0.90, manifest["accuracy"]
    assert manifest["tflite"]["route"].startswith("onnx lowered")
    assert manifest["tflite"]["ranges"]["matched_by_value"] > 50


def test_float_builds_match_fp32(int8_builds):
    for precision in ("fp32", "fp16"):
        _, manifest = int8_builds("digits_cnn", precision=precision)
        metrics = manifest["accuracy"]["metrics"]
        assert metrics["cosine"] > (0.99999 if precision == "fp32" else 0.999), metrics
        assert manifest["tflite"]["types"]["tensor_types"].get("int8", 0) == 0


def test_an_io_type_the_file_could_not_take_is_said_in_a_note(int8_builds):
    """int16 outputs asked for, but XNNPACK has no 16x8 FULLY_CONNECTED: the float pass keeps
    digits_cnn's classifier float, its output float32. That was silent (a new user found int8 I/O
    asked and float outputs given, no word); now the manifest's notes say which and why."""
    from enginekit.targets.tflite import io_notes

    _, manifest = int8_builds("digits_cnn", tflite_io="int8", tflite_output_bits=16)
    io = manifest["tflite"]["io"]
    assert io["image"]["dtype"] == "int8"
    if io["logits"]["dtype"] == "float32":
        assert "output 'logits' is float32, not int16: the op computing it runs in float" in manifest["tflite"]["notes"]
    else:
        assert io["logits"]["dtype"] == "int16"
    as_asked = {"x": {"role": "input", "dtype": "uint8"}, "y": {"role": "output", "dtype": "uint8"}}
    assert io_notes(as_asked, "uint8", 8) == [] and io_notes({**as_asked, "y": {"role": "output", "dtype": "int8"}}, "int8", 16) == []
    assert io_notes({"x": {"role": "input", "dtype": "float32"}}, "uint8", 8) == ["input 'x' is float32, not uint8: the op reading it runs in float"]
    assert io_notes({"x": {"role": "input", "dtype": "float32"}}, "float32", 8) == []


def test_uint8_io_option(int8_builds):
    _, manifest = int8_builds("digits_cnn", tflite_io="uint8")
    assert {p["dtype"] for p in manifest["tflite"]["io"].values()} == {"uint8"}
    metrics = manifest["accuracy"]["metrics"]
    assert metrics["accuracy"] >= metrics["fp32_accuracy"] - 0.01


def test_percentile_and_minmax_give_their_own_scales():
    """An early activation: the two methods' TFLite scales differ, and each equals the scale its
    CalibrationTable implies for an asymmetric int8 tensor within 1 %."""
    import enginekit as ek
    from enginekit.exporter.reference import load_fp32
    from enginekit.targets.tflite.runner import require_litert

    fp32 = load_fp32("digits_cnn")
    run = ek.calibrate("digits_cnn", None, methods=["minmax", "percentile"], percentile=99.0, num_samples=256)
    float_model = convert_function(to_tf_function(fp32.proto, "digits_cnn"), "digits_cnn")
    feeds = fp32.spec.dataset().samples("calibration", 2)
    first_conv = next(n for n in fp32.proto.graph.node if n.op_type == "Relu").output[0]
    scales = {}
    for method, table in run.tables.items():
        ranges = map_ranges(float_model, fp32.proto, table, feeds)
        tflite_name = next(name for name, onnx_name in ranges.matched.items() if onnx_name == first_conv)
        quantized = quantize_int8(float_model, ranges.ranges)
        interpreter = require_litert().Interpreter(model_content=quantized)
        detail = next(t for t in interpreter.get_tensor_details() if t["name"] == tflite_name)
        low, high = tflite_range(table.tensors[first_conv])
        expected = (high - low) / 255
        scales[method] = detail["quantization"][0]
        assert scales[method] == pytest.approx(expected, rel=0.01), (method, scales[method], expected)
    assert abs(scales["minmax"] / scales["percentile"] - 1) > 0.05, scales


def test_int8_weights_are_the_integers_of_the_qdq_hub(int8_builds, tmp_path):
    """TFLite quantizes float weights itself (per channel, max|w|/127): given the hub's GPTQ-rounded
    integers dequantized, it finds exactly those integers again (the ONNX Runtime artifact holds them)."""
    from enginekit.targets.tflite.runner import require_litert

    folder, manifest = int8_builds("digits_cnn")
    # the convolutions; the two linear layers see one row per sample, too few to trust H: nearest
    assert manifest["quantization"]["weight_rounding"]["method"] == "gptq" and manifest["quantization"]["weight_rounding"]["layers"] == 3
    build("digits_cnn", "onnxruntime", "int8", tmp_path / "ort", BuildOptions())
    hub = weight_integers(tmp_path / "ort" / "model.int8.onnx")
    interpreter = require_litert().Interpreter(model_content=(folder / MODEL_FILE).read_bytes())
    weights = [interpreter.get_tensor(t["index"]).astype(np.int32) for t in interpreter.get_tensor_details()
               if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) > 1]
    assert len(hub) == 5 and len(weights) == 5
    for name, value in hub.items():  # ONNX OIHW / (out, in) -> TFLite OHWI, depthwise 1HWO, (out, in)
        layouts = [value] if value.ndim == 2 else [value.transpose(0, 2, 3, 1), value.transpose(1, 2, 3, 0)]
        if value.ndim == 4:  # ONNX Runtime's first Conv: OHWI with zero input channels after the model's own
            layouts += [layouts[0][..., :w.shape[-1]] for w in weights
                        if w.shape[:-1] == layouts[0].shape[:-1] and not layouts[0][..., w.shape[-1]:].any()]
        assert any(w.shape == v.shape and np.array_equal(w, v) for w in weights for v in layouts), name


def test_runner_uses_manifest_io_parameters(int8_builds, tmp_path):
    folder, manifest = int8_builds("digits_cnn", tflite_io="int8")
    io = json.loads(json.dumps(manifest["tflite"]["io"]))
    runner = TfliteRunner((folder / MODEL_FILE).read_bytes(), threads=1, io=io)
    feeds = {"image": np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)}
    (logits,) = runner.infer(feeds).values()
    assert logits.dtype == np.float32 and logits.shape == (3, 10)
    io["image"]["scale"] *= 2
    with pytest.raises(InputError, match="differs from the flatbuffer"):
        TfliteRunner((folder / MODEL_FILE).read_bytes(), io=io)


def _tiny_onnx(op: str) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name=f"my_{op.lower()}")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_op_the_lowering_lacks_is_named_with_its_node():
    with pytest.raises(InputError, match=r"cannot lower op Erf \(node my_erf\)"):
        to_tf_function(_tiny_onnx("Erf"), "tiny.onnx")


def test_lowering_matches_onnxruntime_on_a_small_graph():
    from enginekit.targets.onnxruntime import OrtRunner

    model = _tiny_onnx("Sigmoid")
    x = np.linspace(-4, 4, 8, dtype=np.float32).reshape(2, 4)
    runner = TfliteRunner(convert_function(to_tf_function(model, "tiny.onnx"), "tiny.onnx"))
    np.testing.assert_allclose(next(iter(runner.infer({"x": x}).values())), next(iter(OrtRunner(model.SerializeToString()).infer({"x": x}).values())), atol=1e-6)


def test_converter_error_names_the_tf_op():
    from enginekit.targets.tflite.convert import _converter_problem

    text = "loc(...): error: 'tf.Erfinv' op is neither a custom op nor a flex op\nerror: failed while converting"
    assert _converter_problem(text) == "no TFLite builtin for op tf.Erfinv"


def test_tflite_artifact_benches_through_the_registry(int8_builds):
    from enginekit.targets.registry import open_artifact

    folder, _ = int8_builds("digits_cnn")
    runner, manifest = open_artifact(folder, threads=1)
    assert manifest["target"] == "tflite"
    (logits,) = runner.infer({"image": np.zeros((1, 1, 8, 8), np.float32)}).values()
    assert logits.shape == (1, 10)


def test_a_scalar_input_is_fed_as_a_scalar():
    """silero's sample rate is a 0-d input: the runner once made it 1-D (np.ascontiguousarray
    does) and LiteRT refused the feed."""
    nodes = [helper.make_node("Cast", ["scale"], ["s"], name="cast", to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "s"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                                           helper.make_tensor_value_info("scale", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    runner = TfliteRunner(convert_function(to_tf_function(model, "scalar.onnx"), "scalar.onnx"))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(runner.infer({"x": x, "scale": np.array(3, np.int64)})["y"], 3 * x)


def test_hub_float_tensors_follow_the_hub_and_spare_compute_layers_and_its_integer_tensors():
    from enginekit.targets.tflite.hub_float import hub_float_tensors
    from enginekit.targets.tflite.ranges import RangeMap

    ranges = RangeMap(matched={"conv": "c1", "residual": "add_1", "norm": "ln_out"},
                      producers={"conv": "CONV_2D", "residual": "ADD", "mean": "MEAN", "norm": "ADD", "moved": "RESHAPE", "fc": "FULLY_CONNECTED"},
                      inputs_of={"moved": ["norm"], "norm": ["mean"], "fc": ["moved"]})
    # the residual Add is quantized in the hub (int8 here too); the LayerNorm's inside and output are
    # float there, and so is a reshape that moves the float output, unless a layer reads it
    assert hub_float_tensors(ranges, {"add_1", "c1"}, []) == ["mean", "norm"]  # "moved" feeds the FULLY_CONNECTED: int8
    ranges.inputs_of["fc"] = ["norm"]
    # a float op a layer reads stays float, as in the hub: a QUANTIZE writes the layer's input
    # (the LayerNorm's MUL whose scale the converter folded into the FULLY_CONNECTED); the reshape no layer reads moves floats
    assert hub_float_tensors(ranges, {"add_1", "c1"}, []) == ["mean", "norm", "moved"]
    assert hub_float_tensors(ranges, {"add_1", "c1", "ln_out"}, ["mean"]) == []
    # an op named like a part of a fused layer's name stays int8 (the quantizer would take the layer float with it)
    ranges.producers["Mul_2;MatMul;Add_31"] = "FULLY_CONNECTED"
    ranges.producers["Mul_2"] = "MUL"
    assert "Mul_2" not in hub_float_tensors(ranges, {"add_1", "c1"}, [])


def test_an_op_reading_a_float_tensor_is_float_as_in_the_hub_though_its_output_is_quantized():
    """silero's magnitude: Sqrt of a sum of squares the hub keeps float, its output quantized at
    the next Conv's input. The hub runs the Sqrt on floats; an int8 SQRT quantized the squares
    first, and silero's TFLite INT8 output had cosine 0.908 (0.995 with the SQRT float). An op
    reading only quantized tensors (the Mul after the Sqrt) stays int8."""
    from enginekit.targets.tflite.hub_float import hub_float_tensors
    from enginekit.targets.tflite.ranges import RangeMap

    ranges = RangeMap(matched={"squares": "add_50", "magnitude": "sqrt", "scaled": "mul_3", "conv": "c1"},
                      producers={"squares": "ADD", "magnitude": "SQRT", "scaled": "MUL", "conv": "CONV_2D"},
                      inputs_of={"magnitude": ["squares"], "scaled": ["magnitude"], "conv": ["scaled"]})
    assert hub_float_tensors(ranges, {"sqrt", "mul_3", "c1"}, []) == ["squares", "magnitude"]


def test_a_transformer_keeps_the_hubs_float_ops_on_tflite_where_they_pay(tmp_path):
    """A ViT (4 layers, seeded weights): full-integer LiteRT quantizes LayerNorm, Softmax and the
    residual stream, which ONNX Runtime and OpenVINO run in float; judged on calibration samples,
    the flatbuffer keeping the hub's float ops float is chosen, and its top-1 agreement passes.
    Its linear layers stay int8."""
    from corpus.models import BY_NAME

    entry = BY_NAME["vit_classifier"]
    for split in ("calibration", "evaluation"):  # the corpus's data
        np.savez(tmp_path / f"{split}.npz", **entry.data(split, 128))
    options = BuildOptions(calib_data=str(tmp_path / "calibration.npz"), eval_data=str(tmp_path / "evaluation.npz"), num_samples=128,
                           input_shapes=entry.input_shapes, output_kinds=entry.output_kinds, min_accuracy="none")
    manifest = build(entry.source(), "tflite", "int8", tmp_path / "out", options).manifest
    choice = manifest["tflite"]["hub_float_ops"]
    assert choice["chosen"], choice
    assert all(h < i + 0.002 for h, i in zip(choice["errors_hub"], choice["errors_integer"]))
    floating = manifest["tflite"]["types"]["float32_compute_ops"]
    assert "SOFTMAX" in floating and "FULLY_CONNECTED" not in floating
    # the attention's BATCH_MATMULs between two activations, which XNNPACK runs in float only, are
    # float too (delegate_float.py), and nothing of them is left outside the delegate
    delegated = manifest["tflite"]["float_for_xnnpack"]
    assert delegated["chosen"] and "BATCH_MATMUL" in delegated["ops"] and delegated["outside_after"] < delegated["outside_before"]
    assert "BATCH_MATMUL" in floating and "BATCH_MATMUL" not in manifest["tflite"]["types"]["outside_xnnpack"]
    # full-integer: 0.81 on these 128 samples (measured here), 0.898 with the LayerNorms' normalising
    # MUL int8, 0.914 with it float; ONNX Runtime and OpenVINO: 0.98; the corpus's gate: 0.90
    assert manifest["accuracy"]["metrics"]["top1_agreement"] >= 0.90, manifest["accuracy"]["metrics"]


@pytest.mark.parametrize("errors_integer, errors_hub, chosen", [
    ([0.058, 0.0185, 0.076, 0.030], [0.0085, 0.0196, 0.0070, 0.0164], True),  # PP-OCRv4 rec: one part 0.001 worse, mean / 3.5
    ([0.058, 0.0185, 0.076, 0.030], [0.0085, 0.0300, 0.0070, 0.0164], False),  # one part clearly worse
    ([0.010, 0.012, 0.011, 0.010], [0.008, 0.009, 0.008, 0.008], False)])  # better everywhere, but not by 1.5
def test_the_hubs_float_ops_need_a_clear_mean_gain_and_no_part_clearly_worse(monkeypatch, errors_integer, errors_hub, chosen):
    from enginekit.targets.tflite import hub_float

    errors = iter([errors_integer, errors_hub])
    monkeypatch.setattr(hub_float, "outputs_on", lambda model, samples, threads=None: model)
    monkeypatch.setattr(hub_float, "cosine_errors", lambda reference, candidate: next(errors) if candidate != b"float" else None)
    _, record = hub_float.choose(b"float", b"integer", lambda: b"hub", ["t"], [{}] * 4)
    assert record["chosen"] is chosen, record


@pytest.mark.parametrize("hub_noise, smoke_fails, chosen", [(0.2, False, True), (0.95, False, False), (0.2, True, False), (None, False, False)])
def test_the_hubs_float_ops_are_chosen_only_for_a_clear_gain_and_never_after_a_failed_smoke_run(monkeypatch, hub_noise, smoke_fails, chosen):
    """Outputs scripted per flatbuffer: full-integer with noise 1.0 (error well above 0.002), the
    hub's flatbuffer with `hub_noise` (None: full-integer within 0.002 of float, never judged)."""
    from enginekit.targets.tflite import hub_float

    rng = np.random.default_rng(0)
    base = [[rng.normal(0, 1, (8, 100))] for _ in range(4)]
    noise = [[rng.normal(0, 1, (8, 100))] for _ in range(4)]
    integer_noise = 0.01 if hub_noise is None else 0.1

    def outputs_on(model, samples, threads=None):
        scale = {b"float": 0.0, b"integer": integer_noise, b"hub": (hub_noise or 0.0) * 0.1}[model]
        return [[b[0] + scale * n[0]] for b, n in zip(base, noise)]

    def smoke(model, what):
        if smoke_fails:
            raise InputError("LiteRT crashed (SIGABRT) running the int8 flatbuffer")

    made = []
    monkeypatch.setattr(hub_float, "outputs_on", outputs_on)
    model, record = hub_float.choose(b"float", b"integer", lambda: made.append(1) or b"hub", ["t"], [{}] * 4, smoke=smoke)
    assert record["chosen"] is chosen and model == (b"hub" if chosen else b"integer")
    assert made == ([] if hub_noise is None else [1])  # within 0.002: the second flatbuffer is not even made
    if smoke_fails:
        assert "failed" in record["why"] and "SIGABRT" in record["why"]
    assert hub_float.choose(b"float", b"integer", lambda: b"hub", ["t"], [])[0] == b"integer"  # nothing to judge on


def test_the_runner_quantizes_io_as_round_half_even_plus_zero_point_saturated_whatever_the_size():
    """The runner's quantize takes one path for small inputs and another for large ones (speed):
    both give round(x / scale) + zero_point saturated to the type, the ends included."""
    from enginekit.targets.tflite.runner import LARGE_IO, quantize

    rng = np.random.default_rng(0)
    for size in (1, 10, LARGE_IO, 224 * 224 * 3):
        values = (rng.standard_normal(size) * 4).astype(np.float32)
        values[0], values[-1] = -1e6, 1e6  # beyond every grid: saturate at both ends (size 1: high)
        for zero_point, dtype in ((-3, np.int8), (128, np.uint8), (0, np.int16)):
            info = np.iinfo(dtype)
            expected = np.clip(np.rint(values / np.float32(0.0187)) + zero_point, info.min, info.max).astype(dtype)
            got = quantize(values, 0.0187, zero_point, dtype)
            assert got.dtype == dtype and np.array_equal(got, expected), (size, dtype)
            assert got[-1] == info.max and (size == 1 or got[0] == info.min)
    assert quantize(np.float32(0.5), 0.25, 1, np.int8) == 3  # a 0-d input


def test_the_hub_float_judge_counts_top_1_disagreements_of_probability_rows_only():
    """cosine barely sees a flat softmax whose int8 copy ties its top classes; the share of rows
    whose argmax moved does. Rows that are not probabilities (logits, maps) keep 1 - cosine."""
    from enginekit.targets.tflite.hub_float import cosine_errors

    rng = np.random.default_rng(0)
    flat = np.full((4, 300), 1 / 300) + rng.normal(0, 1e-5, (4, 300))
    flat /= flat.sum(1, keepdims=True)
    tied = np.round(flat * 256) / 256  # every row ties: argmax takes index 0
    assert 1 - np.dot(flat.ravel(), tied.ravel()) / np.linalg.norm(flat) / np.linalg.norm(tied) < 0.01
    assert cosine_errors([[flat]], [[tied]]) == [1.0]
    logits = np.log(flat) + 3.0  # a classifier's raw scores (log(flat) alone are log-probabilities: scores, judged by argmax too)
    error = cosine_errors([[logits]], [[np.round(logits * 4) / 4]])[0]
    assert error < 0.01  # not probability rows: cosine only, though the argmax moved
    assert cosine_errors([[np.log(flat)]], [[np.round(np.log(flat) * 4) / 4]]) == [1.0]


def test_the_hub_float_judge_weighs_a_detections_scores_apart_from_its_boxes():
    """A YOLO-style output: scores on a 1/4 grid barely move the whole tensor's cosine (boxes in
    pixels dominate it); the judge's error is the scores' own."""
    from enginekit.targets.tflite.hub_float import cosine_errors

    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.uniform(0, 320, (2, 4, 200)), rng.uniform(0, 1, (2, 3, 200))], axis=1)
    coarse = rows.copy()
    coarse[:, 4:] = np.round(coarse[:, 4:] * 4) / 4
    whole = 1 - np.dot(rows.ravel(), coarse.ravel()) / np.linalg.norm(rows) / np.linalg.norm(coarse)
    error = cosine_errors([[rows]], [[coarse]])[0]
    assert whole < 1e-6 and error > 0.005  # the scores' 1 - cosine, not the whole tensor's


@pytest.mark.parametrize("name", ["onnx::Flatten_0", "_features", "input.1"])
def test_an_input_name_tensorflow_refuses_keeps_its_name_on_the_tflite_artifact(tmp_path, name):
    """Older torch exports name inputs 'onnx::Flatten_0': TensorFlow refused it as a placeholder
    name, the converter wrote no signature ('model has 0 Signatures') and INT8 failed with an
    unexpected ValueError. The signature carries an escaped name; the runner, the manifest and
    the range matching give the model's own back."""
    rng = np.random.default_rng(5)
    weight = onnx.numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", [name, "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "named",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "named.onnx"))
    np.savez(tmp_path / "d.npz", **{name: rng.normal(0, 1, (32, 8)).astype(np.float32)})
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none")
    for precision in ("fp32", "int8"):
        result = build(str(tmp_path / "named.onnx"), "tflite", precision, tmp_path / precision, options)
        assert result.manifest["accuracy"]["metrics"]["cosine"] > 0.99
        assert [spec.name for spec in TfliteRunner(tmp_path / precision / MODEL_FILE).inputs] == [name]
    assert name in result.manifest["tflite"]["io"]


@pytest.mark.parametrize("sentinel", [float(np.finfo(np.float32).min), -np.inf])
def test_an_attention_mask_of_sentinels_stays_float_and_the_int8_flatbuffer_runs(tmp_path, sentinel):
    """scores + Where(pad, lowest float, 0) -> Softmax, as PyTorch writes a key-padding mask: the
    mask's range reached from -3.4e38 to the scores' top, a scale of ~1e36 on which LiteRT
    aborted. The tensors holding the sentinel stay float, found on any calibration batch (the
    first ones have no padding here); the projections stay int8."""
    rng = np.random.default_rng(6)
    constants = {"wq": rng.normal(0, 0.5, (16, 16)), "wv": rng.normal(0, 0.5, (16, 16)), "sentinel": np.array(sentinel), "zero": np.array(0.0)}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "xt"], ["scores"]), helper.make_node("Where", ["pad", "sentinel", "zero"], ["mask"]),
             helper.make_node("Unsqueeze", ["mask", "one"], ["mask3"]), helper.make_node("Add", ["scores", "mask3"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["weights"], axis=-1), helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("MatMul", ["weights", "v"], ["y"])]
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items()] + [onnx.numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16]),
                                                helper.make_tensor_value_info("pad", TensorProto.BOOL, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "masked.onnx"))
    pad = np.zeros((32, 8), bool)
    pad[4:, 6:] = True  # the last two positions of every sample but the first four are padding
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 8, 16)).astype(np.float32), pad=pad)
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none")
    result = build(str(tmp_path / "masked.onnx"), "tflite", "int8", tmp_path / "int8", options)
    assert result.manifest["accuracy"]["metrics"]["cosine"] > 0.98
    assert result.manifest["tflite"]["mask_float_ops"] >= 2  # the mask and the masked scores
    from ai_edge_litert import interpreter

    flatbuffer = (tmp_path / "int8" / MODEL_FILE).read_bytes()
    scales = [t["quantization"][0] for t in interpreter.Interpreter(model_content=flatbuffer).get_tensor_details() if t["dtype"] == np.int8]
    assert scales and max(scales) < 1.0, max(scales)  # no int8 grid spans the sentinel (it had a step of ~1e36)
    products = [op for op in op_types(flatbuffer) if op["op"] in ("BATCH_MATMUL", "FULLY_CONNECTED")]
    assert any("float32" not in op["inputs"] + op["outputs"] for op in products)


def test_an_int8_hard_swish_is_one_float_op_inside_xnnpack_between_int8_convolutions(tmp_path):
    """The INT8 build lowers a HardSwish to the one HARD_SWISH op, which it keeps float inside
    XNNPACK (its int8 kernel runs outside: delegate_float.py), between a DEQUANTIZE and a
    QUANTIZE; the convolutions stay int8. The INT8 lowering used to write it as an int8
    (x / 6) * relu6(x + 3), three ops XNNPACK runs in int8, each requantizing: PP-OCR cls INT8
    ran 0.94x FP32 that way and 1.27x this way (LiteRT, 2 threads), at the same accuracy."""
    from enginekit.targets.tflite.convert import outside_xnnpack

    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("HardSwish", ["c1"], ["h"]),
             helper.make_node("Conv", ["h", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "hswish.onnx"))
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none")
    result = build(str(tmp_path / "hswish.onnx"), "tflite", "int8", tmp_path / "int8", options)
    flatbuffer = (tmp_path / "int8" / MODEL_FILE).read_bytes()
    ops = op_types(flatbuffer)
    assert [op["inputs"] for op in ops if op["op"] == "HARD_SWISH"] == [["float32"]], ops
    assert not {"MUL", "ADD"} & {op["op"] for op in ops}, ops
    assert [op["inputs"][0] for op in ops if op["op"] == "CONV_2D"] == ["int8", "int8"]
    assert outside_xnnpack(flatbuffer) == {}
    assert result.manifest["accuracy"]["metrics"]["cosine"] > 0.99


def test_a_returned_concat_of_boxes_and_scores_stays_float_so_the_scores_keep_their_grid(tmp_path):
    """A YOLO-style head concatenates boxes in pixels with sigmoid scores and returns them: on the
    concat's one int8 grid over [0, 300] every score is 0 or ~1.2. Kept float (its inputs on
    their own grids), the scores keep their values."""
    rng = np.random.default_rng(5)
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 1, (6, 3, 1, 1)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.array([0, 6, 64], np.int64), "flat"),
             onnx.numpy_helper.from_array(np.array([4, 2], np.int64), "parts"),
             onnx.numpy_helper.from_array(np.array(300.0, np.float32), "pixels")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "flat"], ["rows"]),
             helper.make_node("Split", ["rows", "parts"], ["raw_boxes", "logits"], axis=1),
             helper.make_node("Sigmoid", ["raw_boxes"], ["unit_boxes"]), helper.make_node("Mul", ["unit_boxes", "pixels"], ["boxes"]),
             helper.make_node("Sigmoid", ["logits"], ["scores"]), helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 6, 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "head.onnx"))
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    options = BuildOptions(calib_data=str(tmp_path / "d.npz"), eval_data=str(tmp_path / "d.npz"), num_samples=32, min_accuracy="none",
                           target_options={"tflite": {"speed_check": False}})
    result = build(str(tmp_path / "head.onnx"), "tflite", "int8", tmp_path / "int8", options)
    output = result.manifest["accuracy"]["metrics"]["outputs"]["output0"]
    assert output["kind"] == "detection" and output["score_cosine"] > 0.99, output
    assert result.manifest["tflite"]["mixed_concat_float_ops"] >= 1


def test_only_a_returned_concat_of_unlike_ranges_is_kept_float():
    from enginekit.targets.tflite.float_layers import mixed_concat_outputs
    from enginekit.targets.tflite.ranges import RangeMap

    ranges = RangeMap(ranges={"boxes": (0.0, 320.0), "scores": (0.0, 1.0), "joined": (0.0, 320.0), "moved": (0.0, 320.0),
                              "a": (0.0, 4.0), "b": (-1.0, 2.0), "near": (-1.0, 4.0), "inner": (0.0, 320.0), "conv": (-5.0, 5.0)},
                      producers={"joined": "CONCATENATION", "moved": "RESHAPE", "near": "CONCATENATION", "inner": "CONCATENATION",
                                 "conv": "CONV_2D"},
                      inputs_of={"joined": ["boxes", "scores"], "moved": ["joined", "shape"], "near": ["a", "b"],
                                 "inner": ["scores", "boxes"], "conv": ["inner", "w"]})
    assert mixed_concat_outputs(ranges) == ["joined", "moved"]  # "near": alike ranges; "inner": a convolution reads it
