"""`enginekit deploy`: Triton and OVMS repositories from artifacts, checked offline with Triton's
own ModelConfig proto; `deploy --check` catches what breaks deployments; a deployed model folder
loads with `enginekit.load` and gives the artifact's outputs."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import enginekit as ek
from enginekit.builder import BuildOptions, build_many
from enginekit.quantization.pipeline import QuantizeSettings

pytest.importorskip("tritonclient", reason="the 'triton' extra (tritonclient's model_config_pb2) is not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """digits_cnn for onnxruntime and openvino x fp32/int8, and an ONNX Runtime INT8 in TensorRT's
    symmetric int8 encoding (the graph a TensorRT engine would be built from)."""
    root = tmp_path_factory.mktemp("deploy-build")
    targets = ["onnxruntime"] + (["openvino"] if _has("openvino") else [])
    cells = build_many("digits_cnn", targets, ["fp32", "int8"], root, BuildOptions(num_samples=64))
    folders = {f"{c.target}-{c.precision}": Path(c.folder) for c in cells if c.result is not None}
    options = BuildOptions(num_samples=64, quantize=replace(QuantizeSettings(), encoding="int8"))
    folders["onnxruntime-int8-sym"] = Path(ek.build("digits_cnn", "onnxruntime", "int8", root / "ort-int8-sym", options).folder)
    return folders


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _config(repo: Path, name: str):
    from enginekit.core.loaders import load_triton_config

    return load_triton_config(repo / name / "config.pbtxt")


def test_triton_repository_parses_with_tritons_proto_and_matches_the_manifests(built, tmp_path, run_cli):
    artifacts = [built[k] for k in sorted(built) if k != "onnxruntime-int8-sym"]
    result = run_cli("deploy", "triton", *artifacts, "--plan-tensorrt", built["onnxruntime-int8-sym"], "-o", tmp_path / "repo")
    assert result.code == 0, result.err
    repo = tmp_path / "repo"
    ort = _config(repo, "digits_cnn-onnxruntime-int8")
    assert ort.platform == "onnxruntime_onnx" and ort.default_model_filename == "model.int8.onnx"
    assert ort.max_batch_size == 16 and list(ort.input[0].dims) == [1, 8, 8]  # no batch dim: Triton adds it
    assert ort.instance_group[0].kind == type(ort.instance_group[0]).KIND_CPU
    assert ort.model_warmup[0].inputs["image"].random_data and list(ort.model_warmup[0].inputs["image"].dims) == [1, 8, 8]
    manifest = json.loads((repo / "digits_cnn-onnxruntime-int8" / "1" / "manifest.json").read_text())
    assert manifest["build_key"] == json.loads((built["onnxruntime-int8"] / "manifest.json").read_text())["build_key"]
    planned = _config(repo, "digits_cnn-tensorrt-int8")
    assert planned.platform == "tensorrt_plan" and planned.max_batch_size == 32 and list(planned.instance_group[0].profile) == ["0"]
    assert planned.instance_group[0].kind == type(planned.instance_group[0]).KIND_GPU
    assert "PLANNED" in (repo / "digits_cnn-tensorrt-int8" / "config.pbtxt").read_text()
    if "openvino-fp32" in built:
        ov = _config(repo, "digits_cnn-openvino-fp32")
        assert ov.backend == "openvino" and ov.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
        assert "bf16" in (repo / "digits_cnn-openvino-fp32" / "config.pbtxt").read_text()  # the header says what Triton cannot set
    check = run_cli("deploy", "--check", repo)
    assert check.code == 0 and "digits_cnn-tensorrt-int8: ok (planned" in check.out, check.out + check.err


def test_a_uint8_qdq_graph_is_refused_as_a_tensorrt_plan(built, tmp_path, run_cli):
    result = run_cli("deploy", "triton", built["onnxruntime-fp32"], "--plan-tensorrt", built["onnxruntime-int8"], "-o", tmp_path / "repo")
    assert result.code == 2 and "--encoding int8" in result.error_line
    assert not (tmp_path / "repo").exists()


def test_redeploying_keeps_the_version_and_a_new_build_adds_one(built, tmp_path):
    repo = tmp_path / "repo"
    first = ek.deploy_triton([built["onnxruntime-int8"]], repo, names={str(built["onnxruntime-int8"]): "digits"})
    again = ek.deploy_triton([built["onnxruntime-int8"]], repo, names={str(built["onnxruntime-int8"]): "digits"})
    other = ek.deploy_triton([built["onnxruntime-int8-sym"]], repo, names={str(built["onnxruntime-int8-sym"]): "digits"})
    assert (first[0].version, again[0].version, again[0].reused, other[0].version) == (1, 1, True, 2)
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2", "config.pbtxt", "enginekit-deploy.json"]
    assert ek.check_deployment(repo).ok


def test_deploy_refuses_collisions_foreign_folders_and_targets_without_a_backend(built, tmp_path, run_cli):
    repo = tmp_path / "repo"
    (repo / "digits_cnn-onnxruntime-fp32").mkdir(parents=True)
    (repo / "digits_cnn-onnxruntime-fp32" / "notes.txt").write_text("mine")
    result = run_cli("deploy", "triton", built["onnxruntime-fp32"], "-o", repo)
    assert result.code == 2 and "not written by enginekit deploy triton" in result.error_line
    assert sorted(p.name for p in repo.iterdir()) == ["digits_cnn-onnxruntime-fp32"]
    result = run_cli("deploy", "triton", built["onnxruntime-fp32"], built["onnxruntime-int8"], "--name", f"{built['onnxruntime-int8']}=digits_cnn-onnxruntime-fp32",
                     "-o", tmp_path / "other")
    assert result.code == 2 and "two artifacts would be deployed as model" in result.error_line and not (tmp_path / "other").exists()
    result = run_cli("deploy", "ovms", built["onnxruntime-fp32"], "--name", f"{built['onnxruntime-fp32']}=../escaped", "-o", tmp_path / "fourth")
    assert result.code == 2 and "'../escaped' is not a model name" in result.error_line
    assert not (tmp_path / "fourth").exists() and not (tmp_path / "escaped").exists()
    tampered = tmp_path / "tampered"
    shutil.copytree(built["onnxruntime-fp32"], tampered)
    with open(tampered / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    result = run_cli("deploy", "ovms", tampered, "-o", tmp_path / "third")
    assert result.code == 2 and "does not match its manifest hash" in result.error_line and not (tmp_path / "third").exists()


def _broken(repo: Path, name: str, old: str, new: str) -> None:
    path = repo / name / "config.pbtxt"
    text = path.read_text()
    assert re.search(old, text), f"{old!r} not in {path}"
    path.write_text(re.sub(old, new, text, count=1))


@pytest.mark.parametrize("breakage, expected", [
    (("dims: \\[ 1, 8, 8 \\]", "dims: [ 1, 1, 8, 8 ]"), "include the batch dim"),
    (("data_type: TYPE_FP32", "data_type: TYPE_INT64"), "data_type TYPE_INT64, the model's is TYPE_FP32"),
    (('platform: "onnxruntime_onnx"', 'backend: "onnx"'), "unknown backend 'onnx'"),
    (("max_batch_size: 16", "max_bach_size: 16"), "does not parse as Triton's ModelConfig"),
    (("instance_group", 'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
                        'parameters { key: "int8_calibration_table_name" value: "calibration.flatbuffers" } } ] } }\ninstance_group'),
     "calibration table"),
    (("max_batch_size: 16", "max_batch_size: 16\nname: \"other\""), None),  # a repeated field name: the proto parser refuses
])
def test_check_catches_each_hand_broken_config_with_its_own_message(built, tmp_path, run_cli, breakage, expected):
    repo = tmp_path / "repo"
    ek.deploy_triton([built["onnxruntime-int8"]], repo)
    _broken(repo, "digits_cnn-onnxruntime-int8", *breakage)
    result = run_cli("deploy", "--check", repo)
    assert result.code == 1, result.out
    line = next(line for line in result.out.splitlines() if line.startswith("digits_cnn-onnxruntime-int8:"))
    assert expected is None or expected in line, line


def test_check_holds_a_tensorrt_config_to_the_engines_profile(built, tmp_path, run_cli):
    repo = tmp_path / "repo"
    ek.deploy_triton([], repo, plan_tensorrt=[built["onnxruntime-fp32"]])
    _broken(repo, "digits_cnn-tensorrt-fp32", "max_batch_size: 32", "max_batch_size: 64")
    _broken(repo, "digits_cnn-tensorrt-fp32", 'profile: \\[ "0" \\]', 'profile: [ "1" ]')
    result = run_cli("deploy", "--check", repo)
    assert result.code == 1
    assert "max_batch_size 64 exceeds the engine's optimization profile (batch up to 32)" in result.out
    assert "selects profile '1'; the engine has only profile 0" in result.out
    with pytest.raises(ek.EnginekitError, match="exceeds the engine's optimization profile"):
        ek.deploy_triton([], tmp_path / "other", ek.TritonOptions(max_batch_size=64), plan_tensorrt=[built["onnxruntime-fp32"]])


def test_check_catches_a_missing_version_folder_and_a_calibration_cache_beside_qdq(built, tmp_path, run_cli):
    repo = tmp_path / "repo"
    ek.deploy_triton([built["onnxruntime-int8"], built["onnxruntime-fp32"]], repo)
    shutil.rmtree(repo / "digits_cnn-onnxruntime-fp32" / "1")
    (repo / "digits_cnn-onnxruntime-int8" / "1" / "calibration.cache").write_text("TRT-100-EntropyCalibration2\nimage: 3c010204\n")
    result = run_cli("deploy", "--check", repo)
    assert result.code == 1
    assert "digits_cnn-onnxruntime-fp32: no version folder" in result.out
    assert "calibration cache (calibration.cache) beside a Q/DQ graph" in result.out


def test_check_of_a_folder_that_is_no_repository_is_one_line(tmp_path, run_cli):
    for name in ("docs", "src"):
        (tmp_path / "notarepo" / name).mkdir(parents=True)
    result = run_cli("deploy", "--check", tmp_path / "notarepo")
    assert result.code == 2 and "is not a model repository" in result.error_line and not result.out


def test_check_reads_a_hand_written_repository_without_manifests(tmp_path, built, run_cli):
    model = tmp_path / "repo" / "resnet"
    (model / "1").mkdir(parents=True)
    shutil.copy(built["onnxruntime-fp32"] / "model.onnx", model / "1" / "model.onnx")
    (model / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                                        'input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]\n'
                                        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]\n')
    assert run_cli("deploy", "--check", tmp_path / "repo").code == 0
    (model / "config.pbtxt").write_text('backend: "openvino"\nparameters { key: "INFERENCE_PRECISION_HINT" value { string_value: "f32" } }\n')
    result = run_cli("deploy", "--check", tmp_path / "repo")
    assert result.code == 1 and "version 1 has no model.xml" in result.out and "not read by Triton's OpenVINO backend" in result.out


def test_ovms_repository_and_its_checks(built, tmp_path, run_cli):
    artifacts = [built[k] for k in sorted(built) if k != "onnxruntime-int8-sym"]
    repo = tmp_path / "ovms"
    result = run_cli("deploy", "ovms", *artifacts, "-o", repo)
    assert result.code == 0, result.err
    config = json.loads((repo / "config.json").read_text())
    entries = {e["config"]["name"]: e["config"] for e in config["model_config_list"]}
    assert entries["digits_cnn-onnxruntime-fp32"]["plugin_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in entries["digits_cnn-onnxruntime-int8"]["plugin_config"]
    assert all((repo / c["base_path"] / "1" / "manifest.json").is_file() for c in entries.values())
    config["model_config_list"][0]["config"]["stateful"] = True  # removed from OVMS's schema in 2026
    config["model_config_list"][1]["config"]["nireq"] = "4"
    config["model_config_list"].append({"config": {"name": "ghost", "base_path": "ghost"}})
    (repo / "config.json").write_text(json.dumps(config))
    result = run_cli("deploy", "--check", repo)
    assert result.code == 1
    assert "key 'stateful', which OVMS's schema does not allow" in result.out and "'nireq' must be int, not str" in result.out
    assert "ghost: base_path 'ghost' is not a folder here" in result.out


def test_a_deployed_model_folder_loads_with_the_public_api_and_gives_the_artifacts_outputs(built, tmp_path):
    repo = tmp_path / "repo"
    ek.deploy_triton([built["onnxruntime-int8"]], repo, plan_tensorrt=[built["onnxruntime-int8-sym"]])
    feeds = {"image": np.random.default_rng(3).random((5, 1, 8, 8), np.float32) * 16}
    with ek.load(repo / "digits_cnn-onnxruntime-int8") as deployed, ek.load(built["onnxruntime-int8"]) as original:
        np.testing.assert_array_equal(deployed.infer(feeds)["logits"], original.infer(feeds)["logits"])
    with pytest.raises(ek.EnginekitError, match="no built version"):
        ek.load(repo / "digits_cnn-tensorrt-int8")


def test_an_engine_artifact_is_served_within_its_recorded_profile(tmp_path, built):
    """A TensorRT artifact (its manifest as a GPU build writes it; the plan's bytes are opaque
    here): max_batch_size and the warm-up come from the engine's own profile."""
    from enginekit.core.artifacts import read_manifest, write_manifest

    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "model.plan").write_bytes(b"\x00plan bytes a GPU build would write")
    fp32 = read_manifest(built["onnxruntime-fp32"])
    write_manifest(engine, {"model": "digits_cnn", "target": "tensorrt", "precision": "fp16", "build_key": "k" * 64,
                            "inputs": fp32["inputs"], "outputs": fp32["outputs"],
                            "tensorrt": {"version": "10.16.0", "profile": {"image": [[1, 1, 8, 8], [4, 1, 8, 8], [8, 1, 8, 8]]}}})
    repo = tmp_path / "repo"
    ek.deploy_triton([engine], repo)
    config = _config(repo, "digits_cnn-tensorrt-fp16")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8 and not config.default_model_filename
    assert "optimization profile 0, image: min [1, 1, 8, 8] opt [4, 1, 8, 8] max [8, 1, 8, 8]" in (repo / "digits_cnn-tensorrt-fp16" / "config.pbtxt").read_text()
    assert ek.check_deployment(repo).ok
    with pytest.raises(ek.EnginekitError, match="OpenVINO Model Server does not load tensorrt artifacts"):
        ek.deploy_ovms([engine], tmp_path / "ovms")
    assert not (tmp_path / "ovms").exists()


