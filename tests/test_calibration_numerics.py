import math
import re

import numpy as np
import pytest

from graphq.errors import GraphqError
from graphq.numerics.calibration import (
    ZERO_TENSOR_RANGE,
    RangeEstimator,
    RunningStats,
    levels,
    range_k_sigma,
    range_minmax,
    range_mse,
    range_percentile,
)

CHANNELS = 24
OUTLIER_CHANNELS = (3, 17)
BINS = 512


def _batches(seed: int = 0, count: int = 60) -> list[np.ndarray]:
    """Heavy-tailed float32 batches [..., C] with varying leading shapes, a few outlier channels and a
    scale that grows over time (so the histogram range has to double several times)."""
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(count):
        leading = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 3))))
        x = rng.standard_t(df=2.5, size=(*leading, CHANNELS)) * (0.01 * 1.15**index)
        x[..., list(OUTLIER_CHANNELS)] *= 40.0
        x += 0.05 * 1.15**index  # a non-zero mean
        batches.append(x.astype(np.float32))
    return batches


def _stream(batches, bins=BINS) -> RunningStats:
    stats = RunningStats(bins)
    for batch in batches:
        stats.update(batch)
    return stats


def _flat(batches) -> np.ndarray:
    return np.concatenate([b.reshape(-1, b.shape[-1]) for b in batches]).astype(np.float64)


def _quantization_mse(data: np.ndarray, clip: float, bits: int) -> float:
    """Mean squared error of symmetric uniform quantization of the raw values, clipped at ``clip``."""
    step = clip / levels(bits)
    restored = np.clip(np.round(data / step), -levels(bits), levels(bits)) * step
    return float(np.mean((data - restored) ** 2))


def test_streaming_equals_one_shot():
    batches = _batches()
    stats = _stream(batches)
    data = _flat(batches)
    assert stats.count == data.size
    assert stats.min == data.min() and stats.max == data.max()
    assert stats.abs_max == np.abs(data).max()
    np.testing.assert_array_equal(stats.channel_abs_max, np.abs(data).max(axis=0))
    assert set(np.argsort(stats.channel_abs_max)[-2:]) == set(OUTLIER_CHANNELS)
    assert stats.mean == pytest.approx(data.mean(), rel=1e-9)
    assert stats.std == pytest.approx(data.std(), rel=1e-9)


def test_std_is_accurate_when_the_mean_dominates():
    rng = np.random.default_rng(1)
    batches = [(1e4 + rng.normal(size=(16, 8))).astype(np.float64) for _ in range(20)]
    stats = _stream(batches)
    data = _flat(batches)
    assert stats.mean == pytest.approx(data.mean(), rel=1e-12)
    assert stats.std == pytest.approx(data.std(), rel=1e-9)


def test_histogram_rebinning_is_exact():
    batches = _batches()
    stats = RunningStats(BINS)
    stats.update(batches[0])
    first_range = stats.hist_range
    for batch in batches[1:]:
        stats.update(batch)
    assert stats.hist_range >= 8 * first_range  # doubled at least three times
    magnitudes = np.abs(_flat(batches))
    assert magnitudes.max() < stats.hist_range
    assert stats.histogram.sum() == stats.count == magnitudes.size
    expected, edges = np.histogram(magnitudes, bins=BINS, range=(0.0, stats.hist_range))
    np.testing.assert_array_equal(stats.histogram, expected)
    np.testing.assert_array_equal(stats.bin_edges, edges)


def test_rebinning_is_exact_for_values_on_bin_edges():
    """Values exactly on edges (and on the old range) land in the bin np.histogram gives them."""
    stats = RunningStats(8)
    first = np.array([[0.0, 0.25, 0.5, 1.0]])  # abs_max 1.0 -> range 2.0 (strictly above)
    second = np.array([[2.0, 3.0, -4.0, 0.5]])  # reaches the range: doubles to 8.0
    third = np.array([[-8.0, 15.75, 1.0, 2.0]])  # reaches 8.0: doubles to 16.0
    for batch in (first, second, third):
        stats.update(batch)
    assert stats.hist_range == 16.0
    magnitudes = np.abs(np.concatenate([first, second, third]))
    expected, _ = np.histogram(magnitudes, bins=8, range=(0.0, 16.0))
    np.testing.assert_array_equal(stats.histogram, expected)


