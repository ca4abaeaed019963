"""The accuracy gate: a quantized build is compared with the FP32 reference on held-out data.

Metrics (all computed on the same evaluation samples):
- top1_agreement: share of samples whose arg-max class matches FP32's (classifiers)
- top5_overlap: mean |top-5(FP32) & top-5(INT8)| / 5 (classifiers with >= 5 classes)
- cosine: mean cosine similarity of the output vectors; cosine_min: the worst sample
- sqnr_db: 10 log10(sum ref^2 / sum (ref - int8)^2) over all outputs
- accuracy / fp32_accuracy: task accuracy against labels, where the data has labels
NaN or Inf in an output fails the gate whatever the thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from enginekit.core.errors import InputError
from enginekit.core.tensors import Feeds



def collect_outputs(run: Callable[[Feeds], Mapping[str, np.ndarray]], batches: Iterable[Feeds],
                    max_batch: int | None = None) -> dict[str, np.ndarray]:
    """Every output of `run` over the batches, concatenated along the batch axis, by name; batches
    larger than `max_batch` (what a runtime's profile allows) are fed in slices."""
    parts: dict[str, list[np.ndarray]] = {}
    for feeds in batches:
        size = len(next(iter(feeds.values())))
        step = max_batch or size
        for start in range(0, size, step):
            piece = feeds if step >= size else {name: value[start:start + step] for name, value in feeds.items()}
            for name, value in run(piece).items():
                parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def aligned(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, reference, candidate) per reference output: matched by name, else by position (a
    runtime that renames outputs keeps their order)."""
    if all(name in candidate for name in reference):
        return [(name, reference[name], candidate[name]) for name in reference]
    if len(candidate) != len(reference):
        raise InputError(f"the artifact has outputs {sorted(candidate)}, the FP32 model {sorted(reference)}")
    return [(name, ref, got) for (name, ref), got in zip(reference.items(), candidate.values())]


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    labels: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of the candidate's outputs against the reference's (the first output decides)."""
    name, ref, got = aligned(reference, candidate)[0]
    return output_metrics(np.asarray(ref, np.float64), np.asarray(got, np.float64), labels)


def output_metrics(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    metrics: dict[str, float] = {"samples": float(len(ref2)), "finite": float(np.isfinite(got2).all())}
    if not np.isfinite(got2).all():
        return metrics
    norms = np.linalg.norm(ref2, axis=1) * np.linalg.norm(got2, axis=1)
    cosines = np.where(norms > 0, np.sum(ref2 * got2, axis=1) / np.where(norms > 0, norms, 1), 1.0)
    noise = np.sum((ref2 - got2) ** 2)
    metrics["cosine"] = float(cosines.mean())
    metrics["cosine_min"] = float(cosines.min())
    metrics["sqnr_db"] = float(10 * np.log10(np.sum(ref2**2) / noise)) if noise > 0 else float("inf")
    if ref2.shape[1] >= 2:
        metrics["top1_agreement"] = float(np.mean(ref2.argmax(1) == got2.argmax(1)))
    if ref2.shape[1] >= 5:
        top_ref = np.argsort(-ref2, axis=1)[:, :5]
        top_got = np.argsort(-got2, axis=1)[:, :5]
        metrics["top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_ref, top_got)]))
    if labels is not None:
        metrics["accuracy"] = float(np.mean(got2.argmax(1) == labels[: len(got2)]))
        metrics["fp32_accuracy"] = float(np.mean(ref2.argmax(1) == labels[: len(ref2)]))
    return metrics