def test_dynamic_batching_prefers_the_batch_the_build_benchmark_found_best(built, tmp_path):
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.deploy.triton import preferred_batch_sizes

    root = tmp_path / "build"
    shutil.copytree(built["onnxruntime-int8"], root / "onnxruntime-int8")
    report = ek.bench([root / "onnxruntime-int8"], root / "report.json", BenchSettings(batch_sizes=(1, 4, 16), min_iterations=10, min_seconds=0.2, rounds=1))
    expected = preferred_batch_sizes(report["artifacts"][0], 16)
    assert expected and expected[-1] > 1  # a tiny CNN is fastest per sample in large batches
    ek.deploy_triton([root / "onnxruntime-int8"], tmp_path / "repo")  # the report beside the artifact is found
    assert list(_config(tmp_path / "repo", "digits_cnn-onnxruntime-int8").dynamic_batching.preferred_batch_size) == expected


def test_without_the_triton_extra_deploy_writes_and_says_the_proto_check_did_not_run(built, tmp_path, run_cli, monkeypatch):
    from enginekit.core import loaders
    from enginekit.core.optional import missing

    def absent():
        raise missing("triton", "checking Triton configs against Triton's model_config.proto")

    monkeypatch.setattr(loaders, "triton_model_config_class", absent)
    result = run_cli("deploy", "triton", built["onnxruntime-int8"], "-o", tmp_path / "repo")
    assert result.code == 0 and "not parsed with Triton's own proto" in result.err and "'triton' extra" in result.err
    assert (tmp_path / "repo" / "digits_cnn-onnxruntime-int8" / "1" / "model.int8.onnx").is_file()
    check = run_cli("deploy", "--check", tmp_path / "repo")
    assert check.code == 2 and "'triton' extra" in check.error_line


