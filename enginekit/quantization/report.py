"""Per-layer report: for every quantized tensor, its range, the share of values the range clips,
and the SQNR of that tensor in the quantized graph against FP32 (accumulated error, so the worst
layers show where INT8 hurts), worst first; and what each tensor adds: the error it carries less
the error of the nearest quantized tensors it is computed from (`added_noise`, a share of the
tensor's power), so the layers that cost the most can be named even late in a deep graph."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.calibration.table import CalibrationTable
from enginekit.core.console import markdown_table
from enginekit.exporter.reference import Fp32Model
from enginekit.core.tensors import Feeds
from enginekit.onnx.probe import probe
from enginekit.quantization.qdq import DQ_SUFFIX, QdqGraph


def layer_report(fp32: Fp32Model, qdq: QdqGraph, table: CalibrationTable, batches: Sequence[Feeds],
                 path: Path | None = None, threads: int | None = None) -> list[dict[str, Any]]:
    tensors = list(qdq.activations)
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    reference = probe(fp32.proto, tensors, batches, threads)
    quantized = probe(qdq.model, [t + DQ_SUFFIX for t in tensors], batches, threads)
    for ref_out, q_out in zip(reference, quantized):
        for tensor in tensors:
            ref = ref_out[tensor].astype(np.float64)
            got = q_out[tensor + DQ_SUFFIX].astype(np.float64)
            signal[tensor] += float(np.sum(ref**2))
            noise[tensor] += float(np.sum((ref - got) ** 2))
    rows = []
    for tensor in tensors:
        entry = table.tensors.get(tensor)
        sqnr = 10 * np.log10(signal[tensor] / noise[tensor]) if noise[tensor] > 0 and signal[tensor] > 0 else float("inf")
        rows.append({"tensor": tensor, "min": entry.min if entry else None, "max": entry.max if entry else None,
                     "amax": entry.amax if entry else None, "clipped": entry.clipped if entry else None,
                     "scale": qdq.activations[tensor].scale, "sqnr_db": float(sqnr)})
    _add_noise_added(rows, fp32.proto)
    rows.sort(key=lambda r: r["sqnr_db"])
    if path is not None:
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _add_noise_added(rows: list[dict[str, Any]], model: Any) -> None:
    by_tensor = {r["tensor"]: r for r in rows}
    producers = {o: n for n in model.graph.node for o in n.output}
    for row in rows:
        upstream, seen = [], set()
        frontier = list(producers[row["tensor"]].input) if row["tensor"] in producers else []
        while frontier:
            name = frontier.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in by_tensor:
                upstream.append(by_tensor[name]["sqnr_db"])
            elif name in producers:
                frontier.extend(producers[name].input)
        inherited = max((10 ** (-s / 10) for s in upstream), default=0.0)
        row["upstream_sqnr_db"] = min(upstream) if upstream else None
        row["added_noise"] = max(10 ** (-row["sqnr_db"] / 10) - inherited, 0.0)


def costliest_layers(rows: Sequence[dict[str, Any]], limit: int = 3) -> str:
    """The tensors that add the most error, for a gate failure: 'name (SQNR 31.2 -> 14.8 dB), ...'."""
    ranked = sorted((r for r in rows if r.get("added_noise")), key=lambda r: -r["added_noise"])[:limit]
    parts = []
    for row in ranked:
        before = row.get("upstream_sqnr_db")
        change = f"{before:.1f} -> {row['sqnr_db']:.1f} dB" if before is not None and np.isfinite(before) else f"{row['sqnr_db']:.1f} dB"
        parts.append(f"{row['tensor']} (SQNR {change})")
    return ", ".join(parts)


def format_layer_report(rows: Sequence[dict[str, Any]], limit: int = 15) -> str:
    headers = ["tensor (worst first)", "min", "max", "amax", "clipped %", "SQNR dB"]
    body = [[r["tensor"][-40:], r["min"], r["max"], r["amax"], 100 * (r["clipped"] or 0.0), r["sqnr_db"]] for r in rows[:limit]]
    return markdown_table(headers, body)
