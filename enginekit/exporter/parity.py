"""Parity: does the exported graph compute what its source computes, on real inputs?

Outputs are compared per case (one case per shape, e.g. batch 1 and 4, sequence 8 and 128) by the
largest absolute difference and the cosine similarity of the flattened outputs; the worst case is
what the gate judges. The difference an output may show grows with its scale (`atol + rtol x its
largest magnitude`, as `numpy.allclose` but against the output's largest value, not each element's):
float32 rounding is relative, so a detector's boxes in pixels or a re-initialised LeViT's logits
(up to ~629) differ by 1e-2 with cosine 1.00000000, where logits of a few units differ by 1e-5.
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
DEFAULT_RTOL = 1e-4  # of each output's largest magnitude: 100x float32 rounding over a deep graph
DEFAULT_MIN_COSINE = 0.99999


@dataclass
class ParityCase:
    dims: dict[str, int]
    max_abs: float
    cosine: float
    of_limit: float = 0.0  # the worst output's |difference| over the limit its scale allows (<= 1 passes)


@dataclass
class ParityResult:
    reference: str
    cases: list[ParityCase] = field(default_factory=list)
    max_abs_limit: float = DEFAULT_MAX_ABS
    min_cosine: float = DEFAULT_MIN_COSINE
    data: str = ""
    rtol: float = DEFAULT_RTOL

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.cases)

    @property
    def cosine(self) -> float:
        return min(c.cosine for c in self.cases)

    @property
    def passed(self) -> bool:
        return max(c.of_limit for c in self.cases) <= 1.0 and self.cosine >= self.min_cosine

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "max_abs": self.max_abs,
            "cosine": self.cosine,
            "passed": self.passed,
            "tolerance": {"max_abs": self.max_abs_limit, "rtol": self.rtol, "min_cosine": self.min_cosine},
            "data": self.data,
            "cases": [{"dims": c.dims, "max_abs": c.max_abs, "cosine": c.cosine, "of_limit": c.of_limit} for c in self.cases],
        }

    def summary(self) -> str:
        worst = max(self.cases, key=lambda c: c.of_limit)
        return (f"max_abs {self.max_abs:.3g} ({worst.of_limit:.3g}x the limit {self.max_abs_limit:g} + {self.rtol:g} x the output's "
                f"largest magnitude), cosine {self.cosine:.8f} (min {self.min_cosine})")


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norm)


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], negligible: float = 0.0,
                    rtol: float = 0.0) -> tuple[float, float, float]:
    """(largest |difference|, smallest cosine, largest |difference| / (negligible + rtol x the
    output's largest reference magnitude)) over all outputs; a shape mismatch is infinitely bad.
    An output that lies entirely within `negligible` of zero on both sides (a detector's map on
    random input: every value ~1e-7) has no direction to compare: only its difference counts."""
    worst_abs, worst_cos, worst_of_limit = 0.0, 1.0, 0.0
    for ref, got in zip(reference, candidate, strict=True):
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            return float("inf"), 0.0, float("inf")
        if not ref.size:
            continue
        reference64 = ref.astype(np.float64)
        diff = float(np.abs(reference64 - got.astype(np.float64)).max())
        if not np.isfinite(diff):  # NaN or Inf on either side: max() and cosine would skip a NaN
            return float("inf"), 0.0, float("inf")
        scale = float(np.abs(reference64).max())
        worst_abs = max(worst_abs, diff)
        allowed = negligible + rtol * scale
        worst_of_limit = max(worst_of_limit, diff / allowed if allowed > 0 else (0.0 if diff == 0 else float("inf")))
        if max(scale, float(np.abs(got).max())) <= negligible:
            continue
        worst_cos = min(worst_cos, cosine_similarity(ref, got))
    return worst_abs, worst_cos, worst_of_limit


def check_parity(
    reference: Callable[[Feeds], list[np.ndarray]],
    candidate: Callable[[Feeds], list[np.ndarray]],
    cases: Sequence[tuple[Mapping[str, int], Feeds]],
    reference_name: str,
    data: str,
    max_abs: float = DEFAULT_MAX_ABS,
    min_cosine: float = DEFAULT_MIN_COSINE,
    rtol: float = DEFAULT_RTOL,
) -> ParityResult:
    result = ParityResult(reference=reference_name, max_abs_limit=max_abs, min_cosine=min_cosine, data=data, rtol=rtol)
    for dims, feeds in cases:
        worst_abs, worst_cos, of_limit = compare_outputs(reference(feeds), candidate(feeds), negligible=max_abs, rtol=rtol)
        result.cases.append(ParityCase(dict(dims), worst_abs, worst_cos, of_limit))
    return result
