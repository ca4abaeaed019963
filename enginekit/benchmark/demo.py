"""`make demo` / `enginekit demo`: export every zoo model and show parity and FP32 latency."""

from __future__ import annotations

import os
from pathlib import Path

from enginekit.benchmark.latency import measure_latency
from enginekit.core.console import markdown_table
from enginekit.onnx.session import Session
from enginekit.exporter.pipeline import export_model
from enginekit.models import get_spec, zoo_names


def run_demo(out: Path, threads: int | None = None) -> str:
    threads = threads or os.cpu_count() or 1
    rows = []
    for name in zoo_names():
        spec = get_spec(name)
        manifest = export_model(name, out / name / "onnx")
        session = Session(out / name / "onnx" / "model.onnx", threads=threads)
        dims = {**{d: 1 for s in spec.inputs for d in s.symbolic_dims}, **{k: v for k, v in spec.parity_dims[-1].items() if k != "batch"}}
        feeds = spec.dataset().samples("evaluation", 1, dims)
        stats = measure_latency(lambda: session.run(feeds))
        parity = manifest["parity"]
        shape = " ".join(f"{k}={v}" for k, v in dims.items())
        rows.append([name, f"{spec.parameter_count() / 1e6:.2f}M", parity["max_abs"], f"{parity['cosine']:.7f}",
                     len(parity["cases"]), shape, stats.p50_ms, stats.p99_ms])
    headers = ["model", "params", "parity max-abs", "parity cosine", "cases", "latency input", "ORT fp32 p50 ms", "p99 ms"]
    return f"ONNX export parity and ONNX Runtime FP32 latency ({threads} threads)\n\n" + markdown_table(headers, rows) + f"\n\nartifacts: {out}/"
