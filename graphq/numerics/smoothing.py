"""SmoothQuant scales (Xiao et al., 2023; seed 003).

For a MatMul ``y = x @ W`` with activation channel ranges ``a_j = max|X_j|`` (over calibration
tokens) and weight row ranges ``w_j = max_n |W[j, n]|`` (over every MatMul that reads the same
``x``), the per-input-channel smoothing factor is

    s_j = a_j^alpha / w_j^(1 - alpha),   alpha in [0, 1].

Then ``y = (x / s) @ (diag(s) W)`` exactly; ``x / s`` has flatter channel ranges (outlier channels
shrink), and the weights absorb the difference. ``alpha`` moves difficulty from activations
(alpha -> 1) to weights (alpha -> 0); 0.4-0.5 works best for LLMs (seed 003). Channels whose
activation or weight range is zero get ``s_j = 1``; factors are clamped to ``[min_scale, 1/min_scale]``
so that no division blows up.
"""

from __future__ import annotations

import numpy as np


def smoothing_scales(
    activation_abs_max: np.ndarray,
    weight_abs_max: np.ndarray,
    alpha: float,
    min_scale: float = 1e-5,
) -> np.ndarray:
    """Per-channel factors s (float32), shape [K]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    a = np.asarray(activation_abs_max, dtype=np.float64)
    w = np.asarray(weight_abs_max, dtype=np.float64)
    if a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"channel ranges must be 1-D and equal in length: {a.shape} vs {w.shape}")
    valid = (a > 0) & (w > 0)
    scales = np.ones_like(a)
    scales[valid] = a[valid] ** alpha / w[valid] ** (1.0 - alpha)
    return np.clip(scales, min_scale, 1.0 / min_scale).astype(np.float32)