def test_a_scalar_input_is_served_as_dims_1_reshaped_to_a_scalar(tmp_path, run_cli):
    """Triton refuses empty dims (silero-vad's sample-rate input is a scalar): the config carries
    it as dims [1] with reshape { shape: [] }, and a hand-written empty dims is caught."""
    from enginekit.core.artifacts import write_manifest

    artifact = tmp_path / "vad"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"opaque here: deploy reads the manifest")
    write_manifest(artifact, {"model": "vad", "target": "onnxruntime", "precision": "fp32", "build_key": "v" * 64,
                              "inputs": [{"name": "input", "shape": [1, 576], "dtype": "float32"},
                                         {"name": "sr", "shape": [], "dtype": "int64"}],
                              "outputs": [{"name": "output", "shape": [1, 1], "dtype": "float32"}]})
    repo = tmp_path / "repo"
    ek.deploy_triton([artifact], repo)
    config = _config(repo, "vad-onnxruntime-fp32")
    sr = next(entry for entry in config.input if entry.name == "sr")
    assert config.max_batch_size == 0 and list(sr.dims) == [1] and sr.HasField("reshape") and list(sr.reshape.shape) == []
    assert list(config.model_warmup[0].inputs["sr"].dims) == [1]
    assert ek.check_deployment(repo).ok
    _broken(repo, "vad-onnxruntime-fp32", "dims: \\[ 1 \\]\n    reshape \\{\n      shape: \\[  \\]\n    \\}", "dims: [ ]")
    result = run_cli("deploy", "--check", repo)
    assert result.code == 1 and "input 'sr': empty dims, which Triton refuses" in result.out



