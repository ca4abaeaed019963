"""Study: TensorRT engines (needs tensorrt and an NVIDIA GPU). For each zoo model and precision
built under `--root`, batch-1 end-to-end latency (host copies included) and the GPU's own compute
time (CUDA events), both from the product harness, plus the accuracy the build measured.

    python -m studies.tensorrt [--root artifacts/verify-tensorrt] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="artifacts/verify-tensorrt", help="where `enginekit build` put <model>/tensorrt-<precision>")
    parser.add_argument("--json", default="artifacts/benchmarks/tensorrt.json")
    args = parser.parse_args()

    import enginekit as ek
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.benchmark.report import accuracy_summary
    from enginekit.core.console import markdown_table
    from enginekit.models import zoo_names
    from studies.common import write_json

    folders = [Path(args.root) / model / f"tensorrt-{precision}" for model in zoo_names() for precision in ("fp32", "fp16", "int8")]
    folders = [f for f in folders if (f / "manifest.json").is_file()]
    report = ek.bench(folders, settings=BenchSettings(min_iterations=200, batch_sizes=(1, 8)))
    rows = [[e["model"], e["precision"], e["latency_ms"]["p50_ms"], e["latency_ms"]["p99_ms"], e["gpu_compute_p50_ms"], accuracy_summary(e)]
            for e in report["artifacts"]]
    print(markdown_table(["model", "precision", "end-to-end p50 ms", "p99 ms", "GPU compute p50 ms", "accuracy vs FP32"], rows))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
