"""Offline checks of model-server repositories (written by enginekit or by hand).

Triton: each `config.pbtxt` is parsed with Triton's own ModelConfig message (tritonclient's
`model_config_pb2`), then checked against what the server will find: a known platform or
backend, numbered version folders holding the file it loads, and, where a version carries an
enginekit manifest, the inputs and outputs (names, data types, dims with or without the batch
dim, max_batch_size against the batch dim and a TensorRT profile) and INT8 calibration tables
set on a graph that already holds Q/DQ. OVMS: `config.json` against the model-config schema,
and each `base_path` against the formats OVMS loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.core.errors import EnginekitError, InputError, MissingDependencyError
from enginekit.core.tensors import TensorSpec
from enginekit.deploy.artifact import TRITON_TYPES, served_dims

TRITON_PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "tensorflow_graphdef": "tensorflow",
                    "tensorflow_savedmodel": "tensorflow", "pytorch_libtorch": "pytorch", "ensemble": ""}
TRITON_BACKENDS = {"onnxruntime", "openvino", "tensorrt", "pytorch", "tensorflow", "python", "fil", "dali", "vllm",
                   "tensorrtllm", "identity", "repeat", "square"}
DEFAULT_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml", "tensorrt": "model.plan", "pytorch": "model.pt",
                 "python": "model.py"}
CALIBRATION_KEYS = ("calibration_table",)  # ORT TensorRT provider: int8_calibration_table_name, trt_int8_calibration_table_name


@dataclass
class RepositoryCheck:
    """Per model of a repository: the problems (the server would fail or misbehave) and notes."""

    folder: Path
    service: str
    problems: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def lines(self) -> list[str]:
        lines = []
        for name in sorted(set(self.problems) | set(self.notes)):
            problems, notes = self.problems.get(name) or [], self.notes.get(name) or []
            if problems:
                lines += [f"{name}: {problem}" for problem in problems]
            else:
                lines.append(f"{name}: ok" + (f" ({'; '.join(notes)})" if notes else ""))
        return lines


def check_repository(folder: str | Path) -> RepositoryCheck:
    """Every model of a Triton or OVMS repository (OVMS when the folder has config.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("is not a folder (a model repository is one)", folder)
    from enginekit.deploy.ovms import CONFIG

    if (folder / CONFIG).is_file():
        return _check_ovms(folder)
    result = RepositoryCheck(folder, "triton")
    models = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not any((model / "config.pbtxt").is_file() for model in models):
        raise InputError("is not a model repository: no folder in it has a config.pbtxt (Triton) and it has no "
                         "config.json (OpenVINO Model Server)", folder)
    for model in models:
        result.problems[model.name], result.notes[model.name] = check_triton_model(model)
    return result


# ------------------------------------------------------------------------------------- Triton


def check_triton_model(model: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of one Triton model folder."""
    from enginekit.core.loaders import load_triton_config
    from enginekit.deploy.repository import read_record

    if not (model / "config.pbtxt").is_file():
        return ["no config.pbtxt"], []
    try:
        config = load_triton_config(model / "config.pbtxt")
        record = read_record(model) or {}
    except MissingDependencyError:
        raise  # nothing in the repository is wrong: this machine cannot check it
    except EnginekitError as exc:
        return [_short(exc, model)], []
    backend = _backend(config)
    versions = sorted((p for p in model.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        default = DEFAULT_FILES.get(backend or "", "the model file")
        return [f"no version folder (Triton loads numbered folders such as 1/ holding {config.default_model_filename or default})"], []
    latest = versions[-1]
    planned = bool(((record.get("versions") or {}).get(latest.name) or {}).get("planned"))
    problems, notes = _version_problems(config, backend, latest, planned), []
    manifest = _manifest(latest, problems)
    problems += _config_problems(config, model.name, manifest, planned, latest)
    if planned:
        notes.append(f"planned: version {latest.name} holds the ONNX graph; build model.plan from it on the serving GPU")
    elif manifest is not None and not problems:
        notes.append(f"{manifest.get('model')} {manifest.get('target')} {manifest.get('precision')}, version {latest.name}")
    return problems, notes


def triton_model_problems(text: str, folder_name: str, manifest: Mapping[str, Any], planned: bool = False) -> list[str]:
    """The problems of a config text against a manifest (what `deploy` checks before writing)."""
    from enginekit.core.loaders import parse_triton_config

    try:
        config = parse_triton_config(text, f"{folder_name}/config.pbtxt")
    except MissingDependencyError:
        return []  # no tritonclient: nothing to parse with (deploy says the configs went unchecked)
    except EnginekitError as exc:
        return [str(exc)]
    return _config_problems(config, folder_name, manifest, planned, None)


def _backend(config: Any) -> str | None:
    if config.backend:
        return config.backend
    return TRITON_PLATFORMS.get(config.platform)


def _version_problems(config: Any, backend: str | None, version: Path, planned: bool) -> list[str]:
    if planned:
        return []
    wanted = config.default_model_filename or DEFAULT_FILES.get(backend or "")
    if wanted and not (version / wanted).exists():
        return [f"version {version.name} has no {wanted} (the file the {backend} backend loads)"]
    if backend == "openvino" and wanted and not (version / wanted).with_suffix(".bin").is_file():
        return [f"version {version.name} has {wanted} but no {Path(wanted).with_suffix('.bin').name} beside it"]
    return []


def _manifest(version: Path, problems: list[str]) -> dict[str, Any] | None:
    """The version's enginekit manifest (a failed file verification is a problem, the manifest
    still serves the other checks); None where there is none or it is unreadable."""
    from enginekit.core.artifacts import read_manifest, verify_files

    if not (version / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(version)
    except EnginekitError as exc:
        problems.append(f"version {version.name}: {_short(exc, version)}")
        return None
    try:
        verify_files(version, manifest)
    except EnginekitError as exc:
        problems.append(f"version {version.name}: {_short(exc, version)}")
    return manifest


def _config_problems(config: Any, folder_name: str, manifest: Mapping[str, Any] | None, planned: bool, version: Path | None) -> list[str]:
    problems = []
    if config.name and config.name != folder_name:
        problems.append(f"config names the model '{config.name}', its folder is '{folder_name}' (Triton requires them equal)")
    if config.platform and config.platform not in TRITON_PLATFORMS:
        problems.append(f"unknown platform '{config.platform}' (known: {', '.join(sorted(TRITON_PLATFORMS))})")
    if config.backend and config.backend not in TRITON_BACKENDS:
        problems.append(f"unknown backend '{config.backend}' (Triton's: {', '.join(sorted(TRITON_BACKENDS))})")
    if config.platform in TRITON_PLATFORMS and config.backend and TRITON_PLATFORMS[config.platform] not in ("", config.backend):
        problems.append(f"platform '{config.platform}' and backend '{config.backend}' disagree")
    if not config.platform and not config.backend:
        problems.append("names neither a platform nor a backend")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size {config.max_batch_size} is negative")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        problems.append("dynamic_batching needs max_batch_size > 0 (the model's batch dim is fixed or absent)")
    for size in config.dynamic_batching.preferred_batch_size:
        if config.max_batch_size and size > config.max_batch_size:
            problems.append(f"preferred_batch_size {size} exceeds max_batch_size {config.max_batch_size}")
    if _backend(config) == "openvino":
        from enginekit.deploy.triton import OPENVINO_PARAMETERS

        problems += [f"parameter '{key}' is not read by Triton's OpenVINO backend, which ignores it (it reads "
                     f"{', '.join(OPENVINO_PARAMETERS)})" for key in config.parameters if key not in OPENVINO_PARAMETERS]
    if manifest is not None:
        problems += _io_problems(config, manifest)
        problems += _tensorrt_problems(config, manifest, planned)
        problems += _calibration_problems(config, manifest, version)
    return problems


def _io_problems(config: Any, manifest: Mapping[str, Any]) -> list[str]:
    specs = {"input": [TensorSpec.from_json(s) for s in manifest.get("inputs") or []],
             "output": [TensorSpec.from_json(s) for s in manifest.get("outputs") or []]}
    data_type_name = type(config).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type.values_by_number
    batched = config.max_batch_size > 0
    problems = []
    for kind, entries in (("input", config.input), ("output", config.output)):
        expected = {spec.name: spec for spec in specs[kind]}
        given = {entry.name for entry in entries}
        if kind == "input":
            problems += [f"input '{name}' of the model is missing from the config" for name in expected if name not in given]
        for entry in entries:
            spec = expected.get(entry.name)
            if spec is None:
                problems.append(f"{kind} '{entry.name}' is not an {kind} of the model (its {kind}s: {', '.join(expected)})")
                continue
            have, want = data_type_name[entry.data_type].name, TRITON_TYPES.get(spec.dtype)
            if have != want:
                problems.append(f"{kind} '{entry.name}': data_type {have}, the model's is {want}")
            problems += _dims_problems(kind, entry, spec, batched, config.max_batch_size)
    for warmup in config.model_warmup:
        for name in warmup.inputs:
            if name not in {s.name for s in specs["input"]}:
                problems.append(f"model_warmup '{warmup.name}' feeds '{name}', which is not an input of the model")
    return problems


def _dims_problems(kind: str, entry: Any, spec: TensorSpec, batched: bool, max_batch: int) -> list[str]:
    dims = list(entry.dims)
    if not dims:
        return [f"{kind} '{entry.name}': empty dims, which Triton refuses; a scalar is dims [ 1 ] with reshape {{ shape: [ ] }}"]
    if entry.HasField("reshape"):
        return []  # the server reshapes; the model's own shape is then not what dims say
    if batched and not (spec.shape and spec.shape[0] == "batch"):
        return [f"max_batch_size {max_batch}, but {kind} '{entry.name}' has no free batch dim (shape {list(spec.shape)}): "
                "use max_batch_size: 0 and the full shape in dims"]
    expected = served_dims(spec, batched)
    if _dims_match(dims, expected):
        return []
    if batched and _dims_match(dims, served_dims(spec, False)):
        return [f"{kind} '{entry.name}': dims {dims} include the batch dim; with max_batch_size {max_batch} Triton adds it "
                f"(dims {expected})"]
    return [f"{kind} '{entry.name}': dims {dims}, the model's are {expected}" + (" (without the batch dim)" if batched else "")]


def _dims_match(dims: list[int], expected: list[int]) -> bool:
    """A fixed model dim must be given as is; a variable one (-1) as -1 or any size."""
    return len(dims) == len(expected) and all(want == -1 and (have == -1 or have > 0) or have == want for have, want in zip(dims, expected))


def _tensorrt_problems(config: Any, manifest: Mapping[str, Any], planned: bool) -> list[str]:
    if config.platform != "tensorrt_plan" and config.backend != "tensorrt":
        return []
    profile = (manifest.get("tensorrt") or {}).get("profile")
    if planned:  # the profile the engine will be built with
        from enginekit.deploy.triton import planned_profile

        profile = planned_profile(manifest)
    if not isinstance(profile, dict) or not profile:
        return ["the manifest records no TensorRT optimization profile (not an engine artifact)"]
    problems = []
    largest = min(int(shapes[2][0]) for shapes in profile.values())
    if config.max_batch_size > largest:
        problems.append(f"max_batch_size {config.max_batch_size} exceeds the engine's optimization profile (batch up to {largest})")
    for group in config.instance_group:
        for name in group.profile:
            if name != "0":
                problems.append(f"instance_group selects profile '{name}'; the engine has only profile 0")
    offset = 1 if config.max_batch_size > 0 else 0
    for entry in config.input:
        low, _, high = profile.get(entry.name, [[], [], []])
        for index, dim in enumerate(entry.dims):
            axis = index + offset
            if dim > 0 and axis < len(low) and not low[axis] <= dim <= high[axis]:
                problems.append(f"input '{entry.name}': dim {dim} on axis {axis} lies outside the engine's profile ({low[axis]}..{high[axis]})")
    return problems


def _calibration_problems(config: Any, manifest: Mapping[str, Any], version: Path | None) -> list[str]:
    """An INT8 calibration table beside a graph that already holds Q/DQ: ONNX Runtime's TensorRT
    provider then fails to create the session (the ranges are in the graph already)."""
    if manifest.get("precision") != "int8" or "quantization" not in manifest:
        return []
    problems = []
    accelerators = config.optimization.execution_accelerators
    for accelerator in [*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator]:
        for key in accelerator.parameters:
            if any(word in key for word in CALIBRATION_KEYS):
                problems.append(f"sets a TensorRT INT8 calibration table ({accelerator.name} '{key}') on a model that already holds "
                                "Q/DQ nodes; the session fails: remove the parameter")
    if version is not None:
        for path in sorted(version.iterdir()):
            if path.is_file() and _is_calibration_cache(path):
                problems.append(f"version {version.name} holds a TensorRT calibration cache ({path.name}) beside a Q/DQ graph; "
                                "ranges come from the graph: remove the cache")
    return problems


def _is_calibration_cache(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"TRT-"
    except OSError:
        return False


def _short(exc: EnginekitError, base: Path) -> str:
    """The error's message without the path prefix of the folder it is reported under."""
    text, prefix = str(exc), f"{exc.path}: "
    if not exc.path or not text.startswith(prefix):
        return text
    relative = Path(exc.path).relative_to(base) if Path(exc.path).is_relative_to(base) else Path(exc.path)
    return text[len(prefix):] if str(relative) == "." else f"{relative}: {text[len(prefix):]}"


# --------------------------------------------------------------------------------------- OVMS

OVMS_FORMATS = ((".xml", "OpenVINO IR"), (".onnx", "ONNX"), (".tflite", "TFLite"), (".pdmodel", "PaddlePaddle"))


def _check_ovms(folder: Path) -> RepositoryCheck:
    from enginekit.deploy.ovms import CONFIG, TOP_LEVEL, read_config

    result = RepositoryCheck(folder, "ovms")
    try:
        document = read_config(folder)
    except EnginekitError as exc:
        result.problems[CONFIG] = [_short(exc, folder)]
        return result
    models = document.get("model_config_list")
    unknown = sorted(set(document) - set(TOP_LEVEL))
    if not isinstance(models, list) or unknown:
        result.problems[CONFIG] = ([f"has the top-level key(s) {', '.join(unknown)}, which OVMS's schema does not allow"] if unknown else [])
        result.problems[CONFIG] += [] if isinstance(models, list) else ["has no model_config_list (a list of {\"config\": {...}} entries)"]
        if not isinstance(models, list):
            return result
    for index, item in enumerate(models):
        config = item.get("config") if isinstance(item, dict) else None
        name = config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str) else f"model_config_list[{index}]"
        if name in result.problems:
            result.problems[name].append("is named twice in model_config_list")
            continue
        problems: list[str] = []
        result.problems[name], result.notes[name] = problems, []
        if not isinstance(config, dict) or set(item) != {"config"}:
            problems.append("entry must be {\"config\": {...}} and nothing else")
            continue
        problems += _ovms_config_problems(config)
        if isinstance(config.get("base_path"), str) and not problems:
            problems += _ovms_model_problems(folder, config["base_path"], result.notes[name])
    return result


