"""Pre-quantized models pass through: a QDQ ONNX (ONNX Runtime's quantize_static, or enginekit's
own INT8 artifact) builds for every target without calibration data, with its own scales, read
back from each artifact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import enginekit as ek
from enginekit.onnx.prequantized import has_qdq, restore_channels_first_pools, strip_qdq

TARGETS = ["onnxruntime", "openvino", "tflite"]


def _digits(count: int, split: str = "calibration") -> np.ndarray:
    from enginekit.models import get_spec

    return get_spec("digits_cnn").dataset().samples(split, count)["image"]


def _ort_quantized(float_path: Path, out: Path, fmt: str = "QDQ") -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    images = _digits(64)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i : i + 8]} for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _activation_scales(path: Path) -> dict[str, tuple[float, int]]:
    """Quantized tensor -> (scale, zero point); a tensor ONNX Runtime's artifact pads with zero
    channels before quantizing (targets.onnxruntime.align_input_channels) counts as the tensor padded;
    a channels-last integer MaxPool of the artifact is read as the Q/DQ MaxPool it stands for."""
    model = onnx.load(str(path))
    restore_channels_first_pools(model)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    padded = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Pad"}
    return {padded.get(n.input[0], n.input[0]): (float(values[n.input[1]]), int(values[n.input[2]]) if len(n.input) > 2 else 0)
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in values}


def _openvino_scales(folder: Path) -> list[float]:
    import openvino as ov

    scales = []
    for op in ov.Core().read_model(str(folder / "model.xml")).get_ordered_ops():
        if op.get_type_name() == "FakeQuantize":
            low, high = (op.input_value(i).get_node().get_data() for i in (1, 2))
            if low.size == 1:
                scales.append(float((high - low).ravel()[0]) / (op.get_levels() - 1))
    return scales


def _tflite_scales(folder: Path) -> list[float]:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(str(folder / "model.tflite")).get_tensor_details()
    return [float(d["quantization_parameters"]["scales"][0]) for d in details
            if d["dtype"] in (np.int8, np.uint8) and len(d["quantization_parameters"]["scales"]) == 1]


def _read_back(folder: Path, target: str) -> list[float]:
    if target == "onnxruntime":
        return [scale for scale, _ in _activation_scales(folder / "model.int8.onnx").values()]
    return _openvino_scales(folder) if target == "openvino" else _tflite_scales(folder)


@pytest.fixture(scope="module")
def ort_qdq(exported, tmp_path_factory):
    pytest.importorskip("onnxruntime.quantization")
    folder = tmp_path_factory.mktemp("prequantized")
    path = _ort_quantized(exported("digits_cnn")[0] / "model.onnx", folder / "ort_qdq.onnx")
    np.savez(folder / "eval.npz", image=_digits(128, "evaluation"))
    return path, folder / "eval.npz"


def test_the_float_twin_of_onnx_runtimes_qdq_graph(ort_qdq, exported):
    path, _ = ort_qdq
    source = onnx.load(str(path))
    before = source.SerializeToString()
    twin = strip_qdq(source)
    assert source.SerializeToString() == before  # the caller's model is left as it was
    assert has_qdq(source) and not has_qdq(twin.model) and twin.weights == 10
    float_ops = Counter(n.op_type for n in onnx.load(str(exported("digits_cnn")[0] / "model.onnx")).graph.node)
    assert Counter(n.op_type for n in twin.model.graph.node)["Relu"] == float_ops["Relu"]  # the ReLUs ORT folded into grids are back
    grids = {name: grid for name, grid in twin.activations.items()}
    assert grids["image"].type == "uint8" and grids["image"].zero_point == 0
    import onnxruntime as ort

    feeds = {"image": _digits(32, "evaluation")}
    # the Q/DQ graph as written (DequantizeLinear -> float op -> QuantizeLinear), not fused into
    # ORT's u8 x s8 kernels, which saturate on a CPU without VNNI (corrcoef 0.9967 on an AVX2 EPYC)
    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    quantized = ort.InferenceSession(str(path), unfused).run(None, feeds)[0]
    floating = ort.InferenceSession(twin.model.SerializeToString()).run(None, feeds)[0]
    assert np.corrcoef(quantized.ravel(), floating.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("target", TARGETS)
def test_an_onnx_runtime_qdq_model_builds_for_every_target_with_its_own_scales(ort_qdq, tmp_path, target):
    if target != "onnxruntime":
        pytest.importorskip({"openvino": "openvino", "tflite": "ai_edge_litert"}[target], reason=f"the {target} extra is not installed")
    path, eval_data = ort_qdq
    result = ek.build(path, target, "int8", tmp_path / target, ek.BuildOptions(eval_data=eval_data))  # no calibration data
    manifest = result.manifest
    assert manifest["calibration"]["method"] == "imported" and manifest.accuracy["passed"]
    source = {name: scale for name, (scale, _) in _activation_scales(path).items()}
    built = _read_back(Path(result.folder), target)
    honoured = [name for name, scale in source.items() if any(abs(b - scale) <= 1e-6 * scale for b in built)]
    assert len(honoured) >= len(source) - 2, f"{target} kept {honoured} of {sorted(source)}"
    if target == "onnxruntime":  # tensor by tensor, scale and zero point
        own = _activation_scales(Path(result.folder) / "model.int8.onnx")
        pairs = [(grid, own.get(name, own.get(f"{name}__relu"))) for name, grid in _activation_scales(path).items()]  # a restored ReLU's output keeps the grid
        assert sum(theirs == ours for theirs, ours in pairs) >= len(pairs) - 2, pairs


def test_enginekits_own_int8_artifact_passes_through_every_target(tmp_path):
    built = ek.build("digits_cnn", "onnxruntime", "int8", tmp_path / "first", ek.BuildOptions(num_samples=64))
    path = tmp_path / "own.onnx"
    path.write_bytes((Path(built.folder) / "model.int8.onnx").read_bytes())
    np.savez(tmp_path / "eval.npz", image=_digits(128, "evaluation"))
    original = _activation_scales(path)
    for target in [t for t in TARGETS if t == "onnxruntime" or _has(t)]:
        again = ek.build(path, target, "int8", tmp_path / target, ek.BuildOptions(eval_data=tmp_path / "eval.npz"))
        assert again.manifest["calibration"]["method"] == "imported"
        assert again.manifest.accuracy["metrics"]["top1_agreement"] >= 0.97
        scales = _read_back(Path(again.folder), target)
        assert sum(any(abs(s - scale) <= 1e-6 * scale for s in scales) for scale, _ in original.values()) >= len(original) - 2
    rebuilt = _activation_scales(tmp_path / "onnxruntime" / "model.int8.onnx")
    assert rebuilt == original  # the same graph again: every tensor, scale and zero point


def _has(target: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"openvino": "openvino", "tflite": "ai_edge_litert"}[target]) is not None


def test_a_qoperator_model_is_refused_in_one_line(exported, tmp_path, run_cli):
    path = _ort_quantized(exported("digits_cnn")[0] / "model.onnx", tmp_path / "qop.onnx", "QOperator")
    result = run_cli("export", "--model", path, "-o", tmp_path / "out")
    assert result.code == 2 and "QOperator-format ops" in result.error_line and "QLinearConv" in result.error_line
    assert not (tmp_path / "out").exists()


def test_a_dynamically_quantized_model_builds_in_float_and_its_int8_says_it_is_quantized_already(exported, tmp_path, run_cli):
    """ONNX Runtime's quantize_dynamic (ddddocr ships such a CRNN) leaves ConvInteger and
    DynamicQuantizeLinear and no float weights: the file runs as it is, but INT8 has nothing to
    calibrate; its cell said 'no Conv, Gemm or MatMul', which sent users looking for a bug."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(exported("digits_cnn")[0] / "model.onnx"), str(path), weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    np.savez(tmp_path / "d.npz", image=_digits(16))
    result = run_cli("build", "--model", path, "--targets", "onnxruntime", "--precisions", "fp32,int8", "--calib-data", tmp_path / "d.npz",
                     "--eval-data", tmp_path / "d.npz", "-n", "16", "-o", tmp_path / "out")
    assert result.code == 1 and (tmp_path / "out" / "onnxruntime-fp32" / "manifest.json").exists()
    assert "the model is quantized already (ConvInteger" in result.out and "DynamicQuantizeLinear" in result.out
    assert not (tmp_path / "out" / "onnxruntime-int8").exists()
