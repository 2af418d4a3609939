"""Dynamic int8 quantization along one axis: the KV cache and the attention matmul inputs.

For a tensor ``x`` and a reduction axis ``a`` (the last axis for a cached key/value row
``[batch, kv_heads, tokens, head_dim]``: one scale per token per head), symmetric int8 with
zero point 0:

    s = max(max_a |x| / 127, s_min)          (one scale per slice along a; s_min guards all-zero rows)
    q = round(x / s)  in [-127, 127]          (round half to even, like ONNX Round)
    x_hat = s * q

Since ``|x| <= 127 s`` no clipping is needed and ``|x - x_hat| <= s / 2`` element-wise. The
cache stores ``q`` (1 byte per element) and ``s`` (float32, one per token per head), so a token
costs ``head_dim + 4`` bytes per head and kind instead of ``4 head_dim``: 68 / 256 = 0.266x
float32 for ``head_dim = 64``.

For a MatMul ``y = A @ B`` the scales that an integer kernel can factor out of the sum over the
contracted index ``k`` are one per row of ``A`` (reduce over its last axis) and one per column of
``B`` (reduce over its second-to-last axis): ``y_ij = s_i t_j sum_k qa_ik qb_kj``.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
# Smallest scale (an all-zero token row quantizes to zeros with this scale instead of dividing by 0).
MIN_SCALE = np.float32(1e-8)
FLOAT32_BYTES = 4


def int8_scale(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """s = max(max |x| / 127, s_min) along ``axis`` (kept as a size-1 axis); float32."""
    abs_max = np.abs(np.asarray(x, dtype=np.float32)).max(axis=axis, keepdims=True)
    return np.maximum(abs_max / np.float32(INT8_MAX), MIN_SCALE).astype(np.float32)


def quantize_int8(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, s float32) with one symmetric scale per slice along ``axis``."""
    x = np.asarray(x, dtype=np.float32)
    scale = int8_scale(x, axis)
    return np.rint(x / scale).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x_hat = s * q in float32."""
    return (q.astype(np.float32) * scale).astype(np.float32)


def fake_quantize_int8(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """dequantize(quantize(x)) with per-slice scales along ``axis``."""
    return dequantize_int8(*quantize_int8(x, axis))


def cache_bytes_per_token(kv_heads: int, head_dim: int, *, int8: bool) -> int:
    """Bytes one token adds to one cache tensor (a layer's keys or its values): float32, or int8
    codes plus one float32 scale per head."""
    per_head = head_dim + FLOAT32_BYTES if int8 else FLOAT32_BYTES * head_dim
    return kv_heads * per_head
