"""`enginekit quantize`: FP32 ONNX + CalibrationTable -> Q/DQ ONNX artifact, bias-corrected,
evaluated against FP32 and gated on accuracy. The ONNX Runtime target is this artifact itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from enginekit.artifacts import staged_artifact, write_manifest
from enginekit.calibrate.data import open_data, stream
from enginekit.calibrate.table import CalibrationTable
from enginekit.engines.onnxruntime import OrtRunner, integer_op_report
from enginekit.errors import InputError
from enginekit.export.onnx_graph import graph_inputs, tensor_specs
from enginekit.export.reference import Fp32Model, load_fp32
from enginekit.machine import machine_info, toolchain
from enginekit.outputs import ARTIFACT, Output, check_outputs
from enginekit.quantize import accuracy
from enginekit.quantize.bias_correction import correct_biases
from enginekit.quantize.encoding import TARGET_ENCODING
from enginekit.quantize.placement import plan_quantization
from enginekit.quantize.qdq import QdqGraph, insert_qdq, integerize_biases
from enginekit.quantize.report import layer_report

QDQ_FILE = "model.int8.onnx"
DEFAULT_EVAL_SAMPLES = 256  # unlabelled data; a labelled evaluation split is used whole


@dataclass
class QuantizeOptions:
    target: str = "onnxruntime"
    encoding: str | None = None  # default: the target's fastest (TARGET_ENCODING)
    bias_correction: bool = True
    per_channel: bool = True
    exclude_nodes: Sequence[str] = ()
    exclude_ops: Sequence[str] = ()
    keep_first_last_float: bool = False
    exclude_after: Sequence[str] | None = None  # None: the zoo spec's keep_float_after
    data: str | None = None  # calibration data for bias correction (default: the zoo's)
    eval_data: str | None = None
    eval_samples: int | None = None
    min_accuracy: str | None = None
    layer_report: bool = False
    threads: int | None = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def resolved_encoding(self) -> str:
        return self.encoding or TARGET_ENCODING[self.target]


def build_qdq(fp32: Fp32Model, table: CalibrationTable, options: QuantizeOptions) -> tuple[QdqGraph, dict[str, Any]]:
    """The Q/DQ graph for `options`' encoding, bias-corrected on the calibration data."""
    table.check_model(fp32.sha256, fp32.path)
    after = options.exclude_after
    if after is None:
        after = fp32.spec.keep_float_after if fp32.spec else ()
    plan = plan_quantization(fp32.proto, options.exclude_nodes, options.exclude_ops, options.keep_first_last_float, after)
    if not plan.nodes:
        raise InputError("nothing left to quantize after the exclusions", fp32.path)
    qdq = insert_qdq(fp32.proto, plan, table, options.resolved_encoding, options.per_channel)
    details: dict[str, Any] = {"quantized_nodes": len(plan.nodes), "quantized_tensors": len(plan.activations),
                               "quantized_weights": len(plan.weights), "exclude_after": list(after)}
    if options.bias_correction:
        source = open_data(options.data, fp32.inputs, fp32.spec, "calibration")
        batches, stats = stream(source, fp32.inputs, table.num_samples, 32)
        batches = list(batches)
        if stats.sha256 != table.data_sha256:
            options.notes.append("bias correction ran on data that differs from the table's calibration data")
        corrections = correct_biases(fp32.proto, qdq, batches, options.threads, options.progress)
        details["bias_correction"] = {"layers": len(corrections), "samples": stats.used,
                                      "largest_shift": max(corrections.values(), default=0.0)}
    if options.resolved_encoding != "int8":
        integerize_biases(qdq)
    return qdq, details


def evaluation_batches(fp32: Fp32Model, options: QuantizeOptions):
    """Held-out evaluation data (the zoo's evaluation split, or --eval-data) and its labels."""
    if options.eval_data is None and fp32.spec is None:
        raise InputError("accuracy needs held-out data: pass --eval-data (this model is not from the zoo)")
    source = open_data(options.eval_data, fp32.inputs, fp32.spec, "evaluation")
    has_labels = options.eval_data is None and fp32.spec is not None and fp32.spec.dataset().labels("evaluation", 1) is not None
    count = options.eval_samples or (source.count() if has_labels else DEFAULT_EVAL_SAMPLES)
    count = min(count, source.count())
    batches, stats = stream(source, fp32.inputs, count, 32)
    labels = fp32.spec.dataset().labels("evaluation", count) if has_labels else None
    return list(batches), labels, source.description


def quantize(model: str | Path, table_path: str | Path, out: str | Path, options: QuantizeOptions) -> dict[str, Any]:
    check_outputs([Output(Path(out), ARTIFACT)], [model, table_path, options.data, options.eval_data])
    fp32 = load_fp32(model)
    check_outputs([Output(Path(out), ARTIFACT)], [fp32.path])
    table = CalibrationTable.load(table_path)
    conditions = accuracy.parse_conditions(options.min_accuracy)
    qdq, details = build_qdq(fp32, table, options)
    eval_batches, labels, eval_description = evaluation_batches(fp32, options)
    with staged_artifact(out) as stage:
        path = stage / QDQ_FILE
        onnx.save(qdq.model, str(path))
        reference = OrtRunner(fp32.path, threads=options.threads)
        candidate = OrtRunner(path, threads=options.threads)
        metrics = accuracy.evaluate(reference.infer, candidate.infer, eval_batches, labels)
        verdict = accuracy.gate(metrics, conditions, f"{fp32.name} int8")
        manifest_extra: dict[str, Any] = {}
        if options.target == "onnxruntime":
            manifest_extra["integer_ops"] = integer_op_report(path, fp32.proto)
        if options.layer_report:
            manifest_extra["layer_report"] = "layers.json"
            layer_report(fp32, qdq, table, eval_batches[:1], stage / "layers.json", options.threads)
        manifest = write_manifest(stage, {
            "model": fp32.name,
            "target": options.target,
            "precision": "int8",
            "encoding": options.resolved_encoding,
            "source": {"fp32": str(fp32.path), "fp32_sha256": fp32.sha256},
            "inputs": [s.to_json() for s in tensor_specs(graph_inputs(qdq.model))],
            "outputs": [s.to_json() for s in tensor_specs(qdq.model.graph.output)],
            "calibration": {"method": table.method, "parameters": table.parameters, "num_samples": table.num_samples,
                            "data": table.data, "data_sha256": table.data_sha256, "table": str(table_path)},
            "quantization": {**details, "per_channel_weights": options.per_channel,
                             "exclude_nodes": list(options.exclude_nodes), "exclude_ops": list(options.exclude_ops),
                             "keep_first_last_float": options.keep_first_last_float},
            "accuracy": {"reference": "fp32-onnx", "data": eval_description, "metrics": metrics, **verdict},
            **manifest_extra,
            "notes": options.notes,
            "toolchain": toolchain("onnx", "onnxruntime", "numpy"),
            "machine": machine_info(),
        })
    return manifest