def test_an_onnx_runtime_artifact_running_pools_channels_last_is_refused_by_ovms_and_reads_back_as_a_source(tmp_path):
    """A MaxPool after a swish (no QLinearConv beside it) is the artifact's NhwcMaxPool, an ONNX
    Runtime op: OVMS (OpenVINO) cannot read it, so deploying it there is refused before anything is
    written; the artifact as a pre-quantized source builds OpenVINO INT8 with its pools restored."""
    import onnx

    from tests.test_placement import swish_max_pool_model

    model, rng = swish_max_pool_model(), np.random.default_rng(5)
    onnx.save(model, str(tmp_path / "pools.onnx"))
    for split, count in (("calib", 32), ("eval", 16)):
        np.savez(tmp_path / f"{split}.npz", x=rng.normal(0, 1, (count, 8, 9, 9)).astype(np.float32))
    options = ek.BuildOptions(num_samples=32, calib_data=tmp_path / "calib.npz", eval_data=tmp_path / "eval.npz")
    built = ek.build(tmp_path / "pools.onnx", "onnxruntime", "int8", tmp_path / "ort", options)
    assert built.manifest["integer_ops"]["channels_last_max_pools"] == 2
    with pytest.raises(ek.EnginekitError, match="NhwcMaxPool.*serve this model's openvino artifact"):
        ek.deploy_ovms([built.folder], tmp_path / "ovms")
    assert not (tmp_path / "ovms").exists()
    if _has("openvino"):
        again = ek.build(Path(built.folder) / "model.int8.onnx", "openvino", "int8", tmp_path / "ov",
                         ek.BuildOptions(eval_data=tmp_path / "eval.npz"))
        assert again.manifest["calibration"]["method"] == "imported" and again.manifest.accuracy["passed"]
