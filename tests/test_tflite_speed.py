"""TFLite's speed check (targets/tflite/speed_float.py): each int8 compute layer is cut out and
timed against its float twin; the slower ones stay float when that makes the file faster."""

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
from enginekit.targets.tflite import speed_float  # noqa: E402
from enginekit.targets.tflite.convert import op_types  # noqa: E402
from enginekit.targets.tflite.runner import MODEL_FILE  # noqa: E402


def _convnet(folder, classes: int = 4, size=32):
    """3 -> 8 channels (a first layer with few input channels), 8 -> 16, pooled, a Gemm head;
    `size` "any" leaves height and width dynamic (the data is 32 x 32)."""
    rng = np.random.default_rng(11)
    constants = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.2, (16, 8, 3, 3)),
                 "b2": rng.normal(0, 0.1, 16), "wg": rng.normal(0, 0.3, (16, classes)), "bg": rng.normal(0, 0.1, classes)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="first"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="second"), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, *((size, size) if size != "any" else ("h", "w"))])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
                              [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in constants.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "convnet.onnx"))
    np.savez(folder / "d.npz", x=rng.normal(0, 1, (32, 3, 32, 32)).astype(np.float32))
    return BuildOptions(calib_data=str(folder / "d.npz"), eval_data=str(folder / "d.npz"), num_samples=32, min_accuracy="none",
                        target_options={"tflite": {"speed_check": True}})


