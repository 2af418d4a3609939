"""Cube-root companding numerics against the reference formulas (graphq.numerics.companding)."""

import numpy as np
import pytest

from graphq.errors import GraphqError
from graphq.numerics.companding import (
    CubeRootWeight,
    activation_scale,
    codebook,
    compand,
    expand,
    fake_quantize_activation,
    fake_quantize_activation_per_token,
    gptq_cuberoot,
    quantize_cuberoot,
)
from graphq.numerics.weight_only import WeightQuantConfig, awq_clip_search, quantize_rtn

W4 = WeightQuantConfig(bits=4, group_size=128, symmetric=True)


def _data(kind: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return {"gauss": rng.standard_normal, "laplace": lambda s: rng.laplace(size=s),
            "t3": lambda s: rng.standard_t(3, size=s)}[kind](shape)


def test_compand_round_trip_and_shape():
    x = np.array([-27.0, -1.0, -0.001, 0.0, 0.008, 1.0, 8.0, 1e6])
    np.testing.assert_allclose(compand(x), np.sign(x) * np.abs(x) ** (1 / 3), rtol=1e-12)
    np.testing.assert_allclose(expand(compand(x)), x, rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(compand(np.sort(_data("t3", 1000)))) >= 0)  # monotone


def test_codes_scales_and_dequantize_follow_the_formula():
    w = _data("laplace", (300, 24))  # the last group is short: 300 = 2 x 128 + 44
    qw = quantize_cuberoot(w, W4, pad=True)
    assert isinstance(qw, CubeRootWeight) and qw.q.dtype == np.uint8 and qw.q.max() <= 15
    rows = np.arange(300) // 128
    groups = [w[rows == g] for g in range(3)]
    extreme = np.stack([g[np.abs(g).argmax(axis=0), np.arange(24)] for g in groups])
    np.testing.assert_array_equal(qw.scales, (extreme / -512.0).astype(np.float32))
    # w_hat = s (k d)^3 with s = -e (the signed extreme, sign trick), d = 1 / 8, k = q - 8: the seed's form.
    k = qw.q.astype(np.float64) - 8
    reference = -extreme[rows] * (k / 8) ** 3
    np.testing.assert_allclose(qw.dequantize(), reference, rtol=1e-6)
    np.testing.assert_array_equal(qw.dequantize(), (codebook(4)[qw.q] * qw.scales[rows]).astype(np.float32))
    # each group's extreme is reproduced exactly (level -8); every other value lies within half a
    # step of its level in the companded domain, or beyond the top level on the other side (clipped)
    for g in range(3):
        at = np.abs(groups[g]).argmax(axis=0) + 128 * g
        assert np.all(k[at, np.arange(24)] == -8)
        np.testing.assert_allclose(qw.dequantize()[at, np.arange(24)], extreme[g], rtol=1e-6)
    v = compand(w / qw.scales[rows].astype(np.float64))
    assert np.all((np.abs(v - k) <= 0.5 + 1e-9) | ((k == 7) & (v > 7)))


def test_dq_cube_form_matches_codebook_form():
    qw = quantize_cuberoot(_data("gauss", (256, 32)), W4)
    np.testing.assert_allclose(qw.dequantize_cube_form(), qw.dequantize(), rtol=5e-6, atol=1e-9)
    assert qw.levels.dtype == np.int8 and qw.levels.min() >= -8 and qw.levels.max() <= 7


def test_zero_group_and_eight_bits():
    w = np.zeros((128, 4))
    w[:, 1] = _data("gauss", 128)
    qw = quantize_cuberoot(w, WeightQuantConfig(bits=8, group_size=0))
    assert qw.scales[0, 0] == 1.0 and np.all(qw.dequantize()[:, 0] == 0)
    assert np.abs(qw.dequantize()[:, 1] - w[:, 1]).max() < 0.02 * np.abs(w[:, 1]).max()


@pytest.mark.parametrize("kind", ["gauss", "laplace", "t3"])
def test_small_values_get_smaller_errors_than_uniform(kind):
    """The seed's point: companding spends its levels on small values (|w| < 0.5 std)."""
    w = _data(kind, (1024, 64))
    cube, uniform = quantize_cuberoot(w, W4).dequantize(), quantize_rtn(w, W4).dequantize()
    small = np.abs(w) < 0.5 * w.std()
    assert np.mean((cube - w)[small] ** 2) < 0.6 * np.mean((uniform - w)[small] ** 2)


def test_total_error_lower_than_uniform_only_for_heavy_tails():
    """At 4 bits g128 the total MSE of cube-root beats the uniform grid (sign trick) on Student-t(3)
    groups, not on Gaussian ones (coarse steps where most of the mass lies): measured, not assumed."""
    def mse(kind):
        w = _data(kind, (1024, 64))
        return (np.mean((quantize_cuberoot(w, W4).dequantize() - w) ** 2), np.mean((quantize_rtn(w, W4).dequantize() - w) ** 2))

    cube, uniform = mse("t3")
    assert cube < 0.8 * uniform
    cube, uniform = mse("gauss")
    assert cube > 1.5 * uniform


@pytest.mark.parametrize("config, message", [
    (WeightQuantConfig(bits=2, group_size=128), "supports 4 or 8 bits"),
    (WeightQuantConfig(bits=3, group_size=128), "supports 4 or 8 bits"),
    (WeightQuantConfig(bits=4, group_size=128, symmetric=False), "symmetric"),
])
def test_unsupported_settings_are_refused(config, message):
    with pytest.raises(GraphqError, match=message):
        quantize_cuberoot(np.ones((128, 2)), config)


def test_activation_fake_quantization():
    x = _data("t3", (3, 5, 64)).astype(np.float32)
    r = float(np.abs(x).max())
    s = activation_scale(r)
    assert s == pytest.approx(r ** (1 / 3) / 127, rel=1e-6) and activation_scale(0.0) == 1.0
    static = fake_quantize_activation(x, s)
    codes = np.rint(compand(x) / s)
    assert np.abs(codes).max() <= 127
    np.testing.assert_allclose(static, (codes * s) ** 3, rtol=1e-5)
    # per token: each row's extreme is exact; an all-zero row stays zero
    x[0, 0] = 0
    token = fake_quantize_activation_per_token(x)
    assert np.all(token[0, 0] == 0)
    at = np.abs(x).argmax(axis=-1)
    np.testing.assert_allclose(np.take_along_axis(token, at[..., None], -1), np.take_along_axis(x, at[..., None], -1), rtol=1e-5)
    # relative error of small activations is bounded by the companded step
    small = (np.abs(x) > 0) & (np.abs(x) < 0.1)
    assert np.median(np.abs(token - x)[small] / np.abs(x)[small]) < 0.2


def _output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    d = w - w_hat
    return float(np.einsum("kn,kn->", d, hessian @ d))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_the_cuberoot_grid(act_order):
    rng = np.random.default_rng(3)
    k, n = 256, 24
    w = _data("t3", (k, n), seed=4) * 0.05
    x = rng.standard_normal((2048, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k))  # correlated inputs
    hessian = 2 * x.T @ x / x.shape[0]
    config = WeightQuantConfig(bits=4, group_size=64, symmetric=True)

    rtn = quantize_cuberoot(w, config)
    gptq = gptq_cuberoot(w, hessian, config, act_order=act_order)

    # codes on the same grid (levels sigma (q - 8)^3, the same static group scales as RTN when act_order)
    assert isinstance(gptq, CubeRootWeight) and gptq.q.max() <= 15
    np.testing.assert_array_equal(gptq.zero_points, 8)
    if act_order:
        np.testing.assert_array_equal(gptq.scales, rtn.scales)
    np.testing.assert_allclose(gptq.dequantize(), codebook(4)[gptq.q] * np.repeat(gptq.scales, 64, axis=0), rtol=1e-6)
    # the error feedback lowers the layer's output error tr(D^T H D) against RTN on the same grid
    assert _output_error(w, gptq.dequantize(), hessian) < 0.7 * _output_error(w, rtn.dequantize(), hessian)  # measured 0.56


def test_gptq_cuberoot_with_a_diagonal_hessian_is_rtn():
    """With uncorrelated inputs no error is propagated: GPTQ reduces to round to nearest."""
    w = _data("gauss", (128, 8), seed=5)
    hessian = np.diag(np.linspace(0.5, 2.0, 128))
    config = WeightQuantConfig(bits=4, group_size=32, symmetric=True)
    np.testing.assert_array_equal(gptq_cuberoot(w, hessian, config, damp=0.0).q, quantize_cuberoot(w, config).q)


def test_clip_search_on_the_cuberoot_grid_never_hurts():
    rng = np.random.default_rng(6)
    w = _data("gauss", (128, 16), seed=7)
    x = rng.standard_normal((512, 128))
    config = WeightQuantConfig(bits=4, group_size=32, symmetric=True)
    from graphq.numerics.companding import cuberoot_grid

    ratios = awq_clip_search(w, x, config, levels=cuberoot_grid(config))
    assert ratios.shape == (4, 16) and ((ratios > 0.49) & (ratios <= 1.0)).all()
    grid = cuberoot_grid(config)
    grouped = w.reshape(4, 32, 16)
    errors = []
    for r in (np.ones((4, 16)), ratios):
        sigma, zero = grid.params(grouped, r)
        _, deq = grid.round(grouped, sigma[:, None], zero[:, None])
        errors.append(float(((x @ (w - deq.reshape(128, 16))) ** 2).sum()))
    assert errors[1] <= errors[0]
