"""Core vocabulary every stage shares: a tensor's spec (name, shape with symbolic dims, dtype) and
feeds (input name -> array)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: a name, a shape whose symbolic dims are strings, a numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def symbolic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.shape if isinstance(d, str))

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Substitute sizes for symbolic dims; a symbol without a size is an error."""
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as exc:
            raise KeyError(f"no size given for dim {exc.args[0]!r} of {self.name}") from None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "TensorSpec":
        return cls(entry["name"], tuple(entry["shape"]), entry.get("dtype", "float32"))



Feeds = dict[str, np.ndarray]


def random_feeds(inputs: Sequence[TensorSpec], dims: Mapping[str, int], seed: int = 0) -> Feeds:
    """Seeded N(0,1) floats / small integers, for sources that bring no data of their own."""
    from enginekit.core import limits

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = spec.concrete_shape(dims)
        nbytes = float(np.prod(shape, dtype=np.float64)) * np.dtype(spec.dtype).itemsize
        limits.check_bytes(nbytes, limits.MAX_FEED_BYTES, f"an input '{spec.name}' of shape {list(shape)}", "ENGINEKIT_MAX_FEED_BYTES")
        if np.issubdtype(np.dtype(spec.dtype), np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return feeds
