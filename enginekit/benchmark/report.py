"""The benchmark report: a versioned JSON document; Markdown is a rendering of it.

Schema `enginekit.report/1`:
  {"schema", "created", "machine", "toolchain", "settings", "artifacts": [entry, ...]}
where each entry is what `harness.bench_artifact` returns (model, target, precision, size_mb,
load_s, first_inference_ms, latency_ms {mean, std, min, p50, p90, p95, p99, max, iterations,
seconds}, latency_samples_ms, latency_slices [[start, end] wall clock], throughput [{batch,
mean_ms, throughput_per_s}], stream_throughput [{streams, requests, throughput_per_s}] (OpenVINO;
empty elsewhere), best_throughput_per_s (over both sweeps), rss_mb, peak_rss_mb, threads, cpus (cores it ran on), accuracy).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from enginekit.core.console import markdown_table

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

    return load_json_document(path, REPORT_SCHEMA, "report")


def artifact_key(entry: dict[str, Any]) -> str:
    return f"{entry['model']}/{entry['target']}/{entry['precision']}"


def accuracy_summary(entry: dict[str, Any]) -> str:
    accuracy = entry.get("accuracy") or {}
    for key in ACCURACY_KEYS:
        if key in accuracy:
            return f"{key} {accuracy[key]:.4f}"
    return "-"


def markdown(report: dict[str, Any]) -> str:
    """One row per artifact; speed-up is against the FP32 artifact of the same model and target
    (else the model's ONNX Runtime FP32)."""
    entries = report["artifacts"]
    reference: dict[tuple[str, str], float] = {}
    for entry in entries:
        if entry["precision"] == "fp32":
            reference[(entry["model"], entry["target"])] = entry["latency_ms"]["p50_ms"]
    rows = []
    for entry in entries:
        base = reference.get((entry["model"], entry["target"])) or reference.get((entry["model"], "onnxruntime"))
        p50 = entry["latency_ms"]["p50_ms"]
        rows.append([entry["model"], entry["target"], entry["precision"], entry["size_mb"], accuracy_summary(entry),
                     p50, entry["latency_ms"]["p99_ms"], entry["best_throughput_per_s"], f"{base / p50:.2f}x" if base else "-"])
    machine = report["machine"]
    header = f"enginekit report, {machine['cpu']} ({machine['cores']} cores), {report['created']}\n\n"
    return header + markdown_table(["model", "target", "precision", "size MB", "accuracy vs FP32", "p50 ms", "p99 ms", "throughput /s", "speed-up vs FP32"], rows)
