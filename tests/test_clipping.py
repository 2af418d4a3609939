"""k-sigma clipping: weights per column (fixed and searched k), activations (searched k on the histogram)."""

import math

import numpy as np
import pytest
from conftest import run_model
from test_qdq_insert import W as QDQ_W
from test_qdq_insert import X as QDQ_X
from test_qdq_insert import _matmul_model, _softmax

from graphq.cli import main
from graphq.errors import GraphqError
from graphq.numerics.calibration import (
    RangeEstimator,
    RunningStats,
    histogram_mse,
    range_k_sigma,
    range_k_sigma_search,
)
from graphq.numerics.clipping import (
    WeightClip,
    clipped_quantization_error,
    column_k_sigma_ranges,
    search_k_sigma,
)
from graphq.numerics.quantize import fake_quantize, symmetric_scale
from graphq.passes.qdq_insert import QdqConfig, QdqInsertionPass

RNG = np.random.default_rng(2)
WEIGHT = RNG.standard_t(df=3, size=(256, 12)).astype(np.float32) * 0.02
WEIGHT[5, 3] = 1.0  # one large weight in column 3


def test_column_k_sigma_ranges_follow_the_formula():
    w = WEIGHT.astype(np.float64)
    for k in (3.0, 5.0, 10.0):
        expected = np.minimum(np.abs(w).max(0), np.abs(w.mean(0)) + k * w.std(0))
        np.testing.assert_allclose(column_k_sigma_ranges(WEIGHT, k), expected, rtol=1e-12)
    assert column_k_sigma_ranges(WEIGHT, 3.0)[3] < 0.5  # the outlier column is clipped hard
    ranges, k = WeightClip().column_ranges(WEIGHT)
    assert k is None and np.array_equal(ranges, np.abs(w).max(0))


def test_searched_k_minimises_the_quantization_error():
    grid = (3.0, 5.0, 10.0, 20.0)
    heavy = np.random.default_rng(3).standard_t(df=3, size=(2048, 8)).astype(np.float32)
    for weight, bits in ((WEIGHT, 8), (heavy, 8), (heavy, 4)):
        k, ranges = search_k_sigma(weight, grid, bits)
        errors = {g: clipped_quantization_error(weight, column_k_sigma_ranges(weight, g), bits) for g in grid}
        errors[math.inf] = clipped_quantization_error(weight, np.abs(weight).max(0), bits)  # no clipping is a candidate
        assert errors[k] == min(errors.values())
        manual = np.square(weight - fake_quantize(weight, symmetric_scale(ranges, bits)[None, :], bits)).sum()
        assert clipped_quantization_error(weight, ranges, bits) == pytest.approx(manual, rel=1e-6)
    # The planted outlier costs more clipped than kept at 8 bits; at 4 bits clipping a t(3) weight wins.
    assert search_k_sigma(WEIGHT, grid)[0] == math.inf
    assert search_k_sigma(heavy, grid, 4)[0] < math.inf


def test_histogram_mse_matches_the_empirical_error():
    x = RNG.standard_t(df=4, size=(64, 2048)).astype(np.float32)
    stats = RunningStats(4096)
    stats.update(x)
    magnitude = np.abs(x).astype(np.float64)
    for clip in (2.0, 5.0, float(magnitude.max())):
        step = clip / 127
        empirical = np.mean(np.square(magnitude - step * np.minimum(np.rint(magnitude / step), 127)))
        assert histogram_mse(stats, clip, 8) == pytest.approx(empirical, rel=0.05)
    grid = (2.0, 3.0, 5.0, 10.0)
    best = range_k_sigma_search(stats, grid, 8)
    candidates = [range_k_sigma(stats, k) for k in grid] + [stats.abs_max]
    assert best in candidates
    assert histogram_mse(stats, best, 8) == min(histogram_mse(stats, c, 8) for c in candidates)
    assert RangeEstimator(method="k_sigma_search", k_grid=grid).absmax(stats) == best


@pytest.mark.parametrize("make", [
    lambda: WeightClip(method="k_sigma", k=0.0),
    lambda: WeightClip(method="k_sigma", k=-3.0),
    lambda: WeightClip(method="k_sigma_search", k_grid=(3.0, 0.0)),
    lambda: WeightClip(method="k_sigma_search", k_grid=()),
    lambda: WeightClip(method="sometimes"),
    lambda: RangeEstimator(method="k_sigma", k=0.0),
    lambda: RangeEstimator(method="k_sigma_search", k_grid=(-1.0,)),
])
def test_bad_k_is_refused(make):
    with pytest.raises(GraphqError):
        make()


def test_cli_bad_k_writes_nothing(tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "out" / "model.onnx"
    code = main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "w8a8-static", "--weight-clip", "k_sigma",
                 "--k", "0"])
    assert code == 1
    assert "must be positive" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_qdq_with_clipped_weights_matches_reference(tmp_path):
    ranges = column_k_sigma_ranges(QDQ_W, 2.0)
    assert (ranges < np.abs(QDQ_W).max(0)).any()
    x_range = float(np.abs(QDQ_X).max())
    result = QdqInsertionPass({"proj": "int8"}, QdqConfig("static"), activation_abs_max={"x": x_range},
                              weight_abs_max={"proj": ranges})(_matmul_model())
    wq = result.model.graph.initializers["proj.weight_int8"].const_value.numpy()
    clipped = np.abs(QDQ_W) > ranges[None, :]
    assert clipped.any() and np.all(np.abs(wq[clipped]) == 127)  # weights beyond the clip saturate
    scales = symmetric_scale(ranges)
    expected = fake_quantize(QDQ_X, symmetric_scale(x_range)) @ fake_quantize(QDQ_W, scales[None, :])
    (actual,) = run_model(result.model, {"x": QDQ_X}, tmp_path)
    np.testing.assert_allclose(actual, _softmax(expected), rtol=1e-5, atol=1e-6)
