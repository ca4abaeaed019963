"""Bounded-memory statistics of one activation tensor, updated batch by batch.

A histogram of |x| with a fixed number of bins over [0, edge). The edge is always a power of two
(the smallest above the largest |x| seen) and the bin count is one too, so a value's bin is
|x| scaled by a power of two and truncated: exact in float32. When a batch exceeds the edge, the
edge doubles k times and every 2^k old bins merge into one, which is exactly the binning the
values would have had at the new edge. So the histogram depends only on the multiset of values,
never on their order or on how they were batched: histograms of shards of the data merge
(`merge`) into the very histogram one pass over all of it gives, in any shard order (sharded
calibration is byte-identical to one process). Memory stays one array of `bins` counts however
many samples stream through. 4096 bins: an edge up to twice the peak still leaves the peak at
least 2048 bins, the resolution the first-batch edges had before. Exact zeros are counted apart:
they are exactly representable on every zero-point-0 grid, and their spike (after ReLU) must not
steer the range methods.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 4096
MIN_EXPONENT = -100  # edges never go below 2^-100: the float32 scale bins/edge stays finite
# Values are binned in chunks through two buffers per thread, reused: no batch-sized temporaries
# (three per tensor before: |x|, its float32 scaling, the int64 indices), so memory does not
# grow with the batch. 1 Mi values per chunk keeps numpy calls (and GIL hand-offs between the
# binning threads) few: efficientnet_lite0's four-method calibration took 18.2-18.8 s with 64 Ki
# chunks, 16.1-16.6 s with 1 Mi, 17.0 s with 16 Mi (interleaved runs on a 2-core EPYC).
_CHUNK = 1 << 20
_buffers = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray]:
    if not hasattr(_buffers, "floats"):
        _buffers.floats, _buffers.indices = np.empty(_CHUNK, np.float32), np.empty(_CHUNK, np.intp)
    return _buffers.floats, _buffers.indices


@dataclass
class TensorHistogram:
    bins: int = DEFAULT_BINS
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    edge: float = 0.0
    zeros: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    unbinned: int = 0  # non-zero values counted but not binned (a min-max-only pass)
    infinite: int = 0  # +-inf values, left out of every statistic (`_finite`)

    def __post_init__(self) -> None:
        if self.bins < 1 or self.bins & (self.bins - 1):
            raise ValueError(f"the bin count must be a power of two, not {self.bins}")
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.zeros + self.unbinned

    @property
    def abs_max(self) -> float:
        return max(abs(self.minimum), abs(self.maximum)) if self.total else 0.0

    @property
    def signed(self) -> bool:
        return self.minimum < 0.0

    @property
    def bin_width(self) -> float:
        return self.edge / self.bins

    def update(self, values: np.ndarray, binned: bool = True) -> None:
        """Add a batch: min/max, the exact zeros, and every non-zero |x| binned (unless `binned`
        is False: min-max alone needs no bins). Zeros are binned with the rest (they all fall in
        bin 0) and taken back out of it, which costs one count instead of a masked copy."""
        values = np.asarray(values, dtype=np.float32)
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            values = self._finite(values)
            if values.size == 0:
                return
            low, high = float(values.min()), float(values.max())
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)
        zeros = values.size - int(np.count_nonzero(values))
        self.zeros += zeros
        if zeros == values.size:
            return
        if not binned:
            self.unbinned += values.size - zeros
            return
        peak = max(-low, high)  # the largest |x|
        self._cover(canonical_edge(peak))
        factor = np.float32(self.bins / self.edge)  # a power of two: |x| * factor is exact
        clamp = np.float32(peak) * factor >= self.bins  # never, as peak < edge; kept as a guard
        flat = values.reshape(-1)
        floats, indices = _scratch()
        for start in range(0, flat.size, _CHUNK):
            part = flat[start : start + _CHUNK]
            scaled = np.abs(part, out=floats[: part.size])
            np.multiply(scaled, factor, out=scaled)
            index = indices[: part.size]
            np.copyto(index, scaled, casting="unsafe")  # truncation, as astype(np.intp)
            if clamp:
                np.minimum(index, self.bins - 1, out=index)
            self.counts += np.bincount(index, minlength=self.bins)
        self.counts[0] -= zeros

    def _finite(self, values: np.ndarray) -> np.ndarray:
        """The finite values; the infinite ones are counted apart (`infinite`), a NaN is an error.
        Why: a model may compute with infinities on purpose (an additive attention mask of -inf,
        as transformers' RoBERTa and ALBERT build it; T5's log of a zero distance): no grid holds
        them, the range is that of the values a grid can hold, and an int8 -inf saturates to the
        grid's end. A NaN has no such meaning."""
        if np.isnan(values).any():
            raise ValueError("values that are NaN")
        finite = values[np.isfinite(values)]
        self.infinite += values.size - finite.size
        return finite

    def _cover(self, edge: float) -> None:
        """Make the edge at least `edge` (both powers of two)."""
        if self.edge == 0.0:
            self.edge = edge
        elif edge > self.edge:
            self._grow(round(edge / self.edge))

    def merge(self, other: "TensorHistogram") -> None:
        """Add another histogram of the same tensor (another shard of the data): the result is
        the histogram of both shards' values together, whatever the order of merging."""
        if other.bins != self.bins:
            raise ValueError(f"histograms of {self.bins} and {other.bins} bins do not merge")
        counts = other.counts
        if other.edge:
            self._cover(other.edge)
            if other.edge < self.edge:
                counts = _merged_bins(other.counts, self.bins, round(self.edge / other.edge))
        self.counts = self.counts + counts
        self.zeros += other.zeros
        self.unbinned += other.unbinned
        self.infinite += other.infinite
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    def _grow(self, factor: int) -> None:
        """Widen the range by an integer factor (a power of two), merging each `factor` old bins
        into one."""
        self.counts = _merged_bins(self.counts, self.bins, factor)
        self.edge *= factor

    def fraction_above(self, threshold: float) -> float:
        """Share of all values with |x| > threshold (clipped by a range of that amax)."""
        if self.total == 0 or threshold >= self.abs_max:
            return 0.0
        start = int(threshold / self.bin_width) + 1  # the bin holding the threshold counts as kept
        return float(self.counts[start:].sum()) / self.total

    def to_json(self) -> dict:
        return {"bins": self.bins, "edge": self.edge, "zeros": self.zeros, "minimum": self.minimum, "maximum": self.maximum}


def canonical_edge(peak: float) -> float:
    """The smallest power of two above `peak` (strictly: the peak's bin is inside the range)."""
    _, exponent = math.frexp(peak)  # peak = m * 2^exponent with 0.5 <= m < 1
    return math.ldexp(1.0, max(exponent, MIN_EXPONENT))


def _merged_bins(counts: np.ndarray, bins: int, factor: int) -> np.ndarray:
    """Counts re-binned at an edge `factor` times wider: every `factor` bins summed into one (a
    factor beyond the bin count puts every value into the first bin, exactly as well)."""
    if factor >= bins:
        merged = np.array([counts.sum()], np.int64)
    else:
        merged = counts.reshape(-1, factor).sum(axis=1)  # bins and factor are powers of two
    result = np.zeros(bins, np.int64)
    result[: merged.size] = merged
    return result
