"""`build`: target x precision artifacts from one model, calibrating once for INT8.

The FP32 ONNX, the CalibrationTable and the Q/DQ graph per encoding are the shared inputs (one
ModelSession per model); each target turns them into its own files and a Runner. Every artifact
is scored against the FP32 reference on held-out data and gated before it is published. An
artifact whose build key (content address of everything that changes it) matches the one
already at its path is reused after its files are verified.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.accuracy import Condition, collect_outputs, compare_outputs, gate, parse_conditions
from enginekit.accuracy.user import run_user_metric
from enginekit.builder.fallback import DEFAULT_MAX_FLOAT_LAYERS, fallback_error, find_float_layers, sensitivity_ranking
from enginekit.builder.key import build_key
from enginekit.builder.options import BuildOptions
from enginekit.builder.session import CellInputs, ModelSession
from enginekit.builder.threads import fastest_threads
from enginekit.calibration.pipeline import write_tables
from enginekit.core.artifacts import Manifest, read_manifest, sha256_file, staged_artifact, verify_files, write_manifest
from enginekit.core.executor import fault_point
from enginekit.core.errors import EnginekitError, GateError, InputError, MissingDependencyError, debugging, naming, unexpected_line
from enginekit.core.interrupt import stop_requested
from enginekit.core.machine import machine_info, toolchain
from enginekit.core.outputs import ARTIFACT, BUILD_ROOT, Output, check_outputs
from enginekit.core.profile import profiling, stage
from enginekit.core.tensors import take
from enginekit.core.progress import report
from enginekit.exporter.reference import Fp32Model, load_fp32
from enginekit.onnx.graph import graph_inputs, tensor_specs
from enginekit.quantization.report import costliest_layers, layer_report
from enginekit.targets.base import Target
from enginekit.targets.registry import get_target

logger = logging.getLogger(__name__)

TABLE_FILE = "calibration.json"
LAYER_REPORT_FILE = "layers.json"


@dataclass
class BuildResult:
    """One built (or reused) artifact: its folder, its manifest, and whether the cache served it."""

    folder: Path
    manifest: Manifest
    cache_hit: bool = False


@dataclass
class Cell:
    """One target x precision of a multi-target build: built (or reused), skipped because this
    machine lacks what it needs, or failed with the one-line reason (nothing published)."""

    target: str
    precision: str
    folder: Path | None = None
    result: BuildResult | None = None
    skipped: str | None = None
    failed: str | None = None
    exit_code: int = 0  # of the failure: 1 a gate, 2 an input the target cannot use
    option: str | None = None  # of the failure: the setting that fixes it (EnginekitError.option)
    profile: dict[str, Any] | None = None  # where the whole build's time went (core.profile), shared by its cells

    @property
    def manifest(self) -> Manifest | None:
        return self.result.manifest if self.result else None

    def fail(self, problem: EnginekitError) -> None:
        self.failed, self.exit_code, self.option = str(problem), problem.exit_code, problem.option


def failed_cell(target: str, precision: str, problem: EnginekitError) -> Cell:
    cell = Cell(target, precision)
    cell.fail(problem)
    return cell


def _inputs(model: str | Path, options: BuildOptions) -> list[Any]:
    """Every path a build reads (outputs must not overwrite or contain them). A data path that
    does not exist is refused here, before any work, even where no cell reads it: an FP32-only
    build never opens --calib-data, and a typo in it went by without a word."""
    data = [d for d in (options.calib_data, options.eval_data) if isinstance(d, (str, Path)) and str(d) != "zoo"]
    for path in data:
        if not Path(path).exists():
            raise InputError("data not found", path)
    return [model if isinstance(model, (str, Path)) else None, options.table, options.weights, *data]


def check_cell(target: Target, precision: str) -> None:
    """Refuse a precision the target does not offer (InputError), or one this machine cannot
    build (MissingDependencyError), before any work."""
    if precision not in target.precisions:
        raise InputError(f"target {target.name} builds {', '.join(target.precisions)}, not '{precision}'", option="precisions")
    reason = target.unavailable(precision)
    if reason:
        raise MissingDependencyError(f"the {target.name} target cannot run here: {reason}" if "target" not in reason else reason)


def build(model: str | Path, target: str, precision: str, out: str | Path, options: BuildOptions | None = None) -> BuildResult:
    """One artifact of `model` for `target` at `precision` in the folder `out`."""
    options = options or BuildOptions()
    out = Path(out)
    check_outputs([Output(out, ARTIFACT)], _inputs(model, options))
    chosen = get_target(target)
    check_cell(chosen, precision)
    conditions = parse_conditions(options.min_accuracy)
    session = ModelSession(_load(model, options, out, ARTIFACT), options)
    try:
        if precision == "int8":
            session.int8_pairs = {int8_pair(chosen, options)}
            problem, _ = auto_fallback_search(session, [chosen], conditions)
            if problem is not None:
                raise problem
        return build_cell(session, chosen, precision, out, conditions)
    except EnginekitError as exc:  # named against the model the user gave, as build_many's cells are
        raise naming(exc, session.fp32.origin) from None


def sensitivity(model: str | Path, targets: list[str], options: BuildOptions, output: str | Path | None = None) -> dict[str, Any]:
    """How much each layer (unit) gains kept float alone, for the INT8 encodings of `targets`,
    without building anything; with `output`, also written as JSON."""
    from enginekit.core.artifacts import atomic_write
    from enginekit.core.outputs import SENSITIVITY, SENSITIVITY_SCHEMA

    if output is not None:
        check_outputs([Output(Path(output), SENSITIVITY)], _inputs(model, options))
    chosen = [get_target(name) for name in targets]
    session = ModelSession(load_fp32(model, options.source_options()), options)
    pairs = sorted({int8_pair(t, options) for t in chosen})
    session.int8_pairs = set(pairs)
    result = {"schema": SENSITIVITY_SCHEMA, **sensitivity_ranking(session, pairs, parse_conditions(options.min_accuracy))}
    if output is not None:
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(output, lambda path: path.write_text(text))
    return result


def int8_pair(target: Target, options: BuildOptions) -> tuple[str, str]:
    """The (encoding, placement) of the Q/DQ graph `target`'s INT8 is built from."""
    return target.resolve_encoding(options.quantize.encoding), target.placement


