"""Stopping a runtime mid-run: Ctrl-C and SIGTERM, and a time limit on each run.

A runtime executing a graph holds Python's main thread inside native code, where Python's own
signal handlers cannot run until the call returns: an endless Loop node would ignore Ctrl-C. So
the signal's arrival is also written to a wake-up pipe (`signal.set_wakeup_fd`), which a
watcher thread reads; it then sets the stop flag of every run in progress (ONNX Runtime's
`RunOptions.terminate`), the run returns, and Python raises KeyboardInterrupt as usual. The same
watcher stops a run that outlives its time limit, which then fails with a one-line error.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from enginekit.core.errors import InputError


class _Watcher:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, tuple[Any, float, dict[str, bool]]] = {}  # id -> (stoppable, deadline, flags)
        self.read_fd: int | None = None
        self.changed = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="enginekit-watcher", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            with self.lock:
                deadlines = [deadline for _, deadline, _ in self.active.values()]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
            fds = [self.read_fd] if self.read_fd is not None else []
            if fds:
                ready, _, _ = select.select(fds, [], [], min(wait, 1.0))
                if ready:
                    try:
                        os.read(self.read_fd, 512)
                    except OSError:
                        pass
                    self._stop_all("interrupted")
            else:
                self.changed.wait(min(wait, 1.0))
                self.changed.clear()
            now = time.monotonic()
            with self.lock:
                expired = [(stoppable, flags) for stoppable, deadline, flags in self.active.values() if deadline <= now]
            for stoppable, flags in expired:
                flags["timed_out"] = True
                stoppable.terminate = True

    def _stop_all(self, reason: str) -> None:
        with self.lock:
            runs = list(self.active.values())
        for stoppable, _, flags in runs:
            flags[reason] = True
            stoppable.terminate = True


_STOP_REQUESTED = threading.Event()


def request_stop(_signum: int, _frame: Any) -> None:
    """Signal handler for SIGINT and SIGTERM: remember the request, then unwind like Ctrl-C (so
    staging folders are removed), even where a library later wraps the KeyboardInterrupt."""
    _STOP_REQUESTED.set()
    raise KeyboardInterrupt


def stop_requested() -> bool:
    """Whether SIGINT or SIGTERM arrived: an error raised after it is the interruption's echo."""
    return _STOP_REQUESTED.is_set()


_WATCHER: _Watcher | None = None
_WATCHER_LOCK = threading.Lock()


def _watcher() -> _Watcher:
    global _WATCHER
    with _WATCHER_LOCK:
        if _WATCHER is None:
            _WATCHER = _Watcher()
        return _WATCHER


def install_signal_wakeup() -> None:
    """Let Ctrl-C and SIGTERM stop runs in native code (call once, from the main thread of a
    program that owns the process, such as the CLI)."""
    if threading.current_thread() is not threading.main_thread():
        return
    watcher = _watcher()
    if watcher.read_fd is not None:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(read_fd)
        os.close(write_fd)
        return
    watcher.read_fd = read_fd
    watcher.changed.set()


_RUN_LIMIT: ContextVar[float | None] = ContextVar("enginekit_run_limit", default=None)


def run_limit() -> float:
    """The time limit of one run here: set by `run_time_limit`, else the default from core.limits."""
    from enginekit.core.limits import DEFAULT_RUN_TIMEOUT

    value = _RUN_LIMIT.get()
    return DEFAULT_RUN_TIMEOUT if value is None else value


@contextlib.contextmanager
def run_time_limit(seconds: float | None) -> Iterator[None]:
    """Runs inside the block stop after `seconds` each (None: the default)."""
    token = _RUN_LIMIT.set(seconds)
    try:
        yield
    finally:
        _RUN_LIMIT.reset(token)


@contextlib.contextmanager
def stoppable_run(stoppable: Any, what: str, timeout: float | None) -> Iterator[dict[str, bool]]:
    """Register a run whose `stoppable.terminate = True` aborts it, for the block. A run stopped
    by its time limit raises a one-line InputError naming `what` and the limit."""
    watcher = _watcher()
    flags: dict[str, bool] = {}
    deadline = time.monotonic() + timeout if timeout else float("inf")
    key = id(flags)
    with watcher.lock:
        watcher.active[key] = (stoppable, deadline, flags)
    if timeout and timeout < 1.0:  # the watcher looks at least once a second; wake it for a shorter limit
        watcher.changed.set()
    try:
        yield flags
    except Exception:
        if flags.get("interrupted"):
            raise KeyboardInterrupt from None
        if flags.get("timed_out"):
            raise InputError(f"{what} ran longer than the {timeout:g} s limit and was stopped (an endless loop?)",
                             option="timeout") from None
        raise
    finally:
        with watcher.lock:
            watcher.active.pop(key, None)


def die_with_parent() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: the child is killed when enginekit dies, even by
    SIGKILL, instead of living on as an orphan (Linux PR_SET_PDEATHSIG; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
