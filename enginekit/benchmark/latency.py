"""Batch-1 latency the way benchmark_app and MLPerf LoadGen measure it: warm up, then run for at
least a minimum number of iterations AND a minimum duration, and report the distribution."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    iterations: int
    seconds: float
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_samples(cls, samples_ns: np.ndarray) -> "LatencyStats":
        ms = samples_ns.astype(np.float64) / 1e6
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return cls(
            iterations=int(ms.size), seconds=float(ms.sum() / 1e3), mean_ms=float(ms.mean()), std_ms=float(ms.std()),
            min_ms=float(ms.min()), p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95), p99_ms=float(p99),
            max_ms=float(ms.max()),
        )

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def measure_latency(
    run: Callable[[], object],
    warmup: int = 10,
    min_iterations: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    record: list[int] | None = None,
) -> LatencyStats:
    """Time `run()` call by call with perf_counter_ns until both minimums are met (or max_seconds);
    `record`, if given, receives the raw samples in nanoseconds."""
    for _ in range(warmup):
        run()
    samples: list[int] = []
    start = time.perf_counter_ns()
    deadline_min = start + int(min_seconds * 1e9)
    deadline_max = start + int(max_seconds * 1e9)
    while True:
        t0 = time.perf_counter_ns()
        run()
        t1 = time.perf_counter_ns()
        samples.append(t1 - t0)
        if (len(samples) >= min_iterations and t1 >= deadline_min) or t1 >= deadline_max:
            break
    if record is not None:
        record.extend(samples)
    return LatencyStats.from_samples(np.array(samples))
