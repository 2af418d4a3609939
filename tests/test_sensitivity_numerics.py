"""Numerics of the sensitivity analysis: moments, outlier channels, matched noise, bits, fake quantization."""

import math

import numpy as np
import pytest

from graphq.numerics.sensitivity import (
    PowerSums,
    bits_per_weight,
    fake_quantize,
    matched_noise,
    outlier_channels,
    precision_config,
    tensor_kurtosis,
)
from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn


def _kurtosis(x):
    x = np.asarray(x, dtype=np.float64).ravel()
    d = x - x.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2)


def test_power_sums_stream_equals_direct_moments():
    rng = np.random.default_rng(0)
    batches = [rng.standard_t(4, size=(2, 50, 16)) * 3 + 1000.0 for _ in range(4)]  # large mean: the shift matters
    stats = PowerSums()
    for batch in batches:
        stats.update(batch.astype(np.float32))
    everything = np.concatenate([b.astype(np.float32).astype(np.float64).reshape(-1, 16) for b in batches])
    assert stats.count == everything.size
    assert stats.mean == pytest.approx(everything.mean(), rel=1e-12)
    assert stats.std == pytest.approx(everything.std(), rel=1e-6)
    assert stats.kurtosis == pytest.approx(_kurtosis(everything), rel=1e-5)
    np.testing.assert_array_equal(stats.channel_abs_max, np.abs(everything).max(axis=0))
    assert stats.abs_max == np.abs(everything).max()


def test_kurtosis_of_known_distributions():
    rng = np.random.default_rng(1)
    assert tensor_kurtosis(rng.standard_normal(200_000)) == pytest.approx(3.0, abs=0.05)
    assert tensor_kurtosis(rng.uniform(-1, 1, 200_000)) == pytest.approx(1.8, abs=0.02)
    assert math.isnan(tensor_kurtosis(np.ones(10)))


def test_power_sums_refuse_bad_batches():
    stats = PowerSums()
    stats.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="channel count"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.array([[np.nan, 0, 0, 0]]))


def test_outlier_channels_are_the_few_far_above_the_median():
    ranges = np.ones(64)
    ranges[[5, 40]] = [20.0, 7.0]
    ranges[9] = 5.9  # below 6x the median
    assert outlier_channels(ranges).tolist() == [5, 40]
    assert outlier_channels(ranges, 10).tolist() == [5]
    assert outlier_channels(np.array([0.0, 0.0, 1.0])).tolist() == [2]


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_matched_noise_has_the_error_variance(kind, scope):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    w[:128] *= 10  # one group with a much larger error
    error = quantize_rtn(w, WeightQuantConfig(4, 128)).dequantize() - w
    noise = matched_noise(error, kind, np.random.default_rng(3), scope=scope, group_size=128)
    assert noise.shape == error.shape and noise.dtype == np.float32
    assert np.mean(noise.astype(np.float64) ** 2) == pytest.approx(np.mean(error.astype(np.float64) ** 2), rel=0.05)
    if scope == "group":
        for rows in (slice(0, 128), slice(128, 256)):
            assert np.mean(noise[rows].astype(np.float64) ** 2) == pytest.approx(np.mean(error[rows].astype(np.float64) ** 2), rel=0.05)
    if scope == "tensor":  # one distribution over the whole tensor: its shape shows
        sigma = np.sqrt(np.mean(error.astype(np.float64) ** 2))
        assert tensor_kurtosis(noise) == pytest.approx(3.0 if kind == "gaussian" else 1.8, rel=0.05)
        if kind == "uniform":
            assert np.abs(noise).max() <= math.sqrt(3) * sigma * 1.0001


def test_bits_per_weight_accounting():
    # The int4 precisions: 8-bit scale codes per group plus an int8 exponent per column (8 / K).
    assert bits_per_weight(precision_config("int4"), 576) == 4 + 8 / 128 + 8 / 576
    assert bits_per_weight(precision_config("int8"), 1536) == 8.125  # float16 scales
    assert bits_per_weight(precision_config("float"), 576) == 32
    assert bits_per_weight(precision_config("int4", tied_dim=576), 576) == 4 + 8 / 64 + 8 / 576  # tied head: group 64
    assert bits_per_weight(precision_config("int4-g32-fzp"), 576) == 4.5 + 16 / 576  # 8-bit scale and offset per 32
    assert bits_per_weight(precision_config("int4-g32-asym"), 1536) == 4 + 8 / 32 + 4 / 32 + 8 / 1536
    assert bits_per_weight(WeightQuantConfig(4, 32, symmetric=False, float_zero_points=True, scale_dtype="float16"), 64) == 5.0
    assert bits_per_weight(WeightQuantConfig(4, 32, symmetric=False, float_zero_points=True), 64) == 6.0  # float32 ones
    assert bits_per_weight(WeightQuantConfig(4, 32, symmetric=False, float_zero_points=True), 64) == 6.0  # float32 ones
    assert bits_per_weight(WeightQuantConfig(4, 32, symmetric=False), 64) == 4 + 1 + 4 / 32
    assert bits_per_weight(WeightQuantConfig(4, 0), 64) == 4.5
    with pytest.raises(ValueError, match="unknown precision"):
        precision_config("int3")


def test_fake_quantize_is_rtn_dequantized_in_column_blocks():
    w = np.random.default_rng(4).standard_normal((576, 5000)).astype(np.float32)
    config = precision_config("int4")
    w_hat, scales = fake_quantize(w, config)
    reference = quantize_rtn(w, config, pad=True)
    np.testing.assert_array_equal(w_hat, reference.dequantize())
    np.testing.assert_array_equal(scales, np.abs(reference.scales))
