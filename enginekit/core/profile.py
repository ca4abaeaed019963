"""Where a build's time goes: wall seconds per stage (export/load, calibration, quantization, bias
correction, conversion, evaluation, benchmark), per cell where a stage belongs to one, and how
many times each stage ran (a stage the build shares, such as the calibration or the FP32
reference outputs, must run once).

Stages are marked with `with stage("calibration"):` anywhere in the pipeline; they are recorded
only inside `with profiling() as profile:` (nothing is collected otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Profile:
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in first-seen order
    counts: dict[str, int] = field(default_factory=dict)  # stage -> times it ran
    cells: dict[str, dict[str, float]] = field(default_factory=dict)  # "target-precision" -> stage -> seconds
    wall: float = 0.0

    def add(self, name: str, seconds: float, cell: str | None) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1
        if cell is not None:
            per_cell = self.cells.setdefault(cell, {})
            per_cell[name] = per_cell.get(name, 0.0) + seconds

    def to_json(self) -> dict[str, Any]:
        return {"wall_s": self.wall, "stages": dict(self.stages), "counts": dict(self.counts), "cells": {k: dict(v) for k, v in self.cells.items()}}


_CURRENT: ContextVar[Profile | None] = ContextVar("enginekit_profile", default=None)
_OPEN: ContextVar[tuple["_Open", ...]] = ContextVar("enginekit_open_stages", default=())


@dataclass
class _Open:
    name: str
    inner: float = 0.0  # seconds spent in stages nested inside this one


@contextmanager
def profiling() -> Iterator[Profile]:
    """Collect the stages run inside this block (an enclosing profile keeps collecting)."""
    outer = _CURRENT.get()
    profile = outer or Profile()
    token = _CURRENT.set(profile) if outer is None else None
    start = time.perf_counter()
    try:
        yield profile
    finally:
        if token is not None:
            profile.wall += time.perf_counter() - start
            _CURRENT.reset(token)


@contextmanager
def stage(name: str, cell: str | None = None) -> Iterator[None]:
    """Time this block as `name` (of `cell`). Times are exclusive: a stage nested in another
    (bias correction inside quantization) is taken out of the enclosing one, so the stages add
    up to at most the wall time; a stage inside another of the same name counts once."""
    profile = _CURRENT.get()
    opened = _OPEN.get()
    if profile is None or any(o.name == name for o in opened):
        yield
        return
    mine = _Open(name)
    token = _OPEN.set((*opened, mine))
    start = time.perf_counter()
    try:
        yield
    finally:
        _OPEN.reset(token)
        elapsed = time.perf_counter() - start
        profile.add(name, elapsed - mine.inner, cell)
        if opened:
            opened[-1].inner += elapsed


def current() -> Profile | None:
    return _CURRENT.get()
