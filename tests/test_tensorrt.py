"""TensorRT target: everything on the ONNX side runs here; the adapter's use of the TensorRT and
CUDA APIs is checked against a recording stand-in of TensorRT 10.16 and 11.1 and cuda-python
(tests/tensorrt_standin.py: builder, runtime, engine, execution context, cudart); integration
tests run wherever tensorrt and a GPU exist and are skipped otherwise."""

from __future__ import annotations

import json
import re
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
    int8.graph.node.append(onnx.helper.make_node("NhwcMaxPool", ["x"], ["y"], name="pool", domain="com.microsoft", kernel_shape=[2, 2]))
    assert any("NhwcMaxPool 'pool' is an op of the 'com.microsoft' domain" in p for p in tensorrt_qdq_problems(int8))


# ------------------------------------------------------------------ the TensorRT API stand-in

VERSIONS = ["10.16.1", "11.1.0"]


@pytest.fixture
def standin(monkeypatch):
    """Install the TensorRT + cuda-python stand-in (tests/tensorrt_standin.py) for one behaviour."""
    from enginekit.targets.tensorrt import runner as trt_runner
    from enginekit.targets.tensorrt import support as trt_support
    from enginekit.targets.tensorrt import target as trt_target
    from tests import tensorrt_standin

    gpu = {"name": "NVIDIA H200", "compute_capability": "9.0", "driver": "580.1"}

    def install(**behaviour):
        trt, cudart, state = tensorrt_standin.make(tensorrt_standin.Behaviour(**behaviour))
        for module in (trt_support, trt_target):
            monkeypatch.setattr(module, "require_tensorrt", lambda: trt)
        monkeypatch.setattr(trt_target, "unavailable_reason", lambda: None)
        monkeypatch.setattr(trt_runner, "_cudart", lambda: cudart)
        for module in (trt_builder, trt_runner):
            monkeypatch.setattr(module, "gpu_info", lambda: gpu)
        return state

    return install


@pytest.mark.parametrize("version, flags", [("10.16.1", 1 << 1), ("11.1.0", 1 << 0)])
def test_builder_maps_options_to_the_tensorrt_api_of_each_version(standin, tmp_path, version, flags):
    state = standin(version=version)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"onnx bytes")
    inputs = [TensorSpec("input_ids", ("batch", "sequence"), "int64"), TensorSpec("attention_mask", ("batch", "sequence"), "int64")]
    profile = trt_builder.profile_shapes(inputs, {"batch": (1, 4, 16)}, {"sequence": 256})
    settings = trt_builder.BuildSettings(profile=profile, workspace_mb=512, timing_cache=cache, optimization_level=4)
    info = trt_builder.build_plan(onnx_path, settings, tmp_path / "model.plan")
    calls = state.calls
    assert ("create_network", flags) in calls  # STRONGLY_TYPED by name: bit 1 in 10.x, bit 0 in 11.x
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in calls
    assert ("set_shape", "input_ids", (1, 1), (4, 128), (16, 256)) in calls
    assert ("set_shape", "attention_mask", (1, 1), (4, 128), (16, 256)) in calls
    assert ("create_timing_cache", b"old") in calls and ("set_timing_cache", b"old", False) in calls
    assert cache.read_bytes() == b"cache:old"  # the cache is saved back for the next build
    assert (tmp_path / "model.plan").read_bytes() == b"onnx bytes"
    assert info["version"] == version and info["compute_capability"] == "9.0" and info["strongly_typed"]


def test_a_timing_cache_the_device_rejects_falls_back_to_a_fresh_one(standin, tmp_path):
    state = standin(cache_accepted=False)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another driver")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.warns(UserWarning, match="does not match this device"):
        trt_builder.build_plan(tmp_path / "m.onnx", trt_builder.BuildSettings(timing_cache=cache), tmp_path / "model.plan")
    assert ("set_timing_cache", b"", False) in state.calls and cache.read_bytes() == b"cache:"


def test_a_missing_timing_cache_after_the_build_is_a_warning(standin, tmp_path):
    standin(cache_missing=True)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.warns(UserWarning, match="no timing cache"):
        trt_builder.build_plan(tmp_path / "m.onnx", trt_builder.BuildSettings(timing_cache=cache), tmp_path / "model.plan")
    assert (tmp_path / "model.plan").is_file() and cache.read_bytes() == b"old"


