"""Benchmark TensorRT engines (needs tensorrt and an NVIDIA GPU): for each zoo model and
precision, batch-1 end-to-end latency (host copies included) and GPU compute time from CUDA
events, plus accuracy against the FP32 ONNX. Prints a table and writes JSON.

    python -m enginekit.benchmarks.tensorrt [--root artifacts/verify-tensorrt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="artifacts/verify-tensorrt", help="where `enginekit build` put <model>/tensorrt-<precision>")
    parser.add_argument("--json", default="artifacts/benchmarks/tensorrt.json")
    args = parser.parse_args()

    from enginekit.artifacts import read_manifest
    from enginekit.benchmarks.latency import measure_latency
    from enginekit.console import markdown_table
    from enginekit.engines.tensorrt.runner import TensorRTRunner
    from enginekit.models import get_spec, zoo_names

    rows, results = [], []
    for model in zoo_names():
        spec = get_spec(model)
        feeds = spec.dataset().samples("evaluation", 1)
        for precision in ("fp32", "fp16", "int8"):
            folder = Path(args.root) / model / f"tensorrt-{precision}"
            if not (folder / "manifest.json").is_file():
                continue
            manifest = read_manifest(folder)
            runner = TensorRTRunner(folder)
            gpu_ms: list[float] = []

            def run() -> None:
                runner.infer(feeds)
                gpu_ms.append(runner.last_gpu_ms)

            stats = measure_latency(run, warmup=20, min_iterations=200, min_seconds=2.0)
            metrics = manifest["accuracy"]["metrics"]
            key = "top1_agreement" if "top1_agreement" in metrics else "cosine"
            entry = {"model": model, "precision": precision, "end_to_end_p50_ms": stats.p50_ms, "end_to_end_p99_ms": stats.p99_ms,
                     "gpu_compute_median_ms": float(np.median(gpu_ms)), key: metrics[key], "tensorrt": manifest["tensorrt"]}
            results.append(entry)
            rows.append([model, precision, stats.p50_ms, stats.p99_ms, entry["gpu_compute_median_ms"], f"{key} {metrics[key]:.4f}"])
    print(markdown_table(["model", "precision", "end-to-end p50 ms", "p99 ms", "GPU compute ms", "accuracy vs FP32"], rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