def _ovms_config_problems(config: Mapping[str, Any]) -> list[str]:
    """One model's "config" object against OVMS's schema."""
    from enginekit.deploy.ovms import CONFIG_TYPES, REQUIRED, VERSION_POLICIES

    problems = [f"config lacks the required key '{key}'" for key in REQUIRED if key not in config]
    for key, value in config.items():
        if key not in CONFIG_TYPES:
            problems.append(f"config has the key '{key}', which OVMS's schema does not allow")
        elif not isinstance(value, CONFIG_TYPES[key]) or (isinstance(value, bool) and bool not in CONFIG_TYPES[key]):
            problems.append(f"config key '{key}' must be {' or '.join(t.__name__ for t in CONFIG_TYPES[key])}, not {type(value).__name__}")
        elif key in ("nireq", "batch_size") and isinstance(value, int) and value < 0:
            problems.append(f"config key '{key}' must be >= 0")
    plugin = config.get("plugin_config")
    if isinstance(plugin, dict):
        problems += [f"plugin_config '{k}' must be a string, boolean or number" for k, v in plugin.items() if not isinstance(v, (str, bool, int, float))]
    policy = config.get("model_version_policy")
    if isinstance(policy, dict) and (len(policy) != 1 or next(iter(policy)) not in VERSION_POLICIES):
        problems.append("model_version_policy must be exactly one of {\"all\": {}}, {\"specific\": {\"versions\": [...]}}, "
                        "{\"latest\": {\"num_versions\": N}}")
    elif isinstance(policy, dict):
        kind, body = next(iter(policy.items()))
        field_name = VERSION_POLICIES[kind]
        if not isinstance(body, dict) or (field_name and field_name not in body) or (not field_name and body):
            problems.append(f"model_version_policy '{kind}' is malformed")
    return problems


def _ovms_model_problems(folder: Path, base_path: str, notes: list[str]) -> list[str]:
    base = Path(base_path) if Path(base_path).is_absolute() else folder / base_path
    if not base.is_dir():
        return [f"base_path '{base_path}' is not a folder here"]
    versions = sorted((p for p in base.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        return [f"base_path '{base_path}' has no version folder (numbered folders such as 1/ holding the model)"]
    problems = []
    for version in versions:
        found = [label for suffix, label in OVMS_FORMATS if any(version.glob(f"*{suffix}"))]
        if len(found) != 1:
            problems.append(f"version {version.name} holds {'no model file' if not found else ' and '.join(found) + ' files'} "
                            "(OVMS loads one model format per version)")
        elif found == ["OpenVINO IR"] and not all(p.with_suffix(".bin").is_file() for p in version.glob("*.xml")):
            problems.append(f"version {version.name} has an .xml without its .bin")
    manifest = _manifest(versions[-1], problems)
    if manifest is not None and not problems:
        notes.append(f"{manifest.get('model')} {manifest.get('target')} {manifest.get('precision')}, version {versions[-1].name}")
    return problems