def auto_fallback_search(session: ModelSession, int8_targets: list[Target], conditions: list[Condition] | None
                   ) -> tuple[GateError | None, set[tuple[str, str]]]:
    """With --auto-fallback: search the float layers once for every INT8 target of the build and
    adopt them. When no set within the bound passes: the GateError (best found) and the
    (encoding, placement) pairs that fail all-INT8 (their cells fail; the others build all-INT8)."""
    options = session.options
    int8_targets = [t for t in int8_targets if t.float_layers]
    if not options.auto_fallback or not int8_targets:
        return None, set()
    by_pair: dict[tuple[str, str], list[Target]] = {}
    for target in int8_targets:
        by_pair.setdefault(int8_pair(target, options), []).append(target)
    pairs = sorted(by_pair)
    bound = options.max_float_layers if options.max_float_layers is not None else DEFAULT_MAX_FLOAT_LAYERS
    report("searching float fallback", 0, 1, "searches", ", ".join(f"{e}/{p}" for e, p in pairs))
    found = find_float_layers(session, pairs, conditions, bound, by_pair)
    session.adopt_fallback(found)
    return (None, set()) if found.passed else (fallback_error(found, f"{session.fp32.name} int8", bound), set(found.failing))


def _load(model: str | Path, options: BuildOptions, out: Path, kind: str) -> Fp32Model:
    with stage("load FP32 (export, hash)"):
        fp32 = load_fp32(model, options.source_options())
    check_outputs([Output(out, kind)], [fp32.path.parent if fp32.path.name == "model.onnx" else fp32.path])
    return fp32