def test_memory_is_fixed():
    batches = _batches(count=40)
    stats = RunningStats(BINS)
    stats.update(batches[0])
    nbytes = stats.nbytes
    for batch in batches[1:]:
        stats.update(batch)
    assert stats.nbytes == nbytes == BINS * 8 + CHANNELS * 8


def test_zero_batches_before_data_and_all_zero_tensors():
    stats = RunningStats(16)
    stats.update(np.zeros((3, 4)))
    assert stats.hist_range is None and stats.histogram[0] == 12
    for estimate in (range_minmax(stats), range_percentile(stats, 99.0), range_mse(stats, 8), range_k_sigma(stats, 3.0)):
        assert estimate == ZERO_TENSOR_RANGE
    stats.update(np.array([[0.0, 0.3, -0.7, 0.0]]))
    expected, _ = np.histogram(np.array([0.0] * 14 + [0.3, 0.7]), bins=16, range=(0.0, 1.0))
    np.testing.assert_array_equal(stats.histogram, expected)
    assert stats.hist_range == 1.0 and stats.channel_abs_max.tolist() == [0.0, 0.3, 0.7, 0.0]


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_within_one_bin(percentile):
    batches = _batches()
    stats = _stream(batches)
    expected = np.percentile(np.abs(_flat(batches)), percentile)
    assert abs(range_percentile(stats, percentile) - expected) <= stats.bin_width
    assert 0 < range_percentile(stats, percentile) <= stats.abs_max


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_matches_brute_force_on_raw_data(bits):
    batches = _batches()
    stats = _stream(batches, bins=2048)
    data = _flat(batches)
    clip = range_mse(stats, bits)
    candidates = np.linspace(0, stats.abs_max, 2001)[1:]
    errors = np.array([_quantization_mse(data, c, bits) for c in candidates])
    best = candidates[int(np.argmin(errors))]
    assert abs(clip - best) <= 3 * stats.bin_width
    assert _quantization_mse(data, clip, bits) <= 1.001 * errors.min()


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_beats_the_other_estimators_on_heavy_tails(bits):
    batches = _batches()
    stats = _stream(batches, bins=2048)
    data = _flat(batches)
    mse = _quantization_mse(data, range_mse(stats, bits), bits)
    for other in (range_minmax(stats), range_percentile(stats, 99.99), range_k_sigma(stats, 5.0)):
        assert mse <= _quantization_mse(data, other, bits)


def test_k_sigma_is_the_formula():
    batches = _batches()
    stats = _stream(batches)
    for k in (1.0, 3.0, 5.0):
        assert range_k_sigma(stats, k) == min(stats.abs_max, abs(stats.mean) + k * stats.std)
    assert range_k_sigma(stats, 1e6) == stats.abs_max


def test_range_estimator_dispatches():
    stats = _stream(_batches())
    assert RangeEstimator().absmax(stats) == range_minmax(stats) == stats.abs_max
    assert RangeEstimator("percentile", percentile=99.9).absmax(stats) == range_percentile(stats, 99.9)
    assert RangeEstimator("mse").absmax(stats, bits=4) == range_mse(stats, 4)
    assert RangeEstimator("k_sigma", k=3.0).absmax(stats) == range_k_sigma(stats, 3.0)
    assert RangeEstimator("percentile", percentile=100).absmax(stats) == pytest.approx(stats.abs_max)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "entropy"}, "unknown range method 'entropy'"),
        ({"percentile": 0.0}, "percentile must be in (0, 100]"),
        ({"percentile": 100.5}, "percentile must be in (0, 100]"),
        ({"k": 0.0}, "k (for k-sigma clipping) must be positive"),
        ({"k": -2.0}, "k (for k-sigma clipping) must be positive"),
        ({"k": math.nan}, "k (for k-sigma clipping) must be positive"),
    ],
)
def test_range_estimator_validation(kwargs, message):
    with pytest.raises(GraphqError, match=re.escape(message)):
        RangeEstimator(**kwargs)


def test_bad_use_is_refused():
    with pytest.raises(GraphqError, match="at least 2 bits"):
        RangeEstimator().absmax(_stream(_batches(count=2)), bits=1)
    with pytest.raises(ValueError, match="even number"):
        RunningStats(7)
    with pytest.raises(ValueError, match="never observed"):
        range_minmax(RunningStats())
    stats = RunningStats()
    stats.update(np.ones((2, 3)))
    with pytest.raises(ValueError, match="channel count changed from 3 to 4"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        stats.update(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="scalar"):
        stats.update(np.float32(1.0))
    stats.update(np.ones((0, 3)))
    assert stats.count == 6
