"""Hostile and broken files, one per loader weakness the ecosystem has shipped (see the CVEs in
the hardening issue): each case asserts the one-line message, the exit code (or the error the
library API raises), and that nothing was written or executed."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from enginekit.core.errors import GateError, InputError
from enginekit.core.loaders import check_safetensors_header, check_tflite, keras_config_problems, load_keras, load_onnx
from tests.conftest import assert_nothing_written


def _external_model(folder: Path, location: str, offset: int = 0, length: int = 16) -> Path:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def _refused_export(run_cli, tmp_path, model, needle):
    out = tmp_path / "out"
    result = run_cli("export", "--model", model, "-o", out)
    assert result.code == 2, result.err
    assert needle in result.error_line and str(model) in result.error_line
    assert_nothing_written(out)


def test_external_data_to_etc_passwd(run_cli, tmp_path):
    path = _external_model(tmp_path / "a" / "b", "../../etc/passwd")
    _refused_export(run_cli, tmp_path, path, "outside the model folder")


def test_external_data_absolute_path(run_cli, tmp_path):
    path = _external_model(tmp_path / "m", "/etc/passwd")
    _refused_export(run_cli, tmp_path, path, "absolute path")


def test_external_data_symlink_out_of_the_folder(run_cli, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(4, np.float32).tobytes())
    path = _external_model(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").symlink_to(secret)
    _refused_export(run_cli, tmp_path, path, "symbolic link")


def test_external_data_hard_link(run_cli, tmp_path):
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(np.zeros(4, np.float32).tobytes())
    path = _external_model(tmp_path / "m", "weights.bin")
    os.link(other, tmp_path / "m" / "weights.bin")
    _refused_export(run_cli, tmp_path, path, "hard links")


def test_external_data_offset_beyond_the_end(run_cli, tmp_path):
    path = _external_model(tmp_path / "m", "weights.bin", offset=64, length=16)
    (tmp_path / "m" / "weights.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    _refused_export(run_cli, tmp_path, path, "beyond the end")


def test_external_data_inside_the_folder_loads(tmp_path):
    path = _external_model(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = load_onnx(path)
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == [0, 1, 2, 3]


def test_opset_newer_than_the_runtime(run_cli, tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "future.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version() + 5)]), str(path))
    _refused_export(run_cli, tmp_path, path, "newer than this ONNX release supports")


# ------------------------------------------------------------------------------- safetensors


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = __import__("json").dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, needle", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, bytes(16), "outside the data"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24), "overlap"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, bytes(16), "does not match"),
    ({"a": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype"),
])
def test_safetensors_header_attacks(tmp_path, header, data, needle):
    path = _safetensors(tmp_path / "w.safetensors", header, data)
    with pytest.raises(InputError, match=needle):
        check_safetensors_header(path)


def test_safetensors_header_length_beyond_the_file(run_cli, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    out = tmp_path / "out"
    result = run_cli("export", "--model", "digits_cnn", "--weights", path, "-o", out)
    assert result.code == 2 and "header length" in result.error_line
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------- Keras


keras = pytest.importorskip("keras", reason="the keras extra is not installed")


def _lambda_model():
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2, name="doubler")(keras.layers.Dense(3)(inputs))
    return keras.Model(inputs, outputs)


def test_lambda_layer_in_a_keras_archive_is_refused(tmp_path):
    path = tmp_path / "lambda.keras"
    _lambda_model().save(path)
    with pytest.raises(InputError, match="Lambda layer 'doubler'") as info:
        load_keras(path)
    assert info.value.option == "unsafe_allow_lambda" and str(path) in str(info.value)


def test_lambda_layer_in_an_h5_is_refused(tmp_path):
    path = tmp_path / "lambda.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _lambda_model().save(path)
    with pytest.raises(InputError, match="Lambda layer"):
        load_keras(path)


def test_keras_custom_module_and_tfsmlayer_are_flagged():
    config = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "Evil", "module": "attacker.payload", "config": {"name": "x"}},
        {"class_name": "TFSMLayer", "module": "keras.layers", "config": {"name": "sm"}},
        {"class_name": "Dense", "module": "keras.layers", "config": {"name": "ok"}},
    ]}}
    problems = keras_config_problems(config)
    assert problems == ["class Evil from module 'attacker.payload'", "TFSMLayer layer 'sm'"]


def test_a_plain_keras_model_loads(tmp_path):
    inputs = keras.Input((4,))
    path = tmp_path / "plain.keras"
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(path)
    assert load_keras(path).output_shape == (None, 2)


def test_unreadable_keras_file(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a readable Keras model"):
        load_keras(path)


# ------------------------------------------------------------------------------------ TFLite


def test_malformed_tflite_is_checked_in_a_subprocess(tmp_path):
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\x1c\x00\x00\x00TFL3" + os.urandom(512))
    with pytest.raises(InputError, match="TFLite model") as info:
        check_tflite(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------- caches, gates and scales


def test_corrupt_timing_cache_is_reported_and_rebuilt(tmp_path, monkeypatch):
    from enginekit.targets.tensorrt import builder

    created = []

    class Config:
        def create_timing_cache(self, data):
            if data:
                raise RuntimeError("invalid timing cache")
            created.append(data)
            return "fresh"

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"):
        assert builder._load_timing_cache(Config(), cache) == "fresh"
    assert created == [b""]


def test_nan_output_fails_the_accuracy_gate():
    from enginekit.accuracy import gate, output_metrics

    reference = np.ones((4, 10))
    broken = reference.copy()
    broken[2, 3] = np.nan
    with pytest.raises(GateError, match="NaN or Inf"):
        gate(output_metrics(reference, broken), [], "model")


def test_constant_zero_tensor_gets_a_safe_scale():
    from enginekit.calibration.table import TensorRange
    from enginekit.quantization.encoding import activation_qparams

    with pytest.warns(UserWarning, match="constant zero"):
        params = activation_qparams("dead", TensorRange(0.0, 0.0, 0.0, False), "uint8")
    assert params.scale > 0 and np.isfinite(params.scale)


def test_no_module_calls_the_raw_loaders():
    """Only enginekit/core/loaders.py may call torch.load, keras load_model, onnx.load or numpy.load."""
    import re

    raw = re.compile(r"\b(torch\.load|onnx\.load(_model)?|onnx\.load_from_string|np\.load|numpy\.load|load_model\(|load_external_data_for_model|tflite\.Interpreter|Interpreter\(model_path)")
    root = Path(__file__).parents[2] / "enginekit"
    offenders = []
    for source in root.rglob("*.py"):
        if source.relative_to(root).as_posix() == "core/loaders.py":
            continue
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if raw.search(line) and not line.strip().startswith("#"):
                offenders.append(f"{source.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "raw loaders outside enginekit/core/loaders.py:\n" + "\n".join(offenders)
