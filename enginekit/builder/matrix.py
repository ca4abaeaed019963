"""A build matrix: models x targets x precisions, fanned out over an executor (core.executor:
local worker processes or a Ray cluster), with one report for the whole matrix.

Two waves. First one task per model exports it (once, into the export cache), runs what the graph
alone rules out, the fallback search, and the one calibration its INT8 cells share: its
`SessionState`. Then one task per cell builds that target x precision from the state, exactly as
`build_many` would in one process (same build key, same files). A cell whose artifact is already
published with its build key is reused, so a rerun of the matrix builds only what is missing. A
cell's failure (a gate, a worker killed, a library a node lacks) is its own row; the other cells
go on. Cells of a target the matrix pins to a GPU kind run only where that kind is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from enginekit.builder.options import BuildOptions
from enginekit.builder.pipeline import TABLE_FILE, BuildResult, Cell, auto_fallback_search, failed_cell, build_cell, cached_artifact, cell_key, int8_pair
from enginekit.builder.session import ModelSession, SessionState
from enginekit.core.errors import EnginekitError, InputError, naming
from enginekit.core.executor import Executor, Task, get_executor
from enginekit.core.outputs import BUILD_ROOT, MATRIX_FILES, MATRIX_SCHEMA, Output, check_outputs
from enginekit.core.progress import report
from enginekit.targets.registry import get_target

CPU = "cpu"
# what a model entry of a matrix file may set for its own builds (the rest come from the command)
MODEL_KEYS = ("model", "name", "calib_data", "eval_data", "num_samples", "eval_samples", "calib_method", "min_accuracy",
              "weights", "input_shapes", "opset")
PATH_KEYS = ("calib_data", "eval_data", "weights")
_MODEL_KEY_TYPES = {"calib_data": (str,), "eval_data": (str,), "num_samples": (int,), "eval_samples": (int,), "calib_method": (str,),
                    "min_accuracy": (str, list), "weights": (str,), "input_shapes": (list,), "opset": (int,)}


@dataclass
class MatrixModel:
    model: str  # zoo name, model file or export folder, or 'module:factory'
    name: str  # its folder under the matrix's output root
    options: BuildOptions


@dataclass
class MatrixCell:
    model: str
    target: str
    precision: str
    machine: str  # "cpu", or the GPU kind the matrix pins the target to
    cell: Cell
    attempts: int = 0
    infrastructure: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.cell.skipped:
            return "skipped"
        if self.cell.failed:
            return "failed"
        return "reused" if self.cell.result and self.cell.result.cache_hit else "built"


@dataclass
class MatrixResult:
    cells: list[MatrixCell]
    executor: str
    wall_s: float
    written: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[MatrixCell]:
        return [c for c in self.cells if c.status == "failed"]


@dataclass
class _Prepared:
    """A model's first wave: its state for the cells, and the cells settled already."""

    state: SessionState | None = None
    settled: dict[tuple[str, str], Cell] = field(default_factory=dict)
    error: tuple[str, int] | None = None  # the model itself failed (export, calibration): every cell fails with it


