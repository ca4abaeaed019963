"""TensorRT target: everything on the ONNX side runs here; the adapter's use of the TensorRT
API is checked against a recording stand-in that has only the TensorRT 11 API (so any removed
call fails); integration tests run wherever tensorrt and a GPU exist and are skipped otherwise."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from enginekit.targets.onnxruntime import OrtRunner
from enginekit.targets.tensorrt import unavailable_reason
from enginekit.targets.tensorrt import builder as trt_builder
from enginekit.targets.tensorrt.graphs import tensorrt_qdq_problems, to_fp16
from enginekit.targets.tensorrt.runner import check_compatible
from enginekit.targets.tensorrt.trtexec import summarize_times, trtexec_command
from enginekit.models import get_spec
from enginekit.core.tensors import TensorSpec
from enginekit.accuracy import output_metrics
from tests.conftest import assert_nothing_written

TRT_REASON = unavailable_reason()
needs_tensorrt = pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT integration: {TRT_REASON}")


@pytest.mark.parametrize("name", ["digits_cnn", "efficientnet_lite0", "minilm_l6"])
def test_fp16_onnx_keeps_cosine_0999_in_onnxruntime(exported, name):
    folder, _ = exported(name)
    fp32 = onnx.load(str(folder / "model.onnx"))
    fp16 = to_fp16(fp32)
    types_used = {t.data_type for t in fp16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types_used
    assert all(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for v in [*fp16.graph.input, *fp16.graph.output])
    feeds = get_spec(name).dataset().samples("evaluation", 32)
    ref = next(iter(OrtRunner(folder / "model.onnx").infer(feeds).values()))
    got = next(iter(OrtRunner(fp16.SerializeToString()).infer(feeds).values()))
    assert output_metrics(ref, got)["cosine"] >= 0.999


def test_fp16_keeps_sensitive_ops_in_float32(exported):
    folder, _ = exported("minilm_l6")
    fp16 = to_fp16(onnx.load(str(folder / "model.onnx")))
    producers = {o: n for n in fp16.graph.node for o in n.output}
    for node in fp16.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            feeding = producers.get(node.input[0])
            assert feeding is not None and feeding.op_type == "Cast", f"{node.name} is not fed through a Cast to float32"


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory):
    import enginekit as ek

    return ek.calibrate("digits_cnn", methods=["entropy"], num_samples=128, output=tmp_path_factory.mktemp("trt-cal") / "ranges.json").written[0]


def _qdq(table: Path, encoding: str) -> onnx.ModelProto:
    from enginekit.exporter.reference import load_fp32
    from enginekit.calibration.table import CalibrationTable
    from enginekit.quantization.pipeline import QuantizeSettings, build_qdq

    qdq, _ = build_qdq(load_fp32("digits_cnn"), CalibrationTable.load(table), QuantizeSettings(bias_correction=False), encoding)
    return qdq.model


def test_int8_graph_obeys_tensorrt_rules(digits_table):
    model = _qdq(digits_table, "int8")
    assert tensorrt_qdq_problems(model) == []
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 5


def test_rule_check_catches_what_tensorrt_rejects(digits_table):
    problems = tensorrt_qdq_problems(_qdq(digits_table, "uint8"))
    assert any("zero point type UINT8" in p for p in problems)
    assert any("int32 dequantization" in p for p in problems)
    int8 = _qdq(digits_table, "int8")
    zero_point = next(t for t in int8.graph.initializer if t.name.endswith("__zp") and t.data_type == onnx.TensorProto.INT8 and not t.dims)
    zero_point.CopyFrom(onnx.numpy_helper.from_array(np.array(3, np.int8), zero_point.name))
    assert any("non-zero zero point" in p for p in tensorrt_qdq_problems(int8))


# ------------------------------------------------------------------ the TensorRT API stand-in


class _Recorder:
    """A stand-in `tensorrt` module with only names that exist in TensorRT 11 (no FP16/INT8
    builder flags, no calibrators, no build_engine, no bindings); it records every call."""

    def __init__(self, parse_ok: bool = True):
        calls: list[tuple] = []
        self.calls = calls
        rec = self

        class Flag:
            STRONGLY_TYPED = 1

        class Pool:
            WORKSPACE = "WORKSPACE"

        class Logger:
            WARNING = 2

            def __init__(self, level):
                calls.append(("Logger", level))

        class Profile:
            def set_shape(self, name, low, opt, high):
                calls.append(("set_shape", name, tuple(low), tuple(opt), tuple(high)))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"cache:" + self.data

        class Config:
            builder_optimization_level = 3

            def set_memory_pool_limit(self, pool, size):
                calls.append(("set_memory_pool_limit", pool, size))

            def add_optimization_profile(self, profile):
                calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                calls.append(("create_timing_cache", bytes(data)))
                self.cache = Cache(bytes(data))
                return self.cache

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                calls.append(("Builder",))

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return types.SimpleNamespace()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                return b"PLAN"

        class ParserError:
            def node_name(self):
                return "conv_7"

            def node_operator(self):
                return "FancyConv"

            def desc(self):
                return "unsupported attribute"

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse_from_file", path))
                return rec.parse_ok

            def get_error(self, index):
                return ParserError()

        self.parse_ok = parse_ok
        self.module = types.SimpleNamespace(
            __version__="11.5.0", Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
            NetworkDefinitionCreationFlag=Flag, MemoryPoolType=Pool,
            BuilderFlag=types.SimpleNamespace(),  # 11.x has no precision flags: any use fails
        )


@pytest.fixture
def fake_trt(monkeypatch):
    def install(parse_ok: bool = True) -> _Recorder:
        recorder = _Recorder(parse_ok)
        monkeypatch.setattr("enginekit.targets.tensorrt.support.require_tensorrt", lambda: recorder.module)
        monkeypatch.setattr(trt_builder, "gpu_info", lambda: {"name": "NVIDIA H100", "compute_capability": "9.0"})
        return recorder

    return install


def test_builder_maps_options_to_the_tensorrt_11_api(fake_trt, tmp_path):
    recorder = fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    inputs = [TensorSpec("input_ids", ("batch", "sequence"), "int64"), TensorSpec("attention_mask", ("batch", "sequence"), "int64")]
    profile = trt_builder.profile_shapes(inputs, {"batch": (1, 4, 16)}, {"sequence": 256})
    settings = trt_builder.BuildSettings(profile=profile, workspace_mb=512, timing_cache=cache, optimization_level=4)
    info = trt_builder.build_plan(tmp_path / "m.onnx", settings, tmp_path / "model.plan")
    calls = recorder.calls
    assert ("create_network", 1 << 1) in calls  # STRONGLY_TYPED, nothing else
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in calls
    assert ("set_shape", "input_ids", (1, 1), (4, 128), (16, 256)) in calls
    assert ("set_shape", "attention_mask", (1, 1), (4, 128), (16, 256)) in calls
    assert ("create_timing_cache", b"old") in calls and ("set_timing_cache", False) in calls
    assert cache.read_bytes() == b"cache:old"  # the cache is saved back for the next build
    assert (tmp_path / "model.plan").read_bytes() == b"PLAN"
    assert info["version"] == "11.5.0" and info["compute_capability"] == "9.0" and info["strongly_typed"]


def test_parser_errors_name_the_node_and_op(fake_trt, tmp_path):
    fake_trt(parse_ok=False)
    with pytest.raises(Exception) as info:
        trt_builder.build_plan(tmp_path / "m.onnx", trt_builder.BuildSettings(), tmp_path / "model.plan")
    assert "conv_7" in str(info.value) and "FancyConv" in str(info.value) and "m.onnx" in str(info.value)
    assert not (tmp_path / "model.plan").exists()


def test_adapter_uses_no_api_removed_in_tensorrt_11():
    removed = ["BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16", "int8_calibrator", "IInt8", "build_engine(",
               "get_binding", "binding_", "execute_async_v2", "execute_v2", "max_workspace_size", "EXPLICIT_BATCH",
               "set_calibration_profile", "platform_has_fast", "OBEY_PRECISION_CONSTRAINTS", "device_memory_size", "--fp16", "--int8"]
    folder = Path(__file__).parents[1] / "enginekit" / "engines" / "tensorrt"
    for source in folder.glob("*.py"):
        code = "\n".join(line for line in source.read_text().splitlines() if not line.strip().startswith("#"))
        code = re.sub(r'""".*?"""', "", code, flags=re.S)
        for name in removed:
            assert name not in code, f"{source.name} uses {name}, which TensorRT 11 removed"


def test_trtexec_command_matches_the_builder(tmp_path):
    profile = trt_builder.profile_shapes([TensorSpec("image", ("batch", 3, 224, 224))])
    settings = trt_builder.BuildSettings(profile=profile, workspace_mb=1024, timing_cache=tmp_path / "t.cache")
    command = trtexec_command(Path("m.onnx"), settings, Path("m.plan"), Path("times.json"))
    assert "--stronglyTyped" in command and "--memPoolSize=workspace:1024M" in command
    assert "--minShapes=image:1x3x224x224" in command and "--optShapes=image:8x3x224x224" in command
    assert "--maxShapes=image:32x3x224x224" in command and f"--timingCacheFile={tmp_path / 't.cache'}" in command
    assert not any(flag in command for flag in ("--fp16", "--int8", "--best"))
    summary = summarize_times([{"computeMs": 1.0, "latencyMs": 1.5}, {"computeMs": 3.0, "latencyMs": 3.5}])
    assert summary == {"iterations": 2, "gpu_compute_ms": 2.0, "end_to_end_ms": 2.5}


def test_profile_ranges_parse_and_validate():
    assert trt_builder.parse_dim_ranges(["batch=1,8,64"]) == {"batch": (1, 8, 64)}
    with pytest.raises(Exception):
        trt_builder.parse_dim_ranges(["batch=8,1,64"])


def test_engine_from_another_gpu_or_version_is_a_clear_error(tmp_path):
    built = {"version": "10.8.0", "gpu": "NVIDIA A100", "compute_capability": "8.0"}
    with pytest.raises(Exception) as info:
        check_compatible(built, "11.5.0", {"name": "NVIDIA A100", "compute_capability": "8.0"}, tmp_path)
    assert "TensorRT 10.8.0" in str(info.value) and "rebuild" in str(info.value)
    with pytest.raises(Exception) as info:
        check_compatible(built, "10.8.0", {"name": "NVIDIA H100", "compute_capability": "9.0"}, tmp_path)
    assert "A100" in str(info.value) and "H100" in str(info.value)


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here, so the refusal cannot be shown")
def test_tensorrt_without_tensorrt_is_one_line_exit_2(run_cli, tmp_path):
    out = tmp_path / "trt"
    result = run_cli("build", "-m", "digits_cnn", "--target", "tensorrt", "--precision", "fp16", "-o", out)
    assert result.code == 2 and "tensorrt target cannot run here" in result.error_line
    assert_nothing_written(out)


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here, so nothing is skipped")
def test_several_targets_list_tensorrt_as_skipped(run_cli, tmp_path):
    result = run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime,tensorrt", "--precisions", "fp32", "-o", tmp_path / "all")
    assert result.code == 0, result.err
    row = next(line for line in result.out.splitlines() if line.startswith("| tensorrt"))
    assert "skipped" in row and "TensorRT is not installed" in row
    assert (tmp_path / "all" / "onnxruntime-fp32" / "manifest.json").is_file()


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_builds_runs_and_agrees(tmp_path, precision):
    from enginekit.builder import build

    manifest = build("digits_cnn", "tensorrt", precision, tmp_path / precision).manifest
    assert manifest["tensorrt"]["strongly_typed"] and (tmp_path / precision / "model.plan").is_file()
    metrics = manifest["accuracy"]["metrics"]
    assert metrics["accuracy"] >= metrics["fp32_accuracy"] - 0.01
    assert json.loads((tmp_path / precision / "manifest.json").read_text())["tensorrt"]["gpu"]
    assert np.isfinite(metrics["cosine"])


def test_pinned_buffer_views_round_trip():
    """The runner reads and writes pinned host memory through numpy views at raw pointers."""
    import ctypes

    from enginekit.targets.tensorrt.runner import _host_array

    memory = (ctypes.c_byte * 64)()
    values = np.arange(16, dtype=np.float32).reshape(2, 8)
    _host_array(ctypes.addressof(memory), values.dtype, values.shape)[...] = values
    np.testing.assert_array_equal(_host_array(ctypes.addressof(memory), np.float32, (2, 8)), values)
