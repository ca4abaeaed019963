"""Parity: does the exported graph compute what its source computes, on real inputs?

Outputs are compared per case (one case per shape, e.g. batch 1 and 4, sequence 8 and 128) by the
largest absolute difference and the cosine similarity of the flattened outputs; the worst case is
what the gate judges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enginekit.core.tensors import Feeds

# Defaults chosen so FP32 exports of the zoo pass with margin (observed max-abs ~1e-5, cosine
# 1 - 1e-9) while a wrong weight, layout or padding fails by orders of magnitude.
DEFAULT_MAX_ABS = 1e-3
DEFAULT_MIN_COSINE = 0.99999


@dataclass
class ParityCase:
    dims: dict[str, int]
    max_abs: float
    cosine: float


@dataclass
class ParityResult:
    reference: str
    cases: list[ParityCase] = field(default_factory=list)
    max_abs_limit: float = DEFAULT_MAX_ABS
    min_cosine: float = DEFAULT_MIN_COSINE
    data: str = ""

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.cases)

    @property
    def cosine(self) -> float:
        return min(c.cosine for c in self.cases)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.max_abs_limit and self.cosine >= self.min_cosine

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "max_abs": self.max_abs,
            "cosine": self.cosine,
            "passed": self.passed,
            "tolerance": {"max_abs": self.max_abs_limit, "min_cosine": self.min_cosine},
            "data": self.data,
            "cases": [{"dims": c.dims, "max_abs": c.max_abs, "cosine": c.cosine} for c in self.cases],
        }

    def summary(self) -> str:
        return f"max_abs {self.max_abs:.3g} (limit {self.max_abs_limit:g}), cosine {self.cosine:.8f} (min {self.min_cosine})"


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norm)


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], negligible: float = 0.0) -> tuple[float, float]:
    """(largest |difference|, smallest cosine) over all outputs; a shape mismatch is infinitely bad.
    An output that lies entirely within `negligible` of zero on both sides (a detector's map on
    random input: every value ~1e-7) has no direction to compare: only its difference counts."""
    worst_abs, worst_cos = 0.0, 1.0
    for ref, got in zip(reference, candidate, strict=True):
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            return float("inf"), 0.0
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max()) if diff.size else 0.0)
        if ref.size and max(float(np.abs(ref).max()), float(np.abs(got).max())) <= negligible:
            continue
        worst_cos = min(worst_cos, cosine_similarity(ref, got))
    if not np.isfinite(worst_abs):
        return float("inf"), 0.0
    return worst_abs, worst_cos


def check_parity(
    reference: Callable[[Feeds], list[np.ndarray]],
    candidate: Callable[[Feeds], list[np.ndarray]],
    cases: Sequence[tuple[Mapping[str, int], Feeds]],
    reference_name: str,
    data: str,
    max_abs: float = DEFAULT_MAX_ABS,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> ParityResult:
    result = ParityResult(reference=reference_name, max_abs_limit=max_abs, min_cosine=min_cosine, data=data)
    for dims, feeds in cases:
        worst_abs, worst_cos = compare_outputs(reference(feeds), candidate(feeds), negligible=max_abs)
        result.cases.append(ParityCase(dict(dims), worst_abs, worst_cos))
    return result
