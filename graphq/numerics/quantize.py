"""Uniform integer quantization kernels (pure numpy, no graph code).

Symmetric b-bit quantization with scale ``s`` maps ``x`` to ``q = clip(round(x / s), -Q, Q)`` with
``Q = 2^(b-1) - 1`` (so int8 uses [-127, 127] and zero point 0, the form TensorRT requires) and
dequantizes as ``x_hat = s * q``. For a range ``r = max|x|`` the scale is ``s = r / Q``; a range of
zero (an all-zero channel) gets ``s = 1`` so that nothing divides by zero and zeros stay zeros.

Per-channel weight quantization of a MatMul weight ``W`` of shape ``[K, N]`` (``y = x @ W``) takes
one scale per output column ``n``: ``s_n = max_k |W[k, n]| / Q``.
"""

from __future__ import annotations

import numpy as np


def qmax(bits: int) -> int:
    """Largest magnitude of the symmetric signed grid: 2^(bits-1) - 1."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def symmetric_scale(abs_max: np.ndarray | float, bits: int = 8) -> np.ndarray:
    """s = r / Q, with s = 1 where r == 0; float32."""
    abs_max = np.asarray(abs_max, dtype=np.float32)
    scale = abs_max / np.float32(qmax(bits))
    return np.where(abs_max > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_symmetric(x: np.ndarray, scale: np.ndarray, bits: int = 8) -> np.ndarray:
    """q = clip(round(x / s), -Q, Q) as int8 (bits <= 8) or int16; round half to even like ONNX."""
    limit = qmax(bits)
    q = np.clip(np.rint(x / scale), -limit, limit)
    return q.astype(np.int8 if bits <= 8 else np.int16)


def per_column_weight_quantization(weight: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``W [K, N]`` with one symmetric scale per column; returns (q [K, N], scales [N])."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    scales = symmetric_scale(np.abs(weight).max(axis=0), bits)
    return quantize_symmetric(weight, scales[None, :], bits), scales


def fake_quantize(x: np.ndarray, scale: np.ndarray, bits: int = 8) -> np.ndarray:
    """Dequantize(quantize(x)): what the integer kernel effectively computes with."""
    return (quantize_symmetric(x, scale, bits).astype(np.float32) * scale).astype(np.float32)
