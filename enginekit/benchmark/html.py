"""The report as one self-contained HTML page (no scripts, no network): the Markdown table plus
three inline-SVG plots — latency distribution per artifact, accuracy vs latency, and
throughput vs batch size."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from enginekit.benchmark.report import accuracy_summary, artifact_key

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_WIDTH, _ROW, _LEFT = 760, 26, 260


def _text(value: Any) -> str:
    """Any value from a report or manifest, as HTML text (never markup)."""
    return html.escape(str(value), quote=True)


def _color(index: int) -> str:
    return _COLORS[index % len(_COLORS)]


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / (high - low or 1.0) * (end - start)


def _axis_ticks(low: float, high: float, count: int = 5) -> list[float]:
    return list(np.linspace(low, high, count))


def latency_plot(entries: list[dict[str, Any]]) -> str:
    """Box per artifact: whiskers p1-p99, box p25-p75, line at the median (ms, log-free)."""
    height = 40 + _ROW * len(entries)
    high = max(np.percentile(e["latency_samples_ms"], 99) for e in entries) * 1.05
    parts = [f'<svg width="{_WIDTH}" height="{height}" role="img" aria-label="latency distribution">']
    for tick in _axis_ticks(0, high):
        x = _scale(tick, 0, high, _LEFT, _WIDTH - 20)
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - 20}" stroke="#ddd"/><text x="{x:.1f}" y="{height - 5}" font-size="11" text-anchor="middle">{tick:.2f} ms</text>')
    for i, entry in enumerate(entries):
        y = 30 + i * _ROW
        p1, p25, p50, p75, p99 = np.percentile(entry["latency_samples_ms"], [1, 25, 50, 75, 99])
        xs = [_scale(v, 0, high, _LEFT, _WIDTH - 20) for v in (p1, p25, p50, p75, p99)]
        color = _color(i)
        parts.append(f'<text x="{_LEFT - 8}" y="{y + 5}" font-size="12" text-anchor="end">{html.escape(artifact_key(entry))}</text>')
        parts.append(f'<line x1="{xs[0]:.1f}" y1="{y}" x2="{xs[4]:.1f}" y2="{y}" stroke="{color}"/>')
        parts.append(f'<rect x="{xs[1]:.1f}" y="{y - 8}" width="{max(xs[3] - xs[1], 1):.1f}" height="16" fill="{color}" fill-opacity="0.35" stroke="{color}"/>')
        parts.append(f'<line x1="{xs[2]:.1f}" y1="{y - 9}" x2="{xs[2]:.1f}" y2="{y + 9}" stroke="{color}" stroke-width="3"/>')
    parts.append("</svg>")
    return "".join(parts)


def _accuracy_value(entry: dict[str, Any]) -> float | None:
    accuracy = entry.get("accuracy") or {}
    for key in ("top1_agreement", "cosine", "accuracy"):
        if key in accuracy:
            return float(accuracy[key])
    return None


def accuracy_plot(entries: list[dict[str, Any]]) -> str:
    points = [(e["latency_ms"]["p50_ms"], _accuracy_value(e), i, e) for i, e in enumerate(entries) if _accuracy_value(e) is not None]
    if not points:
        return "<p>No accuracy figures in this report.</p>"
    width, height, pad = _WIDTH, 360, 60
    x_high = max(p[0] for p in points) * 1.15
    y_low = min(min(p[1] for p in points) - 0.01, 0.98)
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="accuracy vs latency">']
    right = width - 230  # room for the labels of the rightmost points
    for tick in _axis_ticks(0, x_high):
        x = _scale(tick, 0, x_high, pad, right)
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - pad}" stroke="#eee"/><text x="{x:.1f}" y="{height - pad + 16}" font-size="11" text-anchor="middle">{tick:.2f}</text>')
    for tick in _axis_ticks(y_low, 1.0):
        y = _scale(tick, y_low, 1.0, height - pad, 20)
        parts.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/><text x="{pad - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:.3f}</text>')
    parts.append(f'<text x="{right / 2}" y="{height - 20}" font-size="12" text-anchor="middle">batch-1 p50 latency (ms)</text>')
    parts.append(f'<text x="14" y="{height / 2}" font-size="12" transform="rotate(-90 14 {height / 2})" text-anchor="middle">agreement with FP32</text>')
    dots = [(_scale(latency, 0, x_high, pad, right), _scale(value, y_low, 1.0, height - pad, 20), index, entry) for latency, value, index, entry in points]
    labels, placed = [], []
    for x, y, index, entry in sorted(dots, key=lambda d: (d[1], d[0])):
        # a label starts right of every dot it would run across, and stacks below labels it would hit;
        # it takes its dot's colour, so the pairing stays readable when dots crowd together
        label_x = max(dx for dx, dy, _, _ in dots if abs(dy - y) < 13 and 0 <= dx - x < 160) + 9
        label_y = y + 4
        while any(abs(label_y - py) < 13 and abs(label_x - px) < 200 for px, py in placed):
            label_y += 13
        placed.append((label_x, label_y))
        labels.append(f'<text x="{label_x:.1f}" y="{label_y:.1f}" font-size="11" fill="{_color(index)}">{html.escape(artifact_key(entry))}</text>')
    parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{_color(index)}"/>' for x, y, index, _ in dots] + labels
    parts.append("</svg>")
    return "".join(parts)


def throughput_plot(entries: list[dict[str, Any]]) -> str:
    width, height, pad = _WIDTH, 360, 60
    batches = sorted({s["batch"] for e in entries for s in e["throughput"]})
    y_high = max(s["throughput_per_s"] for e in entries for s in e["throughput"]) * 1.1
    x_positions = {b: _scale(i, 0, max(len(batches) - 1, 1), pad + 20, width - 180) for i, b in enumerate(batches)}
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="throughput vs batch size">']
    for batch, x in x_positions.items():
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 16}" font-size="11" text-anchor="middle">{batch}</text>')
    for tick in _axis_ticks(0, y_high):
        y = _scale(tick, 0, y_high, height - pad, 20)
        parts.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{width - 180}" y2="{y:.1f}" stroke="#eee"/><text x="{pad - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:.0f}</text>')
    parts.append(f'<text x="{(width - 160) / 2}" y="{height - 20}" font-size="12" text-anchor="middle">batch size</text>')
    parts.append(f'<text x="14" y="{height / 2}" font-size="12" transform="rotate(-90 14 {height / 2})" text-anchor="middle">inferences per second</text>')
    for index, entry in enumerate(entries):
        coords = [(x_positions[s["batch"]], _scale(s["throughput_per_s"], 0, y_high, height - pad, 20)) for s in entry["throughput"]]
        color = _color(index)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>' for x, y in coords]
        parts.append(f'<text x="{width - 170}" y="{30 + 16 * index}" font-size="11" fill="{color}">{html.escape(artifact_key(entry))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    entries = report["artifacts"]
    machine = report["machine"]
    rows = "".join(
        f"<tr><td>{_text(e['model'])}</td><td>{_text(e['target'])}</td><td>{_text(e['precision'])}</td><td>{e['size_mb']:.2f}</td>"
        f"<td>{_text(accuracy_summary(e))}</td><td>{e['latency_ms']['p50_ms']:.3f}</td><td>{e['latency_ms']['p99_ms']:.3f}</td>"
        f"<td>{e['best_throughput_per_s']:.1f}</td></tr>" for e in entries)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>enginekit report</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
h2{{margin-top:28px}}</style></head><body>
<h1>enginekit report</h1>
<p>{_text(machine.get('cpu') or '')} · {_text(machine.get('cores'))} cores · ISA {_text(', '.join(map(str, machine.get('isa') or [])))} · GPU {_text((machine.get('gpu') or {}).get('name', 'none'))} · {_text(report['created'])}</p>
<table><tr><th>model</th><th>target</th><th>precision</th><th>size MB</th><th>accuracy vs FP32</th><th>p50 ms</th><th>p99 ms</th><th>throughput /s</th></tr>{rows}</table>
<h2>Latency distribution (batch 1; box p25–p75, whiskers p1–p99, bar = median)</h2>{latency_plot(entries)}
<h2>Accuracy vs latency</h2>{accuracy_plot(entries)}
<h2>Throughput vs batch size</h2>{throughput_plot(entries)}
</body></html>
"""
