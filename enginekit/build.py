"""`enginekit build`: one target x precision artifact from a model, calibrating once for INT8.

The FP32 ONNX and (for INT8) the CalibrationTable are the shared inputs; each target is a small
adapter that turns them into its own files and a Runner. Every artifact is scored against the
FP32 ONNX on held-out data and gated before it is published.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from enginekit.artifacts import staged_artifact, write_manifest
from enginekit.calibrate.pipeline import calibrate, write_tables
from enginekit.calibrate.table import CalibrationTable
from enginekit.engines.onnxruntime import OrtRunner, integer_op_report
from enginekit.errors import InputError
from enginekit.export.onnx_graph import graph_inputs, tensor_specs
from enginekit.export.reference import Fp32Model, load_fp32
from enginekit.machine import machine_info, toolchain
from enginekit.quantize import accuracy
from enginekit.quantize.pipeline import QuantizeOptions, build_qdq, evaluation_batches

TARGET_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "fp16", "int8"), "tensorrt": ("fp32", "fp16", "int8")}
TABLE_FILE = "calibration.json"


@dataclass
class BuildOptions:
    table: str | None = None  # an existing CalibrationTable; else calibrate here
    calib_method: str = "minmax"
    calib_data: str | None = None
    num_samples: int = 256
    quantize: QuantizeOptions = field(default_factory=lambda: QuantizeOptions(progress=False))
    min_accuracy: str | None = None
    threads: int | None = None
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # TensorRT profile overrides
    workspace_mb: int = 4096
    tensorrt_builder: str = "api"  # or "trtexec": the same engine built by NVIDIA's CLI, with its timings


def build(model: str | Path, target: str, precision: str, out: str | Path, options: BuildOptions | None = None) -> dict[str, Any]:
    options = options or BuildOptions()
    check_target(target, precision)
    conditions = accuracy.parse_conditions(options.min_accuracy)
    fp32 = load_fp32(model)
    quant_options = replace(options.quantize, target=target, data=options.calib_data, threads=options.threads)
    eval_batches, labels, eval_description = evaluation_batches(fp32, quant_options)
    with staged_artifact(out) as stage:
        extra: dict[str, Any] = {}
        source = fp32.path
        if precision == "int8":
            table = _table(fp32, options, stage)
            qdq, details = build_qdq(fp32, table, quant_options)
            source = stage / "model.int8.onnx"
            onnx.save(qdq.model, str(source))
            extra["calibration"] = {"method": table.method, "num_samples": table.num_samples, "data": table.data,
                                    "data_sha256": table.data_sha256, "table": TABLE_FILE}
            extra["quantization"] = {"encoding": quant_options.resolved_encoding, **details}
            if target == "tensorrt":
                _require_tensorrt_rules(qdq.model, source)
        elif precision == "fp16" and target == "tensorrt":
            from enginekit.engines.tensorrt.graphs import to_fp16

            source = stage / "model.fp16.onnx"
            onnx.save(to_fp16(fp32.proto), str(source))
        runner, files_extra = _target_files(target, precision, fp32, source, stage, options)
        extra.update(files_extra)
        reference = OrtRunner(fp32.path, threads=options.threads)
        metrics = accuracy.evaluate(reference.infer, runner.infer, eval_batches, labels)
        verdict = accuracy.gate(metrics, conditions, f"{fp32.name} {target} {precision}")
        manifest = write_manifest(stage, {
            "model": fp32.name, "target": target, "precision": precision,
            "source": {"fp32": str(fp32.path), "fp32_sha256": fp32.sha256},
            "inputs": [s.to_json() for s in tensor_specs(graph_inputs(fp32.proto))],
            "outputs": [s.to_json() for s in tensor_specs(fp32.proto.graph.output)],
            **extra,
            "accuracy": {"reference": "fp32-onnx", "data": eval_description, "metrics": metrics, **verdict},
            "toolchain": toolchain("onnx", "onnxruntime", "openvino", "numpy"),
            "machine": machine_info(),
        })
    return manifest


def _table(fp32: Fp32Model, options: BuildOptions, stage: Path) -> CalibrationTable:
    """The CalibrationTable every INT8 target consumes: the given one, or one calibration here."""
    if options.table:
        table = CalibrationTable.load(options.table)
        table.check_model(fp32.sha256, options.table)
        table.save(stage / TABLE_FILE)
        return table
    run = calibrate(fp32.path if fp32.spec is None else fp32.name, options.calib_data, [options.calib_method],
                    num_samples=options.num_samples, threads=options.threads, progress=False)
    write_tables(run, stage / TABLE_FILE)
    return run.tables[options.calib_method]


def check_target(target: str, precision: str) -> None:
    """Refuse (exit 2, one line) a target or precision this machine cannot build, before any work."""
    if target not in TARGET_PRECISIONS:
        raise InputError(f"unknown target '{target}' (known: {', '.join(TARGET_PRECISIONS)})")
    if precision not in TARGET_PRECISIONS[target]:
        raise InputError(f"target {target} builds {', '.join(TARGET_PRECISIONS[target])}, not '{precision}'")
    if target == "openvino":
        from enginekit.engines import openvino

        openvino.check_precision_supported(precision)
    elif target == "tensorrt":
        from enginekit.engines.tensorrt import require_tensorrt

        require_tensorrt()


def _require_tensorrt_rules(model: onnx.ModelProto, path: Path) -> None:
    from enginekit.engines.tensorrt.graphs import tensorrt_qdq_problems

    problems = tensorrt_qdq_problems(model)
    if problems:
        raise InputError(f"the Q/DQ graph breaks TensorRT's rules: {'; '.join(problems[:3])}", path)


def _target_files(target: str, precision: str, fp32: Fp32Model, source: Path, stage: Path, options: BuildOptions):
    """Write the target's files into the staging folder; return its runner and manifest fields."""
    threads = options.threads
    if target == "tensorrt":
        from enginekit.engines.tensorrt.builder import BuildSettings, build_plan, describe_build, profile_shapes
        from enginekit.engines.tensorrt.runner import PLAN_FILE, TensorRTRunner

        dim_max = fp32.spec.dim_max if fp32.spec else {}
        from enginekit.engines.tensorrt import require_tensorrt
        from enginekit.engines.tensorrt.builder import default_timing_cache

        settings = BuildSettings(profile=profile_shapes(fp32.inputs, options.dim_ranges, dim_max), workspace_mb=options.workspace_mb,
                                 timing_cache=default_timing_cache(require_tensorrt().__version__))
        if options.tensorrt_builder == "trtexec":
            from enginekit.engines.tensorrt.trtexec import build_with_trtexec

            info = {**describe_build(settings), **build_with_trtexec(source, settings, stage / PLAN_FILE, stage)}
        else:
            info = build_plan(source, settings, stage / PLAN_FILE)
        return TensorRTRunner(stage, built=info), {"tensorrt": info}
    if target == "onnxruntime":
        if precision == "fp32":
            target_path = stage / "model.onnx"
            target_path.write_bytes(fp32.path.read_bytes())
            return OrtRunner(target_path, threads=threads), {}
        return OrtRunner(source, threads=threads), {"integer_ops": integer_op_report(source, fp32.proto)}
    from enginekit.engines import openvino

    openvino.convert(source, precision, stage)
    if source.parent == stage:
        source.unlink()  # the IR is the artifact; the Q/DQ ONNX stays reproducible from the table
    runner = openvino.OpenVinoRunner(stage, precision, threads=threads)
    return runner, {"openvino": {**openvino.device_info(), "compile_config": runner.config,
                                 "executed": openvino.executed_precisions(runner.compiled)}}


