"""ModelSpec: everything enginekit needs to know about a model besides its weights.

A spec says how to build the network, what goes in and out (with symbolic dims such as "batch"),
where representative data comes from (calibration and evaluation splits) and which metric
decides whether a quantized build is still good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from enginekit.core.tensors import Feeds, TensorSpec

if TYPE_CHECKING:
    import torch

class Dataset(Protocol):
    """Representative data of a model: named splits of ready-to-feed (preprocessed) inputs."""

    description: str

    def size(self, split: str) -> int: ...

    def samples(self, split: str, count: int, dims: Mapping[str, int] | None = None) -> Feeds:
        """The first `count` samples of a split, stacked along the batch axis."""
        ...

    def labels(self, split: str, count: int) -> np.ndarray | None:
        """Ground-truth labels of the same samples, or None when the data has none."""
        ...


def iter_batches(dataset: Dataset, split: str, count: int, batch_size: int, dims: Mapping[str, int] | None = None) -> Iterator[Feeds]:
    """Stream a split in batches; datasets that can generate lazily provide `batches` themselves."""
    own = getattr(dataset, "batches", None)
    if own is not None:
        yield from own(split, count, batch_size, dims)
        return
    feeds = dataset.samples(split, count, dims)
    total = len(next(iter(feeds.values())))
    for start in range(0, total, batch_size):
        yield {name: array[start : start + batch_size] for name, array in feeds.items()}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    architecture: Callable[[], "torch.nn.Module"]
    load_weights: Callable[["torch.nn.Module"], None]
    dataset: Callable[[], Dataset]
    preprocessing: str
    metric: str
    weights_source: str
    # Shapes the export parity check runs at: one dict of symbolic-dim sizes per case.
    parity_dims: tuple[Mapping[str, int], ...] = field(default=({"batch": 1}, {"batch": 4}))
    # Largest size a symbolic dim may take (e.g. the position table bounds a transformer's sequence).
    dim_max: Mapping[str, int] = field(default_factory=dict)
    # Compute ops reading the output of these op types stay float unless the user says otherwise.
    keep_float_after: tuple[str, ...] = ()
    framework: str = "torch"  # or "keras": architecture() returns a keras.Model
    # The architecture's parameter count, declared so listing the zoo imports no framework
    # (a test checks it against parameter_count()).
    parameters: int | None = None

    def build(self) -> Any:
        """The network with its real weights (a torch module in eval mode, or a Keras model)."""
        module = self.architecture()
        self.load_weights(module)
        return module.eval() if self.framework == "torch" else module

    def parameter_count(self) -> int:
        """Counted on the built architecture (imports its framework)."""
        network = self.architecture()
        if self.framework == "keras":
            return int(network.count_params())
        return sum(p.numel() for p in network.parameters())
