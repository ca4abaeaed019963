"""Inference targets. Each is a thin adapter over a vendor runtime that exposes a Runner:
its I/O specs and `infer(feeds) -> outputs`, so the harness and the accuracy checks never
depend on which runtime sits underneath."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from enginekit.models.spec import Feeds, TensorSpec


class Runner(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, feeds: Feeds) -> list[np.ndarray]: ...
