"""The thread count an artifact runs fastest at, measured on the machine that builds it.

Why: a runtime's default is every core, and for a model whose run is a fraction of a millisecond
the thread pool's hand-offs cost more than the second core gives. On a 2-core Xeon, ONNX
Runtime ran a 2-layer BERT encoder's INT8 artifact in 288 us at one thread and 365 us at two,
its FP32 twin in 338 us at two and 395 us at one; OpenVINO ran MTCNN R-Net's INT8 in 66 us at
one thread, 87 us at two. Each artifact, FP32 and INT8 alike, is timed at its runtime's default
and at fewer threads, interleaved, and keeps the count it runs fastest at; `open_artifact` and
the benchmark then use it unless the caller names one. Measured here: another machine may
differ, so the record says what was measured on what.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from enginekit.core.errors import one_line
from enginekit.core.tensors import Feeds
from enginekit.targets.base import Runner

TUNE_BY_DEFAULT = True  # tests turn it off (conftest) so their manifests do not depend on timings
FASTER = 1.05  # fewer threads are taken only when this much faster than the runtime's default
ROUNDS = 3
SLICE_SECONDS = 0.05
MIN_RUNS = 3


def thread_counts(cores: int) -> list[int | None]:
    """The counts tried: the runtime's default (None: every core), half the cores, one."""
    fewer = sorted({count for count in (max(1, cores // 2), 1) if count < cores}, reverse=True)
    return [None, *fewer]


def _slice_seconds(runner: Runner, feeds: Feeds) -> float:
    runs, started = 0, time.perf_counter()
    while True:
        runner.infer(feeds)
        runs += 1
        spent = time.perf_counter() - started
        if spent >= SLICE_SECONDS and runs >= MIN_RUNS:
            return spent / runs


def fastest_threads(open_runner: Callable[[int | None], Runner], feeds: Feeds, cores: int | None = None) -> dict[str, Any] | None:
    """The record for the manifest: the count chosen (None: the runtime's default) and the median
    time per run at each count tried, slices interleaved so that drift hits all alike; None on a
    one-core machine. A measurement that fails leaves the default and says why."""
    cores = cores or len(os.sched_getaffinity(0))
    counts = thread_counts(cores)
    if len(counts) < 2:
        return None
    runners: dict[int | None, Runner] = {}
    try:
        for count in counts:
            runners[count] = open_runner(count)
            runners[count].infer(feeds)  # first run: weights packed, memory planned
        seconds: dict[int | None, list[float]] = {count: [] for count in counts}
        for _ in range(ROUNDS):
            for count, runner in runners.items():
                seconds[count].append(_slice_seconds(runner, feeds))
    except Exception as exc:  # a timing must not fail a build that passed its gate
        return {"chosen": None, "cores": cores, "why": f"not measured: {one_line(exc)}"}
    finally:
        for runner in runners.values():
            runner.close()
    median_us = {count: float(np.median(values)) * 1e6 for count, values in seconds.items()}
    best = min(counts, key=lambda count: median_us[count])
    chosen = best if median_us[None] > FASTER * median_us[best] else None
    return {"chosen": chosen, "cores": cores, "median_us": {_label(count): round(us, 1) for count, us in median_us.items()},
            "why": (f"{chosen} thread(s) ran {median_us[None] / median_us[chosen]:.2f}x faster than the runtime's default on this machine"
                    if chosen else "the runtime's default thread count was fastest (or within noise) on this machine")}


def _label(count: int | None) -> str:
    return "default" if count is None else str(count)
