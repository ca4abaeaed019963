"""The benchmark report: a versioned JSON document; Markdown is a rendering of it.

Schema `enginekit.report/1`:
  {"schema", "created", "machine", "toolchain", "settings", "artifacts": [entry, ...]}
where each entry is what `harness.bench_artifact` returns (model, target, precision, size_mb,
load_s, first_inference_ms, latency_ms {mean, std, min, p50, p90, p95, p99, max, iterations,
seconds}, latency_samples_ms, latency_slices [[start, end] wall clock], latency_slice_p50_ms
(each round's p50), throughput [{batch, mean_ms, throughput_per_s}], stream_throughput
[{streams, requests, throughput_per_s}] (OpenVINO; empty elsewhere), best_throughput_per_s (over
both sweeps), rss_mb, peak_rss_mb, threads, cpus (cores it ran on), accuracy).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.console import cell_text, markdown_table
from enginekit.core.errors import InputError

REPORT_SCHEMA = "enginekit.report/1"
ACCURACY_KEYS = ("accuracy", "top1_agreement", "cosine")


def make_report(entries: list[dict[str, Any]], settings: Any) -> dict[str, Any]:
    from enginekit.core.machine import machine_info, toolchain

    return {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "toolchain": toolchain("onnx", "onnxruntime", "openvino", "tensorrt", "ai-edge-litert", "numpy"),
        "settings": asdict(settings) if hasattr(settings, "__dataclass_fields__") else dict(settings),
        "artifacts": entries,
    }


def load_report(path: str | Path) -> dict[str, Any]:
    from enginekit.core.loaders import load_json_document

    report = load_json_document(path, REPORT_SCHEMA, "report")
    validate_report(report, path)
    return report


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1e9


def validate_report(report: dict[str, Any], path: str | Path | None = None) -> None:
    """A report read from disk has the fields `compare` and the renderings rely on, with sane
    numbers: latencies finite, positive and below ~11 days; text fields text. Anything else is an
    unusable report (one line naming the artifact and the field), never "no change"."""
    artifacts = report.get("artifacts")
    if not isinstance(artifacts, list):
        raise InputError("report has no list of artifacts", path)
    if not isinstance(report.get("machine", {}), dict):
        raise InputError("report's machine is not an object", path)
    for index, entry in enumerate(artifacts):
        where = f"artifact {index}"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is not an object", path)
        for key in ("model", "target", "precision"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise InputError(f"{where} has no text field '{key}'", path)
        where = f"artifact {artifact_key(entry)}"
        latency = entry.get("latency_ms")
        if not isinstance(latency, dict) or not all(_finite_positive(latency.get(k)) for k in ("p50_ms", "p99_ms")):
            raise InputError(f"{where}: latency_ms needs finite, positive p50_ms and p99_ms", path)
        samples = entry.get("latency_samples_ms")
        if not isinstance(samples, list) or not samples or not all(_finite_positive(v) for v in samples):
            raise InputError(f"{where}: latency_samples_ms must be a non-empty list of finite, positive milliseconds", path)
        for key in ("size_mb", "best_throughput_per_s"):
            if key in entry and not _finite_positive(entry[key]):
                raise InputError(f"{where}: {key} must be a finite, positive number", path)
        accuracy = entry.get("accuracy", {})
        if not isinstance(accuracy, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in accuracy.values()):
            raise InputError(f"{where}: accuracy must map metric names to numbers", path)
        shapes = entry.get("latency_shapes", {})
        if not isinstance(shapes, dict) or not all(isinstance(v, list) for v in shapes.values()):
            raise InputError(f"{where}: latency_shapes must map input names to shapes", path)


def artifact_key(entry: dict[str, Any]) -> str:
    return f"{entry['model']}/{entry['target']}/{entry['precision']}"


def accuracy_summary(entry: dict[str, Any]) -> str:
    if entry.get("accuracy_headline"):
        return str(entry["accuracy_headline"])
    accuracy = entry.get("accuracy") or {}
    for key in ACCURACY_KEYS:
        if key in accuracy:
            return f"{key} {accuracy[key]:.4f}"
    return "-"


LOW_INTEGER_SHARE = 0.5  # an INT8 artifact that runs less than half its compute ops in integer is flagged


def speedup(base: dict[str, Any], entry: dict[str, Any]) -> float:
    """How many times faster `entry` runs than `base`: the median over the latency rounds of the
    ratio of their p50s in that round, where the two were measured in the same interleaved rounds;
    else the ratio of their p50s over all rounds.

    Why per round: on a shared machine a neighbour can take a core for seconds, and a model that
    runs on both cores then takes up to twice as long while a one-thread one does not (this 2-core
    EPYC: PP-OCR cls's ONNX Runtime FP32 0.50 -> 1.2 ms in some rounds, its INT8 0.70 -> 1.07 ms).
    The two p50s of one round were measured within a second or two, under the same load. Pooled
    over three rounds, one disturbed round moved that speed-up from 0.71x to 0.55x; the median of
    the rounds' ratios read 0.72x. A disturbance through most of the rounds still moves it."""
    before, after = base.get("latency_slice_p50_ms") or [], entry.get("latency_slice_p50_ms") or []
    if before and len(before) == len(after) and all(value > 0 for value in after) and _interleaved(base, entry):
        return float(np.median([b / a for b, a in zip(before, after)]))
    return base["latency_ms"]["p50_ms"] / entry["latency_ms"]["p50_ms"]


def _interleaved(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether each latency slice of one ran between the other's slices of the rounds before and after."""
    a, b = first.get("latency_slices") or [], second.get("latency_slices") or []
    if len(a) != len(b) or not a:
        return False
    return all(a[i - 1][1] <= b[i][0] and b[i - 1][1] <= a[i][0] for i in range(1, len(a)))


def _speedups_over(entries: list[dict[str, Any]], base_of: Any) -> dict[int, float | None]:
    """Each entry's (by index) speed-up over `base_of(entry)`, where that base was measured at the
    same input shapes; None where there is no such base."""
    result: dict[int, float | None] = {}
    for index, entry in enumerate(entries):
        base = base_of(entry)
        same_shape = base is not None and base.get("latency_shapes") == entry.get("latency_shapes")
        result[index] = speedup(base, entry) if same_shape else None
    return result


def source_speedups(entries: list[dict[str, Any]]) -> dict[int, float | None]:
    """Speed-up of each entry over the model's source framework row (the first one: PyTorch
    eager, or Keras) at the same input shapes; None where the report has none."""
    sources: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.get("source"):
            sources.setdefault(entry["model"], entry)
    return _speedups_over(entries, lambda entry: sources.get(entry["model"]))


def speedups(entries: list[dict[str, Any]]) -> dict[int, float | None]:
    """Speed-up of each entry (by index) over the FP32 artifact of the same model and target (else
    the model's ONNX Runtime FP32), measured at the same input shapes; None where there is none
    (and for the source framework's own rows, which `source_speedups` compares)."""
    reference: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        if entry["precision"] == "fp32" and not entry.get("source"):
            reference[(entry["model"], entry["target"])] = entry
    return _speedups_over(entries, lambda entry: None if entry.get("source") else
                          reference.get((entry["model"], entry["target"])) or reference.get((entry["model"], "onnxruntime")))


def flags(entry: dict[str, Any], ratio: float | None) -> list[str]:
    """What a reader must not miss about an artifact: an INT8 that is not faster than its FP32
    twin (with where it runs float and where it requantizes), one that runs few compute ops in
    integer or carries uint8 weights, a model whose FP32 outputs never change."""
    found = []
    if entry["precision"] != "fp32" and ratio is not None and ratio <= 1.0:
        text = f"not faster than FP32 ({ratio:.2f}x)"
        for label, ops in (("float ops between integer ones", entry.get("float_islands")), ("ops LiteRT runs outside XNNPACK", entry.get("outside_delegate")),
                           ("requantizing ops", entry.get("requantizing_ops"))):
            if ops:
                text += f"; {label}: " + ", ".join(f"{op} x{count}" for op, count in list(ops.items())[:4])
        found.append(text)
    share = entry.get("integer_share")
    if entry["precision"] == "int8" and isinstance(share, (int, float)) and share < LOW_INTEGER_SHARE:
        found.append(f"only {share:.0%} of compute ops in integer")
    if entry["precision"] == "int8" and entry.get("weight_type") == "uint8":
        # chosen where int8 weights saturate this CPU's kernels (encoding.weight_type): it explains
        # a slower or float-running artifact, and the CPU it was built for
        found.append("uint8 weights (int8 ones saturate u8 x s8 kernels on a CPU without VNNI)")
    found += [f"FP32 output '{name}' is constant on the data" for name in entry.get("constant_outputs") or []]
    found += [f"FP32 output '{name}' barely changes on the data ({value:.1e} of its magnitude)"
              for name, value in (entry.get("nearly_constant_outputs") or {}).items()]
    found += [f"FP32 output '{name}' vanishes on the data (largest magnitude {value:.2g})" for name, value in (entry.get("vanishing_outputs") or {}).items()]
    return found


def shape_text(entry: dict[str, Any]) -> str:
    shapes = entry.get("latency_shapes") or {}
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items()) or "-"


def markdown(report: dict[str, Any]) -> str:
    """One row per artifact (speed-up against the FP32 artifact of the same model and target,
    else the model's ONNX Runtime FP32, at the same input shape), the input shape every figure
    was measured at, flags, and the cells a build skipped or failed."""
    entries = report["artifacts"]
    ratio, over_source = speedups(entries), source_speedups(entries)
    with_source = any(entry.get("source") for entry in entries)
    rows = []
    for index, entry in enumerate(entries):
        row = [entry["model"], entry["target"], entry["precision"], entry["size_mb"], accuracy_summary(entry),
               entry["latency_ms"]["p50_ms"], entry["latency_ms"]["p99_ms"], entry["best_throughput_per_s"],
               f"{ratio[index]:.2f}x" if ratio[index] else "-"]
        row += [f"{over_source[index]:.2f}x" if over_source[index] else "-"] if with_source else []
        rows.append(row + [shape_text(entry), "; ".join(flags(entry, ratio[index])) or "-"])
    machine = report["machine"]
    header = "enginekit report, " + cell_text(f"{machine.get('cpu')} ({machine.get('cores')} cores), {report.get('created')}", True) + "\n\n"
    columns = ["model", "target", "precision", "size MB", "accuracy vs FP32", "p50 ms", "p99 ms", "throughput samples/s", "speed-up vs FP32"]
    columns += ["speed-up vs source"] if with_source else []
    text = header + markdown_table(columns + ["measured at (batch 1)", "flags"], rows, escape=True)
    if report.get("source_note"):
        text += "\n" + cell_text(f"source: {report['source_note']}", True)
    for kind in ("failed", "skipped"):
        for cell in report.get(kind) or []:
            text += "\n" + cell_text(f"{kind}: {cell.get('target')} {cell.get('precision')}: {cell.get('reason')}", True)
    return text
