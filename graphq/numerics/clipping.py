"""k-sigma clipping of MatMul weights (Gong et al. 2024, seed 004): pure numpy.

A weight ``W [K, N]`` (``y = x @ W``) is quantized per output column ``n`` on the symmetric grid
``s_n * [-Q, Q]`` (``Q = 127`` at 8 bits). Without clipping ``s_n = max_k |W[k, n]| / Q``. k-sigma
clipping takes the column's range as

    c_n(k) = min(max_k |W[k, n]|, |mean_n| + k * std_n)

(``mean_n``, ``std_n``: the population mean and standard deviation of column ``n``), so
``s_n = c_n / Q`` and values beyond ``c_n`` saturate at ``+-Q``: a few large weights are clipped and
every other weight gets a finer step.

The searched mode picks one ``k`` per tensor from a grid plus "no clipping" (``k = inf``, the plain
column maxima), the one whose quantized weight has the least squared error
``sum (W - s * clip(round(W / s), -Q, Q))^2`` (ties: the larger ``k``, the lighter clip).
:class:`WeightClip` is the typed option (``method``: ``none`` | ``k_sigma`` | ``k_sigma_search``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from graphq.errors import GraphqError
from graphq.numerics.calibration import DEFAULT_K_GRID, check_k_values
from graphq.numerics.quantize import fake_quantize, symmetric_scale

WEIGHT_CLIP_METHODS = ("none", "k_sigma", "k_sigma_search")


def column_k_sigma_ranges(weight: np.ndarray, k: float) -> np.ndarray:
    """``c_n(k) = min(max |W[:, n]|, |mean_n| + k std_n)`` per column (float64)."""
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}")
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    return np.minimum(np.abs(w).max(axis=0), np.abs(w.mean(axis=0)) + k * w.std(axis=0))


def clipped_quantization_error(weight: np.ndarray, ranges: np.ndarray, bits: int = 8) -> float:
    """``sum (W - fake_quantize(W, s))^2`` with ``s_n = ranges_n / Q`` (clipping included)."""
    w = np.asarray(weight, dtype=np.float32)
    scales = symmetric_scale(ranges, bits)[None, :]
    return float(np.square(w - fake_quantize(w, scales, bits), dtype=np.float64).sum())


def search_k_sigma(weight: np.ndarray, grid: tuple[float, ...], bits: int = 8) -> tuple[float, np.ndarray]:
    """The ``k`` of ``grid`` or ``inf`` (no clipping), and its column ranges, with the least quantization error."""
    best = None
    for k in [math.inf, *sorted(grid, reverse=True)]:
        ranges = np.abs(np.asarray(weight, dtype=np.float64)).max(axis=0) if k == math.inf else column_k_sigma_ranges(weight, k)
        error = clipped_quantization_error(weight, ranges, bits)
        if best is None or error < best[0]:
            best = (error, k, ranges)
    return best[1], best[2]


@dataclasses.dataclass(frozen=True)
class WeightClip:
    """How the per-column range of an int8 weight is chosen."""

    method: str = "none"
    k: float = 5.0
    k_grid: tuple[float, ...] = DEFAULT_K_GRID

    def __post_init__(self) -> None:
        if self.method not in WEIGHT_CLIP_METHODS:
            raise GraphqError(f"unknown weight clip method '{self.method}'; choose one of {', '.join(WEIGHT_CLIP_METHODS)}")
        check_k_values(self.k, self.k_grid)

    def column_ranges(self, weight: np.ndarray, bits: int = 8) -> tuple[np.ndarray, float | None]:
        """The per-column ranges ``c_n`` of ``weight`` and the ``k`` used (None: no clipping)."""
        if self.method == "none":
            return np.abs(np.asarray(weight, dtype=np.float64)).max(axis=0), None
        if self.method == "k_sigma":
            return column_k_sigma_ranges(weight, self.k), self.k
        k, ranges = search_k_sigma(weight, self.k_grid, bits)
        return ranges, k
