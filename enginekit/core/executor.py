"""Where independent pieces of work run: a process pool on this machine (`local`) or tasks on an
existing Ray cluster (`ray`, an optional extra). Both take the same tasks (a top-level function
and its arguments, plus the accelerator it needs) and yield each outcome as it finishes.

A task's own errors are its result (the callers' task functions turn expected failures into
values); what an executor handles is infrastructure: a worker that dies in the middle of a task
(killed, out of memory) is retried once in a fresh worker, then reported failed with the reason.
A task that needs an accelerator no worker has is never started: it comes back skipped.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.core.errors import InputError, MissingDependencyError

EXECUTORS = ("local", "ray")
ATTEMPTS = 2  # a task whose worker dies runs once more
FAULTS_ENV = "ENGINEKIT_TEST_FAULTS"  # tests only: a folder of one-shot "kill this worker here" markers


@dataclass
class Task:
    key: str  # unique among the tasks of one run
    function: Callable[..., Any]  # importable at module level (it is pickled by reference)
    args: tuple = ()
    accelerator: str | None = None  # e.g. "H100": only a worker with this GPU kind may run it


@dataclass
class Outcome:
    key: str
    value: Any = None
    failed: str | None = None  # the worker died on every attempt, or the task raised unexpectedly
    skipped: str | None = None  # no worker can run it (an accelerator nobody has)
    attempts: int = 0
    infrastructure: list[str] = field(default_factory=list)  # each worker death, in order


class Executor:
    name = ""
    workers = 1

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        """Every task's outcome, in the order they finish."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def get_executor(name: str = "local", workers: int | None = None, address: str | None = None) -> Executor:
    if name == "local":
        if address:
            raise InputError("an address is for the ray executor; local runs on this machine", option="address")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, workers)
    raise InputError(f"unknown executor '{name}' (known: {', '.join(EXECUTORS)})", option="executor")


def fault_point(name: str) -> None:
    """Tests only: when $ENGINEKIT_TEST_FAULTS names a folder holding `<name>.kill`, that file is
    removed and this worker process kills itself (SIGKILL, as the OOM killer would) right here;
    `<name>.kill-always` kills every attempt. Without the variable this does nothing."""
    folder = os.environ.get(FAULTS_ENV)
    if not folder:
        return
    marker = Path(folder) / f"{name.replace('/', '__')}.kill"
    always = marker.with_suffix(".kill-always")
    if always.exists():
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        marker.unlink()
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def default_workers() -> int:
    """One worker per two cores: each cell's runtimes use several threads of their own."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def local_accelerator() -> str | None:
    from enginekit.core.machine import gpu_info

    gpu = gpu_info()
    return gpu["name"] if gpu else None


def accelerator_matches(wanted: str, name: str) -> bool:
    """"H100" matches "NVIDIA H100 80GB HBM3"; case and spaces aside."""
    squeeze = lambda text: "".join(text.lower().split())  # noqa: E731
    return squeeze(wanted) in squeeze(name)


class LocalExecutor(Executor):
    """A pool of fresh Python processes (spawned, not forked: runtimes hold threads). A worker
    that dies breaks the whole pool and fails every task it held; each of those is retried once,
    in a pool of its own."""

    name = "local"

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 1:
            raise InputError("the number of workers must be at least 1", option="workers")
        self.workers = workers or default_workers()

    def describe(self) -> str:
        return f"local ({self.workers} worker process{'es' if self.workers > 1 else ''})"

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        outcomes = {task.key: Outcome(task.key) for task in tasks}
        pending: list[Task] = []
        here = local_accelerator() if any(task.accelerator for task in tasks) else None
        for task in tasks:
            if task.accelerator and not (here and accelerator_matches(task.accelerator, here)):
                outcomes[task.key].skipped = f"needs a {task.accelerator} GPU; this machine has {here or 'no NVIDIA GPU'}"
                yield outcomes[task.key]
            else:
                pending.append(task)
        retry: list[Task] = []
        with _pool(min(self.workers, len(pending) or 1)) as pool:  # one shared pool first
            futures = {pool.submit(task.function, *task.args): task for task in pending}
            for future in as_completed(futures):
                task = futures[future]
                if self._settle(outcomes[task.key], future):
                    yield outcomes[task.key]
                else:
                    retry.append(task)
        # A death breaks the whole pool, failing its other tasks too: each retry runs in a pool
        # of its own, so a task that kills its worker again takes no other task with it.
        with ThreadPoolExecutor(max_workers=self.workers) as threads:
            futures = {threads.submit(_run_alone, task): task for task in retry}
            for future in as_completed(futures):
                task = futures[future]
                self._settle(outcomes[task.key], future.result(), last=True)
                yield outcomes[task.key]

    @staticmethod
    def _settle(outcome: Outcome, future: Any, last: bool = False) -> bool:
        """Record a finished attempt; False when the worker died and the task is to run again."""
        from concurrent.futures.process import BrokenProcessPool

        outcome.attempts += 1
        try:
            outcome.value = future.result()
        except BrokenProcessPool:
            outcome.infrastructure.append("a worker process died (killed, or out of memory; in a shared pool, this task's or another's)")
            if not last:
                return False
            outcome.failed = f"its worker process died on each of {outcome.attempts} attempts (killed, or out of memory)"
        except Exception as exc:  # noqa: BLE001 - a bug in a task: its cell fails, the others go on
            outcome.failed = f"{type(exc).__name__}: {exc}"
        return True


def _pool(workers: int) -> Any:
    """Spawned, not forked, processes: the runtimes hold threads a fork would copy half-alive."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from enginekit.core.console import print_warnings_on_one_line, prints_warnings_on_one_line

    one_line = prints_warnings_on_one_line()  # a worker's warnings read like the parent's
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=print_warnings_on_one_line if one_line else None)


