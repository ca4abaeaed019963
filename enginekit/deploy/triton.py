"""Triton Inference Server model configs (config.pbtxt) from artifact manifests.

One model per artifact: `platform`/`backend` from the target's Serving declaration, inputs and
outputs with Triton's data types and `dims` without the batch dim when the server batches
(`max_batch_size` > 0), else the full shape with `max_batch_size: 0`; dynamic batching with the
benchmark's best batch as the preferred size; one instance group on the target's device kind;
the backend parameters the artifact was measured with (OpenVINO's hints); a warm-up request at
the shape the artifact was evaluated at; the TensorRT profile bounds in the header.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enginekit.core.errors import EnginekitError, InputError
from enginekit.core.tensors import TensorSpec
from enginekit.deploy.artifact import TRITON_TYPES, DeployArtifact, served_dims
from enginekit.deploy.pbtxt import Enum, parameters, to_text
from enginekit.targets.registry import artifact_threads

DEFAULT_MAX_BATCH = 16  # for CPU artifacts whose batch dim is free: the benchmark's largest batch by default
# the parameters Triton's OpenVINO backend reads (openvino_backend src/openvino.cc ParseParameters);
# it ignores any other key without a word, and none of these sets an f32 precision hint
OPENVINO_PARAMETERS = ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS", "NUM_STREAMS", "HINT_BF16",
                       "TARGET_DEVICE", "CPU_EXTENSION_PATH", "SKIP_OV_DYNAMIC_BATCHSIZE", "ENABLE_BATCH_PADDING", "RESHAPE_IO_LAYERS")


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int | None = None  # None: the TensorRT profile's largest batch, else DEFAULT_MAX_BATCH
    instances: int = 1
    threads: int | None = None  # OpenVINO's INFERENCE_NUM_THREADS, ORT's intra_op_thread_count; None: the count the build measured fastest, else (OpenVINO) the cores of the machine that measured it
    max_queue_delay_us: int = 100


def tensorrt_profile(artifact: DeployArtifact) -> dict[str, list[list[int]]]:
    """The engine's optimization profile {input: [min, opt, max]} (from the manifest, or, for an
    engine not built yet, the profile the TensorRT target would build with)."""
    profile = (artifact.manifest.get("tensorrt") or {}).get("profile")
    if isinstance(profile, dict) and profile:
        return profile
    return planned_profile(artifact.manifest)


def planned_profile(manifest: Mapping[str, Any]) -> dict[str, list[list[int]]]:
    """The profile `build --targets tensorrt` gives an engine of this graph: the default dim
    ranges, capped by a zoo model's dim_max (a transformer's position table)."""
    from enginekit.models import get_spec, zoo_names
    from enginekit.targets.tensorrt.builder import profile_shapes

    inputs = [TensorSpec.from_json(s) for s in manifest.get("inputs") or []]
    dim_max: Mapping[str, int] = {}
    if manifest.get("model") in zoo_names():
        try:
            dim_max = get_spec(manifest["model"]).dim_max
        except EnginekitError:  # the zoo extra is absent: the default ranges
            pass
    return {name: [list(shape) for shape in shapes] for name, shapes in profile_shapes(inputs, None, dim_max).items()}


def max_batch_size(artifact: DeployArtifact, options: TritonOptions, tensorrt: bool) -> int:
    """0 where the batch dim is fixed (or not every tensor has one); else the asked size, bounded
    by a TensorRT engine's profile."""
    if not artifact.batched:
        return 0
    if tensorrt:
        largest = min(shapes[2][0] for shapes in tensorrt_profile(artifact).values())
        asked = options.max_batch_size or largest
        if asked > largest:
            raise InputError(f"max_batch_size {asked} exceeds the engine's optimization profile (batch up to {largest})",
                             artifact.folder, option="max_batch_size")
        return asked
    return options.max_batch_size or DEFAULT_MAX_BATCH


def preferred_batch_sizes(entry: Mapping[str, Any] | None, limit: int) -> list[int]:
    """The benchmark's best batch (highest throughput), and any other swept batch within 10 % of
    it, up to `limit`; none without a benchmark entry or when batch 1 is best."""
    sweep = [s for s in (entry or {}).get("throughput") or [] if isinstance(s, dict) and 1 < s.get("batch", 0) <= limit]
    best = max(((entry or {}).get("throughput") or [{}]), key=lambda s: s.get("throughput_per_s", 0), default={})
    if not sweep or best.get("batch", 1) <= 1:
        return []
    return sorted(s["batch"] for s in sweep if s["throughput_per_s"] >= 0.9 * best["throughput_per_s"])


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    """One input or output; Triton refuses empty dims, so a scalar is dims [1] reshaped to []."""
    dims = served_dims(spec, batched)
    shape = {"dims": dims} if dims else {"dims": [1], "reshape": {"shape": []}}
    return {"name": spec.name, "data_type": Enum(TRITON_TYPES[spec.dtype]), **shape}


