"""`enginekit bench`: every artifact measured the same way, whatever its runtime.

Per artifact: load (or compile) time, first-inference time, batch-1 latency distribution after
warm-up for at least a minimum number of iterations AND a minimum duration, throughput over a
batch-size sweep, artifact size, resident memory, threads; the raw latency samples are kept
(thinned) so `compare` can judge noise. Machine and toolchain are recorded once per report.

`bench_artifacts` measures each artifact in a fresh interpreter of its own: runtimes' thread pools
(ONNX Runtime's spinning workers, OpenVINO's TBB arena, XNNPACK's pool, and whatever a build
loaded before) compete for the same cores when they share a process, which moved latencies by
7-56 % on this 2-core machine; alone, each matches its runtime's own tool (benchmarks/selfcheck).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.benchmarks.latency import measure_latency
from enginekit.errors import EnginekitError, InputError
from enginekit.models.spec import Feeds, TensorSpec

MAX_KEPT_SAMPLES = 2000


@dataclass
class BenchSettings:
    threads: int | None = None
    batch_sizes: Sequence[int] = (1, 4, 16)
    warmup: int = 10
    min_iterations: int = 50
    min_seconds: float = 1.0
    sequence: int = 128  # size of a "sequence" dim


def _rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_feeds(manifest: dict[str, Any], batch: int, sequence: int) -> Feeds:
    """Real samples when the artifact's model is in the zoo, seeded random inputs otherwise."""
    from enginekit.export.sources import random_feeds
    from enginekit.models import zoo_names

    inputs = [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
    dims = {d: (batch if d == "batch" else sequence) for spec in inputs for d in spec.symbolic_dims}
    if manifest.get("model") in zoo_names():
        from enginekit.models import get_spec

        feeds = get_spec(manifest["model"]).dataset().samples("evaluation", batch, dims)
        if all(feeds[s.name].shape == s.concrete_shape(dims) for s in inputs):
            return feeds
    return random_feeds(inputs, dims)


def bench_artifact(folder: str | Path, settings: BenchSettings) -> dict[str, Any]:
    from enginekit.engines.registry import load_runner

    folder = Path(folder)
    rss_before = _rss_mb()
    start = time.perf_counter()
    runner, manifest = load_runner(folder, threads=settings.threads)
    load_s = time.perf_counter() - start
    one = bench_feeds(manifest, 1, settings.sequence)
    start = time.perf_counter()
    runner.infer(one)
    first_ms = (time.perf_counter() - start) * 1e3
    samples: list[int] = []
    stats = measure_latency(lambda: runner.infer(one), settings.warmup, settings.min_iterations, settings.min_seconds, record=samples)
    batch_dynamic = any(i["shape"] and i["shape"][0] == "batch" for i in manifest["inputs"])
    sweep = []
    for batch in (settings.batch_sizes if batch_dynamic else (1,)):
        feeds = bench_feeds(manifest, batch, settings.sequence)
        batch_stats = measure_latency(lambda f=feeds: runner.infer(f), 3, max(5, settings.min_iterations // 5), settings.min_seconds / 2)
        sweep.append({"batch": batch, "mean_ms": batch_stats.mean_ms, "throughput_per_s": batch * 1e3 / batch_stats.mean_ms})
    thinned = np.array(samples[:: max(1, len(samples) // MAX_KEPT_SAMPLES)], np.float64) / 1e6
    accuracy = manifest.get("accuracy", {}).get("metrics", {})
    return {
        "artifact": str(folder),
        "model": manifest.get("model"),
        "target": "onnxruntime" if manifest.get("target") == "onnx" else manifest.get("target"),
        "precision": manifest.get("precision"),
        "size_mb": sum(f["bytes"] for f in manifest.get("files", []) if not f["path"].endswith(".json")) / 1e6,
        "load_s": load_s,
        "first_inference_ms": first_ms,
        "latency_ms": stats.to_json(),
        "latency_samples_ms": [round(float(v), 5) for v in thinned],
        "throughput": sweep,
        "best_throughput_per_s": max(s["throughput_per_s"] for s in sweep),
        "rss_mb": _rss_mb() - rss_before if np.isfinite(rss_before) else None,
        "threads": settings.threads or os.cpu_count(),
        "accuracy": {k: v for k, v in accuracy.items() if k not in ("samples", "finite")},
        "manifest_sha": {f["path"]: f["sha256"][:16] for f in manifest.get("files", [])},
    }


def bench_artifacts(folders: Sequence[str | Path], settings: BenchSettings, isolate: bool = True) -> list[dict[str, Any]]:
    """`bench_artifact` for each folder, each in its own process unless `isolate` is False."""
    results = []
    for index, folder in enumerate(folders, 1):
        if sys.stderr.isatty():
            sys.stderr.write(f"[{index}/{len(folders)}] benchmarking {folder}\n")
        results.append(_bench_in_subprocess(Path(folder), settings) if isolate else bench_artifact(folder, settings))
    return results


def _bench_in_subprocess(folder: Path, settings: BenchSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="enginekit-bench-") as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "enginekit.benchmarks.harness", str(folder), json.dumps(asdict(settings)), str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if done.returncode == InputError.exit_code:  # the worker's own one-line error, passed on
            raise InputError(last)
        if done.returncode != 0 or not out.is_file():
            raise InputError(f"benchmark crashed: {last}", folder)
        return json.loads(out.read_text())


def _worker(argv: list[str]) -> None:
    """Entry of the per-artifact process: folder, settings JSON, result path."""
    folder, settings_json, out = argv
    try:
        result = bench_artifact(folder, BenchSettings(**json.loads(settings_json)))
    except EnginekitError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(exc.exit_code)
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1:])
