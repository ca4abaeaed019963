"""Range methods against hand-made distributions with known answers, and the histogram's
exact re-binning and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from enginekit.calibration import methods
from enginekit.calibration.histogram import DEFAULT_BINS, TensorHistogram
from enginekit.calibration.table import CalibrationTable, TensorRange


def _hist(values: np.ndarray, chunks: int = 10, bins: int = 2048) -> TensorHistogram:
    hist = TensorHistogram(bins)
    for chunk in np.array_split(values.astype(np.float32), chunks):
        hist.update(chunk)
    return hist


@pytest.fixture(scope="module")
def gaussian_with_outlier() -> TensorHistogram:
    values = np.random.default_rng(0).standard_normal(200_000)
    return _hist(np.append(values, 50.0))


def test_minmax_takes_the_outlier(gaussian_with_outlier):
    assert methods.minmax(gaussian_with_outlier) == pytest.approx(50.0)


def test_percentile_ignores_the_outlier_and_matches_numpy(gaussian_with_outlier):
    values = np.append(np.random.default_rng(0).standard_normal(200_000), 50.0)
    for pct in (99.0, 99.9, 99.99):
        expected = np.percentile(np.abs(values), pct)
        assert methods.percentile(gaussian_with_outlier, pct) == pytest.approx(expected, rel=0.02)
    assert methods.percentile(gaussian_with_outlier, 99.99) < 5.0


def test_entropy_clips_the_outlier_near_tensorrt_thresholds(gaussian_with_outlier):
    amax = methods.entropy(gaussian_with_outlier)
    assert 2.5 < amax < 6.0  # a few sigma, far below the outlier at 50


def test_mse_finds_the_uniform_edge():
    values = np.random.default_rng(1).uniform(-3.0, 3.0, 100_000)
    assert methods.mse(_hist(values)) == pytest.approx(3.0, rel=0.02)


def test_entropy_is_not_dragged_down_by_a_zero_spike():
    """A post-ReLU6 tensor: 70 % exact zeros, a long tail, a spike at the clip value 6."""
    rng = np.random.default_rng(2)
    values = np.concatenate([np.zeros(70_000), np.minimum(np.abs(rng.standard_normal(30_000)) * 2.0, 6.0)])
    hist = _hist(values)
    assert hist.zeros == 70_000 and not hist.signed
    assert methods.entropy(hist) > 4.0


@pytest.mark.parametrize("what, values", [
    ("far from zero", np.random.default_rng(4).uniform(5.0, 6.0, 100_000)),
    ("post-sigmoid near 1", 1 / (1 + np.exp(-np.random.default_rng(5).normal(4.0, 1.0, 100_000)))),
    ("signed, one-sided long tail", np.concatenate([np.random.default_rng(6).uniform(-0.375, 0.0, 20_000),
                                                    np.random.default_rng(7).exponential(1.5, 80_000)])),
])
def test_entropy_never_clips_the_bulk_of_a_tensor(what, values):
    hist = _hist(values)
    amax = methods.entropy(hist)
    assert hist.fraction_above(amax) <= methods.OUTLIER_SHARE + 1e-3, what
    assert amax <= hist.abs_max


def _entropy_one_candidate_at_a_time(hist: TensorHistogram) -> float:
    """The KL search as TensorRT describes it, one threshold at a time (what methods.entropy
    computed before it took every candidate at once from prefix sums): the oracle it must match."""
    levels = methods.levels_for(hist)
    counts = hist.counts.astype(np.float64)
    nonzero = np.flatnonzero(counts)
    last = int(nonzero[-1]) + 1 if nonzero.size else 0
    suffix = np.cumsum(counts[::-1])[::-1]
    clips_bulk = np.flatnonzero(suffix > methods.OUTLIER_SHARE * counts.sum())
    first = max(levels, int(clips_bulk[-1]) + 1 if clips_bulk.size else levels)
    if last <= levels or first >= last:
        return hist.abs_max
    best_i, best_kl = last, np.inf
    for i in range(first, last + 1):
        p = counts[:i].copy()
        if i < hist.bins:
            p[i - 1] += suffix[i]
        edges = np.unique(np.linspace(0, i, levels + 1).astype(np.int64))
        present = counts[:i] > 0
        chunk_mass = np.add.reduceat(counts[:i], edges[:-1])
        chunk_bins = np.add.reduceat(present.astype(np.float64), edges[:-1])
        per_bin = np.divide(chunk_mass, chunk_bins, out=np.zeros_like(chunk_mass), where=chunk_bins > 0)
        q = np.repeat(per_bin, np.diff(edges)) * present
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = np.inf if np.any(q[mask] == 0) else float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return min(float(best_i * hist.bin_width), hist.abs_max)


@pytest.mark.parametrize("seed", range(6))
def test_entropy_of_all_candidates_at_once_picks_the_one_at_a_time_threshold(seed):
    rng = np.random.default_rng(seed)
    shapes = [rng.standard_normal(60_000), np.maximum(rng.standard_normal(60_000), 0), rng.standard_t(2, 60_000),
              1 / (1 + np.exp(-3 * rng.standard_normal(60_000))), np.round(rng.standard_normal(60_000) * 4) / 4,
              np.concatenate([rng.exponential(1.0, 60_000), [40.0]])]
    hist = _hist(shapes[seed], chunks=3)
    assert methods.entropy(hist) == _entropy_one_candidate_at_a_time(hist)


def test_methods_differ_on_a_heavy_tail():
    values = np.random.default_rng(3).standard_t(3, 200_000)
    hist = _hist(values)
    amaxes = {m: methods.compute_amax(hist, m) for m in methods.METHODS}
    assert amaxes["minmax"] > amaxes["percentile"] and amaxes["minmax"] > amaxes["entropy"]
    assert len({round(v, 3) for v in amaxes.values()}) == 4


def test_rebinning_is_exact_and_memory_is_bounded():
    hist = TensorHistogram(bins=8)
    hist.update(np.array([0.5, 1.0], np.float32))
    hist.update(np.array([3.0], np.float32))  # grows the range by an integer factor
    assert hist.total == 3 and hist.counts.size == 8
    assert hist.counts.sum() == 3
    big = TensorHistogram()
    rng = np.random.default_rng(4)
    for scale in (1, 10, 100, 1000):
        big.update(rng.standard_normal(10_000) * scale)
    assert big.counts.size == DEFAULT_BINS and big.total == 40_000
    assert big.abs_max == pytest.approx(np.abs(big.minimum) if abs(big.minimum) > big.maximum else big.maximum)


def _same(a: TensorHistogram, b: TensorHistogram) -> bool:
    return (a.edge, a.zeros, a.minimum, a.maximum, a.unbinned) == (b.edge, b.zeros, b.minimum, b.maximum, b.unbinned) \
        and np.array_equal(a.counts, b.counts)


def test_the_histogram_depends_on_the_values_only_not_their_order_or_batches():
    """Power-of-two edges: growing by doubling re-bins exactly as binning at the final edge would,
    so any batching and any order of the same values gives the same histogram."""
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.standard_normal(30_000) * s for s in (0.01, 1.0, 37.0)] + [np.zeros(500), [4.0, -8.0]])
    values = values.astype(np.float32)
    whole = TensorHistogram()
    whole.update(values)
    for seed in range(4):
        shuffled = np.random.default_rng(seed).permutation(values)
        batched = TensorHistogram()
        for chunk in np.array_split(shuffled, 1 + seed * 7):
            batched.update(chunk)
        assert _same(batched, whole)
    assert whole.edge == 256.0 and whole.zeros == 500


def test_shard_histograms_merge_into_the_whole_in_any_order():
    rng = np.random.default_rng(8)
    shards = [rng.standard_t(3, 20_000).astype(np.float32) * scale for scale in (0.5, 3.0, 0.001, 90.0)]
    whole = TensorHistogram()
    for shard in shards:
        whole.update(shard)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        merged = TensorHistogram()
        for index in order:
            part = TensorHistogram()
            part.update(shards[index])
            merged.merge(part)
        assert _same(merged, whole)
        assert {m: methods.compute_amax(merged, m) for m in methods.METHODS} == {m: methods.compute_amax(whole, m) for m in methods.METHODS}
    merged.merge(TensorHistogram())  # an empty shard changes nothing
    assert _same(merged, whole)
    with pytest.raises(ValueError, match="power of two"):
        TensorHistogram(bins=100)


def test_infinities_are_counted_apart_and_a_nan_is_refused():
    """An additive attention mask of -inf (transformers' RoBERTa): the range is that of the finite
    values, the same histogram as without the infinities; a NaN still stops calibration."""
    values = np.random.default_rng(0).normal(0, 2, 10_000).astype(np.float32)
    masked = np.concatenate([values, np.full(50, -np.inf, np.float32), np.full(3, np.inf, np.float32)])
    plain, with_inf = TensorHistogram(), TensorHistogram()
    plain.update(values)
    with_inf.update(masked)
    assert with_inf.infinite == 53 and (with_inf.minimum, with_inf.maximum) == (plain.minimum, plain.maximum)
    assert np.array_equal(with_inf.counts, plain.counts) and with_inf.total == plain.total
    only_inf = TensorHistogram()
    only_inf.update(np.full(8, -np.inf, np.float32))
    assert only_inf.total == 0 and only_inf.infinite == 8
    with pytest.raises(ValueError, match="NaN"):
        TensorHistogram().update(np.array([1.0, np.nan], np.float32))


def test_clipped_fraction(gaussian_with_outlier):
    assert gaussian_with_outlier.fraction_above(50.0) == 0.0
    assert gaussian_with_outlier.fraction_above(3.0) == pytest.approx(0.0027, abs=0.0008)


def test_tensorrt_cache_lines_hold_the_int8_scale(tmp_path):
    import struct

    table = CalibrationTable("entropy", {}, 4, "d", "0" * 64, "1" * 64, {"x": TensorRange(-1.0, 2.54, 2.54, True)})
    lines = table.tensorrt_cache().splitlines()
    assert lines[0].startswith("TRT-") and lines[1].startswith("x: ")
    assert struct.unpack(">f", bytes.fromhex(lines[1].split(": ")[1]))[0] == pytest.approx(2.54 / 127)
    table.save(tmp_path / "t.json")
    assert CalibrationTable.load(tmp_path / "t.json").tensors["x"].amax == 2.54
