import dataclasses
import logging

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphq.errors import GraphqError
from graphq.numerics.weight_only import (
    QuantizedWeight,
    WeightQuantConfig,
    awq_clip_search,
    awq_search,
    gptq_factor,
    gptq_quantize,
    group_params,
    hessian_accumulate,
    pack_codes,
    pack_matmul_nbits,
    packed_uint4,
    pow2_round,
    pow2_split,
    quantize_rtn,
    split_float_zero_points,
    unpack_codes,
)

K, N, M = 256, 64, 512


def _weight(seed=0, k=K, n=N) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)


def _correlated_inputs(seed=1, m=M, k=K) -> np.ndarray:
    """Inputs with a random covariance (and unequal channel scales), like a transformer's activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((m, k)) @ mixing + 0.3 * rng.standard_normal((m, k))
    return (x * rng.uniform(0.5, 2.0, size=k)).astype(np.float32)


def _outlier_inputs(seed=2, m=M, k=K) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((m, k))
    x[:, [3, 50, 100, 200]] *= 30.0
    return x.astype(np.float32)


def _output_error(x, w, w_hat) -> float:
    diff = np.asarray(x, dtype=np.float64) @ (np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64))
    return float(np.mean(diff**2))


def _hessian(x) -> np.ndarray:
    return hessian_accumulate(None, x, 0)[0]


# --- configuration and groups -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, True, 4.0, "4"])
def test_bits_must_be_2_to_8(bits):
    with pytest.raises(GraphqError, match="bits"):
        WeightQuantConfig(bits=bits)


def test_config_validation():
    for bits in range(2, 9):
        assert WeightQuantConfig(bits=bits).qmax == 2**bits - 1
    assert WeightQuantConfig().symmetric_zero_point == 8
    with pytest.raises(GraphqError, match="group size"):
        WeightQuantConfig(group_size=-2)
    with pytest.raises(GraphqError, match="symmetric"):
        WeightQuantConfig(symmetric="yes")
    assert WeightQuantConfig(group_size=0).per_channel and WeightQuantConfig(group_size=-1).per_channel
    with pytest.raises(GraphqError, match="asymmetric"):
        WeightQuantConfig(symmetric=True, float_zero_points=True)
    with pytest.raises(GraphqError, match="float_zero_points"):
        WeightQuantConfig(symmetric=False, float_zero_points=1)
    # codes, a float32 scale per group, and a zero point per group: b bits, or 32 when it is a float
    assert WeightQuantConfig(4, 128, True).bits_per_weight(128) == 4.25
    assert WeightQuantConfig(4, 32, False).bits_per_weight(32) == 5.125
    assert WeightQuantConfig(4, 32, False, float_zero_points=True).bits_per_weight(32) == 6.0


def test_group_size_must_divide_k_unless_padded():
    w = _weight(k=100)
    config = WeightQuantConfig(group_size=32)
    with pytest.raises(GraphqError, match="group size 32 does not divide the input dimension K = 100"):
        quantize_rtn(w, config)
    qw = quantize_rtn(w, config, pad=True)
    assert qw.scales.shape == (4, N) and qw.zero_points.shape == (4, N)
    np.testing.assert_array_equal(qw.group_of_rows(), np.arange(100) // 32)
    # The short last group (rows 96..99) is quantized from its own 4 rows only.
    alone = quantize_rtn(w[96:], WeightQuantConfig(group_size=0))
    np.testing.assert_array_equal(qw.scales[3], alone.scales[0])
    np.testing.assert_array_equal(qw.q[96:], alone.q)
    assert np.abs(qw.dequantize() - w).max() < np.abs(qw.scales).max()


@pytest.mark.parametrize("group_size", [0, -1])
def test_per_channel_is_one_group(group_size):
    w = _weight(k=100)
    qw = quantize_rtn(w, WeightQuantConfig(group_size=group_size))
    assert qw.scales.shape == (1, N)
    np.testing.assert_array_equal(qw.scales, quantize_rtn(w, WeightQuantConfig(group_size=100)).scales)


def test_quantized_weight_checks_shapes():
    qw = quantize_rtn(_weight(), WeightQuantConfig(group_size=32))
    with pytest.raises(ValueError):
        QuantizedWeight(qw.q, qw.scales[:4], qw.zero_points, qw.config)
    with pytest.raises(ValueError):
        QuantizedWeight(qw.q.astype(np.int8), qw.scales, qw.zero_points, qw.config)


# --- round to nearest -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_in_range_and_error_bounded(bits, group_size, symmetric):
    w = _weight()
    w[:, 0] = np.abs(w[:, 0])  # an all-positive column (the asymmetric range still holds 0)
    config = WeightQuantConfig(bits, group_size, symmetric)
    qw = quantize_rtn(w, config)
    assert qw.q.dtype == np.uint8 and qw.q.max() <= 2**bits - 1
    assert qw.scales.dtype == np.float32 and qw.zero_points.dtype == np.uint8
    rows = qw.group_of_rows()
    step = np.abs(qw.scales[rows]).astype(np.float64)
    error = np.abs(qw.dequantize().astype(np.float64) - w)
    if symmetric:
        assert (qw.zero_points == 2 ** (bits - 1)).all()
        # Values on the grid's range are within half a step; only the side opposite the group's
        # extreme can be clipped (by less than one step), and the extreme itself is exact.
        position = w / qw.scales[rows].astype(np.float64) + qw.zero_points[rows]
        inside = (position >= -0.5) & (position <= 2**bits - 0.5)
        assert (error[inside] <= step[inside] * (0.5 + 1e-6)).all()
        assert (error <= step * (1 + 1e-6)).all()
        assert inside.mean() > (0.95 if bits == 2 else 0.99)
        g = qw.group_length
        for n in range(0, N, 7):
            for group in range(qw.scales.shape[0]):
                column = w[group * g:(group + 1) * g, n]
                k = group * g + int(np.argmax(np.abs(column)))
                assert qw.q[k, n] == 0  # the extreme is code 0: -2^(bits-1) steps of a signed scale
                assert error[k, n] <= 1e-6 * abs(w[k, n])
    else:
        assert (error <= step * (0.5 + 1e-6)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("config", [WeightQuantConfig(4, 32, True), WeightQuantConfig(4, 32, False),
                                    WeightQuantConfig(3, 0, False), WeightQuantConfig(4, 32, False, float_zero_points=True)])
def test_rtn_float32_path_is_the_float64_definition(dtype, config):
    """quantize_rtn works in float32 for float16/32 weights; its codes must equal the float64 definition
    (group_params + quantize_with_params) bit for bit, including values whose float32 quotient w / s
    rounds onto a half-integer that the exact quotient is not (only those are redone in float64)."""
    from graphq.numerics.weight_only import quantize_with_params

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((96, 40)) * 0.05).astype(dtype)
    ratios = rng.uniform(0.6, 1.0, (config.n_groups(96, pad=True), 40))
    rows = np.arange(96) // config.group_length(96, pad=True)
    scales, _ = group_params(w, config, pad=True)
    # near-ties: (m + 1/2) s rounded to the weight's dtype; the group extremes are kept, so s stays
    near = ((rng.integers(-3, 3, w.shape) + 0.5) * scales[rows].astype(np.float64)).astype(dtype)
    grouped = w.reshape(-1, config.group_length(96, pad=True), 40)
    extreme = (grouped == grouped.max(axis=1, keepdims=True)) | (grouped == grouped.min(axis=1, keepdims=True))
    w = np.where(extreme.reshape(w.shape) | (rng.random(w.shape) < 0.3), w, near)
    np.testing.assert_array_equal(group_params(w, config, pad=True)[0], scales)
    quotient = w.astype(np.float32) / scales[rows]
    exact = w.astype(np.float64) / scales[rows].astype(np.float64)
    false_ties = (np.abs(quotient - np.rint(quotient)) == 0.5) & (np.abs(exact - np.rint(exact)) != 0.5)
    assert dtype == np.float16 or config.float_zero_points or false_ties.sum() > 10  # the fix-up decides some codes
    for ratio in (1.0, ratios):
        fast = quantize_rtn(w, config, clip_ratio=ratio, pad=True)
        s, z = group_params(w, config, clip_ratio=ratio, pad=True)
        slow = quantize_with_params(w, s, z, config, pad=True)
        np.testing.assert_array_equal(fast.scales, slow.scales)
        np.testing.assert_array_equal(fast.zero_points, slow.zero_points)
        np.testing.assert_array_equal(fast.q, slow.q)
    bad = w.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_rtn(bad, config, pad=True)


def test_symmetric_sign_trick_beats_seven_level_grid():
    w = np.random.default_rng(3).standard_normal((128 * 8, 256))
    qw = quantize_rtn(w, WeightQuantConfig(4, 128, True))
    mse = np.mean((qw.dequantize() - w) ** 2)
    grouped = w.reshape(8, 128, 256)
    step = np.abs(grouped).max(axis=1, keepdims=True) / 7
    mse_seven = np.mean((np.clip(np.rint(grouped / step), -7, 7) * step - grouped) ** 2)
    assert mse < 0.85 * mse_seven


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_has_unit_scale(symmetric):
    w = _weight()
    w[32:64, :] = 0.0
    w[:, 5] = 0.0
    with np.errstate(all="raise"):
        qw = quantize_rtn(w, WeightQuantConfig(4, 32, symmetric))
    assert (qw.scales[1] == 1.0).all() and (qw.scales[:, 5] == 1.0).all()
    deq = qw.dequantize()
    assert np.isfinite(deq).all()
    assert (deq[32:64] == 0).all() and (deq[:, 5] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_clip_ratio(symmetric):
    w = _weight()
    config = WeightQuantConfig(4, 32, symmetric)
    full = quantize_rtn(w, config)
    half = quantize_rtn(w, config, clip_ratio=0.5)
    np.testing.assert_allclose(half.scales, full.scales * 0.5, rtol=1e-6)
    ratios = np.ones((8, N))
    ratios[2, 7] = 0.5
    mixed = quantize_rtn(w, config, clip_ratio=ratios)
    np.testing.assert_allclose(mixed.scales[2, 7], full.scales[2, 7] * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.delete(mixed.scales.reshape(-1), 2 * N + 7),
                                  np.delete(full.scales.reshape(-1), 2 * N + 7))
    assert half.q.min() == 0 and half.q.max() == 15
    with pytest.raises(ValueError):
        quantize_rtn(w, config, clip_ratio=np.ones((3, N)))
    with pytest.raises(ValueError):
        quantize_rtn(w, config, clip_ratio=0.0)


def _affine_groups(seed=11, k=K, n=N, g=32, bits=4) -> np.ndarray:
    """A weight made of llama.cpp Q4_1-style blocks: ``w = d c + m`` per group of ``g`` rows, with codes
    ``c`` in 0..2^bits-1 that reach both ends (as Q4_1's own quantizer makes them)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.002, 0.02, (k // g, 1, n))
    m = rng.uniform(-0.15, 0.05, (k // g, 1, n))
    codes = rng.integers(0, 2**bits, (k // g, g, n))
    codes[:, 0], codes[:, 1] = 0, 2**bits - 1
    return (d * codes + m).reshape(k, n).astype(np.float32)


def test_float_zero_points_keep_affine_groups_exactly():
    """A Q4_1-style weight comes back exactly (float32 rounding only) with float zero points, by RTN
    and by GPTQ (no rounding error to spread); integer zero points cannot hold the offset m."""
    w = _affine_groups()
    fzp = WeightQuantConfig(4, 32, False, float_zero_points=True)
    scale = np.abs(w).max()
    rtn = quantize_rtn(w, fzp)
    assert rtn.zero_points.dtype == np.float32 and rtn.scales.dtype == np.float32
    assert np.abs(rtn.dequantize() - w).max() <= 1e-6 * scale
    h = _hessian(_correlated_inputs())
    for precision in ("float64", "float32"):
        for act_order in (False, True):
            gptq = gptq_quantize(w, h, fzp, act_order=act_order, precision=precision)
            assert np.abs(gptq.dequantize() - w).max() <= 1e-6 * scale
    integer = quantize_rtn(w, WeightQuantConfig(4, 32, False))
    assert np.abs(integer.dequantize() - w).max() > 1e-3 * scale


def test_float16_scales_are_float16_and_cost_nothing_measurable():
    """scale_dtype float16: every scale is a float16 (the codes are taken against it), the accounting is
    b + 16 / G, and the reconstruction error is that of float32 scales to within 0.5 %."""
    w = _weight()
    for config in (WeightQuantConfig(4, 32, True), WeightQuantConfig(4, 32, False), WeightQuantConfig(8, 0, True)):
        half = quantize_rtn(w, dataclasses.replace(config, scale_dtype="float16"))
        full = quantize_rtn(w, config)
        assert half.scales.dtype == np.float32
        np.testing.assert_array_equal(half.scales.astype(np.float16).astype(np.float32), half.scales)
        mse_half, mse_full = (np.mean((q.dequantize() - w).astype(np.float64) ** 2) for q in (half, full))
        assert mse_half == pytest.approx(mse_full, rel=5e-3)
    assert WeightQuantConfig(4, 128, scale_dtype="float16").bits_per_weight(128) == 4.125
    assert WeightQuantConfig(4, 32, False, scale_dtype="float16").bits_per_weight(32) == 4.625
    assert WeightQuantConfig(4, 32, False, float_zero_points=True, scale_dtype="float16").bits_per_weight(32) == 5.0
    with pytest.raises(GraphqError, match="scale_dtype"):
        WeightQuantConfig(scale_dtype="bfloat16")
    with pytest.raises(GraphqError, match="float16's range"):
        quantize_rtn(np.full((32, 2), 1e6, np.float32), WeightQuantConfig(4, 32, scale_dtype="float16"))
    qw = quantize_rtn(w, WeightQuantConfig(4, 32))
    with pytest.raises(ValueError, match="exactly a float16"):
        QuantizedWeight(qw.q, qw.scales * np.float32(1 + 2**-20), qw.zero_points, WeightQuantConfig(4, 32, scale_dtype="float16"))


def _q4_1_weight():
    """``W [K, N]`` made of Q4_1 blocks of 32: ``d q + m`` with float16 ``d`` and ``m``, codes 0 and 15 in every
    block (its range is the lattice's); returns ``(W, d, m, codes)``."""
    rng = np.random.default_rng(5)
    d = rng.uniform(0.002, 0.02, (K // 32, 1, N)).astype(np.float16).astype(np.float64)
    m = rng.uniform(-0.15, 0.05, (K // 32, 1, N)).astype(np.float16).astype(np.float64)
    codes = rng.integers(0, 16, (K // 32, 32, N))
    codes[:, 0], codes[:, 1] = 0, 15
    return (d * codes + m).reshape(K, N).astype(np.float32), d, m, codes


def test_float16_offsets_keep_q4_1_groups_to_a_float16_rounding():
    """Float zero points with float16 storage: what is stored is the offset O = (c - z) s, a float16, and
    W_sym + O reproduces the weight's dequantization. A Q4_1 block (float16 d and m) comes back with its codes
    and to within half a float16 unit of its offset 8 d + m (about the group's centre); so does GPTQ with
    act_order (static groups, the recipes' default; in row order it spreads that rounding into later groups)."""
    w, d, m, codes = _q4_1_weight()
    config = WeightQuantConfig(4, 32, False, float_zero_points=True, scale_dtype="float16")
    offset = (8 * d + m).reshape(K // 32, N)
    budget = np.repeat(np.spacing(np.abs(offset).astype(np.float16)).astype(np.float64), 32, axis=0) / 2 + 1e-7
    for qw in (quantize_rtn(w, config), gptq_quantize(w, _hessian(_correlated_inputs()), config, act_order=True, precision="float32")):
        np.testing.assert_array_equal(qw.q, codes.reshape(K, N))
        assert (np.abs(qw.dequantize() - w) <= budget).all()
        symmetric, offsets = split_float_zero_points(qw)
        np.testing.assert_array_equal(offsets.astype(np.float16).astype(np.float32), offsets)
        np.testing.assert_allclose(symmetric.dequantize() + np.repeat(offsets, 32, axis=0), qw.dequantize(), rtol=0, atol=1e-6)


def test_pow2_split_is_exact_and_minimal():
    """q8-pow2 values: codes times one power of two per column, the smallest exponent that fits the column's
    largest |value| (uint8 codes when no value is negative, int8 in -127..127 otherwise); exact on its own
    output, so the stored float32 values give the codes and exponents back; idempotent on values a hair off."""
    rng = np.random.default_rng(11)
    values = rng.uniform(0.001, 0.3, (9, 7))
    values[:, 3] = 0.0  # an all-zero column: exponent 0
    rounded = pow2_round(values)
    codes, exponents = pow2_split(rounded)
    assert codes.dtype == np.uint8 and exponents.dtype == np.int8 and exponents.shape == (7,)
    np.testing.assert_array_equal(codes * np.exp2(exponents.astype(np.float64)), rounded)
    live = np.arange(7) != 3
    assert (codes.max(axis=0)[live] >= 128).all() and exponents[3] == 0  # minimal: one exponent less would overflow 255
    assert (np.abs(rounded - values) <= np.exp2(exponents.astype(np.float64)) / 2 + 1e-12).all()
    np.testing.assert_array_equal(pow2_round(rounded * (1 + 1e-9)), rounded)  # recomputed values keep their grid
    signed_codes, _ = pow2_split(pow2_round(values - 0.15))
    assert signed_codes.dtype == np.int8 and np.abs(signed_codes.astype(int)).max() <= 127
    with pytest.raises(ValueError, match="power of two"):
        pow2_split(rounded + 1e-7)
    with pytest.raises(ValueError, match="per column"):
        pow2_split(rounded[0])


@pytest.mark.parametrize("config", [WeightQuantConfig(4, 128, True, scale_dtype="q8-pow2"),
                                    WeightQuantConfig(4, 32, False, scale_dtype="q8-pow2"),
                                    WeightQuantConfig(4, 32, False, float_zero_points=True, scale_dtype="q8-pow2")],
                         ids=["g128-sym", "g32-asym", "g32-fzp"])
def test_q8_pow2_scales_cost_under_one_percent_of_the_error(config):
    """scale_dtype q8-pow2 (RTN and GPTQ): every column's scales (and offsets) are on the grid, the
    reconstruction error is within 1 % of float32 scales', the accounting is b + 8 / G (+ zero points) + 8 / K
    per stored quantity; GPTQ without act_order takes static groups (the scales of a column are coded together)."""
    w = _weight()
    full = dataclasses.replace(config, scale_dtype="float32")
    h = _hessian(_correlated_inputs())
    for method, quantize in (("rtn", lambda c: quantize_rtn(w, c)), ("gptq", lambda c: gptq_quantize(w, h, c, act_order=True))):
        coarse, fine = quantize(config), quantize(full)
        pow2_split(coarse.scales)
        if method == "rtn":  # the weight error
            mse = [np.mean((q.dequantize() - w).astype(np.float64) ** 2) for q in (coarse, fine)]
            assert mse[0] == pytest.approx(mse[1], rel=1e-2)
        else:  # what GPTQ minimises: the output error tr(D^T H D)
            out = [np.trace((q.dequantize() - w).T.astype(np.float64) @ h @ (q.dequantize() - w)) for q in (coarse, fine)]
            assert out[0] <= 1.02 * out[1]
            pow2_split(gptq_quantize(w, h, config, act_order=False).scales)  # row order: static groups too
        if config.float_zero_points:
            pow2_split(split_float_zero_points(coarse)[1])
    g = config.group_size
    zero = 0 if config.symmetric else (8 if config.float_zero_points else 4) / g
    exponents = 8 * (2 if config.float_zero_points else 1) / K
    assert config.bits_per_weight(g, K) == pytest.approx(4 + 8 / g + zero + exponents)
    assert config.bits_per_weight(g) == pytest.approx(4 + 8 / g + zero)  # nominal, K unknown


def test_q8_pow2_keeps_q4_1_groups_to_a_step_of_their_column():
    """A Q4_1 block (float16 d and m) with q8-pow2 storage: the codes come back, and each weight to within
    the column's steps of scale and offset (a few tenths of a percent of the range, against 1/30 for RTN)."""
    w, d, m, codes = _q4_1_weight()
    qw = quantize_rtn(w, WeightQuantConfig(4, 32, False, float_zero_points=True, scale_dtype="q8-pow2"))
    same = qw.q == codes.reshape(K, N)
    assert same.mean() > 0.99
    offset = 8 * d + m
    budget = 15 * d.max(axis=(0, 1)) / 255 + np.abs(offset).max(axis=(0, 1)) / 127  # q ds + dO: the column steps
    error = np.abs(qw.dequantize() - w)
    assert (np.where(same, error, 0) <= budget + 1e-7).all()
    rtn = quantize_rtn(w, WeightQuantConfig(4, 128, True, scale_dtype="float16"))
    assert np.sum(error.astype(np.float64) ** 2) < 0.01 * np.sum((rtn.dequantize() - w).astype(np.float64) ** 2)


def test_float_zero_points_rtn_error_and_clipping():
    w = _weight()
    w[:, 0] = np.abs(w[:, 0]) + 0.1  # all positive: the zero point leaves the code range, which is fine
    config = WeightQuantConfig(4, 32, False, float_zero_points=True)
    qw = quantize_rtn(w, config)
    rows = qw.group_of_rows()
    assert (qw.zero_points[:, 0] < 0).all()
    assert (np.abs(qw.dequantize() - w) <= qw.scales[rows] * (0.5 + 1e-5)).all()
    grouped = w.reshape(-1, 32, N)
    np.testing.assert_allclose(qw.scales, (grouped.max(1) - grouped.min(1)) / 15, rtol=1e-6)
    # a clip ratio shrinks the range about its midpoint: the error moves to both ends
    half = quantize_rtn(w, config, clip_ratio=0.5)
    np.testing.assert_allclose(half.scales, qw.scales * 0.5, rtol=1e-6)
    middle = (grouped.max(1) + grouped.min(1)) / 2
    np.testing.assert_allclose((7.5 - half.zero_points) * half.scales, middle, rtol=1e-5, atol=1e-7)
    with np.errstate(all="raise"):  # a constant group: unit scale, exact
        flat = quantize_rtn(np.full((32, 4), 0.25, np.float32), config)
    np.testing.assert_allclose(flat.dequantize(), 0.25, rtol=1e-6)


# --- GPTQ -------------------------------------------------------------------------------------


def test_hessian_accumulate_equals_batch_formula():
    x = _correlated_inputs()
    h, count = None, 0
    for start, stop in ((0, 100), (100, 101), (101, 101), (101, M)):
        h, count = hessian_accumulate(h, x[start:stop], count)
    assert count == M and h.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(h, 2.0 / M * x64.T @ x64, rtol=1e-10, atol=1e-12)
    h3, count3 = hessian_accumulate(None, x.reshape(4, M // 4, K), 0)  # [..., K] batches
    assert count3 == M
    np.testing.assert_allclose(h3, h, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        hessian_accumulate(h, x[:, :10], count)
    inplace, count = None, 0
    for start, stop in ((0, 100), (100, 101), (101, 101), (101, M)):
        before = inplace
        inplace, count = hessian_accumulate(inplace, x[start:stop], count, in_place=True)
        assert before is None or inplace is before  # updated in place: no K x K copies
    np.testing.assert_allclose(inplace, h, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [5, 256, 300, 600])
def test_inverse_cholesky_upper_blocked_in_place(k):
    """The blocked in-place factor equals the definition U^T U = (H_P + lambda I)^-1 (H_P: H in the
    given order, zero diagonal entries set to 1), upper triangular, and leaves H untouched."""
    from graphq.numerics.weight_only import _inverse_cholesky_upper

    x = _correlated_inputs(m=2 * k, k=k).astype(np.float64)
    x[:, 2] = 0.0  # a dead input
    h = _hessian(x)
    order = np.random.default_rng(0).permutation(k)
    kept = h.copy()
    upper = _inverse_cholesky_upper(h, 0.01, order=order)
    np.testing.assert_array_equal(h, kept)
    hp = h[np.ix_(order, order)]
    hp[np.diag_indices(k)] = np.where(np.diag(hp) == 0, 1.0, np.diag(hp))
    damped = hp + 0.01 * np.mean(np.diag(hp)) * np.eye(k)
    np.testing.assert_array_equal(upper, np.triu(upper))
    assert (np.diag(upper) > 0).all()
    np.testing.assert_allclose(upper.T @ upper @ damped, np.eye(k), atol=1e-9)


def _reference_gptq(w, h, config, damp=0.01):
    """A direct transcription of GPTQ in the paper's [out, in] orientation: one column of in at a
    time, every update applied at once, two Cholesky steps, group parameters from the current weights."""
    wt = np.array(w, dtype=np.float64).T.copy()  # [N, K]
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    wt[:, dead] = 0
    h_inv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(len(h)))
    upper = np.linalg.cholesky(h_inv).T
    k = wt.shape[1]
    g = config.group_length(k)
    single = WeightQuantConfig(config.bits, 0, config.symmetric)
    codes = np.zeros((k, wt.shape[0]), dtype=np.uint8)
    for i in range(k):
        if i % g == 0:
            scale, zero = (a[0].astype(np.float64) for a in group_params(wt[:, i:i + g].T, single))
        col = wt[:, i]
        q = np.clip(np.rint(col / scale) + zero, 0, config.qmax)
        codes[i] = q
        err = (col - (q - zero) * scale) / upper[i, i]
        wt[:, i:] -= np.outer(err, upper[i, i:])
    return codes


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_matches_direct_transcription(symmetric):
    w, x = _weight(k=128, n=32), _correlated_inputs(m=256, k=128)
    config = WeightQuantConfig(4, 32, symmetric)
    expected = _reference_gptq(w, _hessian(x), config)
    for block_size in (128, 48, 1):  # lazy batches (also not aligned with the groups) change nothing
        got = gptq_quantize(w, _hessian(x), config, block_size=block_size)
        assert np.mean(got.q != expected) < 1e-3


@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(group_size, act_order, symmetric):
    w, x = _weight(), _correlated_inputs()
    config = WeightQuantConfig(4, group_size, symmetric)
    qw = gptq_quantize(w, _hessian(x), config, act_order=act_order)
    assert qw.q.shape == (K, N) and qw.q.max() <= 15
    rtn = _output_error(x, w, quantize_rtn(w, config).dequantize())
    assert _output_error(x, w, qw.dequantize()) < 0.7 * rtn


def test_gptq_act_order_keeps_groups_contiguous():
    w, x = _weight(), _correlated_inputs()
    config = WeightQuantConfig(4, 32, False)
    qw = gptq_quantize(w, _hessian(x), config, act_order=True)
    # Static groups: parameters from the original weight's contiguous groups of K.
    scales, zeros = group_params(w, config)
    np.testing.assert_array_equal(qw.scales, scales)
    np.testing.assert_array_equal(qw.zero_points, zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_clip_ratios(act_order):
    w, x = _weight(), _outlier_inputs()
    config = WeightQuantConfig(4, 32, True)
    ratios = awq_clip_search(w, None, config, hessian=_hessian(x))
    assert (ratios < 1).any()
    clipped = gptq_quantize(w, _hessian(x), config, act_order=act_order, clip_ratio=ratios)
    if act_order:  # static groups take the clipped range of the original weight
        np.testing.assert_array_equal(clipped.scales, group_params(w, config, clip_ratio=ratios)[0])
    np.testing.assert_array_equal(gptq_quantize(w, _hessian(x), config, act_order=act_order, clip_ratio=1.0).q,
                                  gptq_quantize(w, _hessian(x), config, act_order=act_order).q)
    with pytest.raises(ValueError, match="clip_ratio must be"):
        gptq_quantize(w, _hessian(x), config, clip_ratio=np.ones((3, 3)))
    assert _output_error(x, w, clipped.dequantize()) < _output_error(x, w, quantize_rtn(w, config).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_float32_agrees_with_float64(act_order, symmetric):
    w, x = _weight(), _correlated_inputs()
    h, config = _hessian(x), WeightQuantConfig(4, 32, symmetric)
    f64 = gptq_factor(h, act_order=act_order)
    f32 = gptq_factor(h, act_order=act_order, precision="float32")
    assert f64.upper.dtype == np.float64 and f32.upper.dtype == np.float32
    np.testing.assert_array_equal(f32.order, f64.order)
    assert np.abs(f32.upper - f64.upper).max() <= 1e-4 * np.abs(f64.upper).max()
    ratios = awq_clip_search(w, None, config, hessian=h)
    np.testing.assert_array_equal(awq_clip_search(w, None, config, hessian=h, precision="float32"), ratios)
    q64 = gptq_quantize(w, h, config, act_order=act_order, clip_ratio=ratios, factor=f64)
    q32 = gptq_quantize(w, h, config, act_order=act_order, clip_ratio=ratios, factor=f32)
    # float32 error feedback moves a few codes across a rounding boundary, and nothing else
    assert np.mean(q32.q != q64.q) < 0.01 and np.abs(q32.q.astype(int) - q64.q).max() <= 1
    assert _output_error(x, w, q32.dequantize()) == pytest.approx(_output_error(x, w, q64.dequantize()), rel=0.01)
    np.testing.assert_array_equal(gptq_quantize(w, h, config, act_order=act_order, precision="float32").q,
                                  gptq_quantize(w, h, config, act_order=act_order, factor=f32).q)


def test_gptq_float32_identity_hessian_is_rtn():
    w = _weight()
    config = WeightQuantConfig(4, 32)
    np.testing.assert_array_equal(gptq_quantize(w, np.eye(K), config, precision="float32").q, quantize_rtn(w, config).q)


def test_gptq_precision_must_be_known():
    with pytest.raises(ValueError, match="precision"):
        gptq_factor(np.eye(4), precision="float16")
    with pytest.raises(ValueError, match="precision"):
        awq_clip_search(_weight(), None, WeightQuantConfig(4, 32), hessian=np.eye(K), precision="bfloat16")


def test_gptq_identity_hessian_is_rtn():
    w = _weight()
    config = WeightQuantConfig(4, 32)
    np.testing.assert_array_equal(gptq_quantize(w, np.eye(K), config).q, quantize_rtn(w, config).q)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_singular_hessian(act_order):
    w = _weight()
    x = _correlated_inputs(m=64)  # rank 64 < K
    x[:, [0, 7, 100]] = 0.0  # dead inputs
    with np.errstate(all="raise"):
        qw = gptq_quantize(w, _hessian(x), WeightQuantConfig(4, 32), act_order=act_order)
    deq = qw.dequantize()
    assert np.isfinite(deq).all()
    assert (deq[[0, 7, 100]] == 0).all()
    assert _output_error(x, w, deq) < _output_error(x, w, quantize_rtn(w, WeightQuantConfig(4, 32)).dequantize())


def test_gptq_raises_damping_until_cholesky_succeeds(caplog):
    x = _correlated_inputs()
    h = _hessian(x)
    h -= 0.05 * np.mean(np.diag(h)) * np.eye(K) + 0.5 * np.min(np.linalg.eigvalsh(h)) * np.eye(K)  # indefinite
    assert np.linalg.eigvalsh(h).min() < 0
    with caplog.at_level(logging.WARNING, logger="graphq.numerics.weight_only"):
        qw = gptq_quantize(_weight(), h, WeightQuantConfig(4, 32))
    assert np.isfinite(qw.dequantize()).all()
    assert any("retrying with damp" in record.message for record in caplog.records)


def test_gptq_gives_up_on_hopeless_hessians():
    h = np.eye(K)
    h[0, 1] = h[1, 0] = 1e9
    with pytest.raises(GraphqError, match="not positive definite"):
        gptq_quantize(_weight(), h, WeightQuantConfig(4, 32))
    h = np.eye(K)
    h[3, 3] = np.nan
    with pytest.raises(GraphqError, match="NaN"):
        gptq_quantize(_weight(), h, WeightQuantConfig(4, 32))
    with pytest.raises(GraphqError, match="does not divide"):
        gptq_quantize(_weight(k=100), np.eye(100), WeightQuantConfig(4, 32))
    assert gptq_quantize(_weight(k=100), np.eye(100), WeightQuantConfig(4, 32), pad=True).scales.shape == (4, N)


# --- AWQ --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_scales_beat_unit_scales(group_size, symmetric):
    w, x = _weight(), _outlier_inputs()
    config = WeightQuantConfig(4, group_size, symmetric)
    scales, loss = awq_search(w, np.abs(x).mean(axis=0), x, config)
    assert scales.shape == (K,) and scales.dtype == np.float32 and (scales > 0).all()
    assert scales[[3, 50, 100, 200]].min() > np.median(scales)  # the salient channels are scaled up
    rtn = _output_error(x, w, quantize_rtn(w, config).dequantize())
    assert loss < 0.6 * rtn
    s = scales.astype(np.float64)
    folded = quantize_rtn(w * s[:, None], config).dequantize() / s[:, None]
    np.testing.assert_allclose(_output_error(x, w, folded), loss, rtol=1e-4)
    # A sample with fewer rows than K takes the direct path instead of the Gram matrix.
    _, loss_small = awq_search(w, np.abs(x).mean(axis=0), x[:100], config, grid=5)
    assert loss_small <= _output_error(x[:100], w, quantize_rtn(w, config).dequantize()) * (1 + 1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clip_search_never_worse_than_no_clipping(symmetric):
    w, x = _weight(), _outlier_inputs()
    config = WeightQuantConfig(4, 32, symmetric)
    ratios = awq_clip_search(w, x, config, grid=20, max_shrink=0.5)
    assert ratios.shape == (8, N) and ratios.min() >= 0.5 - 1e-12 and ratios.max() <= 1.0
    assert (ratios < 1).any()
    np.testing.assert_array_equal(awq_clip_search(w, x, config, column_chunk=7), ratios)

    def group_errors(qw):
        diff = (w.astype(np.float64) - qw.dequantize()).reshape(8, 32, N)
        out = np.einsum("mgi,gin->mgn", x.astype(np.float64).reshape(M, 8, 32), diff)
        return np.mean(out**2, axis=0)

    clipped, plain = quantize_rtn(w, config, clip_ratio=ratios), quantize_rtn(w, config)
    assert (group_errors(clipped) <= group_errors(plain) * (1 + 1e-9)).all()
    assert _output_error(x, w, clipped.dequantize()) < _output_error(x, w, plain.dequantize())


# --- MatMulNBits packing, checked against ONNX Runtime -------------------------------------------


def test_pack_layout_low_nibble_first():
    q = np.arange(40, dtype=np.uint8).reshape(20, 2) % 16  # K = 20, N = 2
    packed = packed_uint4(q, 16)
    assert packed.shape == (2, 2, 8) and packed.dtype == np.uint8
    assert packed[1, 0, 0] == q[0, 1] | (q[1, 1] << 4)
    assert packed[0, 1, 1] == q[18, 0] | (q[19, 0] << 4)
    assert (packed[:, 1, 2:] == 0).all()  # K padded to whole blocks with zeros
    for bits in (2, 4, 8):
        codes = np.random.default_rng(bits).integers(0, 2**bits, size=(96, 5)).astype(np.uint8)
        np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits, 32), bits, 96), codes)
    with pytest.raises(GraphqError):
        pack_codes(q, 3, 16)


def test_pack_refuses_unsupported_layouts():
    with pytest.raises(GraphqError, match="power of two"):
        pack_matmul_nbits(quantize_rtn(_weight(k=96), WeightQuantConfig(4, 48)))
    with pytest.raises(GraphqError, match="bits"):
        pack_matmul_nbits(quantize_rtn(_weight(), WeightQuantConfig(3, 32)))
    with pytest.raises(GraphqError, match="2-bit"):
        pack_matmul_nbits(quantize_rtn(_weight(k=576), WeightQuantConfig(2, 0)))


def _run_matmul_nbits(packed: dict, x: np.ndarray, zero_points: np.ndarray | None = None) -> np.ndarray:
    zero_points = packed["zero_points"] if zero_points is None else zero_points
    initializers = [numpy_helper.from_array(packed["B"], "B"), numpy_helper.from_array(packed["scales"], "scales")]
    inputs = ["A", "B", "scales"]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "zero_points"))
        inputs.append("zero_points")
    attributes = {name: packed[name] for name in ("K", "N", "bits", "block_size")}  # accuracy_level unset: float
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attributes)
    graph = helper.make_graph(
        [node], "matmul_nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, packed["K"]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, packed["N"]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    assert not any(a.name == "accuracy_level" for a in node.attribute)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x})[0]


def _assert_matches_dequantized(qw: QuantizedWeight, zero_points: np.ndarray | None = None, seed: int = 5):
    k = qw.q.shape[0]
    x = np.random.default_rng(seed).standard_normal((7, k)).astype(np.float32)
    expected = x.astype(np.float64) @ qw.dequantize().astype(np.float64)
    got = _run_matmul_nbits(pack_matmul_nbits(qw), x, zero_points)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_matches_dequantize(bits, group_size, symmetric):
    qw = quantize_rtn(_weight(), WeightQuantConfig(bits, group_size, symmetric))
    packed = pack_matmul_nbits(qw)
    n_blocks = K // group_size
    assert packed["B"].shape == (N, n_blocks, group_size * bits // 8)
    assert packed["scales"].shape == (N * n_blocks,)
    assert (packed["zero_points"] is None) == symmetric
    if not symmetric:
        assert packed["zero_points"].shape == (N * -(-n_blocks * bits // 8),)
    _assert_matches_dequantized(qw)


@pytest.mark.parametrize("group_size", [32, 128])
def test_matmul_nbits_float_zero_points(group_size):
    """ONNX Runtime's MatMulNBits reads float zero points unpacked, one per block, as (q - z) s."""
    qw = quantize_rtn(_affine_groups(), WeightQuantConfig(4, group_size, False, float_zero_points=True))
    packed = pack_matmul_nbits(qw)
    assert packed["zero_points"].dtype == np.float32 and packed["zero_points"].shape == (N * (K // group_size),)
    _assert_matches_dequantized(qw)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmul_nbits_symmetric_zero_point_convention(bits):
    """Without zero points ORT uses 2^(bits-1); the same value given explicitly agrees, and negative
    (sign-trick) scales are fine."""
    qw = quantize_rtn(_weight(), WeightQuantConfig(bits, 32, True))
    assert (qw.scales < 0).any() and (qw.scales > 0).any()
    _assert_matches_dequantized(qw)
    explicit = QuantizedWeight(qw.q, qw.scales, qw.zero_points, WeightQuantConfig(bits, 32, False))
    _assert_matches_dequantized(qw, zero_points=pack_matmul_nbits(explicit)["zero_points"])


@pytest.mark.parametrize("k, group_size, pad", [(96, 32, False), (96, 64, True), (96, 0, False)])
def test_matmul_nbits_odd_blocks_and_padding(k, group_size, pad):
    """Three blocks (zero points padded per column), a short last block, one padded per-channel block."""
    for symmetric in (True, False):
        _assert_matches_dequantized(quantize_rtn(_weight(k=k), WeightQuantConfig(4, group_size, symmetric), pad=pad))


def test_matmul_nbits_runs_gptq_output():
    w, x = _weight(), _correlated_inputs()
    _assert_matches_dequantized(gptq_quantize(w, _hessian(x), WeightQuantConfig(4, 32, False), act_order=True))


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_from_streamed_hessian_matches_the_sample(symmetric):
    """AWQ needs no kept sample: the streamed GPTQ Hessian gives the same scales, loss and clip ratios."""
    w, x = _weight(), _outlier_inputs()
    config = WeightQuantConfig(4, 32, symmetric)
    hessian, count = None, 0
    for chunk in np.array_split(x, 3):
        hessian, count = hessian_accumulate(hessian, chunk, count)
    abs_mean = np.abs(x).mean(axis=0)
    scales, loss = awq_search(w, abs_mean, x, config, grid=10)
    scales_h, loss_h = awq_search(w, abs_mean, None, config, grid=10, hessian=hessian)
    np.testing.assert_array_equal(scales_h, scales)
    assert loss_h == pytest.approx(loss, rel=1e-9)
    np.testing.assert_array_equal(awq_clip_search(w, None, config, hessian=hessian), awq_clip_search(w, x, config))
    with pytest.raises(ValueError, match="sample x or its Hessian"):
        awq_search(w, abs_mean, None, config)
