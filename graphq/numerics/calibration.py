"""Streaming activation statistics and the clipping ranges derived from them.

A tensor seen during calibration is a stream of batches ``x`` of shape ``[..., C]`` (``C``, the last
axis, is the channel axis). :class:`RunningStats` folds each batch in and keeps only fixed-size
state, so memory does not depend on how many batches were seen:

- ``count``, ``min``, ``max``, ``abs_max = max |x|`` and ``channel_abs_max[c] = max |x[..., c]|``;
- ``mean`` and ``std`` (population, ``ddof = 0``) over every element, in float64: each batch's sum
  and sum of squared deviations ``M2`` are merged with Chan et al.'s pairwise update
  ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / (n_a + n_b)`` (``delta`` the difference of the two
  means), which stays accurate where ``E[x^2] - E[x]^2`` would cancel;
- a histogram of ``|x|`` with ``bins`` equal bins over ``[0, R)``. ``R`` starts as the smallest
  power of two strictly above the first non-zero batch's ``abs_max`` and doubles (as often as needed)
  whenever a batch reaches it. Doubling merges adjacent bin pairs: the new edges ``2R/B * j`` are
  exactly the old even edges ``R/B * 2j`` in floating point (scaling by 2 is exact), so the merged
  counts equal a histogram of all values seen over the final range, bin for bin.

Range estimators return the clipping value ``c > 0`` for symmetric quantization (``x`` is
represented on ``[-c, c]``); with ``L = 2^(bits-1) - 1`` levels per side the step is ``c / L``:

- ``range_minmax``: ``abs_max``;
- ``range_percentile``: the ``p``-th percentile of ``|x|`` (as ``np.percentile`` defines it) from the
  histogram, less than one bin width from the exact value;
- ``range_mse``: the bin edge ``c`` minimising the expected squared error of quantizing the
  histogram, values spread uniformly within each bin. Bins above ``c`` are clipped: error
  ``(v - c)^2``, whose mean over a bin of width ``w`` and centre ``m`` is ``(m - c)^2 + w^2 / 12``.
  Bins below ``c`` round to the nearest multiple of ``step = c / L``: error ``(v - step round(v /
  step))^2``, averaged over the bin exactly with the integral of the squared sawtooth. (The usual
  shortcut ``step^2 / 12`` for every unclipped value over-charges values much smaller than one
  step, which round to 0 with error ``v^2``; on peaked, heavy-tailed activations it picks clips
  whose real error is several times the optimum, worse than ``abs_max`` at 8 bits.)
- ``range_k_sigma``: ``min(abs_max, |mean| + k * std)`` (k-sigma clipping, Gong et al. 2024).
- ``range_k_sigma_search``: the ``range_k_sigma`` value, over a grid of ``k`` and ``abs_max`` (no
  clipping), whose expected squared quantization error on the histogram (:func:`histogram_mse`, same model as ``range_mse`` but at any
  clip ``c``, the bin holding ``c`` split at ``c``) is smallest; ties go to the larger ``k``.

A tensor that was exactly zero everywhere gets ``ZERO_TENSOR_RANGE``: every value quantizes to 0
whatever the range, and a positive range keeps the scale finite.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from graphq.errors import GraphqError

DEFAULT_BINS = 2048
ZERO_TENSOR_RANGE = 1.0
RANGE_METHODS = ("minmax", "percentile", "mse", "k_sigma", "k_sigma_search")
# k candidates of the searched k-sigma clip (activations and weights).
DEFAULT_K_GRID = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0)
_MSE_BLOCK = 64  # candidates evaluated together in range_mse (64 x bins float64 temporaries)


class RunningStats:
    """Fixed-memory statistics of a stream of ``[..., C]`` arrays; see the module docstring."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"histogram bins must be an even number >= 2, got {bins}")
        self.bins = int(bins)
        self.count = 0
        self.channels: int | None = None
        self.min = math.inf
        self.max = -math.inf
        self.channel_abs_max: np.ndarray | None = None
        self.sum = 0.0
        self.m2 = 0.0
        self.hist_range: float | None = None  # None until a non-zero value is seen
        self.histogram = np.zeros(self.bins, dtype=np.int64)

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else math.nan

    @property
    def bin_width(self) -> float | None:
        return None if self.hist_range is None else self.hist_range / self.bins

    @property
    def bin_edges(self) -> np.ndarray:
        """The ``bins + 1`` histogram edges (as ``np.linspace`` makes them); needs a non-zero value seen."""
        if self.hist_range is None:
            raise ValueError("no non-zero value seen yet: the histogram has no range")
        return np.linspace(0.0, self.hist_range, self.bins + 1)

    @property
    def nbytes(self) -> int:
        """Bytes held in arrays: fixed once the channel count is known."""
        channel_bytes = 0 if self.channel_abs_max is None else self.channel_abs_max.nbytes
        return self.histogram.nbytes + channel_bytes

    def update(self, array: np.ndarray) -> None:
        """Fold one batch ``[..., C]`` into the statistics (an empty batch changes nothing)."""
        x = np.asarray(array)
        if x.ndim == 0:
            raise ValueError("expected an array [..., channels], got a scalar")
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"expected a numeric array, got dtype {x.dtype}")
        channels = x.shape[-1]
        if self.channels is not None and channels != self.channels:
            raise ValueError(f"channel count changed from {self.channels} to {channels}")
        if x.size == 0:
            return
        x64 = x.astype(np.float64, copy=False).reshape(-1, channels)
        batch_min, batch_max = float(x64.min()), float(x64.max())
        if not (math.isfinite(batch_min) and math.isfinite(batch_max)):
            raise ValueError("the batch contains NaN or infinity")
        magnitude = np.abs(x64)
        channel_max = magnitude.max(axis=0)

        n = x64.shape[0] * channels
        batch_sum = float(x64.sum())
        batch_mean = batch_sum / n
        deviations = x64 - batch_mean
        np.square(deviations, out=deviations)
        batch_m2 = float(deviations.sum())
        del deviations
        if self.count:
            delta = batch_mean - self.mean
            self.m2 += batch_m2 + delta * delta * self.count * n / (self.count + n)
        else:
            self.m2 = batch_m2
        self.sum += batch_sum

        self.count += n
        self.channels = channels
        self.min = min(self.min, batch_min)
        self.max = max(self.max, batch_max)
        self.channel_abs_max = channel_max if self.channel_abs_max is None else np.maximum(self.channel_abs_max, channel_max)

        self._add_to_histogram(magnitude, max(abs(batch_min), abs(batch_max)))

    def _add_to_histogram(self, magnitude: np.ndarray, batch_abs_max: float) -> None:
        if batch_abs_max == 0.0:
            self.histogram[0] += magnitude.size  # 0 lies in the first bin whatever the range
            return
        if self.hist_range is None:
            _, exponent = math.frexp(batch_abs_max)  # abs_max = m * 2^e, 0.5 <= m < 1
            self.hist_range = math.ldexp(1.0, exponent)  # strictly above abs_max
        while batch_abs_max >= self.hist_range:
            self._double_range()
        counts, _ = np.histogram(magnitude, bins=self.bins, range=(0.0, self.hist_range))
        self.histogram += counts

    def _double_range(self) -> None:
        merged = self.histogram.reshape(-1, 2).sum(axis=1)
        self.histogram = np.concatenate([merged, np.zeros(self.bins - merged.size, dtype=np.int64)])
        self.hist_range *= 2.0