def cached_artifact(out: Path, key: str) -> Manifest | None:
    """The manifest at `out` if it was built from the same inputs and its files are intact."""
    if not (out / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(out)
        if manifest.get("build_key") != key:
            return None
        verify_files(out, manifest)
    except InputError as exc:
        warnings.warn(f"artifact at {out} is unusable ({exc}); rebuilding", stacklevel=2)
        return None
    return manifest


def cell_key(session: ModelSession, target: Target, precision: str) -> tuple[str, dict[str, Any], str]:
    """A cell's build key, with the target options and the INT8 encoding it was computed from."""
    options = session.options
    target_options = target.options(options.target_options.get(target.name))
    encoding = target.resolve_encoding(options.quantize.encoding)
    table_sha256 = sha256_file(options.table) if options.table else None
    return build_key(session.fp32, target, precision, options, target_options, encoding, table_sha256), target_options, encoding


def build_cell(session: ModelSession, target: Target, precision: str, out: Path, conditions: list[Condition]) -> BuildResult:
    options, fp32 = session.options, session.fp32
    key, target_options, encoding = cell_key(session, target, precision)
    cached = cached_artifact(out, key)
    if cached is not None:
        return BuildResult(out, cached, cache_hit=True)
    evaluation = session.evaluation()
    cell = f"{target.name}-{precision}"
    with staged_artifact(out) as stage_folder:
        inputs = CellInputs(session, precision, encoding, stage_folder, target_options, target.placement)
        with stage("conversion", cell):
            built = target.build(inputs)
        fault_point(f"{fp32.name}/{cell}")  # tests only: a worker killed mid-cell (core.executor)
        fields: dict[str, Any] = {}
        if precision == "int8":
            table = session.table()
            table.save(stage_folder / TABLE_FILE)
            fields["calibration"] = {"method": table.method, "parameters": table.parameters, "num_samples": table.num_samples,
                                     "data": table.data, "data_sha256": table.data_sha256, "table": TABLE_FILE}
            fields["quantization"] = inputs.qdq_details or {"encoding": encoding, "from": "the table's ranges only (no Q/DQ graph)"}
            if session.int8_model() is not fp32:  # SmoothQuant, equalisation: what they did (the divisors are in the table)
                fields["quantization"].update(session.smoothing or {})
            if session.fallback is not None and target.float_layers:
                fields["fallback"] = session.fallback.manifest()
            elif options.auto_fallback and not target.float_layers:
                inputs.notes.append(f"--auto-fallback does not apply: {target.name} INT8 is full-integer (no layer is kept float)")
            if options.quantize.layer_report:
                graph, _ = session.qdq(encoding, target.placement)
                layer_report(session.int8_model(), graph, table, evaluation.batches[:1], stage_folder / LAYER_REPORT_FILE, options.threads)
                fields["layer_report"] = LAYER_REPORT_FILE
        try:
            with stage("evaluation", cell):
                candidate = collect_outputs(built.runner.infer, evaluation.batches, built.runner.max_batch, session.input_axes, session.output_axes)
        finally:
            built.runner.close()
        metrics = compare_outputs(session.reference_outputs(), candidate, evaluation.labels, options.output_kinds,
                                  {name: axis for name, axis in session.output_axes.items() if axis is not None})
        if session.user_metric is not None:
            metrics["user"] = run_user_metric(session.user_metric, session.reference_outputs(), candidate, evaluation.labels)
        verdict = _gate_naming_layers(inputs, target, metrics, conditions, evaluation)
        content = {
            "model": fp32.name, "target": target.name, "precision": precision, "build_key": key,
            "source": {"model": fp32.origin, "fp32": str(fp32.path), "fp32_sha256": fp32.sha256},
            "inputs": [s.to_json() for s in tensor_specs(graph_inputs(fp32.proto))],
            "outputs": [s.to_json() for s in tensor_specs(fp32.proto.graph.output)],
            **fields, **built.manifest,
            "accuracy": {"reference": "fp32-onnx", "data": evaluation.description, "metrics": metrics, **verdict,
                         **({"held_out": False} if session.evaluated_on_calibration_data() else {})},
            "data_shapes": evaluation.shapes,
            **({"constant_outputs": constant} if (constant := session.constant_outputs()) else {}),
            **({"vanishing_outputs": vanishing} if (vanishing := session.vanishing_outputs()) else {}),
            **({"nearly_constant_outputs": nearly} if (nearly := session.nearly_constant_outputs()) else {}),
            "notes": fp32.notes + session.notes + inputs.notes,
            "toolchain": {**toolchain("onnx", "onnxruntime", "numpy"), **target.key_material(target_options).get("toolchain", {})},
            "machine": machine_info(),
        }
        if options.measures_threads(target):
            with stage("thread count", cell):
                record = fastest_threads(lambda count: target.open(stage_folder, content, threads=count),
                                         take(evaluation.batches[0], 0, 1, session.input_axes))
            if record is not None:
                content["runtime_threads"] = record
        manifest = write_manifest(stage_folder, content)
    return BuildResult(out, manifest)


def _gate_naming_layers(inputs: CellInputs, target: Target, metrics: dict[str, Any], conditions: list[Condition],
                        evaluation: Any) -> dict[str, object]:
    """The gate; an INT8 cell below it also names the layers that add the most error (from the
    per-layer report on one evaluation batch), where the accuracy work has to start."""
    session, precision = inputs.session, inputs.precision
    what = f"{session.fp32.name} {target.name} {precision}"
    try:
        return gate(metrics, conditions, what, precision)
    except GateError as exc:
        message = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
        vanishing = session.vanishing_outputs() if precision == "int8" else {}
        if vanishing:  # the cause is the FP32 model itself, not a layer
            found = ", ".join(f"'{name}' (largest magnitude {value:.2g})" for name, value in vanishing.items())
            raise GateError(f"{message}; the FP32 output {found} vanishes on this data (an 8-bit grid holds it as 0): "
                            "the network's activations shrink to nothing (untrained weights, or inputs it does not expect?)",
                            exc.path, exc.option) from None
        if precision != "int8" or inputs.qdq_details is None:  # no Q/DQ graph behind this artifact
            raise
        graph, _ = session.qdq(inputs.encoding, inputs.placement)
        rows = layer_report(session.int8_model(), graph, session.table(), evaluation.batches[:1], None, session.options.threads)
        names = costliest_layers(rows)
        if not names:
            raise
        # ranked by the SQNR each loses where it is computed, which is not always what reaches the output (a new
        # user's wav2vec2 named its layer norms; its feature convs were the cause): say where the output's ranking is
        raise GateError(f"{message}; the layers adding the most error: {names} (each at its own output; by effect on the "
                        "model's output: enginekit sensitivity, or --auto-fallback)", exc.path, exc.option) from None


@dataclass
class BuildPlan:
    runnable: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)