def parse_matrix(document: Mapping[str, Any], base: BuildOptions, folder: Path, origin: Path | None = None
                 ) -> tuple[list[MatrixModel], dict[str, str]]:
    """The `models` and `machines` of a matrix file: each model a zoo name / path / factory, or a
    mapping with `model` and its own MODEL_KEYS (relative paths are relative to the file);
    machines map a target to `{accelerator: KIND}`."""
    import dataclasses

    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise InputError("a matrix lists its models: `models: [name, {model: path, calib_data: ...}, ...]`", origin)
    entries, names = [], set()
    for index, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise InputError(f"model {index + 1} of the matrix is not a name or a mapping with `model`", origin)
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            raise InputError(f"model {index + 1} of the matrix has unknown key(s) {', '.join(unknown)} (known: {', '.join(MODEL_KEYS)})", origin)
        settings = {k: v for k, v in entry.items() if k not in ("model", "name")}
        wrong = [k for k, v in settings.items() if not isinstance(v, _MODEL_KEY_TYPES[k]) or isinstance(v, bool)]
        if wrong:
            raise InputError(f"model {index + 1} of the matrix: {wrong[0]} must be "
                             f"{' or '.join(t.__name__ for t in _MODEL_KEY_TYPES[wrong[0]])}, not {settings[wrong[0]]!r}", origin)
        if "input_shapes" in settings:
            settings["input_shapes"] = [str(v) for v in settings["input_shapes"]]
        for key in PATH_KEYS:
            if isinstance(settings.get(key), str) and settings[key] != "zoo":
                settings[key] = str(folder / settings[key])
        model = entry["model"]
        if ("/" in model or model.endswith((".onnx", ".keras", ".h5"))) and not Path(model).is_absolute():
            model = str(folder / model)
        name = str(entry.get("name") or Path(entry["model"]).stem.replace(":", "_"))
        if name in names or "/" in name or name.startswith("."):
            raise InputError(f"model {index + 1} of the matrix needs a unique plain `name` (got '{name}')", origin)
        names.add(name)
        try:
            options = dataclasses.replace(base, **settings)
        except TypeError as exc:
            raise InputError(f"model {index + 1} of the matrix: {exc}", origin) from None
        entries.append(MatrixModel(model, name, options))
    machines: dict[str, str] = {}
    for target, need in (document.get("machines") or {}).items():
        kind = need.get("accelerator") if isinstance(need, dict) else None
        if not isinstance(kind, str) or not kind or set(need) != {"accelerator"}:
            raise InputError(f"machines.{target} must be {{accelerator: KIND}} (e.g. H100), not {need!r}", origin)
        machines[get_target(str(target)).name] = kind
    return entries, machines


def untuned_beside_others(models: Sequence[MatrixModel], executor: Executor) -> list[MatrixModel]:
    """The models with thread-count tuning (builder/threads.py) off, unless asked for, where the
    executor builds cells side by side: a timing would measure the neighbouring builds, not the
    artifact. One worker builds one cell at a time and tunes as a plain build does."""
    if executor.workers == 1:
        return list(models)
    return [replace(m, options=replace(m.options, tune_threads=False)) if m.options.tune_threads is None else m for m in models]


def build_matrix(models: Sequence[MatrixModel], targets: Sequence[str], precisions: Sequence[str], out: str | Path,
                 executor: Executor | str = "local", machines: Mapping[str, str] | None = None, flat: bool = False) -> MatrixResult:
    """Every model x target x precision on `executor`, each artifact in `out/<model>/<target>-<precision>`
    (`flat`: one model, in `out/<target>-<precision>` as `build_many` lays it out), and the matrix
    report `out/matrix.{json,md}`."""
    started = time.perf_counter()
    out = Path(out)
    executor = get_executor(executor) if isinstance(executor, str) else executor
    machines = dict(machines or {})
    models = untuned_beside_others(models, executor)
    if flat and len(models) != 1:
        raise ValueError("a flat layout holds one model")
    chosen = [get_target(name) for name in targets]  # an unknown target fails before any work
    if not chosen or not precisions:
        raise InputError("name at least one target and one precision", option="targets")
    roots = {m.name: out if flat else out / m.name for m in models}
    check_outputs([Output(out, BUILD_ROOT)], [m.model if Path(m.model).exists() else None for m in models])  # and the models' folders in it
    grid = [(t.name, p) for t in chosen for p in precisions]
    cells: dict[tuple[str, str, str], MatrixCell] = {}  # in model x target x precision order, as reported
    for model in models:
        for target, precision in grid:
            cell = Cell(target, precision)
            if precision not in get_target(target).precisions:
                cell.skipped = f"{target} does not offer {precision}"
            cells[(model.name, target, precision)] = MatrixCell(model.name, target, precision, machines.get(target, CPU), cell)
    folders = {key: roots[key[0]] / f"{key[1]}-{key[2]}" for key in cells}
    total = sum(1 for c in cells.values() if not c.cell.skipped)
    report("preparing models", 0, len(models), "models")
    prepared: dict[str, _Prepared] = {}
    tasks = [Task(model.name, prepare_model, (model, [(t, p, str(folders[(model.name, t, p)]))
                                                      for t, p in grid if not cells[(model.name, t, p)].cell.skipped],
                                              str(roots[model.name])))
             for model in models]
    for outcome in executor.run(tasks):
        failure = outcome.failed or outcome.skipped
        prepared[outcome.key] = outcome.value if not failure else _Prepared(error=(f"preparing the model failed: {failure}", 1))
        report("preparing models", len(prepared), len(models), "models", outcome.key)
    wave: list[Task] = []
    entries = {m.name: m for m in models}
    for key, matrix_cell in cells.items():
        name, target, precision = key
        if matrix_cell.cell.skipped:
            continue
        ready = prepared[name]
        if ready.error is not None:
            matrix_cell.cell.failed, matrix_cell.cell.exit_code = ready.error
        elif (target, precision) in ready.settled:
            matrix_cell.cell = ready.settled[(target, precision)]
        else:
            accelerator = machines.get(target)
            wave.append(Task("/".join(key), build_matrix_cell, (entries[name], target, precision, str(folders[key]), ready.state), accelerator))
    done = total - len(wave)
    report("building", done, total, "cells")
    by_task = {"/".join(key): key for key in cells}
    for outcome in executor.run(wave):
        name, target, precision = by_task[outcome.key]
        matrix_cell = cells[by_task[outcome.key]]
        matrix_cell.attempts, matrix_cell.infrastructure = outcome.attempts, outcome.infrastructure
        if outcome.skipped:
            matrix_cell.cell.skipped = outcome.skipped
        elif outcome.failed:
            matrix_cell.cell.failed, matrix_cell.cell.exit_code = outcome.failed, 1
        else:
            matrix_cell.cell = outcome.value
        done += 1
        report("building", done, total, "cells", f"{name} {target} {precision}: {matrix_cell.status}")
    result = MatrixResult(list(cells.values()), executor.describe(), time.perf_counter() - started)
    result.written = write_matrix_report(result, out)
    return result