def _require_data(stats: RunningStats) -> None:
    if stats.count == 0:
        raise ValueError("no statistics: the tensor was never observed")


def levels(bits: int) -> int:
    """Positive levels of a symmetric signed ``bits``-bit grid: ``2^(bits-1) - 1``."""
    if bits < 2:
        raise ValueError(f"symmetric quantization needs at least 2 bits, got {bits}")
    return 2 ** (bits - 1) - 1


def range_minmax(stats: RunningStats) -> float:
    """``max |x|``."""
    _require_data(stats)
    return stats.abs_max if stats.abs_max > 0 else ZERO_TENSOR_RANGE


def range_percentile(stats: RunningStats, percentile: float) -> float:
    """The ``percentile``-th percentile of ``|x|`` from the histogram, within one bin width of the exact one.

    As ``np.percentile`` defines it: with the ``n`` values sorted, position ``h = p/100 (n - 1)``
    interpolates linearly between order statistics ``floor(h)`` and ``floor(h) + 1``. Each order
    statistic is placed inside its bin as if the bin's values were spread evenly, so it is off by
    less than one bin width, and so is the interpolation.
    """
    _require_data(stats)
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if stats.hist_range is None:
        return ZERO_TENSOR_RANGE
    cumulative = np.cumsum(stats.histogram)

    def order_statistic(rank: int) -> float:  # the rank-th smallest |x|, 0-based
        index = int(np.searchsorted(cumulative, rank + 1, side="left"))
        below = int(cumulative[index - 1]) if index else 0
        return (index + (rank - below + 0.5) / int(stats.histogram[index])) * stats.bin_width

    position = percentile / 100.0 * (stats.count - 1)
    lower = math.floor(position)
    fraction = position - lower
    value = order_statistic(lower)
    if fraction > 0:
        value += fraction * (order_statistic(min(lower + 1, stats.count - 1)) - value)
    return float(min(value, stats.abs_max)) if value > 0 else stats.abs_max