@dataclass
class Outcome:
    target: str
    precision: str
    folder: Path | None = None
    manifest: dict[str, Any] | None = None
    skipped: str | None = None


def build_many(model: str | Path, targets: list[str], precisions: list[str], out: Path, options: BuildOptions) -> list[Outcome]:
    """Every target x precision this machine can build; the rest are listed as skipped with the
    reason (missing library or hardware, a precision the target does not offer). INT8 targets
    share one CalibrationTable, made once."""
    from enginekit.errors import MissingDependencyError

    outcomes, runnable = [], []
    for target in targets:
        if target not in TARGET_PRECISIONS:
            raise InputError(f"unknown target '{target}' (known: {', '.join(TARGET_PRECISIONS)})")
        for precision in precisions:
            if precision not in TARGET_PRECISIONS[target]:
                outcomes.append(Outcome(target, precision, skipped=f"{target} does not offer {precision}"))
                continue
            try:
                check_target(target, precision)
            except MissingDependencyError as exc:
                outcomes.append(Outcome(target, precision, skipped=str(exc)))
                continue
            runnable.append(Outcome(target, precision))
    if any(o.precision == "int8" for o in runnable) and not options.table:
        fp32 = load_fp32(model)
        run = calibrate(fp32.path if fp32.spec is None else fp32.name, options.calib_data, [options.calib_method],
                        num_samples=options.num_samples, threads=options.threads, progress=False)
        options = replace(options, table=str(write_tables(run, out / "calibration.json")[0]))
    for outcome in runnable:
        outcome.folder = out / f"{outcome.target}-{outcome.precision}"
        outcome.manifest = build(model, outcome.target, outcome.precision, outcome.folder, options)
        outcomes.append(outcome)
    order = {(t, p): i for i, (t, p) in enumerate((t, p) for t in targets for p in precisions)}
    return sorted(outcomes, key=lambda o: order[(o.target, o.precision)])