def prepare_model(model: MatrixModel, cells: list[tuple[str, str, str]], root: str) -> _Prepared:
    """First wave, one model: export (or find in the cache), preflight, the fallback search and
    the calibration its missing INT8 cells share. Cells already published with their build key
    and cells the graph rules out are settled here; the calibration runs only when an INT8 cell is
    still to be built."""
    from enginekit.accuracy import parse_conditions
    from enginekit.calibration.pipeline import write_tables
    from enginekit.exporter.reference import load_fp32

    prepared = _Prepared()
    try:
        session = ModelSession(load_fp32(model.model, model.options.source_options()), model.options)
        pending = []
        for target_name, precision, folder in cells:
            target = get_target(target_name)
            problem = target.preflight(session.fp32, precision)
            if problem is not None:
                prepared.settled[(target.name, precision)] = failed_cell(target.name, precision, problem)
            else:
                pending.append((target, precision, Path(folder)))
        int8_targets = [t for t, p, _ in pending if p == "int8"]
        session.int8_pairs = {int8_pair(t, session.options) for t in int8_targets} or session.int8_pairs
        problem, failing = auto_fallback_search(session, int8_targets, parse_conditions(session.options.min_accuracy))
        if problem is not None:
            named = naming(problem, session.fp32.origin)
            for target, precision, _ in pending:
                if precision == "int8" and int8_pair(target, session.options) in failing:
                    prepared.settled[(target.name, precision)] = failed_cell(target.name, precision, named)
        for target, precision, folder in pending:
            if (target.name, precision) in prepared.settled:
                continue
            manifest = cached_artifact(folder, cell_key(session, target, precision)[0])
            if manifest is not None:
                prepared.settled[(target.name, precision)] = Cell(target.name, precision, folder, BuildResult(folder, manifest, cache_hit=True))
        missing_int8 = [t for t, p, _ in pending if p == "int8" and (t.name, p) not in prepared.settled]
        if missing_int8:
            session.table()
            for target in missing_int8:  # bias-corrected once per grid, in the order a one-process build meets them
                session.qdq(*int8_pair(target, session.options))
            if session.calibrated_here:
                write_tables({session.options.calib_method: session.table()}, Path(root) / TABLE_FILE, inputs=[session.fp32.path])
        prepared.state = session.snapshot()
    except EnginekitError as exc:
        prepared.error = (str(naming(exc, model.model)), exc.exit_code)
    return prepared


