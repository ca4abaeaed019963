"""Representative data for calibration and evaluation, streamed in validated batches.

Sources: a zoo model's own split (`--data zoo`), an `.npy` (single-input models; memory-mapped),
an `.npz` keyed by input name, or a folder of images preprocessed the way the zoo model expects.
Every batch is checked against the model's inputs (names, dtype kind, fixed dims) and for
NaN/Inf; the bytes that pass are hashed so tables record exactly which data made them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.errors import InputError
from enginekit.core.loaders import load_image
from enginekit.models.spec import ModelSpec, iter_batches
from enginekit.core.tensors import Feeds, TensorSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class DataStats:
    requested: int
    used: int = 0
    skipped_nonfinite: int = 0
    sha256: str = ""
    warnings: list[str] = field(default_factory=list)


class DataSource:
    """Where samples come from; `count` is how many exist (None: unknown until read), `batches`
    streams them."""

    description: str
    origin: str

    def count(self) -> int | None:
        raise NotImplementedError

    def batches(self, count: int, batch_size: int) -> Iterator[Feeds]:
        raise NotImplementedError


class ZooData(DataSource):
    def __init__(self, spec: ModelSpec, split: str, dims: dict[str, int] | None = None):
        self.dataset = spec.dataset()
        self.split, self.dims = split, dims
        self.description = f"{spec.name} {split} split: {self.dataset.description}"
        self.origin = f"zoo:{spec.name}"

    def count(self) -> int:
        return self.dataset.size(self.split)

    def batches(self, count: int, batch_size: int) -> Iterator[Feeds]:
        return iter_batches(self.dataset, self.split, count, batch_size, self.dims)


class ArrayFileData(DataSource):
    def __init__(self, path: Path, inputs: Sequence[TensorSpec]):
        from enginekit.core.loaders import load_arrays

        arrays = load_arrays(path)
        if path.suffix.lower() == ".npy":
            if len(inputs) != 1:
                raise InputError(f"a .npy holds one array but the model has inputs {[i.name for i in inputs]}; use an .npz keyed by input name", path)
            arrays = {inputs[0].name: next(iter(arrays.values()))}
        self.arrays, self.origin = arrays, str(path)
        self.description = f"{path.name}: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in arrays.items())
        lengths = {len(v) if v.ndim else 0 for v in arrays.values()}
        if len(lengths) != 1:
            raise InputError(f"arrays have different sample counts {sorted(lengths)}", path)
        self._count = lengths.pop()

    def count(self) -> int:
        return self._count

    def batches(self, count: int, batch_size: int) -> Iterator[Feeds]:
        for start in range(0, count, batch_size):
            yield {name: np.asarray(array[start : start + batch_size]) for name, array in self.arrays.items()}


class ImageFolderData(DataSource):
    """Images of a folder (sorted by name), preprocessed like the zoo model's own data."""

    def __init__(self, folder: Path, spec: ModelSpec | None):
        preprocess = getattr(_spec_module(spec), "preprocess_image", None) if spec else None
        if preprocess is None:
            raise InputError("an image folder needs a model with known image preprocessing (a zoo image model such as efficientnet_lite0)", folder)
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder", folder)
        self.preprocess, self.input_name = preprocess, spec.inputs[0].name
        self.origin = str(folder)
        self.description = f"{len(self.files)} images in {folder}"

    def count(self) -> int:
        return len(self.files)

    def batches(self, count: int, batch_size: int) -> Iterator[Feeds]:
        for start in range(0, count, batch_size):
            yield {self.input_name: np.concatenate([self.preprocess(load_image(p)) for p in self.files[start : start + batch_size]])}


class FeedsData(DataSource):
    """Feeds handed over in Python: an iterable of feed dicts, each holding a batch (leading axis)
    of every input. A sequence is read again on every pass; a one-shot iterator is read lazily,
    and what was read is kept for later passes (a build reads calibration data more than once)."""

    def __init__(self, feeds: Iterable[Mapping[str, Any]]):
        self._kept: list[Feeds] = []
        self._rest: Iterator[Mapping[str, Any]] | None = None
        if isinstance(feeds, Sequence):
            self._kept = [self._check(item, i) for i, item in enumerate(feeds)]
        else:
            self._rest = iter(feeds)
        self.origin = "feeds given in Python"
        self.description = "feeds given in Python"

    @staticmethod
    def _check(item: Any, index: int) -> Feeds:
        if not isinstance(item, Mapping) or not item:
            raise InputError(f"item {index} of the feeds is {type(item).__name__}, not a dict of input name -> array")
        arrays = {str(name): np.asarray(value) for name, value in item.items()}
        if any(a.ndim == 0 for a in arrays.values()) or len({len(a) for a in arrays.values()}) != 1:
            raise InputError(f"item {index} of the feeds must hold one batch (same leading size) of every input")
        return arrays

    def _items(self) -> Iterator[Feeds]:
        yield from self._kept
        while self._rest is not None:
            item = next(self._rest, None)
            if item is None:
                self._rest = None
                return
            self._kept.append(self._check(item, len(self._kept)))
            yield self._kept[-1]

    def count(self) -> int | None:
        return sum(len(next(iter(f.values()))) for f in self._kept) if self._rest is None else None

    def batches(self, count: int, batch_size: int) -> Iterator[Feeds]:
        pending: list[Feeds] = []
        held = produced = 0
        for item in self._items():
            if produced + held >= count:
                break
            pending.append(item)
            held += len(next(iter(item.values())))
            while held >= batch_size or produced + held >= count:
                take = min(batch_size, count - produced)
                batch = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
                yield {name: array[:take] for name, array in batch.items()}
                rest = {name: array[take:] for name, array in batch.items()}
                produced += take
                held = len(next(iter(rest.values())))
                pending = [rest] if held else []
                if produced >= count:
                    return
        if held:
            yield {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}


