import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graphq.numerics.kv_cache import (MIN_SCALE, cache_bytes_per_token, dequantize_int8, fake_quantize_int8, int8_scale,
                                      quantize_int8)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, (2, 3, 5, 8), elements=st.floats(-1e4, 1e4, width=32)))
def test_per_token_error_is_at_most_half_a_step(x):
    q, s = quantize_int8(x)
    assert q.dtype == np.int8 and s.shape == (2, 3, 5, 1)
    assert np.abs(q.astype(np.int32)).max() <= 127
    assert np.all(np.abs(x - dequantize_int8(q, s)) <= s / 2 * (1 + 1e-5) + 1e-30)


def test_largest_element_of_each_token_maps_to_127_and_zero_rows_stay_zero():
    x = np.random.default_rng(0).normal(size=(1, 2, 4, 16)).astype(np.float32)
    x[0, 1, 2] = 0.0
    q, s = quantize_int8(x)
    assert np.all(np.abs(q[0, 0]).max(axis=-1) == 127)
    assert not q[0, 1, 2].any() and s[0, 1, 2, 0] == MIN_SCALE
    np.testing.assert_array_equal(fake_quantize_int8(x)[0, 1, 2], 0.0)


def test_axis_selects_the_reduced_dimension():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    assert int8_scale(x, axis=-2).shape == (1, 4)
    np.testing.assert_allclose(int8_scale(x, axis=-2)[0], np.abs(x).max(axis=0) / 127)


def test_cache_bytes_per_token():
    # SmolLM2-135M: 3 KV heads of 64 -> (64 + 4) / (4 * 64) = 0.266x float32.
    assert cache_bytes_per_token(3, 64, int8=False) == 768
    assert cache_bytes_per_token(3, 64, int8=True) == 204
