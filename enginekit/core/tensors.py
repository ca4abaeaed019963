"""Core vocabulary every stage shares: a tensor's spec (name, shape with symbolic dims, dtype) and
feeds (input name -> array)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: a name, a shape whose symbolic dims are strings, a numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    range: tuple[float, float] | None = None  # the values the input takes (token ids: 0..vocabulary-1)

    @property
    def symbolic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.shape if isinstance(d, str))

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Substitute sizes for symbolic dims; a symbol without a size is an error."""
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as exc:
            raise KeyError(f"no size given for dim {exc.args[0]!r} of {self.name}") from None

    @property
    def batch_axis(self) -> int | None:
        """Where the batch is: the dim named "batch", if the tensor has one."""
        return self.shape.index("batch") if "batch" in self.shape else None

    def to_json(self) -> dict[str, Any]:
        entry = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.range is not None:
            entry["range"] = list(self.range)
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "TensorSpec":
        value_range = entry.get("range")
        return cls(entry["name"], tuple(entry["shape"]), entry.get("dtype", "float32"), tuple(value_range) if value_range else None)



Feeds = dict[str, np.ndarray]


def with_ranges(specs: Sequence[TensorSpec], declared: Iterable[TensorSpec]) -> list[TensorSpec]:
    """`specs` with the value range `declared` gives the input of the same name, where a spec has
    none: an ONNX graph cannot hold a range (token ids 0..vocabulary-1), its source and the export
    manifest do, and data is checked against it."""
    ranges = {spec.name: spec.range for spec in declared if spec.range is not None}
    return [replace(spec, range=ranges[spec.name]) if spec.range is None and spec.name in ranges else spec for spec in specs]


RANDOM_INTEGER_RANGE = (0, 99)  # integers without a declared range


def random_feed_text(spec: TensorSpec) -> str:
    """What `random_feeds` draws for `spec`, in words (for messages)."""
    if spec.dtype == "bool":
        return f"{spec.name} random bools"
    low, high = spec.range or (None, None)
    if np.issubdtype(np.dtype(spec.dtype), np.floating):
        return f"{spec.name} {spec.dtype} uniform {low:g}..{high:g}" if spec.range else f"{spec.name} {spec.dtype} N(0,1)"
    low, high = (int(low), int(high)) if spec.range else RANDOM_INTEGER_RANGE
    return f"{spec.name} {spec.dtype} {low}..{high}"


def random_feeds(inputs: Sequence[TensorSpec], dims: Mapping[str, int], seed: int = 0) -> Feeds:
    """Seeded inputs for sources that bring no data of their own: inside each input's declared
    value range where it has one (token ids inside the vocabulary), else N(0,1) floats and small
    integers."""
    from enginekit.core import limits

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = spec.concrete_shape(dims)
        nbytes = float(np.prod(shape, dtype=np.float64)) * np.dtype(spec.dtype).itemsize
        limits.check_bytes(nbytes, limits.MAX_FEED_BYTES, f"an input '{spec.name}' of shape {list(shape)}", "ENGINEKIT_MAX_FEED_BYTES")
        floating = np.issubdtype(np.dtype(spec.dtype), np.floating)
        if spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif spec.range is not None:
            low, high = spec.range
            values = rng.uniform(low, high, shape) if floating else rng.integers(int(low), int(high) + 1, shape)
            feeds[spec.name] = values.astype(spec.dtype)
        elif floating:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(RANDOM_INTEGER_RANGE[0], RANDOM_INTEGER_RANGE[1] + 1, shape).astype(spec.dtype)
    return feeds


def batch_axes(specs: Sequence[TensorSpec]) -> dict[str, int | None]:
    """Where each tensor's batch is (None: the tensor has no batch, one value serves every batch).
    A model whose batch is fixed (no dim named "batch" anywhere) has it on axis 0."""
    if not any("batch" in spec.shape for spec in specs):
        return {spec.name: 0 if spec.shape else None for spec in specs}
    return {spec.name: spec.batch_axis for spec in specs}


def batch_size(arrays: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> int:
    """Samples in `arrays`: the size of the first batched array along its batch axis."""
    axes = axes or {}
    for name, array in arrays.items():
        axis = axes.get(name, 0)
        if axis is not None and np.ndim(array) > axis:
            return int(np.shape(array)[axis])
    return 1


def take(arrays: Mapping[str, np.ndarray], start: int, stop: int, axes: Mapping[str, int | None] | None = None) -> Feeds:
    """Samples start..stop of every batched array (along its batch axis); unbatched ones as they are."""
    axes = axes or {}
    taken = {}
    for name, array in arrays.items():
        axis = axes.get(name, 0)
        if axis is None:
            taken[name] = array
        else:
            index = [slice(None)] * np.ndim(array)
            index[axis] = slice(start, stop)
            taken[name] = np.asarray(array)[tuple(index)]
    return taken


def pick(batches: Sequence[Mapping[str, np.ndarray]], indices: Sequence[int], axes: Mapping[str, int | None] | None = None) -> Feeds:
    """The samples at `indices` (counted across `batches`, in order) as one batch, in index
    order; unbatched arrays taken from the first batch."""
    axes = axes or {}
    wanted = np.unique(np.asarray(indices, dtype=np.int64))
    parts, start = [], 0
    for batch in batches:
        count = batch_size(batch, axes)
        local = wanted[(wanted >= start) & (wanted < start + count)] - start
        if len(local):
            parts.append({name: array if axes.get(name, 0) is None else np.take(np.asarray(array), local, axis=axes.get(name, 0))
                          for name, array in batch.items()})
        start += count
    if not parts:
        raise ValueError(f"no sample at {list(wanted[:4])}: the batches hold {start}")
    return join(parts, axes)


def join(parts: Sequence[Mapping[str, np.ndarray]], axes: Mapping[str, int | None] | None = None) -> Feeds:
    """Batches joined along their batch axes; unbatched arrays taken from the first part."""
    axes = axes or {}
    return {name: (parts[0][name] if axes.get(name, 0) is None else np.concatenate([p[name] for p in parts], axis=axes.get(name, 0)))
            for name in parts[0]}


class ChannelMeans:
    """Per-channel (axis 1) means of tensors accumulated batch by batch, in float64 without a
    float64 copy of the batch: the FP32 reference of bias correction."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: np.ndarray, axis: int = 1) -> None:
        """Accumulate `value`'s means over every axis but `axis` (the channels: 1, or -1 for the
        features of a MatMul's output)."""
        axis = axis % value.ndim
        axes = tuple(i for i in range(value.ndim) if i != axis)
        self.sums[name] = self.sums.get(name, 0.0) + value.sum(axis=axes, dtype=np.float64)
        self.counts[name] = self.counts.get(name, 0) + value.size // value.shape[axis]

    def merge(self, other: "ChannelMeans") -> None:
        """Add another shard's sums (merged in shard order, so the result does not depend on
        which shard finished first)."""
        for name, total in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]

    def mean(self, name: str) -> np.ndarray:
        return self.sums[name] / self.counts[name]

    def means(self) -> dict[str, np.ndarray]:
        return {name: self.mean(name) for name in self.sums}

