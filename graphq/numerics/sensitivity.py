"""Numerics of sensitivity analysis: activation moments, outlier channels, matched noise, bits.

**Moments.** :class:`PowerSums` streams batches ``x`` (any shape, channels on the last axis) and
keeps ``n`` and the float64 sums of ``d, d^2, d^3, d^4`` with ``d = x - c``, ``c`` the mean of the
first batch (a shift that keeps the raw sums from cancelling when the mean is large against the
spread). The central moments follow from the binomial expansion with ``m = mean(d)``:

    mu_2 = E[d^2] - m^2
    mu_4 = E[d^4] - 4 m E[d^3] + 6 m^2 E[d^2] - 3 m^4

and the (Pearson) kurtosis is ``mu_4 / mu_2^2``: 3 for a Gaussian, 1.8 for a uniform, large for
heavy tails or a few channels far from the rest. It also keeps ``max |x|`` per channel.

**Outlier channels.** With ``a_c = max |x[..., c]|`` the channel abs-max, channel ``c`` is an outlier
when ``a_c > ratio * median_c(a_c)`` (``ratio = 6`` by default): structured outliers of
transformers sit in a few embedding dimensions (Bondarenko et al., 2021), which shows up as a few
channels whose range dwarfs the median channel's.

**Matched noise (the lens of perturbation, Gong et al., 2024).** A quantizer replaces ``W`` by
``W_hat``; its error ``E = W_hat - W`` is a perturbation. :func:`matched_noise` draws an artificial
perturbation with the same second moment ``sigma^2 = mean(E^2)``, either over the whole tensor
(``scope = "tensor"``) or per group of ``G`` rows and column, the quantizer's own granularity
(``scope = "group"``): Gaussian ``N(0, sigma^2)`` or uniform ``U(-sqrt(3) sigma, sqrt(3) sigma)``
(whose variance is ``sigma^2``). Comparing the damage of ``W + noise`` with that of ``W_hat`` tells
whether the quantizer hurts through the size of its error (same damage) or through its structure.

**Precisions.** A plan gives each quantizable MatMul one of :data:`PRECISIONS`: ``int4`` (4-bit
symmetric RTN, groups of 128 along ``K``), ``int4-g32-asym`` (4 bits in groups of 32 with a uint4 zero
point each), ``int4-g32-fzp`` (the same with a float zero point, stored as an offset; the affine form
``s q + m`` of llama.cpp's Q4_1, so a model converted from Q4_1 keeps its codes, its weights to within
the scale and offset steps), ``int8`` (symmetric, groups of 128) or ``float``. The int4 precisions store
their scales (and offsets) as q8-pow2, 8-bit codes times a power of two per column; int8 as float16
(``WeightQuantConfig.scale_dtype``). A tied LM head
shares its codes with the embedding lookup, whose rows are cut into groups along the hidden size
``D``, with integer zero points (``GatherBlockQuantized`` reads no float ones: its ``int4-g32-fzp`` is
``int4-g32-asym``): its group is the largest power of two ``<= 128`` dividing ``D`` (64 for ``D = 576``; see
:func:`graphq.passes.embedding_quant.embedding_group`). :func:`fake_quantize` returns the dequantized
weight ``W_hat`` the deployed kernel computes with, column block by column block (bounded memory).

**Bits per weight** (accounting of a precision plan, :meth:`WeightQuantConfig.bits_per_weight`):
``b + S / G`` for ``b``-bit codes in groups of ``G`` with one ``S``-bit scale per group (``S`` = 8 for
q8-pow2, 16 for float16; symmetric: no zero points; asymmetric adds ``b / G``, or ``S / G`` for a float
zero point's offset), plus for q8-pow2 an int8 exponent per column and stored quantity, ``8 / K`` each;
``32`` for float32. At ``K = 576``: int4 4.076, int4-g32-asym 4.389, int4-g32-fzp 4.528, int8 8.125.
Padding of a last short group is not counted (nominal bits, as the budget is stated; the file size is
reported separately).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from graphq.numerics.weight_only import POW2_SCALES, WeightQuantConfig, quantize_rtn

FLOAT_BITS = 32.0
DEFAULT_OUTLIER_RATIO = 6.0
NOISE_KINDS = ("gaussian", "uniform")
NOISE_SCOPES = ("tensor", "group")
PRECISIONS: dict[str, WeightQuantConfig | None] = {
    "int4": WeightQuantConfig(bits=4, group_size=128, symmetric=True, scale_dtype=POW2_SCALES),
    "int4-g32-asym": WeightQuantConfig(bits=4, group_size=32, symmetric=False, scale_dtype=POW2_SCALES),
    "int4-g32-fzp": WeightQuantConfig(bits=4, group_size=32, symmetric=False, float_zero_points=True, scale_dtype=POW2_SCALES),
    "int8": WeightQuantConfig(bits=8, group_size=128, symmetric=True, scale_dtype="float16"),
    "float": None,
}
_COLUMN_BLOCK = 4096


class PowerSums:
    """Streaming count, min/max, shifted power sums (order 1-4) and per-channel ``max |x|``."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: float | None = None
        self.sums = np.zeros(4, dtype=np.float64)
        self.min = math.inf
        self.max = -math.inf
        self.channel_abs_max: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        x = np.asarray(array)
        if x.ndim == 0 or x.size == 0:
            raise ValueError(f"expected a non-empty array with a channel axis, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("the tensor contains NaN or infinity")
        flat = x.reshape(-1, x.shape[-1])
        if self.channel_abs_max is not None and flat.shape[1] != self.channel_abs_max.shape[0]:
            raise ValueError(f"channel count changed from {self.channel_abs_max.shape[0]} to {flat.shape[1]}")
        d = flat.astype(np.float64)
        if self.shift is None:
            self.shift = float(d.mean())
        d -= self.shift
        d2 = d * d
        self.sums += (d.sum(), d2.sum(), (d2 * d).sum(), (d2 * d2).sum())
        self.count += d.size
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        channel = np.abs(flat).max(axis=0).astype(np.float64)
        self.channel_abs_max = channel if self.channel_abs_max is None else np.maximum(self.channel_abs_max, channel)

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def mean(self) -> float:
        return self.shift + self.sums[0] / self.count if self.count else math.nan

    def _central(self) -> tuple[float, float]:
        e1, e2, e3, e4 = self.sums / self.count
        mu2 = e2 - e1 * e1
        mu4 = e4 - 4 * e1 * e3 + 6 * e1 * e1 * e2 - 3 * e1**4
        return max(mu2, 0.0), max(mu4, 0.0)

    @property
    def std(self) -> float:
        return math.sqrt(self._central()[0]) if self.count else math.nan

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis ``mu_4 / mu_2^2`` (Gaussian: 3); NaN for a constant tensor."""
        if not self.count:
            return math.nan
        mu2, mu4 = self._central()
        return mu4 / (mu2 * mu2) if mu2 > 0 else math.nan


def outlier_channels(channel_abs_max: np.ndarray, ratio: float = DEFAULT_OUTLIER_RATIO) -> np.ndarray:
    """Indices of channels with ``max |x| > ratio * median`` over channels, largest first."""
    a = np.asarray(channel_abs_max, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of channel ranges, got shape {a.shape}")
    if ratio <= 0:
        raise ValueError(f"the outlier ratio must be positive, got {ratio}")
    median = float(np.median(a))
    if median <= 0:
        return np.flatnonzero(a > 0)[np.argsort(-a[a > 0], kind="stable")]
    found = np.flatnonzero(a > ratio * median)
    return found[np.argsort(-a[found], kind="stable")]


def tensor_kurtosis(array: np.ndarray, chunk: int = 1 << 20) -> float:
    """Pearson kurtosis of every element of ``array`` (streamed in chunks: bounded float64 temporaries)."""
    flat = np.asarray(array).reshape(-1, 1)
    stats = PowerSums()
    for start in range(0, flat.shape[0], chunk):
        stats.update(flat[start:start + chunk])
    return stats.kurtosis


def matched_noise(error: np.ndarray, kind: str, rng: np.random.Generator, *, scope: str = "tensor",
                  group_size: int = 0) -> np.ndarray:
    """Random ``[K, N]`` noise with the second moment of ``error`` (module docstring), float32."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got '{kind}'")
    if scope not in NOISE_SCOPES:
        raise ValueError(f"noise scope must be one of {NOISE_SCOPES}, got '{scope}'")
    e = np.asarray(error, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"expected a 2-D error [K, N], got shape {e.shape}")
    if kind == "gaussian":
        noise = rng.standard_normal(e.shape, dtype=np.float32)
    else:
        noise = rng.random(e.shape, dtype=np.float32)
        noise -= 0.5
        noise *= 2 * math.sqrt(3.0)
    if scope == "tensor":
        noise *= np.float32(math.sqrt(_mean_square(e)))
        return noise
    k = e.shape[0]
    g = k if group_size <= 0 else group_size
    for start in range(0, k, g):  # one group of rows at a time: bounded temporaries
        rows = slice(start, start + g)
        block = e[rows].astype(np.float64)
        noise[rows] *= np.sqrt(np.mean(block * block, axis=0)).astype(np.float32)
    return noise