def plan_cells(targets: list[str], precisions: list[str]) -> BuildPlan:
    """Every target x precision: runnable, or skipped with the reason (a precision the target does
    not offer, a library or device this machine lacks). An unknown target is an error."""
    plan = BuildPlan()
    if not targets or not precisions:
        raise InputError("name at least one target and one precision", option="targets")
    for name in targets:
        target = get_target(name)
        for precision in precisions:
            try:
                check_cell(target, precision)
            except MissingDependencyError as exc:
                plan.skipped.append(Cell(target.name, precision, skipped=str(exc)))
                continue
            except InputError:
                plan.skipped.append(Cell(target.name, precision, skipped=f"{target.name} does not offer {precision}"))
                continue
            plan.runnable.append(Cell(target.name, precision))
    if not plan.runnable:
        reasons = "; ".join(f"{c.target} {c.precision}: {c.skipped}" for c in plan.skipped[:4])
        raise InputError(f"nothing to build: {reasons}", option="targets")
    return plan


def build_many(model: str | Path, targets: list[str], precisions: list[str], out: str | Path, options: BuildOptions) -> list[Cell]:
    """Every target x precision this machine can build, each in `out/<target>-<precision>`; the
    rest are listed as skipped with the reason. INT8 cells share one CalibrationTable (also
    written to `out/calibration.json`) and one Q/DQ graph per encoding. Each cell carries the
    build's profile (seconds per stage and per cell, and how often each stage ran)."""
    with profiling() as profile:
        cells = _build_many(model, targets, precisions, Path(out), options)
    for cell in cells:
        cell.profile = profile.to_json()
    return cells


def _build_many(model: str | Path, targets: list[str], precisions: list[str], out: Path, options: BuildOptions) -> list[Cell]:
    check_outputs([Output(out, BUILD_ROOT)], _inputs(model, options))
    plan = plan_cells(targets, precisions)
    conditions = parse_conditions(options.min_accuracy)
    session = ModelSession(_load(model, options, out, BUILD_ROOT), options)
    for cell in plan.runnable:  # what the options or the graph alone rule out, before any calibration
        target = get_target(cell.target)
        target.options(options.target_options.get(target.name))  # a value it cannot build with: one line, nothing built
        problem = target.preflight(session.fp32, cell.precision)
        if problem is not None:
            cell.fail(problem)
    pending = [cell for cell in plan.runnable if not cell.failed]
    if pending:  # every cell is judged on it: missing (a model from outside the zoo, no eval data) is one line before any work, not a failure per cell
        session.evaluation()
    int8_targets = [get_target(c.target) for c in pending if c.precision == "int8"]
    session.int8_pairs = {int8_pair(t, options) for t in int8_targets} or session.int8_pairs
    problem, failing = auto_fallback_search(session, int8_targets, conditions)
    if problem is not None:  # the INT8 cells of the encodings below the gate fail with the search's best; the others build all-INT8
        for cell in (c for c in pending if c.precision == "int8" and int8_pair(get_target(c.target), options) in failing):
            cell.fail(naming(problem, session.fp32.origin))
        pending = [cell for cell in pending if not cell.failed]
    for index, cell in enumerate(pending, 1):
        target = get_target(cell.target)
        cell.folder = out / f"{cell.target}-{cell.precision}"
        report("building", index - 1, len(pending), "artifacts", f"{cell.target} {cell.precision}")
        try:
            cell.result = build_cell(session, target, cell.precision, cell.folder, conditions)
        except EnginekitError as exc:  # this cell failed; the others are still built
            cell.folder = None
            cell.fail(naming(exc, session.fp32.origin))
        except Exception as exc:  # a bug or an unforeseen runtime failure in this cell: the others are still built and reported
            if debugging() or stop_requested():
                raise
            logger.debug("cell %s %s failed", cell.target, cell.precision, exc_info=True)
            cell.folder, cell.failed, cell.exit_code = None, unexpected_line(exc), 2
    if session.calibrated_here:  # the table every INT8 cell of this build used, for reuse with --table
        write_tables({options.calib_method: session.table()}, out / TABLE_FILE, inputs=[session.fp32.path])
    report("building", len(pending), len(pending), "artifacts")
    order = {(t, p): i for i, (t, p) in enumerate((get_target(t).name, p) for t in targets for p in precisions)}
    return sorted(plan.runnable + plan.skipped, key=lambda c: order[(c.target, c.precision)])
