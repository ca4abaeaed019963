"""SmoothQuant (onnx/smoothing.py): the smoothed graph computes the same function, the divisors
travel in the calibration table, and on activations with outlier channels (a transformer's
LayerNorm and GELU outputs) INT8 gets closer to FP32 with it than without."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import enginekit as ek
from enginekit.calibration.table import CalibrationTable
from enginekit.core.errors import InputError
from enginekit.onnx.session import Session
from enginekit.onnx.smoothing import apply_smoothing, smoothable_inputs
from enginekit.quantization.pipeline import QuantizeSettings

CHANNELS, TOKENS = 32, 8


def _block(ln_also_read_by_add: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x [batch, 8, 32] -> LayerNorm (a few channels with large gamma: the outliers, read through
    small weights, as in trained transformers) -> two MatMuls (query/key-like) -> Add -> Gelu ->
    MatMul (down projection) -> y, plus a pooled 2-D head."""
    rng = np.random.default_rng(seed)
    outliers = [3, 17, 29]
    gamma = np.ones(CHANNELS, np.float32)
    gamma[outliers] = [40.0, -25.0, 30.0]
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731

    def weight(name, shape):
        value = rng.normal(0, 0.2, shape)
        if shape[0] == CHANNELS and name in ("wq", "wk"):
            value[outliers] /= 30
        return const(name, value)

    node = helper.make_node
    nodes = [node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm", axis=-1),
             node("MatMul", ["n", "wq"], ["q"], name="query"), node("MatMul", ["n", "wk"], ["k"], name="key"),
             node("Add", ["q", "k"], ["s"], name="sum"), node("Gelu", ["s"], ["g"], name="gelu"),
             node("MatMul", ["g", "wd"], ["d"], name="down"),
             node("ReduceMean", ["d", "axes"], ["p"], name="pool", keepdims=0), node("MatMul", ["p", "wh"], ["y"], name="head")]
    if ln_also_read_by_add:
        nodes[3] = node("Sum", ["q", "k", "n"], ["s"], name="sum")
    inits = [const("gamma", gamma), const("beta", rng.normal(0, 0.1, CHANNELS)), weight("wq", (CHANNELS, CHANNELS)),
             weight("wk", (CHANNELS, CHANNELS)), weight("wd", (CHANNELS, CHANNELS)), weight("wh", (CHANNELS, 10)),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, CHANNELS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def _samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, TOKENS, CHANNELS)).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return Session(model).run({"x": x})["y"]


def test_token_matmul_inputs_are_smoothable_and_a_2d_head_or_a_tied_weight_is_not():
    assert sorted(smoothable_inputs(_block())) == ["g", "n"]
    assert [n.name for n in smoothable_inputs(_block())["n"]] == ["query", "key"]
    tied = _block()
    tied.graph.node[5].input[1] = "wq"  # the down projection reuses the query weight: rescaling it for one breaks the other
    assert {t: [n.name for n in nodes] for t, nodes in smoothable_inputs(tied).items()} == {"n": ["key"]}
    smoothed, record = apply_smoothing(tied, {"n": np.full(CHANNELS, 4.0, np.float32)})
    assert record["scale_ops_inserted"] == 1  # the LayerNorm also feeds the query: a Mul for the key alone
    x = _samples(2, 5)
    np.testing.assert_allclose(_run(smoothed, x), _run(tied, x), rtol=1e-4, atol=1e-4)