def test_parser_errors_name_the_node_and_op(standin, tmp_path):
    standin(parse_ok=False)
    with pytest.raises(Exception) as info:
        trt_builder.build_plan(tmp_path / "m.onnx", trt_builder.BuildSettings(), tmp_path / "model.plan")
    assert "conv_7" in str(info.value) and "FancyConv" in str(info.value) and "m.onnx" in str(info.value)
    assert not (tmp_path / "model.plan").exists()


@pytest.fixture
def digits_plan(exported, tmp_path):
    """A TensorRT artifact folder of digits_cnn as the stand-in builds it (the plan is the ONNX)."""
    def make(state, max_batch: int | None = None):
        folder, _ = exported("digits_cnn")
        plan = tmp_path / f"plan{len(list(tmp_path.glob('plan*')))}"
        plan.mkdir()
        profile = trt_builder.profile_shapes([TensorSpec("image", ("batch", 1, 8, 8))], {"batch": (1, 8, max_batch or 32)})
        info = trt_builder.build_plan(folder / "model.onnx", trt_builder.BuildSettings(profile=profile, timing_cache=tmp_path / "t.cache"),
                                      plan / "model.plan")
        return plan, info

    return make


@pytest.mark.parametrize("version", VERSIONS)
def test_the_runner_call_sequence_from_deserialize_to_release(standin, digits_plan, version):
    from enginekit.targets.tensorrt.runner import TensorRTRunner

    state = standin(version=version)
    folder, info = digits_plan(state)
    state.calls.clear()
    feeds = {"image": np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)}
    with TensorRTRunner(folder, built=info) as runner:
        outputs = runner.infer(feeds)
        assert runner.last_gpu_ms == 0.25 and runner.max_batch == 32
    expected = OrtRunner(__import__("enginekit.exporter.reference", fromlist=["load_fp32"]).load_fp32("digits_cnn").path).infer(feeds)
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-5)
    order = [c[0] for c in state.calls]
    expected_order = ["Runtime", "deserialize_cuda_engine", "create_execution_context", "cudaStreamCreate", "cudaEventCreate",
                      "cudaEventCreate", "set_input_shape", "cudaMallocHost", "cudaMalloc", "cudaMemcpyAsync", "set_tensor_address",
                      "infer_shapes", "get_tensor_shape", "cudaMalloc", "set_tensor_address", "cudaEventRecord", "execute_async_v3",
                      "cudaEventRecord", "cudaMallocHost", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaEventElapsedTime",
                      "cudaFree", "cudaFree", "cudaFreeHost", "cudaFreeHost", "cudaEventDestroy", "cudaEventDestroy", "cudaStreamDestroy"]
    assert [o for o in order if o != "Logger"] == expected_order
    assert ("set_input_shape", "image", (3, 1, 8, 8)) in state.calls and not state.memory  # everything released


def test_a_shape_outside_the_profile_is_one_line_and_evaluation_fits_the_profile(standin, digits_plan, run_cli, tmp_path):
    from enginekit.core.errors import InputError
    from enginekit.targets.tensorrt.runner import TensorRTRunner

    state = standin(max_batch=16)
    folder, info = digits_plan(state)
    with TensorRTRunner(folder, built=info) as runner:
        with pytest.raises(InputError, match=r"outside the engine's optimization profile \[1, 1, 8, 8\]\.\.\[16, 1, 8, 8\]") as error:
            runner.infer({"image": np.zeros((32, 1, 8, 8), np.float32)})
        assert error.value.option == "profiles"
    # a whole build: evaluation (batches of 32) is fed in slices the profile takes
    state.calls.clear()
    result = run_cli("build", "-m", "digits_cnn", "--target", "tensorrt", "--precision", "fp32", "--trt-profile", "batch=1,8,16", "-o", tmp_path / "trt")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    assert manifest["accuracy"]["metrics"]["samples"] == 540 and manifest["accuracy"]["metrics"]["top1_agreement"] == 1.0
    assert max(c[2][0] for c in state.calls if c[0] == "set_input_shape") == 16


def test_a_failing_cuda_call_is_one_line_naming_driver_and_runtime(standin, digits_plan, run_cli, tmp_path):
    from tests.tensorrt_standin import CudaError

    standin(stream_error=CudaError.cudaErrorInsufficientDriver, driver_cuda=12020, runtime_cuda=13000)
    result = run_cli("build", "-m", "digits_cnn", "--target", "tensorrt", "--precision", "fp32", "-o", tmp_path / "trt")
    assert result.code == 2 and "cudaStreamCreate failed" in result.error_line
    assert "the driver supports CUDA 12.2, the runtime is CUDA 13.0" in result.error_line and "tensorrt-cu12" in result.error_line
    assert_nothing_written(tmp_path / "trt")


