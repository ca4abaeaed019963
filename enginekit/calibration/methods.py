"""Range methods: each turns a TensorHistogram into the amax (symmetric clipping threshold) of
one tensor. All read the same histogram, so computing every method costs one data pass.

- minmax: the largest |x| seen.
- percentile: the given percentile of |x| (zeros included in the count).
- entropy: TensorRT's KL-divergence calibration: candidate thresholds from `levels` bins up;
  the clipped distribution P (outliers folded into its last bin) is quantized to `levels` levels
  and expanded back to Q; the threshold of least KL(P || Q) wins. Exact zeros are left out of P
  (they quantize exactly), which keeps the ReLU spike at 0 from dragging the threshold down.
  Levels: 128 for signed tensors (int8 grid), 256 for non-negative ones (uint8 grid).
  Candidates that would clip more than OUTLIER_SHARE of the non-zero values are not considered:
  the method exists to saturate outliers, and on a tensor whose values sit far from zero
  (all in [5, 6], post-sigmoid maps near 1) the folded distribution of a tiny threshold is one
  spike that Q reproduces exactly (KL 0), so unguarded it clipped 99.8-100 % of such tensors.
- mse: the threshold minimising the expected squared error of clipping plus rounding.
"""

from __future__ import annotations

import numpy as np

from enginekit.calibration.histogram import TensorHistogram

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99
SIGNED_LEVELS = 128
UNSIGNED_LEVELS = 256
OUTLIER_SHARE = 0.01  # entropy never clips more than this share of the non-zero values


def levels_for(hist: TensorHistogram) -> int:
    return SIGNED_LEVELS if hist.signed else UNSIGNED_LEVELS


def minmax(hist: TensorHistogram) -> float:
    return hist.abs_max


def percentile(hist: TensorHistogram, pct: float = DEFAULT_PERCENTILE) -> float:
    if hist.total == 0 or hist.edge == 0.0:
        return hist.abs_max
    target = pct / 100.0 * hist.total
    if target <= hist.zeros:
        return min(hist.bin_width, hist.abs_max)
    cumulative = np.cumsum(hist.counts) + hist.zeros
    index = int(np.searchsorted(cumulative, target))
    if index >= hist.bins:
        return hist.abs_max
    below = cumulative[index - 1] if index else hist.zeros
    inside = hist.counts[index]
    fraction = (target - below) / inside if inside else 1.0
    return min(float((index + fraction) * hist.bin_width), hist.abs_max)


def entropy(hist: TensorHistogram, levels: int | None = None) -> float:
    levels = levels or levels_for(hist)
    counts = hist.counts.astype(np.float64)
    nonzero_bins = np.flatnonzero(counts)
    if nonzero_bins.size == 0:
        return hist.abs_max
    last = int(nonzero_bins[-1]) + 1  # bins past the largest value cannot be better thresholds
    if last <= levels:
        return hist.abs_max
    suffix = np.append(np.cumsum(counts[::-1])[::-1], 0.0)  # suffix[i] = mass of bins i..end
    clips_bulk = np.flatnonzero(suffix > OUTLIER_SHARE * suffix[0])  # thresholds at bin i clip suffix[i]
    first = max(levels, int(clips_bulk[-1]) + 1 if clips_bulk.size else levels)
    if first >= last:
        return hist.abs_max
    thresholds = np.arange(first, last + 1)
    kl = _kl_after_quantization(counts, suffix, thresholds, levels)
    return min(float(thresholds[int(np.argmin(kl))] * hist.bin_width), hist.abs_max)


def _kl_after_quantization(counts: np.ndarray, suffix: np.ndarray, thresholds: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) of every candidate threshold i at once. P is counts[:i] with the clipped mass
    suffix[i] folded into bin i-1; Q merges counts[:i] into `levels` chunks and spreads each
    chunk's mass evenly over its non-empty bins. Per candidate it needs only chunk sums, which
    prefix sums give (counts are integers: exact in float64), so all candidates cost one
    (candidates x levels) array instead of a Python loop over ~2000 thresholds per tensor.
    With Q's total equal to P's kept mass C: KL = (sum p log p - sum p log q) / P + log(C / P)."""
    mass = np.concatenate(([0.0], np.cumsum(counts)))
    filled = np.concatenate(([0], np.cumsum(counts > 0)))
    p_log_p = np.concatenate(([0.0], np.cumsum(_x_log_x(counts))))
    edges = np.linspace(0, thresholds, levels + 1, axis=1).astype(np.int64)  # the chunks of each candidate
    chunk_mass = np.diff(mass[edges], axis=1)
    chunk_bins = np.diff(filled[edges], axis=1)
    log_per_bin = np.log(np.divide(chunk_mass, chunk_bins, out=np.ones_like(chunk_mass), where=chunk_mass > 0))
    clipped = suffix[thresholds]
    edge_bin = counts[thresholds - 1] + clipped  # bin i-1 of P, outliers folded in
    kept = mass[thresholds]
    total = kept + clipped
    sum_p_log_p = p_log_p[thresholds - 1] + _x_log_x(edge_bin)
    sum_p_log_q = (chunk_mass * log_per_bin).sum(axis=1) + clipped * log_per_bin[:, -1]
    with np.errstate(divide="ignore"):
        kl = (sum_p_log_p - sum_p_log_q) / total + np.log(kept / total)
    # P has mass where Q has none (outliers folded into an empty bin): infinitely bad
    return np.where((counts[thresholds - 1] == 0) & (clipped > 0), np.inf, kl)


def _x_log_x(values: np.ndarray) -> np.ndarray:
    return values * np.log(np.where(values > 0, values, 1.0))


def mse(hist: TensorHistogram, levels: int | None = None, candidates: int = 200) -> float:
    levels = levels or levels_for(hist)
    if hist.total == 0 or hist.edge == 0.0:
        return hist.abs_max
    centers = (np.arange(hist.bins) + 0.5) * hist.bin_width
    thresholds = np.linspace(hist.abs_max / candidates, hist.abs_max, candidates)
    steps = thresholds / (levels - 1)
    clipped = np.maximum(centers[None, :] - thresholds[:, None], 0.0) ** 2
    rounding = np.where(centers[None, :] <= thresholds[:, None], (steps[:, None] ** 2) / 12.0, 0.0)
    errors = ((clipped + rounding) * hist.counts[None, :]).sum(axis=1)
    return float(thresholds[int(np.argmin(errors))])


def compute_amax(hist: TensorHistogram, method: str, pct: float = DEFAULT_PERCENTILE) -> float:
    if method == "minmax":
        return minmax(hist)
    if method == "percentile":
        return percentile(hist, pct)
    if method == "entropy":
        return entropy(hist)
    if method == "mse":
        return mse(hist)
    raise ValueError(f"unknown calibration method {method!r}")
