"""`enginekit bench`: every artifact measured the same way, whatever its runtime.

Per artifact: load (or compile) time, first-inference time, batch-1 latency distribution after
warm-up for at least a minimum number of iterations AND a minimum duration, throughput over a
batch-size sweep, artifact size, resident memory, threads; the raw latency samples are kept
(thinned) so `compare` can judge noise. Machine and toolchain are recorded once per report.

Two rules keep the numbers comparable on a shared machine:
- each artifact runs in a Python process of its own (`bench_artifacts`): runtimes' thread pools
  (ONNX Runtime's spinning workers, OpenVINO's TBB arena, XNNPACK's pool, and whatever a build
  loaded before) compete for the cores when they share a process, which moved latencies by
  7-56 % on this 2-core machine; alone, each matches its runtime's own tool (benchmarks/selfcheck);
- the latency is measured in `rounds` slices, interleaved across the artifacts (A B C A B C ...),
  so a machine whose speed drifts over minutes (this VM: tens of percent) slows every artifact
  alike instead of whichever happened to run during the slow minute; speed-ups stay stable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from enginekit.benchmark.latency import LatencyStats, measure_latency
from enginekit.core.errors import EnginekitError, InputError
from enginekit.core.interrupt import die_with_parent
from enginekit.core.machine import process_memory_mb
from enginekit.core.tensors import Feeds, TensorSpec
from enginekit.accuracy.metrics import headline
from enginekit.targets.base import GPU_TIMING, STREAMS
from enginekit.targets.registry import artifact_threads, get_target

if TYPE_CHECKING:
    from enginekit.benchmark.source import SourceSpec

MAX_KEPT_SAMPLES = 2000
SLICE_WARMUP = 3  # unrecorded runs at the start of each slice: caches went cold while others ran


@dataclass
class BenchSettings:
    threads: int | None = None
    batch_sizes: Sequence[int] = (1, 4, 16)
    warmup: int = 10
    min_iterations: int = 50
    min_seconds: float = 2.0
    rounds: int = 5  # latency slices per artifact, interleaved across artifacts
    sequence: int = 128  # size of a "sequence" dim
    cpus: Sequence[int] | None = None  # pin the measuring process (and the runtime's threads) to these cores

    def __post_init__(self) -> None:
        self.rounds = max(1, self.rounds)


def pin_cpus(cpus: Sequence[int] | None) -> list[int]:
    """Restrict this process to `cpus` (threads created afterwards inherit it); the cores in use."""
    if cpus:
        available = sorted(os.sched_getaffinity(0))
        unknown = sorted(set(cpus) - set(available))
        if unknown:
            raise InputError(f"cannot pin to core(s) {unknown}: this process may use cores {available}")
        os.sched_setaffinity(0, set(cpus))
    return sorted(os.sched_getaffinity(0))


def bench_dims(manifest: dict[str, Any], batch: int, sequence: int) -> dict[str, int]:
    """The size of every symbolic dim: the batch asked for; other dims (a detector's height and
    width, a sentence's length) at the size of the data the artifact was evaluated on, as its
    manifest records it, else `sequence`."""
    inputs = [TensorSpec.from_json(i) for i in manifest["inputs"]]
    data_shapes = manifest.get("data_shapes") or {}
    dims: dict[str, int] = {}
    for spec in inputs:
        observed = data_shapes.get(spec.name)
        for index, dim in enumerate(spec.shape):
            if isinstance(dim, str) and dim not in dims:
                if dim == "batch":
                    dims[dim] = batch
                elif observed and len(observed) == len(spec.shape) and isinstance(observed[index], int):
                    dims[dim] = int(observed[index])
    return {**{d: sequence for spec in inputs for d in spec.symbolic_dims if d not in dims}, **dims}


def bench_feeds(manifest: dict[str, Any], batch: int, sequence: int) -> Feeds:
    """Real samples when the artifact's model is in the zoo, seeded random inputs (inside each
    input's declared value range) otherwise, at `bench_dims`."""
    from enginekit.core.tensors import random_feeds
    from enginekit.models import zoo_names

    inputs = [TensorSpec.from_json(i) for i in manifest["inputs"]]
    dims = bench_dims(manifest, batch, sequence)
    if manifest.get("model") in zoo_names():
        from enginekit.models import get_spec

        feeds = get_spec(manifest["model"]).dataset().samples("evaluation", batch, dims)
        if all(feeds[s.name].shape == s.concrete_shape(dims) for s in inputs):
            return feeds
    return random_feeds(inputs, dims)


class ArtifactBench:
    """One artifact's runner and measurements: load, first inference, latency slices, then the rest."""

    def __init__(self, folder: "str | Path | SourceSpec", settings: BenchSettings):
        from enginekit.benchmark.source import SourceSpec, open_source, unrunnable
        from enginekit.targets.registry import open_artifact

        self.settings = settings
        self.source = folder if isinstance(folder, SourceSpec) else None
        self.folder = Path(folder) if self.source is None else None
        self.cpus = pin_cpus(settings.cpus)  # before the runtime creates its thread pool
        self.rss_before = process_memory_mb()
        start = time.perf_counter()
        if self.source is not None:
            self.runner, self.manifest = open_source(self.source, threads=settings.threads)
        else:
            self.runner, self.manifest = open_artifact(self.folder, threads=settings.threads)
        self.load_s = time.perf_counter() - start
        self.one = bench_feeds(self.manifest, 1, settings.sequence)
        start = time.perf_counter()
        try:
            self.runner.infer(self.one)  # torch.compile compiles here
        except Exception as exc:
            if self.source is None or isinstance(exc, EnginekitError):
                raise
            raise unrunnable(self.source, exc) from None
        self.first_ms = (time.perf_counter() - start) * 1e3
        for _ in range(settings.warmup):
            self.runner.infer(self.one)
        self.samples: list[int] = []
        self.gpu_ms: list[float] = []
        self.slices: list[list[float]] = []  # wall-clock [start, end] of each latency slice
        self.slice_p50_ms: list[float] = []  # each slice's median: speed-ups pair the slices measured side by side

    def measure_slice(self) -> None:
        """One of `rounds` latency slices: together they meet min_iterations AND min_seconds."""
        rounds = self.settings.rounds
        start = time.time()
        timed = GPU_TIMING in self.runner.capabilities  # the device's own time of each call, beside the end-to-end time

        def run() -> None:
            self.runner.infer(self.one)
            if timed:
                self.gpu_ms.append(self.runner.last_gpu_ms)

        stats = measure_latency(run, SLICE_WARMUP, math.ceil(self.settings.min_iterations / rounds),
                                self.settings.min_seconds / rounds, record=self.samples)
        self.slices.append([start, time.time()])
        self.slice_p50_ms.append(stats.p50_ms)

    def finish(self) -> dict[str, Any]:
        """The batch sweep and the result entry (after all latency slices)."""
        settings, manifest = self.settings, self.manifest
        batch_dynamic = any(i["shape"] and i["shape"][0] == "batch" for i in manifest["inputs"])
        sweep = []
        limit = self.runner.max_batch or max(settings.batch_sizes, default=1)  # an engine's profile bounds the sweep
        sizes = [b for b in settings.batch_sizes if b <= limit] or [1]
        for batch in (sizes if batch_dynamic else (1,)):
            feeds = bench_feeds(manifest, batch, settings.sequence)
            batch_stats = measure_latency(lambda f=feeds: self.runner.infer(f), 3, max(5, settings.min_iterations // 5), settings.min_seconds / 4)
            sweep.append({"batch": batch, "mean_ms": batch_stats.mean_ms, "throughput_per_s": batch * 1e3 / batch_stats.mean_ms,
                          "shapes": {name: list(value.shape) for name, value in feeds.items()}})
        streams = []
        if STREAMS in self.runner.capabilities:  # runtimes with a streams concept (OpenVINO)
            for count in stream_counts(settings.threads or os.cpu_count() or 1):
                rate, requests = self.runner.stream_throughput(self.one, count, settings.min_seconds / 4)
                streams.append({"streams": count, "requests": requests, "throughput_per_s": rate})
        samples = np.array(self.samples, np.int64)
        thinned = samples[:: max(1, len(samples) // MAX_KEPT_SAMPLES)].astype(np.float64) / 1e6
        accuracy = manifest.get("accuracy", {}).get("metrics", {})
        source = self.source is not None
        return {
            "artifact": f"{self.source.runtime} {self.source.model}" if source else str(self.folder),
            "model": manifest.get("model"),
            "target": manifest["target"] if source else get_target(manifest.get("target")).name,
            "precision": manifest.get("precision"),
            "source": source,  # the model the user started from, in its own framework (the baseline row)
            "size_mb": (manifest["weights_bytes"] if source else sum(f["bytes"] for f in manifest.get("files", []) if not f["path"].endswith(".json"))) / 1e6,
            "load_s": self.load_s,
            "first_inference_ms": self.first_ms,
            "gpu_compute_p50_ms": float(np.median(self.gpu_ms)) if self.gpu_ms else None,
            "latency_ms": LatencyStats.from_samples(samples).to_json(),
            "latency_samples_ms": [round(float(v), 5) for v in thinned],
            "latency_slices": self.slices,
            "latency_slice_p50_ms": self.slice_p50_ms,
            "throughput": sweep,
            "stream_throughput": streams,
            "best_throughput_per_s": max(s["throughput_per_s"] for s in sweep + streams),
            "rss_mb": process_memory_mb() - self.rss_before if np.isfinite(self.rss_before) else None,
            "peak_rss_mb": process_memory_mb("VmHWM"),  # the whole measuring process, interpreter and imports included
            "threads": artifact_threads(manifest, settings.threads) or os.cpu_count(),  # the count it ran at (its build's choice unless asked)
            "cpus": self.cpus,
            "accuracy": {k: v for k, v in accuracy.items() if isinstance(v, (int, float)) and k not in ("samples", "finite")},
            "accuracy_outputs": accuracy.get("outputs", {}),
            "accuracy_headline": headline(accuracy) if accuracy else "-",
            "latency_shapes": {name: list(value.shape) for name, value in self.one.items()},
            "integer_share": manifest.get("integer_share"),
            "weight_type": (manifest.get("quantization") or {}).get("weight_type"),
            "float_islands": (manifest.get("integer_ops") or {}).get("float_islands") or {},
            "requantizing_ops": (manifest.get("integer_ops") or {}).get("requantizing_ops") or {},
            "outside_delegate": ((manifest.get("tflite") or {}).get("types") or {}).get("outside_xnnpack") or {},
            "constant_outputs": manifest.get("constant_outputs", []),
            "vanishing_outputs": manifest.get("vanishing_outputs", {}),
            "nearly_constant_outputs": manifest.get("nearly_constant_outputs", {}),
            "manifest_sha": {f["path"]: f["sha256"][:16] for f in manifest.get("files", [])},
        }


def stream_counts(threads: int) -> list[int]:
    """1, 2, 4, ... up to the thread count, and the thread count itself."""
    counts = [1 << i for i in range(threads.bit_length()) if 1 << i <= threads]
    return counts if counts[-1] == threads else counts + [threads]


def bench_artifact(folder: str | Path, settings: BenchSettings) -> dict[str, Any]:
    """One artifact in this process, its latency slices back to back (the process's cores restored after)."""
    cores = os.sched_getaffinity(0)
    try:
        bench = ArtifactBench(folder, settings)
        for _ in range(settings.rounds):
            bench.measure_slice()
        return bench.finish()
    finally:
        os.sched_setaffinity(0, cores)


def bench_artifacts(folders: "Sequence[str | Path | SourceSpec]", settings: BenchSettings, isolate: bool = True,
                    skipped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every folder (or source model) measured in its own process (unless `isolate` is False),
    latency slices interleaved. A source that cannot run here (torch.compile without a compiler)
    goes to `skipped` with the reason instead of failing the report."""
    from enginekit.benchmark.source import SourceSpec

    if not isolate:
        return [bench_artifact(folder, settings) for folder in folders]
    tty = sys.stderr.isatty()
    from enginekit.core.artifacts import scratch_dir

    with scratch_dir("bench") as scratch:
        workers: list[_Worker] = []
        try:
            for index, folder in enumerate(folders):  # loaded one at a time: load times are not shared
                if tty:
                    sys.stderr.write(f"[{index + 1}/{len(folders)}] loading {folder}\n")
                try:
                    workers.append(_Worker(folder if isinstance(folder, SourceSpec) else Path(folder), settings, Path(scratch) / str(index)))
                except InputError as exc:
                    if not isinstance(folder, SourceSpec) or skipped is None:
                        raise
                    skipped.append({"target": folder.runtime, "precision": "fp32", "reason": str(exc)})
            for round_index in range(settings.rounds):
                if tty:
                    sys.stderr.write(f"latency round {round_index + 1}/{settings.rounds}\n")
                for worker in workers:
                    worker.ask("measure")
            results = []
            for worker in workers:
                if tty:
                    sys.stderr.write(f"batch sweep: {worker.folder}\n")
                results.append(worker.finish())
            return results
        finally:
            for worker in workers:
                worker.stop()


class _Worker:
    """A `python -m enginekit.benchmark.harness` process serving one artifact over stdin/stdout."""

    def __init__(self, folder: "Path | SourceSpec", settings: BenchSettings, scratch: Path):
        from enginekit.benchmark.source import SourceSpec

        self.folder, self.result = folder, scratch.with_suffix(".json")
        self.log = open(scratch.with_suffix(".log"), "w+")
        from enginekit.targets.registry import plugin_classes

        argument = folder.to_argument() if isinstance(folder, SourceSpec) else str(folder)
        command = [sys.executable, "-m", "enginekit.benchmark.harness", argument, json.dumps(asdict(settings)), json.dumps(plugin_classes())]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        preexec_fn=die_with_parent)
        self._expect("ready")

    def ask(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self._expect("done")

    def finish(self) -> dict[str, Any]:
        self.ask(f"finish {self.result}")
        return json.loads(self.result.read_text())

    def _expect(self, word: str) -> None:
        if self.process.stdout.readline().strip() == word:
            return
        code = self.process.wait()
        self.log.seek(0)
        last = (self.log.read().strip().splitlines() or [f"exit code {code}"])[-1]
        if code == InputError.exit_code:  # the worker's own one-line error, passed on
            raise InputError(last)
        raise InputError(f"benchmark crashed: {last}", str(self.folder))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _serve(folder: str, settings_json: str, plugins_json: str = "[]") -> None:
    """Worker side: register the caller's own targets, load, say "ready", then answer "measure"
    (one latency slice) and "finish PATH"."""
    from enginekit.targets.registry import load_plugins

    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the runtimes print goes to the log, never into the protocol
    sys.stdout = sys.stderr
    try:
        from enginekit.benchmark.source import PREFIX, SourceSpec

        load_plugins(json.loads(plugins_json))
        measured = SourceSpec.from_argument(folder) if folder.startswith(PREFIX) else folder
        bench = ArtifactBench(measured, BenchSettings(**json.loads(settings_json)))
    except EnginekitError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(exc.exit_code)
    print("ready", file=protocol, flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "measure":
            bench.measure_slice()
        elif command == "finish":
            Path(argument).write_text(json.dumps(bench.finish()))
            print("done", file=protocol, flush=True)
            return
        print("done", file=protocol, flush=True)


if __name__ == "__main__":
    _serve(*sys.argv[1:])