def _sums_above(values: np.ndarray) -> np.ndarray:
    """``out[j-1] = sum_{i >= j} values[i]`` for ``j = 1 .. len(values)``."""
    return np.append(np.cumsum(values[::-1])[::-1], 0.0)[1:]


def _rounding_integral(u: np.ndarray) -> np.ndarray:
    """``R(u) = integral from -1/2 to u of (t - round(t))^2 dt`` (one period contributes 1/12)."""
    shifted = u + 0.5
    periods = np.floor(shifted)
    g = shifted - periods - 0.5  # t - round(t) at t = u, in [-1/2, 1/2)
    return periods / 12.0 + (g * g * g + 0.125) / 3.0  # g * g * g: ** 3 of negatives is slow


def range_mse(stats: RunningStats, bits: int) -> float:
    """The histogram bin edge ``c`` minimising the expected squared quantization error (module docstring)."""
    _require_data(stats)
    steps = levels(bits)
    if stats.hist_range is None:
        return ZERO_TENSOR_RANGE
    width = stats.bin_width
    counts = stats.histogram.astype(np.float64)
    bin_index = np.arange(stats.bins, dtype=np.float64)
    centres = (bin_index + 0.5) * width
    # Candidate j clips at edge j * width; edges past the first one at or above abs_max only add error.
    last = min(stats.bins, math.floor(stats.abs_max / width) + 1)
    j = np.arange(1, last + 1, dtype=np.float64)
    candidates = j * width

    # Bins i >= j lie above c: they quantize to c, error (v - c)^2, v uniform in the bin.
    s0 = _sums_above(counts)[:last]
    s1 = _sums_above(counts * centres)[:last]
    s2 = _sums_above(counts * centres**2)[:last]
    clipped = np.maximum(s2 - 2 * candidates * s1 + candidates**2 * s0, 0.0) + s0 * width**2 / 12.0

    # Bins i < j lie below c and round to the grid k * step, step = c / L. In units of the step the
    # edge m * width is m * L / j, so the bin's mean squared rounding error is
    # step^2 * (R(edge_{i+1}) - R(edge_i)) * j / L.
    rounding = np.empty(last)
    edges = np.arange(stats.bins + 1, dtype=np.float64)
    for start in range(0, last, _MSE_BLOCK):
        jj = j[start : start + _MSE_BLOCK, None]
        below = int(jj[-1, 0])  # the block's candidates only see bins 0 .. below - 1
        integral = _rounding_integral(edges[None, : below + 1] * (steps / jj))
        per_bin = np.diff(integral, axis=1) * (bin_index[None, :below] < jj)
        step = jj[:, 0] * width / steps
        rounding[start : start + _MSE_BLOCK] = step**2 * (jj[:, 0] / steps) * (per_bin @ counts[:below])

    best = float(candidates[int(np.argmin(clipped + rounding))])
    return min(best, stats.abs_max)