def _mean_square(array: np.ndarray, chunk: int = 1 << 22) -> float:
    """``mean(x^2)`` in float64, a chunk of the flattened array at a time."""
    flat = array.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk].astype(np.float64)
        total += float(np.dot(part, part))
    return total / flat.size


def bits_per_weight(config: WeightQuantConfig | None, k: int) -> float:
    """Nominal storage bits per weight of a ``[K, N]`` weight (:meth:`WeightQuantConfig.bits_per_weight`:
    ``b + S / G`` for ``S``-bit scales, plus the zero points when asymmetric); ``32`` for float (``config`` None)."""
    if config is None:
        return FLOAT_BITS
    return config.bits_per_weight(k if config.per_channel else config.group_size, k)


def precision_config(precision: str, *, tied_dim: int | None = None) -> WeightQuantConfig | None:
    """The weight config of ``precision`` (None for float); for a head tied to an embedding of
    hidden size ``tied_dim``, with the group its shared lookup can use."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    config = PRECISIONS[precision]
    if config is None or tied_dim is None:
        return config
    from graphq.passes.embedding_quant import embedding_group

    config = dataclasses.replace(config, float_zero_points=False)  # GatherBlockQuantized: integer zero points
    group = embedding_group(tied_dim, config.group_size)
    return config if group is None else dataclasses.replace(config, group_size=group)


def fake_quantize(weight: np.ndarray, config: WeightQuantConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(W_hat, |scales|)`` of RTN ``config`` on ``W [K, N]`` (a short last group is padded), float32."""
    w = np.asarray(weight, dtype=np.float32)
    w_hat = np.empty_like(w)
    scales = []
    for start in range(0, w.shape[1], _COLUMN_BLOCK):
        quantized = quantize_rtn(w[:, start:start + _COLUMN_BLOCK], config, pad=True)
        w_hat[:, start:start + _COLUMN_BLOCK] = quantized.dequantize()
        scales.append(np.abs(quantized.scales))
    return w_hat, np.concatenate(scales, axis=1)
