"""Representative data for calibration and evaluation, streamed in validated batches.

Sources: a zoo model's own split (`--data zoo`), an `.npy` (single-input models; memory-mapped),
an `.npz` keyed by input name, a folder of images preprocessed the way the zoo model expects, or
feeds handed over in Python. Arrays are laid out like the model's inputs, every sample along the
input's batch dim (wherever the model puts it: a recurrent state [2, batch, 128] holds its
samples along axis 1); an input without a batch dim (a scalar sample rate) is one value that
every batch gets. Every batch is checked against the model's inputs (names, dtype kind, fixed
dims) and for NaN/Inf; the samples that pass are hashed so tables record exactly which data made
them. The hash is one digest per sample, then a digest of those in order: it does not depend on
the batch size, and shards of the data (windows of samples, `stream(start=...)`) give digests
that join into the whole stream's.
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
from enginekit.core.tensors import Feeds, TensorSpec, batch_axes, batch_size, join, take
from enginekit.models.spec import ModelSpec, iter_batches

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class DataStats:
    requested: int
    used: int = 0
    skipped_nonfinite: int = 0
    sha256: str = ""
    warnings: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # each input's shape in the first batch
    sample_digests: list[bytes] = field(default_factory=list)  # sha256 of each sample used, in order


def short_data_warning(asked: int, origin: str, available: int) -> str:
    return f"asked for {asked} samples but {origin} has {available}; using {available}"


def joined_digest(sample_digests: Sequence[bytes]) -> str:
    """The data's sha256: of the samples' own digests in order (shards' lists join into it)."""
    return hashlib.sha256(b"".join(sample_digests)).hexdigest()


class DataSource:
    """Where samples come from; `count` is how many exist (None: unknown until read), `batches`
    streams samples start..count-1 (`start` a multiple of the batch size)."""

    description: str
    origin: str

    def count(self) -> int | None:
        raise NotImplementedError

    def batches(self, count: int, batch_size: int, start: int = 0) -> Iterator[Feeds]:
        raise NotImplementedError


class ZooData(DataSource):
    def __init__(self, spec: ModelSpec, split: str, dims: dict[str, int] | None = None):
        self.dataset = spec.dataset()
        self.split, self.dims = split, dims
        self.description = f"{spec.name} {split} split: {self.dataset.description}"
        self.origin = f"zoo:{spec.name}"

    def count(self) -> int:
        return self.dataset.size(self.split)

    def batches(self, count: int, batch_size: int, start: int = 0) -> Iterator[Feeds]:
        skip = start // batch_size  # generated in order from the first sample: a window skips the batches before it
        for index, batch in enumerate(iter_batches(self.dataset, self.split, count, batch_size, self.dims)):
            if index >= skip:
                yield batch


class ArrayFileData(DataSource):
    def __init__(self, path: Path, inputs: Sequence[TensorSpec]):
        from enginekit.core.loaders import load_arrays

        arrays = load_arrays(path)
        unnamed = list(arrays) == ["arr_0"] and [i.name for i in inputs] != ["arr_0"]  # np.savez(file, x) names its one array arr_0
        if path.suffix.lower() == ".npy" or unnamed:
            if len(inputs) != 1:
                what = "an .npz of one unnamed array (arr_0)" if unnamed else "a .npy"
                raise InputError(f"{what} holds one array but the model has inputs {[i.name for i in inputs]}; "
                                 "use an .npz keyed by input name", path)
            arrays = {inputs[0].name: next(iter(arrays.values()))}
        self.arrays, self.origin = arrays, str(path)
        self.axes = {name: axis for name, axis in batch_axes(inputs).items() if name in arrays}
        self.description = f"{path.name}: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in arrays.items())
        lengths = {v.shape[self.axes.get(k, 0)] if v.ndim > self.axes.get(k, 0) else 0
                   for k, v in arrays.items() if self.axes.get(k, 0) is not None}
        if len(lengths) > 1:
            raise InputError(f"arrays have different sample counts {sorted(lengths)} along their batch dims", path)
        self._count = lengths.pop() if lengths else 1

    def count(self) -> int:
        return self._count

    def batches(self, count: int, batch_size: int, start: int = 0) -> Iterator[Feeds]:
        for first in range(start, count, batch_size):
            yield {name: np.asarray(value) for name, value in take(self.arrays, first, min(first + batch_size, count), self.axes).items()}


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

    def batches(self, count: int, batch_size: int, start: int = 0) -> Iterator[Feeds]:
        for first in range(start, count, batch_size):
            yield {self.input_name: np.concatenate([self.preprocess(load_image(p)) for p in self.files[first : min(first + batch_size, count)]])}


class FeedsData(DataSource):
    """Feeds handed over in Python: an iterable of feed dicts, each holding a batch of every input
    (laid out like the model's inputs). A sequence is read again on every pass; a one-shot
    iterator is read lazily, and what was read is kept for later passes (a build reads
    calibration data more than once)."""

    def __init__(self, feeds: Iterable[Mapping[str, Any]], inputs: Sequence[TensorSpec]):
        self.axes = batch_axes(inputs)
        self._kept: list[Feeds] = []
        self._rest: Iterator[Mapping[str, Any]] | None = None
        if isinstance(feeds, Sequence):
            self._kept = [self._check(item, i) for i, item in enumerate(feeds)]
        else:
            self._rest = iter(feeds)
        self.origin = "feeds given in Python"
        self.description = "feeds given in Python"

    def _check(self, item: Any, index: int) -> Feeds:
        if not isinstance(item, Mapping) or not item:
            raise InputError(f"item {index} of the feeds is {type(item).__name__}, not a dict of input name -> array")
        arrays = {str(name): np.asarray(value) for name, value in item.items()}
        sizes = {a.shape[self.axes.get(n, 0)] for n, a in arrays.items() if self.axes.get(n, 0) is not None and a.ndim > self.axes.get(n, 0)}
        if len(sizes) != 1:
            raise InputError(f"item {index} of the feeds must hold one batch (the same number of samples) of every batched input")
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
        return sum(batch_size(f, self.axes) for f in self._kept) if self._rest is None else None

    def batches(self, count: int, size: int, start: int = 0) -> Iterator[Feeds]:
        if start:
            raise InputError("feeds given in Python cannot be split into shards: give a file, an image folder or zoo data")
        pending: list[Feeds] = []
        held = produced = 0
        for item in self._items():
            if produced + held >= count:
                break
            pending.append(item)
            held += batch_size(item, self.axes)
            while held >= size or produced + held >= count:
                take_now = min(size, count - produced)
                merged = join(pending, self.axes)
                yield take(merged, 0, take_now, self.axes)
                rest = take(merged, take_now, held, self.axes)
                produced += take_now
                held -= take_now
                pending = [rest] if held else []
                if produced >= count:
                    return
        if held:
            yield join(pending, self.axes)


DataArg = str | Path | Iterable[Mapping[str, Any]] | None


def _spec_module(spec: ModelSpec):
    import importlib

    return importlib.import_module(spec.architecture.__module__)


def reusable(data: DataArg, inputs: Sequence[TensorSpec]) -> DataArg:
    """`data` as something every pass of a build can read again: a one-shot iterable (a
    generator) becomes one FeedsData, which keeps what it reads; each later `open_data` of a
    generator itself would find it spent ("the data set is empty"). A path, "zoo", a sequence or
    a DataSource is returned as it is."""
    if data is None or isinstance(data, (str, Path, DataSource, Sequence)):
        return data
    return FeedsData(data, inputs)


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
        return FeedsData(data, inputs)
    path = Path(data)
    if not path.exists():
        raise InputError("data not found", path)
    if path.is_dir():
        return ImageFolderData(path, spec)
    return ArrayFileData(path, inputs)


def fixed_batch(inputs: Sequence[TensorSpec]) -> int | None:
    """The batch size a model with a fixed batch dim takes (only that one), else None."""
    axes = batch_axes(inputs)
    fixed = {spec.shape[axes[spec.name]] for spec in inputs if axes[spec.name] is not None}
    size = fixed.pop() if len(fixed) == 1 else None
    return size if isinstance(size, int) else None


def batch_size_for(inputs: Sequence[TensorSpec], wanted: int) -> int:
    """A model with a fixed batch dim can only take batches of exactly that size."""
    return fixed_batch(inputs) or wanted


def stream(
    source: DataSource, inputs: Sequence[TensorSpec], count: int, batch_size_wanted: int, skip_nonfinite: bool = False,
    start: int = 0,
) -> tuple[Iterator[Feeds], DataStats]:
    """Validated batches of at most `count` samples (from sample `start` on, a multiple of the
    batch size: one shard of the data); `stats` is complete once the iterator ends."""
    size = batch_size_for(inputs, batch_size_wanted)
    if fixed_batch(inputs):  # whole batches only: 2 samples for a model fixed at batch 4 did not run (TFLite's range matching)
        count = -(-count // size) * size
    if start % size:
        raise ValueError(f"a window of the data starts at a multiple of the batch size {size}, not {start}")
    available = source.count()
    if available == 0:
        raise InputError("the data set is empty", source.origin)
    stats = DataStats(requested=count)
    if available is not None and available < count:
        stats.warnings.append(short_data_warning(count, source.origin, available))
        count = available
    expected = {spec.name: spec for spec in inputs}
    axes = batch_axes(inputs)

    def generate() -> Iterator[Feeds]:
        index = start
        for batch in source.batches(count, size, start):
            batch = _check_batch(batch, expected, axes, source.origin)
            n = batch_size(batch, axes)
            keep = np.ones(n, bool)
            for name, array in batch.items():
                if not np.issubdtype(array.dtype, np.floating):
                    continue
                axis = axes.get(name)
                per_sample = np.moveaxis(array, axis, 0).reshape(n, -1) if axis is not None else array.reshape(1, -1)
                bad = ~np.isfinite(per_sample).all(axis=1)
                if bad.any() and (axis is None or not skip_nonfinite):
                    first = index + int(np.flatnonzero(bad)[0]) if axis is not None else index
                    what = f"sample {first} of input '{name}'" if axis is not None else f"input '{name}' (one value for every sample)"
                    raise InputError(f"{what} contains NaN or Inf", source.origin, option="skip_nonfinite")  # calibrate can skip them (--skip-nonfinite)
                if axis is not None:
                    keep &= ~bad
            if not keep.all():
                stats.skipped_nonfinite += int((~keep).sum())
                batch = {name: (np.compress(keep, array, axis=axes[name]) if axes.get(name) is not None else array) for name, array in batch.items()}
            index += n
            if batch_size(batch, axes) == 0:
                continue
            if not stats.shapes:
                stats.shapes = {name: list(array.shape) for name, array in batch.items()}
            stats.sample_digests += _sample_digests(batch, axes)
            stats.used += batch_size(batch, axes)
            yield batch
        if stats.used == 0 and not start:  # a window may lie past the end of a short iterator
            raise InputError("no usable samples (every sample had NaN or Inf)" if index else "the data set is empty", source.origin)
        if available is None and index < count:
            stats.warnings.append(f"asked for {count} samples but {source.origin} had {index}; used {index}")
        stats.sha256 = joined_digest(stats.sample_digests)

    return generate(), stats


def _sample_digests(batch: Feeds, axes: Mapping[str, int | None]) -> list[bytes]:
    """One sha256 per sample over its slice of every input (by name); an input without a batch
    axis (one value for every sample) is part of each sample's digest."""
    n = batch_size(batch, axes)
    names = sorted(batch)
    digests = []
    for i in range(n):
        digest = hashlib.sha256()
        for name in names:
            array, axis = batch[name], axes.get(name)
            digest.update(np.ascontiguousarray(array if axis is None else np.take(array, i, axis=axis)).tobytes())
        digests.append(digest.digest())
    return digests


def _check_batch(batch: Feeds, expected: dict[str, TensorSpec], axes: Mapping[str, int | None], origin: str) -> Feeds:
    if set(batch) != set(expected):
        raise InputError(f"data has inputs {sorted(batch)} but the model expects {sorted(expected)}", origin)
    checked: dict[str, Any] = {}
    for name, array in batch.items():
        spec = expected[name]
        want = np.dtype(spec.dtype)
        if array.dtype != want:
            if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu"):
                raise InputError(f"input '{name}' has dtype {array.dtype}, the model expects {want}", origin)
            array = array.astype(want)
        axis = axes.get(name)
        sample = [d for i, d in enumerate(array.shape) if i != axis]
        wanted = [d for i, d in enumerate(spec.shape) if i != axis]
        if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(wanted, sample)):
            shown = "shape" if axis is None else "sample shape"
            raise InputError(f"input '{name}' has {shown} {sample}, the model expects {wanted}", origin)
        if spec.range is not None and want.kind in "iu" and array.size and (array.min() < spec.range[0] or array.max() > spec.range[1]):
            # token ids past the vocabulary: a Gather out of bounds deep in a runtime, named by none of them
            raise InputError(f"input '{name}' has values {array.min()}..{array.max()} outside its declared range "
                             f"{spec.range[0]:g}..{spec.range[1]:g}", origin)
        checked[name] = array
    _check_shared_dims(checked, expected, origin)
    return checked


def _check_shared_dims(batch: Feeds, expected: dict[str, TensorSpec], origin: str) -> None:
    """Inputs that share a symbolic dim (input_ids and attention_mask: batch x sequence) must
    agree on its size; else the model fails inside a Reshape that names no input."""
    seen: dict[str, tuple[str, int]] = {}
    for name, array in batch.items():
        for dim, size in zip(expected[name].shape, array.shape):
            if not isinstance(dim, str) or dim == "?":  # "?": a dim the graph leaves unnamed, tied to no other
                continue
            first = seen.setdefault(dim, (name, size))
            if first[1] != size:
                raise InputError(f"inputs '{first[0]}' and '{name}' disagree on their '{dim}' dim ({first[1]} and {size})", origin)
