"""Progress of long steps (calibration passes, bias correction, builds, benchmarks).

Library code reports events here and never writes to the terminal itself; whoever drives it
installs a callback with `reporting(callback)` (the CLI draws a bar on a terminal and writes a
line every few seconds when its output is a log file). Without a callback, events go to the
`enginekit` logger at DEBUG level.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

_LOG = logging.getLogger("enginekit")


@dataclass(frozen=True)
class ProgressEvent:
    task: str  # e.g. "calibrating", "bias correction", "building"
    done: int
    total: int | None = None
    unit: str = ""  # "samples", "layers", "artifacts"
    message: str = ""  # what is being worked on now

    def describe(self) -> str:
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text = f"{self.task} {count} {self.unit}".rstrip()
        return f"{text}: {self.message}" if self.message else text


ProgressCallback = Callable[[ProgressEvent], None]
_CALLBACK: ContextVar[ProgressCallback | None] = ContextVar("enginekit_progress", default=None)


def report(task: str, done: int, total: int | None = None, unit: str = "", message: str = "") -> None:
    event = ProgressEvent(task, done, total, unit, message)
    callback = _CALLBACK.get()
    if callback is None:
        _LOG.debug(event.describe())
    else:
        callback(event)


@contextlib.contextmanager
def reporting(callback: ProgressCallback | None) -> Iterator[None]:
    """Send the progress events of the block (this thread/context) to `callback`."""
    token = _CALLBACK.set(callback)
    try:
        yield
    finally:
        _CALLBACK.reset(token)