DataArg = str | Path | Iterable[Mapping[str, Any]] | None


def _spec_module(spec: ModelSpec):
    import importlib

    return importlib.import_module(spec.architecture.__module__)


def open_data(data: DataArg, inputs: Sequence[TensorSpec], spec: ModelSpec | None, split: str = "calibration") -> DataSource:
    """A path (npy, npz, image folder), "zoo" / None (the zoo model's own split), a DataSource, or
    an iterable of feed dicts."""
    if isinstance(data, DataSource):
        return data
    if data is None or (isinstance(data, str) and data == "zoo"):
        if spec is None:
            raise InputError(f"{split} data is required: this model is not from the zoo, so it has no data of its own",
                             option=f"{split}_data")
        return ZooData(spec, split)
    if not isinstance(data, (str, Path)):
        return FeedsData(data)
    path = Path(data)
    if not path.exists():
        raise InputError("data not found", path)
    if path.is_dir():
        return ImageFolderData(path, spec)
    return ArrayFileData(path, inputs)


def batch_size_for(inputs: Sequence[TensorSpec], wanted: int) -> int:
    """A model with a fixed batch dim can only take batches of exactly that size."""
    first = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return first if isinstance(first, int) else wanted


def stream(
    source: DataSource, inputs: Sequence[TensorSpec], count: int, batch_size: int, skip_nonfinite: bool = False,
) -> tuple[Iterator[Feeds], DataStats]:
    """Validated batches of at most `count` samples; `stats` is complete once the iterator ends."""
    batch_size = batch_size_for(inputs, batch_size)
    available = source.count()
    if available == 0:
        raise InputError("the data set is empty", source.origin)
    stats = DataStats(requested=count)
    if available is not None and available < count:
        stats.warnings.append(f"asked for {count} samples but {source.origin} has {available}; using {available}")
        count = available
    expected = {spec.name: spec for spec in inputs}

    def generate() -> Iterator[Feeds]:
        digest = hashlib.sha256()
        index = 0
        for batch in source.batches(count, batch_size):
            batch = _check_batch(batch, expected, source.origin)
            n = len(next(iter(batch.values())))
            keep = np.ones(n, bool)
            for name, array in batch.items():
                if np.issubdtype(array.dtype, np.floating):
                    bad = ~np.isfinite(array.reshape(n, -1)).all(axis=1)
                    if bad.any() and not skip_nonfinite:
                        first = index + int(np.flatnonzero(bad)[0])
                        raise InputError(f"sample {first} of input '{name}' contains NaN or Inf (such samples can be skipped)", source.origin, option="skip_nonfinite")
                    keep &= ~bad
            if not keep.all():
                stats.skipped_nonfinite += int((~keep).sum())
                batch = {name: array[keep] for name, array in batch.items()}
            index += n
            if len(next(iter(batch.values()))) == 0:
                continue
            for name in sorted(batch):
                digest.update(np.ascontiguousarray(batch[name]).tobytes())
            stats.used += len(next(iter(batch.values())))
            yield batch
        if stats.used == 0:
            raise InputError("no usable samples (every sample had NaN or Inf)" if index else "the data set is empty", source.origin)
        if available is None and index < count:
            stats.warnings.append(f"asked for {count} samples but {source.origin} had {index}; used {index}")
        stats.sha256 = digest.hexdigest()

    return generate(), stats


def _check_batch(batch: Feeds, expected: dict[str, TensorSpec], origin: str) -> Feeds:
    if set(batch) != set(expected):
        raise InputError(f"data has inputs {sorted(batch)} but the model expects {sorted(expected)}", origin)
    checked: dict[str, Any] = {}
    for name, array in batch.items():
        spec = expected[name]
        want = np.dtype(spec.dtype)
        if array.dtype != want:
            if array.dtype.kind != want.kind:
                raise InputError(f"input '{name}' has dtype {array.dtype}, the model expects {want}", origin)
            array = array.astype(want)
        if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape[1:], array.shape[1:])):
            raise InputError(f"input '{name}' has sample shape {list(array.shape[1:])}, the model expects {list(spec.shape[1:])}", origin)
        checked[name] = array
    return checked
