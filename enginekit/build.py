"""`enginekit build`: one target x precision artifact from a model, calibrating once for INT8.

The FP32 ONNX and (for INT8) the CalibrationTable are the shared inputs; each target is a small
adapter that turns them into its own files and a Runner. Every artifact is scored against the
FP32 ONNX on held-out data and gated before it is published.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from enginekit.artifacts import read_manifest, sha256_file, staged_artifact, verify_files, write_manifest
from enginekit.calibrate.pipeline import calibrate, write_tables
from enginekit.calibrate.table import CalibrationTable
from enginekit.engines.onnxruntime import OrtRunner, integer_op_report
from enginekit.errors import InputError
from enginekit.export.onnx_graph import graph_inputs, tensor_specs
from enginekit.export.reference import Fp32Model, load_fp32
from enginekit.machine import machine_info, toolchain
from enginekit.outputs import ARTIFACT, BUILD_ROOT, Output, check_outputs
from enginekit.quantize import accuracy
from enginekit.quantize.pipeline import QuantizeOptions, build_qdq, evaluation_batches

TARGET_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "fp16", "int8"),
                     "tflite": ("fp32", "fp16", "int8"), "tensorrt": ("fp32", "fp16", "int8")}
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
    tflite_io: str = "int8"  # int8 .tflite input/output type: "int8" or "uint8"
    allow_unsafe_keras: bool = False  # a Keras file with Lambda/custom layers may run its code
    table_from_settings: bool = False  # the table was made here from the calib_* settings (keys use those)


def data_identity(data: str | None, fp32: Fp32Model) -> str:
    """What calibration/evaluation data is, for cache keys: a file's hash, or the zoo code that
    generates the split."""
    import hashlib
    import importlib

    if data not in (None, "zoo"):
        path = Path(data)
        if path.is_dir():
            digest = hashlib.sha256()
            for item in sorted(p for p in path.iterdir() if p.is_file()):
                digest.update(item.name.encode() + sha256_file(item).encode())
            return f"folder:{digest.hexdigest()}"
        return f"file:{sha256_file(path)}" if path.is_file() else f"missing:{data}"
    if fp32.spec is None:
        return "none"
    module = importlib.import_module(fp32.spec.architecture.__module__)
    sources = [Path(module.__file__)] + sorted(Path(__file__).parent.joinpath("models").glob("*.py"))
    return "zoo:" + hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()


def build_key(fp32: Fp32Model, target: str, precision: str, options: BuildOptions) -> str:
    """Content address of an artifact: everything that changes what `build` would produce."""
    import hashlib

    quant = options.quantize
    material = {
        "fp32": fp32.sha256, "target": target, "precision": precision,
        "toolchain": toolchain("onnx", "onnxruntime", "openvino", "tensorrt", "numpy"),
        "min_accuracy": options.min_accuracy, "eval": data_identity(quant.eval_data, fp32), "eval_samples": quant.eval_samples,
    }
    if precision == "int8":
        material["calibration"] = (
            {"table": sha256_file(options.table)} if options.table and not options.table_from_settings and Path(options.table).is_file()
            else {"method": options.calib_method, "samples": options.num_samples, "data": data_identity(options.calib_data, fp32)})
        material["quantize"] = {"encoding": quant.encoding, "bias_correction": quant.bias_correction, "per_channel": quant.per_channel,
                                "exclude_nodes": list(quant.exclude_nodes), "exclude_ops": list(quant.exclude_ops),
                                "exclude_after": None if quant.exclude_after is None else list(quant.exclude_after),
                                "keep_first_last_float": quant.keep_first_last_float}
    if target == "tflite":
        material["tflite"] = {"io": options.tflite_io, "toolchain": toolchain("tensorflow", "keras", "ai-edge-litert", "ai-edge-quantizer"),
                              "keras": fp32.is_keras}
    if target == "tensorrt":
        material["tensorrt"] = {"dims": {k: list(v) for k, v in sorted(options.dim_ranges.items())}, "workspace_mb": options.workspace_mb,
                                "builder": options.tensorrt_builder}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def cached_artifact(out: Path, key: str) -> dict[str, Any] | None:
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


def build(model: str | Path, target: str, precision: str, out: str | Path, options: BuildOptions | None = None) -> dict[str, Any]:
    options = options or BuildOptions()
    check_outputs([Output(Path(out), ARTIFACT)], _inputs(model, options))
    check_target(target, precision)
    conditions = accuracy.parse_conditions(options.min_accuracy)
    fp32 = load_fp32(model, options.allow_unsafe_keras)
    check_outputs([Output(Path(out), ARTIFACT)], [fp32.path])
    key = build_key(fp32, target, precision, options)
    cached = cached_artifact(Path(out), key)
    if cached is not None:
        return {**cached, "cache_hit": True}
    quant_options = replace(options.quantize, target=target, data=options.calib_data, threads=options.threads)
    eval_batches, labels, eval_description = evaluation_batches(fp32, quant_options)
    with staged_artifact(out) as stage:
        extra: dict[str, Any] = {}
        source = fp32.path
        table = qdq = None
        if precision == "int8":
            table = _table(fp32, options, stage)
            if target == "tflite" and fp32.is_keras:  # converted from Keras itself: only the ranges are used
                quant_options = replace(quant_options, bias_correction=False)
            qdq, details = _shared_qdq(fp32, table, quant_options)
            if target != "tflite":  # TFLite's artifact is the flatbuffer; it takes ranges and biases, not this file
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
        if target == "tflite":
            runner, files_extra = _tflite_files(precision, fp32, stage, options, table, qdq)
        else:
            runner, files_extra = _target_files(target, precision, fp32, source, stage, options)
        extra.update(files_extra)
        reference = OrtRunner(fp32.path, threads=options.threads)
        metrics = accuracy.evaluate(reference.infer, runner.infer, eval_batches, labels)
        verdict = accuracy.gate(metrics, conditions, f"{fp32.name} {target} {precision}")
        manifest = write_manifest(stage, {
            "model": fp32.name, "target": target, "precision": precision, "build_key": key,
            "source": {"fp32": str(fp32.path), "fp32_sha256": fp32.sha256},
            "inputs": [s.to_json() for s in tensor_specs(graph_inputs(fp32.proto))],
            "outputs": [s.to_json() for s in tensor_specs(fp32.proto.graph.output)],
            **extra,
            "accuracy": {"reference": "fp32-onnx", "data": eval_description, "metrics": metrics, **verdict},
            "toolchain": toolchain("onnx", "onnxruntime", "openvino", "numpy"),
            "machine": machine_info(),
        })
    return manifest


def _inputs(model: str | Path, options: BuildOptions) -> list[str | Path | None]:
    """Every path a build reads (outputs must not overwrite or contain them)."""
    table = None if options.table_from_settings else options.table
    return [model, table, options.calib_data, options.quantize.eval_data]


def _table(fp32: Fp32Model, options: BuildOptions, stage: Path) -> CalibrationTable:
    """The CalibrationTable every INT8 target consumes: the given one, or one calibration here."""
    if options.table:
        table = CalibrationTable.load(options.table)
        table.check_model(fp32.sha256, options.table)
        table.save(stage / TABLE_FILE)
        return table
    run = calibrate(fp32.path if fp32.spec is None else fp32.name, options.calib_data, [options.calib_method],
                    num_samples=options.num_samples, threads=options.threads, progress=options.quantize.progress)
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
    elif target == "tflite":
        from enginekit.engines.tflite.runner import require_litert
        from enginekit.tf_support import require_tensorflow

        require_tensorflow()
        require_litert()


def _require_tensorrt_rules(model: onnx.ModelProto, path: Path) -> None:
    from enginekit.engines.tensorrt.graphs import tensorrt_qdq_problems

    problems = tensorrt_qdq_problems(model)
    if problems:
        raise InputError(f"the Q/DQ graph breaks TensorRT's rules: {'; '.join(problems[:3])}", path)


_QDQ_MEMO: dict[str, tuple[Any, dict[str, Any]]] = {}  # the last Q/DQ graph built in this process
_QDQ_IRRELEVANT = ("target", "progress", "notes", "eval_data", "eval_samples", "min_accuracy", "layer_report")


def _shared_qdq(fp32: Fp32Model, table: CalibrationTable, options: QuantizeOptions):
    """`build_qdq`, once per encoding: OpenVINO and TFLite both take the "mixed" graph, and its bias
    correction (about a minute for efficientnet_lite0) need not run twice in one build."""
    settings = {k: v for k, v in asdict(options).items() if k not in _QDQ_IRRELEVANT}
    key = hashlib.sha256(json.dumps([fp32.sha256, table.to_json(), options.resolved_encoding, settings],
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key not in _QDQ_MEMO:
        _QDQ_MEMO.clear()  # one entry: a build_many over targets builds each encoding in turn
        _QDQ_MEMO[key] = build_qdq(fp32, table, options)
    return copy.deepcopy(_QDQ_MEMO[key])  # callers may rewrite the graph (e.g. save it, fold biases)


def _tflite_files(precision: str, fp32: Fp32Model, stage: Path, options: BuildOptions, table: CalibrationTable | None, qdq):
    """The .tflite: Keras sources traced directly, others lowered from the (bias-corrected) ONNX."""
    from enginekit.engines import tflite

    reference, notes = fp32.proto, []
    keras_model = fp32.keras_model() if fp32.is_keras else None
    if keras_model is not None:
        from enginekit.export.keras_export import tf_function

        function, route, owner = tf_function(keras_model), "keras (traced by TensorFlow)", keras_model.owner
        if precision == "int8":
            notes.append("Keras source converted directly: the ranges are the table's, bias correction is not carried over")
    else:
        from enginekit.engines.tflite.lowering import to_tf_function

        if precision == "int8":  # a copy either way: the bias fix below rewrites weights in place
            if options.quantize.bias_correction:
                from enginekit.quantize.bias_correction import corrected_float_model

                reference = corrected_float_model(fp32.proto, qdq)
            else:
                reference = onnx.ModelProto.FromString(fp32.proto.SerializeToString())
            changed = tflite.keep_biases_representable(reference, table)
            if changed:
                notes.append(f"near-zero weight channels given one small weight so their int32 bias fits: {'; '.join(changed[:5])}"
                             + (" ..." if len(changed) > 5 else ""))
        function, route, owner = to_tf_function(reference, str(fp32.path)), "onnx lowered to TensorFlow ops", None
    feeds = _calibration_feeds(fp32, options) if precision == "int8" else None
    model, info = tflite.build_flatbuffer(precision, function, str(fp32.path), table=table, reference=reference, feeds=feeds,
                                          io_type=options.tflite_io, owner=owner)
    runner = tflite.write_artifact(model, stage, options.threads)
    return runner, {"tflite": {"route": route, **info, "notes": notes}}


def _calibration_feeds(fp32: Fp32Model, options: BuildOptions, count: int = 2):
    """A few calibration samples: what TFLite tensors are matched to ONNX tensors on."""
    from enginekit.calibrate.data import open_data, stream

    source = open_data(options.calib_data, fp32.inputs, fp32.spec, "calibration")
    batches, _ = stream(source, fp32.inputs, count, count)
    return next(iter(batches))


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

    check_outputs([Output(Path(out), BUILD_ROOT)], _inputs(model, options))
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
    fp32 = load_fp32(model, options.allow_unsafe_keras) if runnable else None
    stale_int8 = [o for o in runnable if o.precision == "int8"
                  and cached_artifact(out / f"{o.target}-{o.precision}", build_key(fp32, o.target, o.precision, options)) is None]
    if stale_int8 and not options.table:
        run = calibrate(fp32.path if fp32.spec is None else fp32.name, options.calib_data, [options.calib_method],
                        num_samples=options.num_samples, threads=options.threads, progress=options.quantize.progress)
        table_path = write_tables(run, out / "calibration.json")[0]
        # the key of an artifact names the calibration settings, not this file, so later runs hit the cache
        options = replace(options, table=str(table_path), table_from_settings=True)
    import sys
    import time

    started = time.perf_counter()
    for index, outcome in enumerate(runnable, 1):
        outcome.folder = out / f"{outcome.target}-{outcome.precision}"
        if sys.stderr.isatty():  # progress for whole builds; logs and pipes get only the results
            sys.stderr.write(f"[{index}/{len(runnable)}] building {outcome.target} {outcome.precision} "
                             f"({time.perf_counter() - started:.0f} s so far)...\n")
        outcome.manifest = build(model, outcome.target, outcome.precision, outcome.folder, options)
        outcomes.append(outcome)
    order = {(t, p): i for i, (t, p) in enumerate((t, p) for t in targets for p in precisions)}
    return sorted(outcomes, key=lambda o: order[(o.target, o.precision)])
