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

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from enginekit.errors import GateError, InputError
from enginekit.models.spec import Feeds

_COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_CONDITION = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|==|>|<)\s*(-?[0-9.eE+-]+)\s*$")


def evaluate(reference: Callable[[Feeds], list[np.ndarray]], candidate: Callable[[Feeds], list[np.ndarray]],
             batches: Iterable[Feeds], labels: np.ndarray | None = None) -> dict[str, float]:
    ref_parts, got_parts = [], []
    for feeds in batches:
        ref_parts.append(np.asarray(reference(feeds)[0], np.float64))
        got_parts.append(np.asarray(candidate(feeds)[0], np.float64))
    return output_metrics(np.concatenate(ref_parts), np.concatenate(got_parts), labels)


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


@dataclass(frozen=True)
class Condition:
    metric: str
    comparison: str
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        return self.metric in metrics and _COMPARISONS[self.comparison](metrics[self.metric], self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.value:g}"


def parse_conditions(text: str | None) -> list[Condition]:
    """`"top1_agreement>=0.90, cosine>=0.99"` -> conditions; an unknown form is an InputError."""
    if not text:
        return []
    conditions = []
    for part in text.split(","):
        match = _CONDITION.match(part)
        if not match:
            raise InputError(f"--min-accuracy: cannot read '{part.strip()}' (expected e.g. top1_agreement>=0.90)")
        conditions.append(Condition(match.group(1), match.group(2), float(match.group(3))))
    return conditions


def gate(metrics: dict[str, float], conditions: list[Condition], what: str) -> dict[str, object]:
    """Raise GateError (exit 1) when outputs are non-finite or a condition fails; else the verdict."""
    if not metrics.get("finite", 1.0):
        raise GateError("accuracy gate failed: the quantized model produced NaN or Inf", what)
    for condition in conditions:
        if condition.metric not in metrics:
            raise InputError(f"--min-accuracy names '{condition.metric}', which this model does not report (it has {', '.join(sorted(metrics))})")
    failed = [c for c in conditions if not c.holds(metrics)]
    if failed:
        shown = ", ".join(f"{c.metric}={metrics[c.metric]:.4f} (needs {c.comparison}{c.value:g})" for c in failed)
        raise GateError(f"accuracy gate failed: {shown}", what)
    return {"conditions": [str(c) for c in conditions], "passed": True}
