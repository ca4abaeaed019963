"""Where a command may write: outputs never destroy what enginekit did not make.

Every output path is checked before any work starts:
- an artifact folder may be missing, empty, or an enginekit artifact (replaced atomically);
- the root of a multi-target build may be missing, empty, or hold only enginekit's own outputs
  (artifact folders, its calibration table, its report files; a matrix's root: such build
  folders, one per model, and the matrix report);
- a file (calibration table, TensorRT cache text, report) may be missing or one enginekit wrote;
- no output may equal an input, contain one, or lie inside an input folder; no two outputs of
  one command may coincide.
Symbolic links are resolved first, so a link to a user's folder is judged as that folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from enginekit.core.errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "enginekit.manifest/1"
TABLE_SCHEMA = "enginekit.calibration/1"
REPORT_SCHEMA = "enginekit.report/1"
SENSITIVITY_SCHEMA = "enginekit.sensitivity/1"
BUILD_TABLE = "calibration.json"
REPORT_FILES = ("report.json", "report.md", "report.html")
MATRIX_SCHEMA = "enginekit.matrix/1"
MATRIX_FILES = ("matrix.json", "matrix.md")

ARTIFACT, BUILD_ROOT, TABLE, TRT_CACHE, REPORT, SENSITIVITY = "artifact", "build-root", "table", "trt-cache", "report", "sensitivity"
REPOSITORY = "repository"  # a model server's repository: enginekit only adds model folders to it
_WHAT = {ARTIFACT: "artifact folder", BUILD_ROOT: "build folder", TABLE: "calibration table",
         TRT_CACHE: "TensorRT cache file", REPORT: "report", SENSITIVITY: "sensitivity ranking", REPOSITORY: "model repository"}


@dataclass(frozen=True)
class Output:
    path: Path
    kind: str  # ARTIFACT | BUILD_ROOT | TABLE | TRT_CACHE | REPORT | SENSITIVITY


def resolved(path: str | Path) -> Path:
    """The absolute path with every symbolic link resolved (a dangling link resolves to its target)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _json_schema(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        if not head.lstrip().startswith(b"{"):
            return None
        document = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return document.get("schema") if isinstance(document, dict) else None


def _starts_with(path: Path, prefixes: Sequence[bytes]) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return False
    return any(head.startswith(p) for p in prefixes)


def is_artifact_folder(path: Path) -> bool:
    """A folder enginekit published: it has a manifest with enginekit's schema."""
    return path.is_dir() and (path / MANIFEST_NAME).is_file() and _json_schema(path / MANIFEST_NAME) == MANIFEST_SCHEMA


def _is_staging_leftover(entry: Path) -> bool:
    name = entry.name
    return name.startswith(".") and (".staging-" in name or ".retired-" in name or name.startswith(".tmp"))


def _ours(path: Path, kind: str) -> bool:
    """Whether an existing path is something enginekit wrote, of the kind about to replace it."""
    if kind == ARTIFACT:
        return path.is_dir() and (is_artifact_folder(path) or not any(path.iterdir()))
    if kind == BUILD_ROOT:
        return path.is_dir() and all(_build_root_entry(entry) for entry in path.iterdir())
    if kind == REPOSITORY:  # nothing in it is replaced but enginekit's own model folders (checked per model)
        return path.is_dir()
    if not path.is_file():
        return False
    if kind == TABLE:
        return _json_schema(path) == TABLE_SCHEMA
    if kind == TRT_CACHE:
        return _starts_with(path, (b"TRT-",))
    if kind == REPORT:
        return _report_file(path)
    if kind == SENSITIVITY:
        return _json_schema(path) == SENSITIVITY_SCHEMA
    raise ValueError(f"unknown output kind {kind!r}")


def _report_file(path: Path) -> bool:
    if path.suffix == ".md":
        return _starts_with(path, (b"enginekit report",))
    if path.suffix == ".html":
        return _starts_with(path, (b"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>enginekit report",))
    return _json_schema(path) == REPORT_SCHEMA


def _build_root_entry(entry: Path) -> bool:
    if _is_staging_leftover(entry):
        return True
    if entry.is_symlink():
        return False
    if entry.is_dir():  # an artifact, or one model's build folder in a matrix
        return _ours(entry, ARTIFACT) or _ours(entry, BUILD_ROOT)
    if entry.name in MATRIX_FILES:
        return _json_schema(entry) == MATRIX_SCHEMA if entry.suffix == ".json" else _starts_with(entry, (b"enginekit matrix",))
    if entry.name == BUILD_TABLE:
        return _ours(entry, TABLE)
    if entry.name in REPORT_FILES:
        return _report_file(entry)
    return False


def report_paths(path: str | Path) -> list[Path]:
    """The three files a report written at `path` occupies (JSON, Markdown, HTML)."""
    path = Path(path)
    return [path, path.with_suffix(".md"), path.with_suffix(".html")]


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse (InputError, one line naming the path) any output that would destroy what is not
    enginekit's, that coincides with another output, or that equals, contains or lies inside an
    input."""
    outputs = list(outputs)
    real_inputs = [(str(i), resolved(i)) for i in inputs if i is not None and str(i) and os.path.lexists(i)]
    seen: dict[Path, Output] = {}
    for output in outputs:
        real = resolved(output.path)
        if real in seen:
            raise InputError(f"is given as two outputs of one command ({_WHAT[seen[real].kind]} and {_WHAT[output.kind]}); "
                             "choose distinct paths", output.path)
        seen[real] = output
        for given, source in real_inputs:
            if real == source:
                raise InputError(f"the output is also an input ({given}); writing it would destroy the input", output.path)
            if source.is_relative_to(real):
                raise InputError(f"the output contains the input {given}; writing it would destroy the input", output.path)
            if source.is_dir() and real.is_relative_to(source):
                raise InputError(f"the output lies inside the input folder {given}; choose a path outside it", output.path)
        if os.path.lexists(real) and not _ours(real, output.kind):
            raise InputError(_refusal(real, output.kind), output.path)
    for a in seen:
        for b in seen:
            if a != b and b.is_relative_to(a):
                raise InputError(f"one output lies inside another ({b}); choose distinct paths", seen[a].path)


def _refusal(path: Path, kind: str) -> str:
    if kind == REPOSITORY:
        return "exists and is not a folder; a model repository is a folder"
    if kind in (ARTIFACT, BUILD_ROOT):
        if not path.is_dir():
            return f"exists and is not a folder; the {_WHAT[kind]} must be a new or empty folder or one enginekit wrote"
        return (f"exists and holds files enginekit did not write; it replaces only its own {_WHAT[kind]}s: "
                "choose a new or empty folder")
    if path.is_dir():
        return f"is a folder; the {_WHAT[kind]} must be a file path"
    return f"exists and is not an enginekit {_WHAT[kind]}; it replaces only files it wrote: choose another path"