def test_smoothing_keeps_the_function_folding_into_layernorm_where_it_can():
    model, x = _block(), _samples(4, 1)
    divisors = {"n": np.random.default_rng(2).uniform(0.2, 8, CHANNELS).astype(np.float32),
                "g": np.random.default_rng(3).uniform(0.2, 8, CHANNELS).astype(np.float32)}
    smoothed, record = apply_smoothing(model, divisors)
    assert record == {"tensors": 2, "folded_into_layernorm": 1, "scale_ops_inserted": 1}
    assert [n.op_type for n in smoothed.graph.node].count("Mul") == 1  # after the Gelu only
    np.testing.assert_allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)
    # a LayerNorm whose output another op reads too cannot carry the division: a Mul does
    shared = _block(ln_also_read_by_add=True)
    smoothed, record = apply_smoothing(shared, divisors)
    assert record["folded_into_layernorm"] == 0 and record["scale_ops_inserted"] == 2
    np.testing.assert_allclose(_run(smoothed, x), _run(shared, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not an input of a MatMul"):
        apply_smoothing(model, {"p": np.ones(CHANNELS, np.float32)})


def _files(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(_block(), str(path))
    np.savez(tmp_path / "calib.npz", x=_samples(64, 10))
    np.savez(tmp_path / "eval.npz", x=_samples(64, 11))
    return path


def _build(path, tmp_path, name: str, alpha: float, **options):
    settings = QuantizeSettings(smoothquant=alpha)
    return ek.build(path, "onnxruntime", "int8", tmp_path / name, ek.BuildOptions(
        calib_data=str(tmp_path / "calib.npz"), eval_data=str(tmp_path / "eval.npz"), num_samples=64, min_accuracy="none",
        quantize=settings, **options)).manifest


def test_smoothquant_brings_int8_closer_to_fp32_and_its_table_rebuilds_the_same_graph(tmp_path):
    path = _files(tmp_path)
    plain, smooth = _build(path, tmp_path, "plain", 0.0), _build(path, tmp_path, "smooth", 0.8)
    before, after = plain["accuracy"]["metrics"]["cosine"], smooth["accuracy"]["metrics"]["cosine"]
    assert "smoothquant" not in plain["quantization"]
    assert smooth["quantization"]["smoothquant"] == {"alpha": 0.8, "tensors": 2, "folded_into_layernorm": 1, "scale_ops_inserted": 1}
    assert 1 - after < (1 - before) / 2, f"cosine {before:.5f} -> {after:.5f}"
    print(f"INT8 cosine to FP32 without SmoothQuant {before:.5f}, with {after:.5f}")
    assert plain["build_key"] != smooth["build_key"]
    table = CalibrationTable.load(tmp_path / "smooth" / "calibration.json")
    assert sorted(table.smoothing) == ["g", "n"] and table.parameters["smoothquant"] == 0.8
    assert table.model_sha256 == CalibrationTable.load(tmp_path / "plain" / "calibration.json").model_sha256  # the source's
    # a given table carries its divisors: the same Q/DQ graph, no smoothing pass of its own
    again = _build(path, tmp_path, "again", 0.0, table=str(tmp_path / "smooth" / "calibration.json"))
    assert (tmp_path / "again" / "model.int8.onnx").read_bytes() == (tmp_path / "smooth" / "model.int8.onnx").read_bytes()
    assert again["quantization"]["smoothquant"]["tensors"] == 2


def test_calibrate_writes_the_divisors_and_sharded_calibration_matches_one_pass(tmp_path):
    path = _files(tmp_path)
    one = ek.calibrate(path, str(tmp_path / "calib.npz"), num_samples=64, output=tmp_path / "one.json")
    two = ek.calibrate(path, str(tmp_path / "calib.npz"), num_samples=64, output=tmp_path / "two.json", shards=2, workers=2)
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    raw = json.loads((tmp_path / "one.json").read_text())
    assert sorted(raw["smoothing"]) == ["g", "n"] and len(raw["smoothing"]["n"]) == CHANNELS
    assert "n/smoothquant/output" not in raw["tensors"] and "g/smoothquant/output" in raw["tensors"]
    off = ek.calibrate(path, str(tmp_path / "calib.npz"), num_samples=64, smoothquant=0)
    assert not off.tables["minmax"].smoothing and one.tables["minmax"].smoothing


def test_a_table_whose_smoothing_does_not_fit_the_model_is_refused_in_one_line(tmp_path):
    path = _files(tmp_path)
    ek.calibrate(path, str(tmp_path / "calib.npz"), num_samples=64, output=tmp_path / "t.json")
    raw = json.loads((tmp_path / "t.json").read_text())
    raw["smoothing"]["p"] = [1.0] * CHANNELS
    (tmp_path / "t.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="smoothing does not fit this model: 'p' is not an input of a MatMul"):
        _build(path, tmp_path, "bad", 0.8, table=str(tmp_path / "t.json"))
    raw["smoothing"] = {"g": [1.0, -2.0]}
    (tmp_path / "t.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="smoothing of tensor 'g' is not a list of positive finite numbers"):
        CalibrationTable.load(tmp_path / "t.json")


def test_the_layer_report_of_a_smoothed_model_reads_the_smoothed_graph(tmp_path):
    """--report compared the Q/DQ graph with the unsmoothed FP32 model, whose graph has no
    '.../smoothquant/output' tensors: ONNX Runtime refused it ('Graph output ... does not exist')
    and every SmoothQuant build with --report failed."""
    path = _files(tmp_path)
    settings = QuantizeSettings(smoothquant=0.8, layer_report=True)
    manifest = ek.build(path, "onnxruntime", "int8", tmp_path / "report", ek.BuildOptions(
        calib_data=str(tmp_path / "calib.npz"), eval_data=str(tmp_path / "eval.npz"), num_samples=64, min_accuracy="none",
        quantize=settings)).manifest
    report = json.loads((tmp_path / "report" / manifest["layer_report"]).read_text())
    assert any("smoothquant" in row["tensor"] for row in report), [row["tensor"] for row in report]


def test_a_channel_silent_on_the_calibration_data_is_not_rescaled():
    """A channel at 0 on every calibration sample got the divisor MIN_PEAK**alpha / |w|**(1-alpha)
    (~1e-4): where it fired later it was multiplied ~10^4 past the calibrated range (MobileBERT's
    ReLU channel: 358 became 3.1e6). Now its divisor is 1; the other channels are smoothed as before."""
    from enginekit.onnx.smoothing import smoothing_scales

    peaks = {"n": np.abs(np.random.default_rng(0).normal(0, 1, CHANNELS)) + 0.5}
    peaks["n"][[5, 9]] = 0.0
    scales = smoothing_scales(_block(), peaks)["n"]
    assert scales[5] == scales[9] == 1.0
    live = np.delete(np.arange(CHANNELS), [5, 9])
    assert np.all(scales[live] != 1.0) and np.all(scales[live] > 0.1)
