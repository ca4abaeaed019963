"""Model-server repositories from artifact folders (the last stage: artifacts -> a service).

    deploy_triton(artifacts, output)  -> Triton model repository (config.pbtxt per model)
    deploy_ovms(artifacts, output)    -> OpenVINO Model Server repository (config.json)
    check_repository(folder)          -> the problems of any repository, one line each

Every artifact is verified against its manifest first, every config is generated and checked
(Triton's own proto, then against the manifest) before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from enginekit.deploy.artifact import DeployArtifact, open_deploy_artifact
from enginekit.deploy.check import RepositoryCheck, check_repository, triton_model_problems
from enginekit.deploy.repository import DeployedModel, check_names, choose_version, repository_root, write_models
from enginekit.deploy.triton import TritonOptions, triton_config

__all__ = ["TritonOptions", "RepositoryCheck", "check_repository", "deploy_ovms", "deploy_triton"]


def _artifacts(folders: Sequence[str | Path], names: Mapping[str, str] | None) -> list[tuple[str, DeployArtifact]]:
    from enginekit.core.errors import InputError

    names = dict(names or {})
    opened = [open_deploy_artifact(folder) for folder in folders]
    named = []
    for folder, artifact in zip(folders, opened):
        name = names.pop(str(folder), None) or names.pop(Path(folder).name, None) or artifact.default_name()
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", name):
            raise InputError(f"'{name}' is not a model name servers accept (letters, digits, '_', '.', '-'; "
                             "not starting with '.' or '-'); it would also be a folder of the repository", option="name")
        named.append((name, artifact))
    if names:
        raise InputError(f"--name given for artifact(s) not deployed: {', '.join(sorted(names))}", option="name")
    return named


def _bench_entry(artifact: DeployArtifact, report: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The benchmark entry that measured this artifact: the one whose file hashes are its own
    (a report's paths are relative to wherever it was run)."""
    own = {f["path"]: f["sha256"][:16] for f in artifact.manifest.files}
    for entry in (report or {}).get("artifacts") or []:
        if isinstance(entry, dict) and not entry.get("source") and entry.get("manifest_sha") == own:
            return entry
    return None


def _planned_tensorrt(name: str, artifact: DeployArtifact) -> DeployedModel:
    """The TensorRT engine that would be built from an ONNX Runtime artifact's graph (FP32, or a
    Q/DQ graph in TensorRT's symmetric int8 encoding), described without building it."""
    from dataclasses import replace

    from enginekit.core.errors import InputError
    from enginekit.core.loaders import load_onnx
    from enginekit.targets.registry import get_target
    from enginekit.targets.tensorrt.graphs import tensorrt_qdq_problems

    if artifact.target.name != "onnxruntime":
        raise InputError("a planned TensorRT engine is described from an ONNX Runtime artifact's graph", artifact.folder)
    if artifact.manifest.precision == "int8":
        problems = tensorrt_qdq_problems(load_onnx(artifact.folder / artifact.model_file))
        if problems:
            raise InputError(f"its Q/DQ graph is not TensorRT's ({problems[0]}); make the graph TensorRT builds with `enginekit quantize --target onnxruntime --encoding int8 --table <its calibration.json>`",
                             artifact.folder, option="encoding")
    planned = replace(artifact, target=get_target("tensorrt"))
    return DeployedModel(name.replace("-onnxruntime-", "-tensorrt-"), planned, planned=True)


def deploy_triton(artifacts: Sequence[str | Path], output: str | Path, options: TritonOptions | None = None,
                  report: Mapping[str, Any] | None = None, names: Mapping[str, str] | None = None,
                  plan_tensorrt: Sequence[str | Path] = ()) -> list[DeployedModel]:
    """A Triton model repository at `output` from artifact folders (with `report`, dynamic
    batching prefers the benchmark's best batch). `plan_tensorrt`: ONNX Runtime artifacts whose
    graph also gets the config of the TensorRT engine that would be built from it (marked planned)."""
    options = options or TritonOptions()
    named = _artifacts(artifacts, names)
    planned = [open_deploy_artifact(folder) for folder in plan_tensorrt]
    repo = repository_root(output, [a.folder for _, a in named] + [a.folder for a in planned])
    models = [DeployedModel(name, artifact) for name, artifact in named]
    models += [_planned_tensorrt(artifact.default_name(), artifact) for artifact in planned]
    check_names(models, repo, "triton")
    for model in models:
        measured = None if model.planned else _bench_entry(model.artifact, report)  # a CPU benchmark says nothing of a GPU engine
        text = triton_config(model.artifact, model.name, options, measured, planned=model.planned)
        problems = triton_model_problems(text, model.name, model.artifact.manifest, planned=model.planned)
        if problems:  # a config enginekit writes must pass its own check
            raise AssertionError(f"generated config of {model.name} fails the check: {problems}")
        model.files = {"config.pbtxt": text}
        choose_version(model, repo)
    write_models(models, repo, "triton")
    return models


def deploy_ovms(artifacts: Sequence[str | Path], output: str | Path, names: Mapping[str, str] | None = None,
                threads: int | None = None) -> list[DeployedModel]:
    """An OpenVINO Model Server repository at `output`: a folder per model and config.json."""
    from enginekit.core.artifacts import atomic_write
    from enginekit.deploy.ovms import CONFIG, merged_config, ovms_entry, read_config

    named = _artifacts(artifacts, names)
    repo = repository_root(output, [a.folder for _, a in named])
    models = [DeployedModel(name, artifact) for name, artifact in named]
    check_names(models, repo, "ovms")
    entries = [ovms_entry(model.artifact, model.name, threads) for model in models]
    text = merged_config(read_config(repo), entries)
    for model in models:
        choose_version(model, repo)
    write_models(models, repo, "ovms")
    atomic_write(repo / CONFIG, lambda path: path.write_text(text))
    return models