def build_matrix_cell(model: MatrixModel, target_name: str, precision: str, folder: str, state: SessionState) -> Cell:
    """Second wave, one cell, in a worker: the model's session restored from the first wave's
    state, then the same `build_cell` a one-process build runs. A target this worker's machine
    cannot run comes back skipped with the reason."""
    import socket

    from enginekit.accuracy import parse_conditions
    from enginekit.exporter.reference import load_fp32

    target = get_target(target_name)
    cell = Cell(target.name, precision)
    reason = target.unavailable(precision)
    if reason:
        cell.skipped = f"on {socket.gethostname()}: {reason}"
        return cell
    try:
        session = ModelSession(load_fp32(model.model, model.options.source_options()), model.options)
        session.restore(state)
        cell.result = build_cell(session, target, precision, Path(folder), parse_conditions(session.options.min_accuracy))
        cell.folder = cell.result.folder
    except EnginekitError as exc:
        cell.fail(naming(exc, model.model))
    return cell


def matrix_document(result: MatrixResult) -> dict[str, Any]:
    from enginekit.accuracy.metrics import headline
    from enginekit.core.machine import machine_info, toolchain

    rows = []
    for c in result.cells:
        manifest = c.cell.manifest
        rows.append({
            "model": c.model, "target": c.target, "precision": c.precision, "machine": c.machine, "status": c.status,
            "reason": c.cell.skipped or c.cell.failed, "option": c.cell.option if c.cell.failed else None,  # the setting that fixes it
            "folder": str(c.cell.folder) if c.cell.folder else None,
            "build_key": manifest.get("build_key") if manifest else None,
            "accuracy": headline(manifest["accuracy"]["metrics"]) if manifest else None,
            "built_on": (manifest.get("machine") or {}).get("cpu") if manifest else None,
            "attempts": c.attempts, "infrastructure_failures": c.infrastructure,
        })
    counts = {status: sum(1 for r in rows if r["status"] == status) for status in ("built", "reused", "skipped", "failed")}
    return {"schema": MATRIX_SCHEMA, "executor": result.executor, "wall_s": round(result.wall_s, 2), "counts": counts,
            "driver": machine_info(), "toolchain": toolchain("onnx", "onnxruntime", "openvino", "ai-edge-litert", "ray"), "cells": rows}


def matrix_markdown(document: Mapping[str, Any]) -> str:
    """The matrix grouped by machine kind: one table per kind, every cell one row."""
    from enginekit.core.console import markdown_table

    counts = ", ".join(f"{n} {status}" for status, n in document["counts"].items())
    parts = [f"enginekit matrix: {len(document['cells'])} cells on {document['executor']} in {document['wall_s']:.1f} s ({counts})"]
    for machine in sorted({row["machine"] for row in document["cells"]}, key=lambda m: (m != CPU, m)):
        rows = [[r["model"], r["target"], r["precision"], r["status"] + (f" (attempt {r['attempts']})" if r["attempts"] > 1 else ""),
                 r["accuracy"] or r["reason"] or "", r["folder"] or ""]
                for r in document["cells"] if r["machine"] == machine]
        title = "CPU cells" if machine == CPU else f"cells on {machine} GPUs"
        parts.append(f"## {title}\n\n" + markdown_table(["model", "target", "precision", "status", "accuracy vs FP32 / reason", "artifact"], rows))
    return "\n\n".join(parts) + "\n"


def write_matrix_report(result: MatrixResult, out: Path) -> list[Path]:
    import json

    from enginekit.core.artifacts import atomic_write_all

    document = matrix_document(result)
    text = matrix_markdown(document)
    paths = [out / MATRIX_FILES[0], out / MATRIX_FILES[1]]
    atomic_write_all([(paths[0], lambda p: p.write_text(json.dumps(document, indent=1) + "\n")),
                      (paths[1], lambda p: p.write_text(text))])
    return paths
