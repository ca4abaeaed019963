"""INT8 weights as int8 or as uint8 zero point 128 (the same grid): which one "auto" picks on a
CPU whose u8 x s8 kernels saturate, that both dequantize to the same weights, and that ONNX
Runtime fuses either into integer kernels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from enginekit.builder import BuildOptions, build
from enginekit.core import machine
from enginekit.quantization.encoding import quantize_weight, weight_type
from enginekit.quantization.pipeline import QuantizeSettings


@pytest.mark.parametrize("saturates, encoding, expected", [
    (True, "uint8", "uint8"), (True, "mixed", "uint8"), (True, "int8", "int8"),
    (False, "uint8", "int8"), (False, "mixed", "int8"), (False, "int8", "int8"),
])
def test_auto_takes_uint8_weights_only_where_the_cpu_saturates(monkeypatch, saturates, encoding, expected):
    monkeypatch.setattr(machine, "int8_pairs_saturate", lambda: saturates)
    assert weight_type("auto", encoding) == expected
    assert weight_type("int8", encoding) == "int8"


def test_tensorrts_encoding_refuses_uint8_weights():
    with pytest.raises(ValueError, match="int8 weights only"):
        weight_type("uint8", "int8")


def test_a_cpu_without_vnni_saturates_and_one_with_it_does_not(monkeypatch):
    for flags, expected in ((frozenset({"avx2", "fma"}), True), (frozenset({"avx2", "avx512f", "avx512_vnni"}), False),
                            (frozenset({"avx2", "avx_vnni"}), False), (frozenset(), False)):
        monkeypatch.setattr(machine, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
        assert machine.int8_pairs_saturate() is expected, flags
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"asimd", "neon"}))
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    assert machine.int8_pairs_saturate() is False


def test_uint8_weights_are_the_int8_grid_shifted():
    weight = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    signed, scales, zero = quantize_weight(weight, 0, "int8")
    unsigned, same_scales, shifted = quantize_weight(weight, 0, "uint8")
    assert signed.dtype == np.int8 and unsigned.dtype == np.uint8 and np.all(zero == 0) and np.all(shifted == 128)
    np.testing.assert_array_equal(scales, same_scales)
    shape = (-1, 1, 1, 1)
    np.testing.assert_array_equal(signed.astype(np.float32) * scales.reshape(shape),
                                  (unsigned.astype(np.float32) - 128) * same_scales.reshape(shape))


def test_onnx_runtime_runs_uint8_weights_as_integer_convolutions_with_the_same_accuracy(tmp_path):
    import onnxruntime as ort

    built = {}
    for kind in ("int8", "uint8"):
        out = tmp_path / kind
        manifest = build("digits_cnn", "onnxruntime", "int8", out, BuildOptions(quantize=QuantizeSettings(weight_type=kind))).manifest
        assert manifest["quantization"]["weight_type"] == kind
        model = onnx.load(str(out / "model.int8.onnx"))
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("__int8")}
        assert weights and {w.dtype for w in weights.values()} == {np.dtype(kind)}
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{kind}-optimized.onnx")
        ort.InferenceSession(str(out / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
        fused = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
        built[kind] = (manifest["accuracy"]["metrics"], fused["QLinearConv"])
    assert built["uint8"][1] == built["int8"][1] > 0  # every conv integer either way
    # the same grid: bias correction and accuracy are those of the int8 weights (digits saturates nowhere)
    assert built["uint8"][0]["accuracy"] == pytest.approx(built["int8"][0]["accuracy"], abs=0.01)


def test_the_report_flags_an_artifact_with_uint8_weights():
    from enginekit.benchmark.report import flags

    floating = {"precision": "int8", "integer_share": 0.02, "weight_type": "uint8"}
    assert flags(floating, 1.36) == ["only 2% of compute ops in integer",
                                     "uint8 weights (int8 ones saturate u8 x s8 kernels on a CPU without VNNI)"]
    assert flags({"precision": "int8", "integer_share": 1.0, "weight_type": "int8"}, 1.6) == []