def _run_alone(task: Task) -> Any:
    """One task in a pool of its own; returns its (finished) future."""
    with _pool(1) as pool:
        future = pool.submit(task.function, *task.args)
        try:
            future.result()
        except BaseException:  # noqa: BLE001 - read by _settle
            pass
        return future


class RayExecutor(Executor):
    """Tasks on a Ray cluster: the one at `address` ("auto": the cluster this node belongs to),
    the one this process is already connected to, or a local one started for the run. A task that
    needs an accelerator asks Ray for one GPU of that kind (`accelerator_type`), so only nodes
    that have it run it; when no node of the cluster has it, the task is skipped up front."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        self.address, self.workers = address, workers or 0

    def _connect(self) -> Any:
        try:
            import ray
        except ImportError:
            raise MissingDependencyError("the ray executor needs Ray (pip install 'enginekit[ray]')") from None
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"cannot reach the Ray cluster at {self.address or 'a new local instance'}: {exc}",
                                 option="address") from None
        return ray

    def describe(self) -> str:
        return f"ray ({self.address or 'local cluster'})"

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        ray = self._connect()
        from ray.exceptions import RayError, RayTaskError

        kinds = cluster_accelerators(ray.cluster_resources())
        outcomes = {task.key: Outcome(task.key) for task in tasks}
        running: dict[Any, Task] = {}
        for task in tasks:
            options: dict[str, Any] = {"num_cpus": 1, "max_retries": ATTEMPTS - 1, "retry_exceptions": False}
            if task.accelerator:
                kind = next((k for k in kinds if accelerator_matches(task.accelerator, k)), None)
                if kind is None:
                    outcomes[task.key].skipped = (f"needs a {task.accelerator} GPU; no node of the cluster has one "
                                                  f"(accelerators: {', '.join(kinds) or 'none'})")
                    yield outcomes[task.key]
                    continue
                options.update(num_gpus=1, accelerator_type=kind)
            remote = ray.remote(task.function).options(**options)
            running[remote.remote(*task.args)] = task
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            task = running.pop(done[0])
            outcome = outcomes[task.key]
            try:
                outcome.value = ray.get(done[0])
                outcome.attempts = 1
            except RayTaskError as exc:  # the task raised: a bug, not infrastructure
                outcome.failed = f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause is not None else str(exc).splitlines()[0]
            except RayError as exc:  # the worker died on every attempt (Ray retried it)
                outcome.attempts = ATTEMPTS
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                outcome.infrastructure.append(reason)
                outcome.failed = f"the Ray worker died on each of {ATTEMPTS} attempts ({type(exc).__name__}: {reason[:200]})"
            yield outcome


def cluster_accelerators(resources: dict[str, float]) -> list[str]:
    """The GPU kinds a Ray cluster offers (its `accelerator_type:<kind>` resources)."""
    prefix = "accelerator_type:"
    return sorted(name[len(prefix):] for name in resources if name.startswith(prefix))