def range_k_sigma(stats: RunningStats, k: float) -> float:
    """``min(abs_max, |mean| + k * std)``."""
    _require_data(stats)
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}")
    value = min(stats.abs_max, abs(stats.mean) + k * stats.std)
    return value if value > 0 else ZERO_TENSOR_RANGE


def histogram_mse(stats: RunningStats, clip: float, bits: int) -> float:
    """Expected squared error per value of quantizing ``|x|`` (the histogram, values uniform within each
    bin) on the symmetric grid ``step * [0, L]`` with ``step = clip / L``: rounding below ``clip``,
    ``(v - clip)^2`` above it."""
    _require_data(stats)
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    if stats.hist_range is None:
        return 0.0
    step = clip / levels(bits)
    counts = stats.histogram.astype(np.float64)
    edges = stats.bin_edges
    low, high = edges[:-1], edges[1:]
    width = high - low
    split = np.clip(clip, low, high)  # each bin is [low, split) rounded and [split, high) clipped
    rounded = step**3 * (_rounding_integral(split / step) - _rounding_integral(low / step))  # integral of err^2
    above_low = np.maximum(low, clip)
    clipped = ((high - clip) ** 3 - (above_low - clip) ** 3) / 3.0 * (high > clip)
    per_bin = (rounded + clipped) / width
    return float(per_bin @ counts / stats.count)


def range_k_sigma_search(stats: RunningStats, grid: tuple[float, ...], bits: int) -> float:
    """The ``range_k_sigma`` clip over ``grid``, or ``range_minmax`` (no clip), with the least :func:`histogram_mse`."""
    _require_data(stats)
    best_error, best = math.inf, None
    for k in [math.inf, *sorted(grid, reverse=True)]:
        clip = range_minmax(stats) if k == math.inf else range_k_sigma(stats, k)
        error = histogram_mse(stats, clip, bits)
        if error < best_error:
            best_error, best = error, clip
    return best


@dataclasses.dataclass(frozen=True)
class RangeEstimator:
    """How a tensor's clipping range is chosen from its :class:`RunningStats`."""

    method: str = "minmax"
    percentile: float = 99.99
    k: float = 5.0
    k_grid: tuple[float, ...] = DEFAULT_K_GRID

    def __post_init__(self) -> None:
        if self.method not in RANGE_METHODS:
            raise GraphqError(f"unknown range method '{self.method}'; choose one of {', '.join(RANGE_METHODS)}")
        if not 0 < self.percentile <= 100:
            raise GraphqError(f"percentile must be in (0, 100], got {self.percentile}")
        check_k_values(self.k, self.k_grid)

    def absmax(self, stats: RunningStats, bits: int = 8) -> float:
        """The clipping value ``c > 0``: the tensor is quantized symmetrically on ``[-c, c]``."""
        if bits < 2:
            raise GraphqError(f"symmetric quantization needs at least 2 bits, got {bits}")
        if self.method == "minmax":
            return range_minmax(stats)
        if self.method == "percentile":
            return range_percentile(stats, self.percentile)
        if self.method == "mse":
            return range_mse(stats, bits)
        if self.method == "k_sigma_search":
            return range_k_sigma_search(stats, self.k_grid, bits)
        return range_k_sigma(stats, self.k)


def check_k_values(k: float, grid: tuple[float, ...]) -> None:
    """k-sigma clipping needs k > 0 (and a non-empty grid of such k to search)."""
    if not k > 0 or not math.isfinite(k):
        raise GraphqError(f"k (for k-sigma clipping) must be positive, got {k}")
    if not grid:
        raise GraphqError("k_grid (for the searched k-sigma clipping) must hold at least one k")
    for value in grid:
        if not value > 0 or not math.isfinite(value):
            raise GraphqError(f"k_grid values (for k-sigma clipping) must be positive, got {value}")
