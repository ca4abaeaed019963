"""Model repositories on disk: one folder per model, a numbered version folder per build (a
verbatim copy of the artifact folder, manifest included, so the files stay verifiable), and
`enginekit-deploy.json` recording which build each version came from.

Everything is checked and generated in memory first; then each model folder is staged beside
its final place and renamed in, so a failure leaves no half-written model. A repository may
hold other models (written by hand or by other tools): enginekit only adds to it, and only
rewrites model folders that carry its own record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.core.artifacts import atomic_write, remove_stale_leftovers, verify_files
from enginekit.core.errors import InputError
from enginekit.core.outputs import resolved
from enginekit.deploy.artifact import DeployArtifact

RECORD = "enginekit-deploy.json"
RECORD_SCHEMA = "enginekit.deploy/1"


@dataclass
class DeployedModel:
    """One model folder about to be written: its name, the artifact its new version copies, and
    the service files (name -> text) that go beside the versions."""

    name: str
    artifact: DeployArtifact
    planned: bool = False  # a TensorRT engine still to be built (the version holds its ONNX graph)
    files: dict[str, str] = field(default_factory=dict)
    version: int = 1
    reused: bool = False  # the same build is already this model's latest version


def read_record(model_folder: Path) -> dict[str, Any] | None:
    """A model folder's deploy record, or None when it has none (not written by enginekit)."""
    from enginekit.core.loaders import load_json_document

    if not (model_folder / RECORD).is_file():
        return None
    return load_json_document(model_folder / RECORD, RECORD_SCHEMA, "deploy record")


def latest_version(model_folder: Path) -> Path | None:
    """The newest built (not planned) version folder of a model folder enginekit deploy wrote;
    None for any other folder."""
    if not (model_folder / RECORD).is_file():
        return None
    record = read_record(model_folder) or {}
    built = [int(v) for v, entry in (record.get("versions") or {}).items() if str(v).isdigit() and not (entry or {}).get("planned")]
    if not built:
        raise InputError("this deployed model has no built version (a planned TensorRT engine is built on its GPU first)", model_folder)
    return model_folder / str(max(built))


def check_names(models: list[DeployedModel], repo: Path, service: str) -> None:
    """Distinct names; each model folder new, or enginekit's own for the same service."""
    seen: dict[str, DeployedModel] = {}
    for model in models:
        if model.name in seen:
            raise InputError(f"two artifacts would be deployed as model '{model.name}' ({seen[model.name].artifact.folder} and "
                             f"{model.artifact.folder}); name them apart", repo, option="name")
        seen[model.name] = model
        folder = repo / model.name
        if not os.path.lexists(folder):
            continue
        record = read_record(folder) if folder.is_dir() and not folder.is_symlink() else None
        if record is None or record.get("service") != service:
            raise InputError(f"model folder '{model.name}' exists and was not written by enginekit deploy {service}; "
                             "it is left alone: choose another name or repository", repo, option="name")


def choose_version(model: DeployedModel, repo: Path) -> None:
    """The next version number, or the latest one again when it holds the same build."""
    record = read_record(repo / model.name) if (repo / model.name).is_dir() else None
    versions = {int(v): entry for v, entry in ((record or {}).get("versions") or {}).items() if str(v).isdigit()}
    if versions:
        latest = max(versions)
        same = versions[latest].get("build_key") == model.artifact.manifest.get("build_key") and bool(versions[latest].get("planned")) == model.planned
        if same and (repo / model.name / str(latest)).is_dir():
            model.version, model.reused = latest, True
            return
    model.version = max(versions, default=0) + 1


def write_models(models: list[DeployedModel], repo: Path, service: str) -> None:
    """Publish every model folder (staged, then renamed in), each with its record."""
    repo.mkdir(parents=True, exist_ok=True)
    for model in models:
        _write_model(model, repo, service)


def _write_model(model: DeployedModel, repo: Path, service: str) -> None:
    final = repo / model.name
    remove_stale_leftovers(repo, f".{model.name}.staging-")
    record = read_record(final) if final.is_dir() else None
    versions = dict((record or {}).get("versions") or {})
    versions[str(model.version)] = {**model.artifact.record(), "planned": model.planned}
    document = {"schema": RECORD_SCHEMA, "service": service, "name": model.name, "versions": versions}
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.staging-{os.getpid()}-", dir=repo))
    try:
        if not model.reused:
            copy = staging / str(model.version)
            shutil.copytree(model.artifact.folder, copy, symlinks=False)
            verify_files(copy, model.artifact.manifest)  # the copy is the artifact, byte for byte
        writes: list[tuple[Path, Callable[[Path], None]]] = [(staging / name, _text(text)) for name, text in model.files.items()]
        writes.append((staging / RECORD, _text(json.dumps(document, indent=2) + "\n")))
        for path, write in writes:
            write(path)
        if not final.exists():
            os.rename(staging, final)
            return
        if not model.reused:
            os.rename(staging / str(model.version), final / str(model.version))
        for path, _ in writes:
            atomic_write(final / path.name, lambda target, source=path: shutil.copyfile(source, target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def repository_root(output: str | Path, inputs: list[Path]) -> Path:
    """The repository folder: new, or an existing folder (enginekit only adds to it); never an
    input artifact, inside one, or containing one."""
    from enginekit.core.outputs import REPOSITORY, Output, check_outputs

    check_outputs([Output(Path(output), REPOSITORY)], inputs)
    return resolved(output)