def test_a_failed_execution_context_and_data_dependent_shapes_are_one_line(standin, digits_plan):
    from enginekit.core.errors import EnginekitError, InputError
    from enginekit.targets.tensorrt.runner import TensorRTRunner

    folder, info = digits_plan(standin(context_fails=True))
    with pytest.raises(EnginekitError, match="execution context"):
        TensorRTRunner(folder, built=info)
    folder, info = digits_plan(standin(data_dependent=True))
    with TensorRTRunner(folder, built=info) as runner:
        with pytest.raises(InputError, match="depends on the data"):
            runner.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})


@pytest.mark.parametrize("log, version", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help", "11.1.0"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v101601] [b11] # trtexec", "10.16.1"),
    ("[11/30/2026-12:00:00] [I] TensorRT version: 10.8.0", "10.8.0"),
    ("usage: something else", None),
])
def test_trtexec_reports_its_own_version(log, version):
    from enginekit.targets.tensorrt.trtexec import parse_trtexec_version

    assert parse_trtexec_version(log) == version


def test_a_trtexec_of_another_version_is_refused(tmp_path, monkeypatch):
    from enginekit.core.errors import MissingDependencyError
    from enginekit.targets.tensorrt.trtexec import build_with_trtexec

    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100800] [b1] # trtexec'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    with pytest.raises(MissingDependencyError, match="trtexec is TensorRT 10.8.0 but the tensorrt Python package is 11.1.0"):
        build_with_trtexec(tmp_path / "m.onnx", trt_builder.BuildSettings(), tmp_path / "m.plan", tmp_path, "11.1.0")


def test_the_tensorrt_extras_pin_cuda_python_to_their_cuda_major():
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, admitted, refused in (("tensorrt-cu12", "12.9.10", "13.0.0"), ("tensorrt-cu13", "13.0.0", "12.9.10")):
        requirements = {r.name: r for r in map(Requirement, extras[extra])}
        assert requirements["cuda-python"].specifier.contains(admitted) and not requirements["cuda-python"].specifier.contains(refused)
        assert extra in requirements  # the TensorRT wheel of the same CUDA major


def test_adapter_uses_no_api_removed_in_tensorrt_11():
    removed = ["BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16", "int8_calibrator", "IInt8", "build_engine(",
               "get_binding", "binding_", "execute_async_v2", "execute_v2", "max_workspace_size", "EXPLICIT_BATCH",
               "set_calibration_profile", "platform_has_fast", "OBEY_PRECISION_CONSTRAINTS", "device_memory_size", "--fp16", "--int8"]
    folder = Path(__file__).parents[1] / "enginekit" / "targets" / "tensorrt"
    sources = sorted(folder.glob("*.py"))
    assert len(sources) >= 5, sources  # the adapter's modules are really scanned
    for source in sources:
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
    assert summary == {"iterations": 2, "gpu_compute_ms": 2.0, "h2d_compute_d2h_ms": 2.5}


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


@pytest.mark.parametrize("rank", [2, 3])
def test_a_matmul_weight_as_input_a_gets_the_axis_the_tensorrt_check_expects(rank):
    """Placement and the TensorRT rule check ask one function for the weight's channel axis, so
    a valid graph with the weight as MatMul's first input is not refused."""
    from onnx import TensorProto, helper, numpy_helper

    from enginekit.calibration.table import CalibrationTable, TensorRange
    from enginekit.quantization.placement import plan_quantization
    from enginekit.quantization.qdq import insert_qdq

    shape = [6, 4] if rank == 2 else [2, 6, 4]
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), "a")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "x"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], 5])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = plan_quantization(model)
    assert plan.weights[0].axis == rank - 2
    table = CalibrationTable("minmax", {}, 1, "d", "0", "0", {"x": TensorRange(-1.0, 1.0, 1.0, True)})
    qdq = insert_qdq(model, plan, table, "int8")
    assert tensorrt_qdq_problems(qdq.model) == []
    dq = next(n for n in qdq.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "a__int8")
    assert next(a.i for a in dq.attribute if a.name == "axis") == rank - 2