def _compute_types(flatbuffer: bytes) -> list[tuple[str, str]]:
    return [(op["op"], op["outputs"][0]) for op in op_types(flatbuffer) if op["op"] in speed_float.PROBED_OPS]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_each_layer_cut_out_alone_computes_what_it_computes_in_the_whole_file(tmp_path, precision):
    """The probes must be the layers themselves: each layer cut out of the file, fed the tensor it
    reads in the whole file, writes the tensor the whole file writes there, with its weights as
    constants (ai-edge-quantizer stores an int8 file's constants after the flatbuffer: missed,
    they became the probe's inputs, which XNNPACK runs unpacked and slow)."""
    from ai_edge_litert import interpreter

    # a 16 x 20000 head: 320 KB of int8 weights, which ai-edge-quantizer stores after the flatbuffer
    result = build(str(tmp_path / "convnet.onnx"), "tflite", precision, tmp_path / precision, _convnet(tmp_path, classes=20000))
    model = (result.folder / MODEL_FILE).read_bytes()
    probes = speed_float.single_op_models(model)
    assert sorted(kind for kind, _ in probes.values()) == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED"]
    whole = interpreter.Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                                    experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    whole.allocate_tensors()
    fed = whole.get_input_details()[0]
    whole.set_tensor(fed["index"], np.random.default_rng(0).normal(0, 1, fed["shape"]).astype(np.float32))
    whole.invoke()
    by_name = {t["name"]: t["index"] for t in whole.get_tensor_details()}
    for name, (_, probe) in probes.items():
        alone = interpreter.Interpreter(model_content=probe, experimental_op_resolver_type=interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        alone.allocate_tensors()
        (fed,) = alone.get_input_details()  # the activation it reads; weights and bias are its own constants
        alone.set_tensor(fed["index"], whole.get_tensor(by_name[fed["name"]]))
        alone.invoke()
        np.testing.assert_allclose(alone.get_tensor(alone.get_output_details()[0]["index"]), whole.get_tensor(by_name[name]), rtol=1e-5, atol=1e-5)
        assert speed_float.interleaved_microseconds([probe], 1)[0] > 0


def test_a_layer_whose_int8_kernel_is_slower_stays_float_when_the_file_gets_faster(tmp_path, monkeypatch):
    """Timings made up (the real ones depend on the CPU): the first convolution's int8 probe is 4x
    its float one, the others faster; the file with it float 'runs' in 100 us against 150. The
    build keeps exactly that layer float, the others int8, says so in the manifest and the notes,
    and the gate judges the file it keeps."""
    options = _convnet(tmp_path)
    real = speed_float.interleaved_microseconds
    calls = []

    def timed(models, threads, shapes=None):
        calls.append(len(models))
        real(models, threads, shapes)  # the probes and files must load and run
        if len(calls) == 1:  # the first probe pair (the first convolution): int8 then float
            return [400.0, 100.0]
        if len(models) == 2 and len(calls) <= 3:
            return [50.0, 100.0]
        return [150.0, 100.0]  # the whole file, then the file with the slow layer float

    monkeypatch.setattr(speed_float, "interleaved_microseconds", timed)
    result = build(str(tmp_path / "convnet.onnx"), "tflite", "int8", tmp_path / "int8", options)
    record = result.manifest["tflite"]["float_for_speed"]
    assert record["chosen"] and record["ops"] == {"CONV_2D": 1} and record["integer_us"] == 150.0
    (layer,) = record["layers"].values()
    assert layer == {"op": "CONV_2D", "int8_us": 400.0, "float_us": 100.0}
    types = _compute_types((result.folder / MODEL_FILE).read_bytes())
    assert [t for _, t in types] == ["float32", "int8", "int8"], types
    assert any("slower on this CPU" in note for note in result.manifest["tflite"]["notes"])
    assert result.manifest["accuracy"]["metrics"]["cosine"] > 0.99


def test_the_slower_layers_stay_int8_when_the_file_with_them_float_is_not_faster(tmp_path, monkeypatch):
    options = _convnet(tmp_path)
    calls = []

    def timed(models, threads, shapes=None):  # the three probe pairs: int8 3x float; then both files alike
        calls.append(models)
        return [300.0, 100.0] if len(calls) <= 3 else [100.0, 100.0]

    monkeypatch.setattr(speed_float, "interleaved_microseconds", timed)
    result = build(str(tmp_path / "convnet.onnx"), "tflite", "int8", tmp_path / "int8", options)
    record = result.manifest["tflite"]["float_for_speed"]
    assert not record["chosen"] and record["ops"] == {"CONV_2D": 2, "FULLY_CONNECTED": 1} and len(calls) == 4
    assert all(t == "int8" for _, t in _compute_types((result.folder / MODEL_FILE).read_bytes()))
    assert any("stay int8" in note for note in result.manifest["tflite"]["notes"])


def test_the_check_off_keeps_every_layer_int8_and_measures_nothing(tmp_path, monkeypatch):
    options = _convnet(tmp_path)
    options.target_options = {"tflite": {"speed_check": False}}

    def never(models, threads, shapes=None):
        raise AssertionError("timed with the speed check off")

    monkeypatch.setattr(speed_float, "interleaved_microseconds", never)
    result = build(str(tmp_path / "convnet.onnx"), "tflite", "int8", tmp_path / "int8", options)
    assert "float_for_speed" not in result.manifest["tflite"]
    assert all(t == "int8" for _, t in _compute_types((result.folder / MODEL_FILE).read_bytes()))


def test_on_this_cpu_the_record_agrees_with_its_own_timings(tmp_path):
    """Real timings, whatever this CPU makes of them: a layer is listed only when its int8 probe
    took more than SLOWER times its float one, and the file with them float is kept only when it
    was faster by FASTER; the kept file's layer types follow that choice."""
    result = build(str(tmp_path / "convnet.onnx"), "tflite", "int8", tmp_path / "int8", _convnet(tmp_path))
    record = result.manifest["tflite"].get("float_for_speed")
    float_layers = [t for _, t in _compute_types((result.folder / MODEL_FILE).read_bytes())].count("float32")
    if record is None:
        print("no int8 kernel was slower than its float one on this CPU")
        assert float_layers == 0
        return
    for layer in record["layers"].values():
        assert layer["int8_us"] > speed_float.SLOWER * layer["float_us"]
    assert record["chosen"] == (record["integer_us"] > speed_float.FASTER * record["with_float_us"])
    assert float_layers == (len(record["layers"]) if record["chosen"] else 0)


def test_the_command_line_turns_the_check_on_and_off(tmp_path, monkeypatch, run_cli):
    _convnet(tmp_path)
    monkeypatch.setattr(speed_float, "interleaved_microseconds", lambda models, threads, shapes=None: [300.0, 100.0])
    common = ["build", "-m", tmp_path / "convnet.onnx", "--target", "tflite", "--precision", "int8", "--calib-data", tmp_path / "d.npz",
              "--eval-data", tmp_path / "d.npz", "--num-samples", "32", "--min-accuracy", "none"]
    for flag, expected in (("--tflite-speed-check", True), ("--no-tflite-speed-check", False)):
        result = run_cli(*common, flag, "-o", tmp_path / flag)
        assert result.code == 0, result.err
        manifest = json.loads((tmp_path / flag / "manifest.json").read_text())
        assert ("float_for_speed" in manifest["tflite"]) is expected


def test_layers_are_timed_at_the_size_the_data_runs_at_when_the_file_leaves_it_dynamic(tmp_path, monkeypatch):
    """An input whose height and width are dynamic: the file holds placeholder sizes, and PP-OCRv4
    det's layers were timed at 1 x 1 pixels. Every probe and both files are timed with the
    tensors at the data's 32 x 32."""
    options = _convnet(tmp_path, size="any")
    real, seen = speed_float.interleaved_microseconds, []

    def timed(models, threads, shapes=None):
        seen.append(shapes)
        return real(models, threads, shapes)

    monkeypatch.setattr(speed_float, "interleaved_microseconds", timed)
    result = build(str(tmp_path / "convnet.onnx"), "tflite", "int8", tmp_path / "int8", options)
    assert result.manifest["accuracy"]["metrics"]["cosine"] > 0.99
    assert seen and all(shapes is seen[0] for shapes in seen)
    shapes = list(seen[0].values())
    assert [1, 32, 32, 8] in shapes and [1, 32, 32, 16] in shapes, shapes  # both convolutions' outputs


def test_a_measurement_that_fails_leaves_the_file_full_integer_and_says_so(tmp_path, monkeypatch):
    """The speed check is an optimisation: LiteRT refusing a probe's shapes must not fail the cell."""
    options = _convnet(tmp_path)

    def refuses(model, feeds):
        raise RuntimeError("tensorflow/lite/kernels/conv.cc: cannot resize")

    monkeypatch.setattr(speed_float, "running_shapes", refuses)
    result = build(str(tmp_path / "convnet.onnx"), "tflite", "int8", tmp_path / "int8", options)
    record = result.manifest["tflite"]["float_for_speed"]
    assert not record["chosen"] and "cannot resize" in record["why"]
    assert all(t == "int8" for _, t in _compute_types((result.folder / MODEL_FILE).read_bytes()))
    assert any(note.startswith("the speed check did not run") for note in result.manifest["tflite"]["notes"])