def _warmup_dims(artifact: DeployArtifact, spec: TensorSpec, tensorrt: bool) -> list[int]:
    """The shape a warm-up request sends (without the batch dim when batched): the data the
    artifact was evaluated on, a TensorRT profile's optimum, else 1 for a free dim."""
    observed = (artifact.manifest.get("data_shapes") or {}).get(spec.name)
    optimum = tensorrt_profile(artifact).get(spec.name, [None, None])[1] if tensorrt else None
    dims = []
    for index, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif tensorrt and optimum and len(optimum) == len(spec.shape):
            dims.append(int(optimum[index]))
        elif isinstance(observed, list) and len(observed) == len(spec.shape) and isinstance(observed[index], int):
            dims.append(int(observed[index]))
        else:
            dims.append(1)
    dims = dims[1:] if artifact.batched else dims
    return dims or [1]  # a scalar travels as dims [1] (the config reshapes it)


def _openvino_parameters(artifact: DeployArtifact, options: TritonOptions) -> dict[str, str]:
    """The hints the artifact was compiled and measured with: its performance hint and thread
    count (Triton's OpenVINO backend has no key for the f32 precision hint; see `_header`)."""
    compiled = (artifact.manifest.get("openvino") or {}).get("compile_config") or {}
    threads = artifact_threads(artifact.manifest, options.threads) or (artifact.manifest.get("machine") or {}).get("cores") or 1
    return {"PERFORMANCE_HINT": compiled.get("PERFORMANCE_HINT", "LATENCY"), "INFERENCE_NUM_THREADS": str(threads)}


def triton_config(artifact: DeployArtifact, name: str, options: TritonOptions, bench_entry: Mapping[str, Any] | None = None,
                  planned: bool = False) -> str:
    """config.pbtxt text of `artifact` served as model `name`. `planned`: a TensorRT engine not
    built yet, described from the ONNX graph it would be built from."""
    serving = artifact.serving
    tensorrt = serving.triton_platform == "tensorrt_plan"
    if not (serving.triton_platform or serving.triton_backend):
        raise InputError(f"Triton has no backend for {artifact.target.name} artifacts (deploy them with 'deploy ovms')", artifact.folder)
    batch = max_batch_size(artifact, options, tensorrt)
    config: dict[str, Any] = {"name": name}
    if serving.triton_platform:
        config["platform"] = serving.triton_platform
    if serving.triton_backend:
        config["backend"] = serving.triton_backend
    config["max_batch_size"] = batch
    config["input"] = [_tensor(spec, batch > 0) for spec in artifact.inputs]
    config["output"] = [_tensor(spec, batch > 0) for spec in artifact.outputs]
    if batch > 0:
        preferred = preferred_batch_sizes(bench_entry, batch)
        config["dynamic_batching"] = {"preferred_batch_size": preferred or None, "max_queue_delay_microseconds": options.max_queue_delay_us}
    group: dict[str, Any] = {"count": options.instances, "kind": Enum(f"KIND_{serving.device}")}
    if tensorrt:
        group["profile"] = ["0"]
    config["instance_group"] = [group]
    model_file = serving.triton_default_file if planned else artifact.model_file
    if model_file != serving.triton_default_file:
        config["default_model_filename"] = model_file
    if serving.triton_backend == "openvino":
        config["parameters"] = parameters(_openvino_parameters(artifact, options))
    elif serving.triton_platform == "onnxruntime_onnx" and (threads := artifact_threads(artifact.manifest, options.threads)):
        config["parameters"] = parameters({"intra_op_thread_count": str(threads)})  # the count it was measured fastest at
    config["model_warmup"] = [{"name": "enginekit-warmup", "batch_size": 1, "count": 1,
                               "inputs": [{"key": spec.name, "value": _warmup_input(artifact, spec, tensorrt)} for spec in artifact.inputs]}]
    return to_text(config, _header(artifact, planned, tensorrt))


def _warmup_input(artifact: DeployArtifact, spec: TensorSpec, tensorrt: bool) -> dict[str, Any]:
    data = {"random_data": True} if spec.dtype.startswith("float") else {"zero_data": True}  # ids stay in range
    return {"data_type": Enum(TRITON_TYPES[spec.dtype]), "dims": _warmup_dims(artifact, spec, tensorrt), **data}


def _header(artifact: DeployArtifact, planned: bool, tensorrt: bool) -> list[str]:
    manifest = artifact.manifest
    lines = [f"written by enginekit deploy from {artifact.folder.name} ({manifest.model}, {manifest.target} "
             f"{manifest.precision}, build key {str(manifest.get('build_key'))[:16]})"]
    if artifact.serving.triton_backend == "openvino" and manifest.precision == "fp32":
        lines.append("FP32 IR: Triton's OpenVINO backend cannot set the f32 precision hint, so on CPUs with AMX OpenVINO runs it "
                     "in bf16 (the artifact was measured in f32); OVMS (deploy ovms) sets it")
    if planned:
        lines.append("PLANNED: no engine was built here; build model.plan from the ONNX graph in the version folder on the GPU "
                     "that will serve it (enginekit build --targets tensorrt), with the profile below")
    if tensorrt:
        for input_name, (low, opt, high) in tensorrt_profile(artifact).items():
            lines.append(f"optimization profile 0, {input_name}: min {low} opt {opt} max {high}")
    return lines

