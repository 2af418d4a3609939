"""Weight-only group quantization: RTN, GPTQ, AWQ and ONNX Runtime MatMulNBits packing (pure numpy).

Layout. A MatMul weight is ``W`` of shape ``[K, N]`` (``y = x @ W``: ``K`` input features, ``N``
output features). Groups run along ``K``, the reduction axis, as ``com.microsoft.MatMulNBits``
expects: with group length ``G``, group ``g`` holds rows ``k`` in ``[g G, (g + 1) G)`` of every column
``n``, and each ``(g, n)`` has its own scale ``s`` and zero point ``z``. ``group_size = 0`` (or
``-1``) means per channel: ``G = K``, one group per column. A ``G`` that does not divide ``K`` is
an error unless the caller passes ``pad=True``; then there are ``ceil(K / G)`` groups and the last
one is shorter (``K mod G`` rows), as MatMulNBits does when it pads ``K`` up to whole blocks.

Codes. With ``b`` bits (2..8) and ``qmax = 2^b - 1``, a weight is stored as an unsigned code
``q = clip(round(w / s) + z, 0, qmax)`` (round half to even) and dequantizes as
``w_hat = (q - z) s``, the form MatMulNBits stores (codes with the zero point added).

- Asymmetric: the group range is widened to hold 0, ``lo = min(min w, 0)``, ``hi = max(max w, 0)``
  (so an all-positive group cannot push the zero point off the grid), then
  ``s = (hi - lo) / qmax`` and ``z = clip(round(-lo / s), 0, qmax)``. Every weight is within
  ``s/2`` of its reconstruction.
- Symmetric: ``z = 2^(b-1)`` (8 for 4 bits, MatMulNBits' default when no zero points are given),
  so the grid is ``[-2^(b-1), 2^(b-1) - 1] s``. ONNX Runtime's own quantizer fills all ``2^b`` levels
  with a sign trick, and so do we: with ``e`` the group's value of largest magnitude (signed),
  ``s = e / -2^(b-1)``. The scale is negative when ``e > 0``; ``e`` itself lands exactly on code 0
  (``-2^(b-1)`` steps), and the other sign reaches ``(2^(b-1) - 1) |s|``, so a value of the
  opposite sign beyond ``(2^(b-1) - 1/2) |s|`` is clipped by less than one step ``|s|``; every other
  value is within ``|s|/2``. Measured on Gaussian and Student-t(3) groups of 32 and 128 at 4 bits,
  the reconstruction MSE relative to ``s = max|w| / 7`` (codes -7..7, one level unused) is: sign
  trick 0.77-0.79, ``s = max|w| / 8`` with a positive scale 0.81-0.96, ``s = 2 max|w| / 15`` (the
  GPTQ reference's symmetric grid) 0.89-0.98. The sign trick wins everywhere, costs nothing at run
  time (a scale is just a multiplier) and matches what ORT writes itself.
- Float zero points (``float_zero_points``, asymmetric only): the affine form ``w_hat = s q + m`` of
  llama.cpp's Q4_1, stored as MatMulNBits stores it, ``w_hat = (q - z) s`` with a float32 ``z = -m / s``.
  The range is the group's own, ``lo = min w``, ``hi = max w`` (no widening to hold 0: the offset is
  free), ``s = (hi - lo) / qmax``, ``z = -lo / s`` and ``q = clip(round(w / s + z), 0, qmax)``. Both
  ends of the range are on the grid, so a weight that already is a ``b``-bit affine group (a Q4_1
  block using codes 0 and ``qmax``) comes back exactly, up to float32 rounding of ``(q - z) s``.
  Cost: a float32 zero point per group, ``32 / G`` bits instead of ``b / G``.
- Float16 scales (``scale_dtype = "float16"``): each scale is rounded to the nearest float16 before the
  codes are taken (the codes are then the nearest for that scale). With float zero points what is
  stored beside the scale is the group's offset ``O = (c - z) s = c s + lo`` (``c = 2^(b-1)``; see
  :func:`split_float_zero_points`), so that is the value rounded to float16, and ``z = c - O / s``.
  The arrays stay float32 (every scale is exactly a float16); the emitter stores them as float16.
  Cost: ``16 / G`` bits per scale (and per offset) instead of ``32 / G``: 4.125 bits per weight for
  4-bit g128 symmetric, 5.0 for 4-bit g32 with float zero points (the size of the GGUF's Q4_1, which
  stores float16 ``d`` and ``m``). A Q4_1 block then comes back with its codes, and its weights to within
  half a float16 unit of its offset ``8 d + m`` (about the group's centre), no longer bit for bit. A scale or offset
  beyond float16's range (65504) is an error; a scale below its smallest subnormal is taken as a
  constant group's.
- 8-bit scales (``scale_dtype = "q8-pow2"``, double quantization as in QLoRA and llama.cpp's k-quants):
  the scales of a column ``n`` (all its groups; and, with float zero points, the offsets ``O`` apart)
  are stored as 8-bit codes times one power of two, ``s[g, n] = c[g, n] 2^e[n]``: ``c`` uint8 in 0..255
  when no value of the weight is negative, else int8 in -127..127, and ``e`` the smallest exponent that
  fits the column's largest ``|s|`` (:func:`pow2_split`; an int8 per column). Each scale is rounded to
  that grid before the codes are taken. A power of two, not a float step, so that the stored float32
  values determine ``(c, e)`` again exactly (the emitter recovers them) and the product ``c 2^e`` is exact.
  Cost: ``8 / G`` bits per scale (and per offset) plus ``8 / K`` per column: 4.5 + 16 / K bits for 4-bit
  g32 with float zero points against 5.0 with float16. A scale's rounding error is below ``1 / 255``
  of the column's largest (``1 / 127`` signed). On SmolLM2-135M's 210 linear weights (each an
  exact Q4_1 lattice) the weight error energy of the Q4_1 form stored so is 0.07 % of int4 g128 RTN's
  (per-tensor instead of per-column exponents: 2 %). Scales must be known for all groups of a column at
  once: GPTQ takes its groups' parameters up front (static groups) and the clip search compares
  candidates with unrounded scales.
- A group that is all zeros (or constant) gets ``s = 1`` (with q8-pow2: its column's step ``2^e``; no
  division by zero; its codes are ``z``, rounded).
- ``clip_ratio`` ``r`` (RTN, AWQ clip search) shrinks the range before the scale is taken:
  ``e -> r e`` (symmetric) or ``lo, hi -> r lo, r hi`` (asymmetric); with float zero points the range
  shrinks about its midpoint, ``hi - lo -> r (hi - lo)``. Values outside are clipped.

GPTQ (Frantar et al., 2022). For calibration inputs ``X`` (rows are tokens), ``H = 2 X^T X / n``
(``K x K``, :func:`hessian_accumulate` streams it) is the Hessian of the layer's output error
``||X W - X W_hat||^2`` with respect to each column of ``W``. GPTQ quantizes the rows ``k`` of
``W`` (the input features: columns in the paper's ``[out, in]`` orientation) one after another and
spreads each row's error over the rows not yet quantized, the optimal-brain-surgeon update

    err = (w_k - w_hat_k) / U[k, k],   W[j] -= U[k, j] err   for j > k,

where ``U`` is the upper Cholesky factor of ``(H + lambda I)^-1`` (``(H + lambda I)^-1 = U^T U``).
Inputs that never fired (``H[k, k] = 0``) get ``H[k, k] = 1`` and ``W[k] = 0``; the damping is
``lambda = damp * mean(diag H)``, multiplied by 10 (with a warning) while the Cholesky
factorisation fails. Rows go in blocks of ``block_size``: inside a block the updates are applied
row by row, the rows after the block get the block's accumulated errors in one matrix product
(the lazy batch update; the result is the same as row by row). A group's scale and zero point are
taken from the current, error-updated weights of its rows when its first row is reached, as the
reference does with a group size (the reference reads rows of the group past the current block
before they receive the pending update of the block; here they include it, which is the same thing
when ``block_size`` is a multiple of ``G``). With ``act_order`` the rows are processed in order of
decreasing ``H[k, k]`` (the most sensitive inputs first, while the most unquantized rows remain to
absorb errors); groups must stay contiguous ranges of the original ``K`` for MatMulNBits, so their
parameters are computed up front from the original weights (the reference's ``static_groups``)
and each row is quantized with the parameters of the group it belongs to in the original order.
The codes come back in the original order.

GPTQ's precision (:data:`GPTQ_PRECISIONS`). ``H`` is always accumulated in float64. The factor ``U``
and the row updates run in float64 or in float32; float32 halves the factor's memory (a 7B
``down_proj``'s ``K x K`` is 0.48 GB instead of 0.97 GB) and roughly halves the time of the
``O(K^3)`` factorisation and the ``O(K^2 N)`` lazy updates. The codes of a float32 row are
bit-identical to rounding the same row in float64 (:func:`_codes_float32`); what changes is the
rounding of the error feedback, so a few codes near a rounding boundary can differ
(``tools/bench_gptq_precision.py`` measures how many and what it does to the layer output error and
to perplexity). The GPTQ reference implementation runs all of it in float32.

AWQ (Lin et al., 2023). Scaling input channel ``k`` of ``W`` by ``s_k`` before quantization and the
activation by ``1 / s_k`` leaves ``y`` unchanged in exact arithmetic and shrinks the relative
rounding error of the salient channels (those with large activations). :func:`awq_search` tries
``s = a^alpha`` for ``alpha`` on a grid in ``[0, 1)``, ``a`` the mean ``|x|`` per channel (clamped at
``1e-4``), normalised by ``sqrt(max s * min s)``, and keeps the ``s`` with the smallest output
error ``mean (x W - (x / s) Q(W diag(s)))^2`` over a calibration sample (``alpha = 0`` is plain RTN,
so the result is never worse than RTN on that sample). :func:`awq_clip_search` then picks, per
group and column, the ``clip_ratio`` in ``[1 - max_shrink, 1]`` minimising that group's own
contribution to the output error, ``mean_m (x_g[m] . (w_g - w_hat_g))^2``.
Output errors are evaluated in float64 either directly or through the Gram matrix ``x^T x``
(whichever is cheaper), never by subtracting two large outputs.

MatMulNBits packing. ``B`` is uint8 ``[N, n_blocks, block_size * bits / 8]``: column ``n``'s codes in
``K`` order, padded with zeros to whole blocks, ``8 / bits`` codes per byte, the first in the low
bits. Scales are float32 ``[N * n_blocks]`` (column-major over blocks: ``scales[n * n_blocks + g]``);
zero points are packed the same way per column, ``[N * ceil(n_blocks * bits / 8)]``, and left out for
symmetric weights (ORT's default zero point is ``2^(bits-1)``). Both conventions are checked
against ONNX Runtime's kernel in ``tests/test_weight_only.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np

from graphq.errors import GraphqError

logger = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 2, 8
POW2_SCALES = "q8-pow2"  # 8-bit scale codes times a power of two per column (module docstring)
SCALE_DTYPES = ("float32", "float16", POW2_SCALES)  # how group scales (and float zero points' offsets) are stored
POW2_EXPONENT_RANGE = (-126, 127)  # float32's normal powers of two; an int8 exponent holds them
PACKABLE_BITS = (2, 4, 8)
MAX_2BIT_BLOCK = 256  # ONNX Runtime 1.32's CPU kernel refuses larger 2-bit blocks
AWQ_MIN_CHANNEL = 1e-4  # mean |x| below this is clamped before the power (as in the AWQ reference)
_DAMP_RETRIES = 4  # after the first try: damping x10, x100, x1000, x10000


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig:
    """Weight-only quantization: ``bits`` in 2..8, ``group_size`` rows of ``K`` per scale (0 or -1:
    per channel), symmetric (fixed zero point ``2^(bits-1)``) or asymmetric (a zero point per group)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    float_zero_points: bool = False  # asymmetric only: a float zero point per group (module docstring)
    # "float16": scales (and float zero points' offsets) rounded to float16 and stored so; "q8-pow2": rounded
    # to 8-bit codes times a power of two per column (module docstring). The numerics default keeps float32;
    # the recipes and precisions of the product choose float16 or q8-pow2.
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise GraphqError(f"weight bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise GraphqError(f"group size must be a positive integer, or 0 / -1 for per channel, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise GraphqError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.float_zero_points, bool):
            raise GraphqError(f"float_zero_points must be true or false, got {self.float_zero_points!r}")
        if self.float_zero_points and self.symmetric:
            raise GraphqError("float zero points need asymmetric groups (a symmetric group has no zero point to store)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise GraphqError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def zero_point_dtype(self) -> type:
        """float32 with float zero points, else uint8."""
        return np.float32 if self.float_zero_points else np.uint8

    @property
    def scale_bits(self) -> int:
        """Bits of a stored scale (and of a float zero point's offset): 32, 16, or 8 (q8-pow2)."""
        return {"float16": 16, POW2_SCALES: 8}.get(self.scale_dtype, 32)

    def bits_per_weight(self, group_length: int, k: int | None = None) -> float:
        """Nominal storage bits per weight: ``b`` for the code, ``scale_bits / G`` for a scale per group,
        and per group a zero point when asymmetric (``b / G``, or ``scale_bits / G`` when it is a float).
        With q8-pow2 and the input dimension ``K`` given, each column's int8 exponent adds ``8 / K`` per
        stored quantity (the scales, and the offsets of float zero points)."""
        zero = 0.0 if self.symmetric else (self.scale_bits if self.float_zero_points else self.bits) / group_length
        exponents = 0.0
        if self.scale_dtype == POW2_SCALES and k:
            exponents = 8.0 * (2 if self.float_zero_points else 1) / k
        return self.bits + self.scale_bits / group_length + zero + exponents

    @property
    def qmax(self) -> int:
        """Largest code: ``2^bits - 1``."""
        return 2**self.bits - 1

    @property
    def symmetric_zero_point(self) -> int:
        """``2^(bits-1)``: the zero point of the symmetric form (8 for 4 bits)."""
        return 2 ** (self.bits - 1)

    @property
    def per_channel(self) -> bool:
        return self.group_size <= 0

    def group_length(self, k: int, *, pad: bool = False) -> int:
        """``G`` for an input dimension ``K``; raises GraphqError if ``G`` does not divide ``K`` and not ``pad``."""
        if k <= 0:
            raise ValueError(f"the input dimension must be positive, got {k}")
        if self.per_channel:
            return k
        if k % self.group_size and not pad:
            raise GraphqError(
                f"group size {self.group_size} does not divide the input dimension K = {k}; "
                "choose a divisor of K, per-channel (group size 0), or allow padding of the last group"
            )
        return self.group_size

    def n_groups(self, k: int, *, pad: bool = False) -> int:
        return -(-k // self.group_length(k, pad=pad))


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Codes, scales and zero points of a quantized ``W [K, N]``; see the module docstring."""

    q: np.ndarray  # [K, N] uint8 codes in 0 .. 2^bits - 1 (zero point included)
    scales: np.ndarray  # [n_groups, N] float32 (symmetric scales may be negative: the sign trick)
    zero_points: np.ndarray  # [n_groups, N] uint8 (2^(bits-1) everywhere when symmetric); float32 with float zero points
    config: WeightQuantConfig

    def __post_init__(self) -> None:
        if self.q.ndim != 2 or self.q.dtype != np.uint8:
            raise ValueError(f"codes must be a 2-D uint8 array, got {self.q.dtype} {self.q.shape}")
        k, n = self.q.shape
        expected = (-(-k // self.group_length), n)
        for name, array, dtype in (("scales", self.scales, np.float32),
                                   ("zero_points", self.zero_points, self.config.zero_point_dtype)):
            if array.shape != expected or array.dtype != dtype:
                raise ValueError(f"{name} must be {np.dtype(dtype)} {expected}, got {array.dtype} {array.shape}")
        if k and int(self.q.max(initial=0)) > self.config.qmax:
            raise ValueError(f"codes exceed {self.config.qmax} for {self.config.bits} bits")
        if self.config.scale_dtype == "float16" and not _is_half(self.scales):
            raise ValueError("scale_dtype float16: every scale must be exactly a float16")
        if self.config.scale_dtype == POW2_SCALES:
            pow2_split(self.scales)  # ValueError unless every column is 8-bit codes times a power of two

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def group_length(self) -> int:
        """``G`` (``K`` when per channel); the last group may be shorter when ``K`` was padded."""
        return self.q.shape[0] if self.config.per_channel else self.config.group_size

    def group_of_rows(self) -> np.ndarray:
        """``g(k)`` for every row ``k``."""
        return np.arange(self.q.shape[0]) // self.group_length

    def dequantize(self) -> np.ndarray:
        """``W_hat[k, n] = (q[k, n] - z[g(k), n]) s[g(k), n]`` as float32 ``[K, N]``."""
        rows = self.group_of_rows()
        centred = self.q.astype(np.float32) - self.zero_points[rows].astype(np.float32)
        return (centred * self.scales[rows]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Round to nearest


def _as_weight(weight: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """A float64 (or ``dtype``) copy of a finite 2-D weight."""
    w = np.array(weight, dtype=dtype, copy=True)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"expected a non-empty 2-D weight [K, N], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("the weight contains NaN or infinity")
    return w


def _group_view(w: np.ndarray, g: int) -> np.ndarray:
    """``[K, N] -> [n_groups, G, N]``, padding the last group with zero rows (zeros never change a
    group's scale: the asymmetric range holds 0 anyway, and the symmetric one is a maximum of |w|)."""
    k, n = w.shape
    groups = -(-k // g)
    if groups * g != k:
        w = np.concatenate([w, np.zeros((groups * g - k, n), dtype=w.dtype)])
    return w.reshape(groups, g, n)


def _clip_ratios(clip_ratio: float | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ratio = np.asarray(clip_ratio, dtype=np.float64)
    if ratio.ndim and ratio.shape != shape:
        raise ValueError(f"clip_ratio must be a scalar or of shape {shape}, got {ratio.shape}")
    if not (np.isfinite(ratio).all() and (ratio > 0).all()):
        raise ValueError("clip ratios must be positive and finite")
    return np.broadcast_to(ratio, shape)


def _group_extremes(grouped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group ``min w`` and ``max w`` along axis -2, as float64 (exact: no rounding in min/max)."""
    return grouped.min(axis=-2).astype(np.float64), grouped.max(axis=-2).astype(np.float64)


def _params_from_groups(grouped: np.ndarray, config: WeightQuantConfig, ratio: np.ndarray | float = 1.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float32) and zero points (uint8; float32 with float zero points) for groups along axis -2:
    ``[..., G, N] -> [..., N]``."""
    return _params_from_extremes(*_group_extremes(grouped), config, ratio)


def _is_half(values: np.ndarray) -> bool:
    """Whether every value is exactly a float16."""
    with np.errstate(over="ignore"):
        return bool(np.array_equal(values.astype(np.float16).astype(values.dtype), values))


def pow2_split(values: np.ndarray, *, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``values [..., n_groups, N]`` as 8-bit codes ``c`` times ``2^e`` per column (over axis -2):
    ``(c, e)`` with ``c`` uint8 in ``0..255`` when no value is negative, else int8 in ``-127..127``, and
    ``e`` int8 ``[..., N]``, the smallest power of two putting the column's largest ``|value|`` within the
    code range (clamped to :data:`POW2_EXPONENT_RANGE`; 0 for an all-zero column). ``exact``: ValueError
    unless ``c 2^e`` equals the values (they were stored so); else the codes are rounded (half to even)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim < 2:
        raise ValueError("q8-pow2 values are coded per column over all its groups: expected [..., n_groups, N], "
                         f"got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("q8-pow2 values must be finite")
    signed = bool((v < 0).any())
    limit = 127 if signed else 255
    # The largest |value| shrunk by 2^-16 before the exponent is taken: values recomputed from stored ones
    # (an offset (c - z) s from a float32 z) a hair above a code of 127 or 255 keep their exponent.
    peak = np.abs(v).max(axis=-2) * (1.0 - 2.0**-16) / limit
    mantissa, exponent = np.frexp(peak)  # peak = m 2^x with m in [0.5, 1): the smallest 2^e >= peak is 2^x, or 2^(x-1) at m = 0.5
    exponent = np.where(peak > 0, exponent - (mantissa == 0.5), 0)
    exponent = np.clip(exponent, *POW2_EXPONENT_RANGE).astype(np.int8)
    scaled = v / np.exp2(exponent.astype(np.float64))[..., None, :]
    codes = np.rint(scaled)
    if exact and not np.array_equal(codes, scaled):
        raise ValueError("the values are not 8-bit codes times a power of two per column (scale_dtype q8-pow2)")
    codes = np.clip(codes, -limit if signed else 0, limit).astype(np.int8 if signed else np.uint8)
    return codes, exponent


def pow2_round(values: np.ndarray) -> np.ndarray:
    """``values [..., n_groups, N]`` rounded to the q8-pow2 grid (:func:`pow2_split`), as float32 (exact)."""
    codes, exponent = pow2_split(values, exact=False)
    return (codes.astype(np.float64) * np.exp2(exponent.astype(np.float64))[..., None, :]).astype(np.float32)


def _stored(values: np.ndarray, config: WeightQuantConfig, what: str = "scale") -> np.ndarray:
    """``values`` rounded to how they are stored (float32; float16 or q8-pow2 held in float32); GraphqError
    for a value beyond float16's range."""
    if config.scale_dtype == POW2_SCALES:
        return pow2_round(values)
    if config.scale_dtype != "float16":
        return np.asarray(values).astype(np.float32)
    with np.errstate(over="ignore"):
        half = np.asarray(values).astype(np.float16)
    if not np.isfinite(half).all():
        raise GraphqError(f"a group {what} exceeds float16's range (65504); use scale_dtype float32")
    return half.astype(np.float32)


def _nonzero_scale(scale: np.ndarray, config: WeightQuantConfig) -> np.ndarray:
    """A zero scale (a constant group) replaced by 1, or with q8-pow2 by its column's step ``2^e`` (code 1)."""
    if config.scale_dtype == POW2_SCALES:
        _, exponent = pow2_split(scale)
        one = np.broadcast_to(np.exp2(exponent.astype(np.float32))[..., None, :], scale.shape)
        return np.where(scale == 0, one, scale).astype(np.float32)
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def _params_from_extremes(low: np.ndarray, high: np.ndarray, config: WeightQuantConfig,
                          ratio: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points from each group's float64 ``min w`` and ``max w`` (module docstring)."""
    if config.float_zero_points:
        width = high - low
        lo = low + width * (1.0 - np.asarray(ratio)) / 2.0  # exactly ``low`` at ratio 1
        scale = _nonzero_scale(_stored(width * ratio / config.qmax, config), config)
        if config.scale_dtype != "float32":  # the stored offset (c - z) s = c s + lo is a float16 (or q8-pow2)
            centre = config.symmetric_zero_point
            offset = _stored(centre * scale.astype(np.float64) + lo, config, "offset").astype(np.float64)
            return scale, (centre - offset / scale.astype(np.float64)).astype(np.float32)
        return scale, (-lo / scale.astype(np.float64)).astype(np.float32)
    lo = np.minimum(low, 0.0) * ratio
    hi = np.maximum(high, 0.0) * ratio
    if config.symmetric:
        extreme = np.where(hi >= -lo, hi, lo)  # the signed value of largest magnitude
        scale = _nonzero_scale(_stored(extreme / -config.symmetric_zero_point, config), config)
        zero = np.full(scale.shape, config.symmetric_zero_point, dtype=np.uint8)
    else:
        scale = _nonzero_scale(_stored((hi - lo) / config.qmax, config), config)
        zero = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, config.qmax).astype(np.uint8)
    return scale, zero


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(round(w / s) + z, 0, qmax)`` (uint8), with ``s`` and ``z`` broadcasting against ``w``; a
    float zero point is added before rounding, ``round(w / s + z)``."""
    if zero.dtype.kind == "f":
        q = np.rint(w / scale.astype(np.float64) + zero.astype(np.float64))
        return np.clip(q, 0, qmax).astype(np.uint8)
    q = np.rint(w / scale.astype(np.float64)) + zero
    return np.clip(q, 0, qmax).astype(np.uint8)


def _codes_float32(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int) -> np.ndarray:
    """:func:`_codes` for float32 ``w`` and ``s``, bit for bit, at float32 cost.

    Division is correctly rounded in both precisions and rounding is monotone, so ``rint`` of the
    float32 quotient ``fl32(w / s)`` equals ``rint`` of the float64 one except where ``fl32(w / s)`` is
    exactly a half-integer (a float64 tie is also a float32 tie: a value within half a float64 ulp of
    ``n + 1/2`` rounds to it in float32 too); only those elements are recomputed in float64. Float zero
    points are worked in float64 (:func:`_codes`): their sum has no such shortcut."""
    if zero.dtype.kind == "f":
        return _codes(w.astype(np.float64), scale, zero, qmax)
    q = np.divide(w, scale)
    codes = np.rint(q)
    np.subtract(q, codes, out=q)
    ties = np.abs(q, out=q) == 0.5
    del q
    if ties.any():
        where = np.unravel_index(np.flatnonzero(ties), ties.shape)  # flatnonzero: ~15x faster than nonzero
        exact = w[where].astype(np.float64) / np.broadcast_to(scale, w.shape)[where].astype(np.float64)
        codes[where] = np.clip(np.rint(exact), -qmax - 1, qmax + 1)  # the final clip gives the same codes
    del ties
    codes += zero
    np.clip(codes, 0, qmax, out=codes)
    return codes.astype(np.uint8)


def group_params(weight: np.ndarray, config: WeightQuantConfig, *, clip_ratio: float | np.ndarray = 1.0,
                 pad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest scales ``[n_groups, N]`` (float32) and zero points (``config.zero_point_dtype``) of ``W [K, N]``."""
    w = _as_weight(weight)
    grouped = _group_view(w, config.group_length(w.shape[0], pad=pad))
    return _params_from_groups(grouped, config, _clip_ratios(clip_ratio, (grouped.shape[0], w.shape[1])))


def quantize_with_params(weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                         config: WeightQuantConfig, *, pad: bool = False) -> QuantizedWeight:
    """Codes of ``W [K, N]`` for given per-group scales and zero points ``[n_groups, N]``."""
    w = _as_weight(weight)
    k, n = w.shape
    rows = np.arange(k) // config.group_length(k, pad=pad)
    scales = np.asarray(scales, dtype=np.float32)
    zero_points = np.asarray(zero_points, dtype=config.zero_point_dtype)
    q = _codes(w, scales[rows], zero_points[rows], config.qmax)
    return QuantizedWeight(q, scales, zero_points, config)


# Weights with more elements than this are quantized in column chunks: every column is quantized on
# its own (groups run along K), so the result is the same, and the float64 temporaries (about six
# copies of the weight) stay at a few hundred MB even for a 7B model's [4096, 32000] LM head.
RTN_CHUNK_ELEMENTS = 1 << 25
# The precisions GPTQ's factor and updates can run in (``gptq_factor``; module docstring).
GPTQ_PRECISIONS = ("float64", "float32")
# GPTQ factors H once per chunk (O(K^3)), so it splits only the widest weights.
GPTQ_CHUNK_ELEMENTS = 1 << 26


def by_column_chunks(quantize, weight: np.ndarray, max_elements: int, clip_ratio: float | np.ndarray = 1.0,
                     **kwargs) -> QuantizedWeight:
    """``quantize(weight[:, cols], clip_ratio=...[:, cols], **kwargs)`` over column chunks of at most
    ``max_elements`` elements, joined; ``quantize`` must treat columns independently."""
    if np.ndim(weight) != 2:  # let ``quantize`` refuse it
        return quantize(weight, clip_ratio=clip_ratio, **kwargs)
    k, n = np.shape(weight)
    width = max(1, max_elements // max(k, 1))
    if width >= n:
        return quantize(weight, clip_ratio=clip_ratio, **kwargs)
    ratio = np.asarray(clip_ratio)
    parts = [quantize(weight[:, start:start + width], clip_ratio=ratio[:, start:start + width] if ratio.ndim else clip_ratio,
                      **kwargs) for start in range(0, n, width)]
    return type(parts[0])(np.concatenate([p.q for p in parts], axis=1), np.concatenate([p.scales for p in parts], axis=1),
                          np.concatenate([p.zero_points for p in parts], axis=1), parts[0].config)


def quantize_rtn(weight: np.ndarray, config: WeightQuantConfig, *, clip_ratio: float | np.ndarray = 1.0,
                 pad: bool = False) -> QuantizedWeight:
    """Round to nearest, each group's range shrunk by ``clip_ratio`` (a scalar or ``[n_groups, N]``);
    in column chunks of :data:`RTN_CHUNK_ELEMENTS` (bounded memory, same result)."""
    return by_column_chunks(_quantize_rtn, weight, RTN_CHUNK_ELEMENTS, clip_ratio, config=config, pad=pad)


def _quantize_rtn(weight: np.ndarray, *, config: WeightQuantConfig, clip_ratio: float | np.ndarray = 1.0,
                  pad: bool = False) -> QuantizedWeight:
    """:func:`group_params` then :func:`quantize_with_params`, bit for bit, in one pass over the groups:
    float16 and float32 weights are worked on in float32 (exact for both; :func:`_codes_float32`), with
    no ``[K, N]`` gather of scales, and non-finite values are caught through the group extremes."""
    w = np.asarray(weight)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"expected a non-empty 2-D weight [K, N], got shape {w.shape}")
    w = w.astype(np.float32 if w.dtype in (np.float16, np.float32) else np.float64, copy=False)
    k, n = w.shape
    grouped = _group_view(w, config.group_length(k, pad=pad))
    low, high = _group_extremes(grouped)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):  # min and max propagate NaN and infinity
        raise ValueError("the weight contains NaN or infinity")
    scales, zeros = _params_from_extremes(low, high, config, _clip_ratios(clip_ratio, low.shape))
    codes = _codes_float32 if w.dtype == np.float32 else _codes
    q = codes(grouped, scales[:, None, :], zeros[:, None, :], config.qmax).reshape(-1, n)[:k]
    return QuantizedWeight(q, scales, zeros, config)


# ---------------------------------------------------------------------------------------------
# GPTQ


HESSIAN_CHUNK_ELEMENTS = 1 << 24  # in-place accumulation adds x^T x in column blocks of this many elements


def running_matrix(matrix: np.ndarray | None, count: int, k: int, what: str) -> np.ndarray:
    """The running ``K x K`` float64 average to add a batch to: ``matrix`` itself (checked against ``k``
    and ``count``), or zeros to start with (``matrix`` None, ``count`` 0)."""
    if matrix is None:
        if count:
            raise ValueError(f"a running count without a {what}")
        matrix = np.zeros((k, k), dtype=np.float64)
    elif matrix.shape != (k, k):
        raise ValueError(f"{what} shape {matrix.shape} does not match inputs with {k} features")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return matrix


def fold_product_in_place(matrix: np.ndarray, rows: np.ndarray, others: np.ndarray, count: int) -> np.ndarray:
    """``M <- M n / (n + m) + 2 / (n + m) rows^T others`` in place (float64 ``M [K, K]``, ``m`` rows of
    ``[m, K]`` each), by column blocks: a ``K x width`` temporary, not ``K x K``. Returns ``M``."""
    total = count + rows.shape[0]
    matrix *= count / total
    width = max(1, HESSIAN_CHUNK_ELEMENTS // matrix.shape[1])
    for start in range(0, matrix.shape[1], width):
        part = rows.T @ others[:, start:start + width]
        part *= 2.0 / total
        matrix[:, start:start + width] += part
    return matrix


def hessian_accumulate(hessian: np.ndarray | None, x: np.ndarray, count: int, *, in_place: bool = False
                       ) -> tuple[np.ndarray, int]:
    """Fold a batch ``x [..., K]`` (``m`` rows) into the running ``H = 2 X^T X / n`` of ``count`` rows.

    ``H <- H n / (n + m) + 2 / (n + m) x^T x`` in float64; start with ``(None, 0)``. Returns the new
    ``(H, count)``; an empty batch changes nothing. ``in_place`` updates a float64 ``hessian`` itself,
    adding ``x^T x`` in column blocks (the same values up to the last bit; no ``K x K`` temporary, where
    the copying form makes three: 1 GB each for a 7B ``down_proj``).
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("expected a batch [..., K], got a scalar")
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64, copy=False)
    k = rows.shape[1]
    hessian = running_matrix(hessian, count, k, "Hessian")
    m = rows.shape[0]
    if m == 0:
        return hessian, count
    if not np.isfinite(rows).all():
        raise ValueError("the batch contains NaN or infinity")
    total = count + m
    if in_place and hessian.dtype == np.float64:
        return fold_product_in_place(hessian, rows, rows, count), total
    updated = hessian.astype(np.float64) * (count / total)
    updated += (2.0 / total) * (rows.T @ rows)
    return updated, total


FACTOR_BLOCK = 256  # block of the in-place Cholesky factorisation and triangular inverse


def _cholesky_lower_in_place(a: np.ndarray, block: int = FACTOR_BLOCK) -> None:
    """``a <- L`` with ``L L^T = a`` (lower; zeros above the diagonal), left-looking by column blocks:
    ``A[j:, J] -= L[j:, :j] L[J, :j]^T``, then the diagonal block's own Cholesky factor ``D`` and
    ``L[e:, J] = A[e:, J] D^-T``. Temporaries are ``K x block``, not ``K x K`` as in ``np.linalg.cholesky``
    (which copies its input and its output). Raises ``np.linalg.LinAlgError`` if ``a`` is not
    positive definite (``a`` is then partly overwritten)."""
    k = a.shape[0]
    for j in range(0, k, block):
        e = min(j + block, k)
        if j:
            a[j:, j:e] -= a[j:, :j] @ a[j:e, :j].T
        d = np.linalg.cholesky(a[j:e, j:e])
        a[j:e, j:e] = d
        a[j:e, e:] = 0.0
        if e < k:
            a[e:, j:e] = a[e:, j:e] @ np.tril(np.linalg.inv(d)).T


def _invert_lower_in_place(a: np.ndarray, block: int = FACTOR_BLOCK) -> None:
    """``a <- L^-1`` for lower-triangular ``L``, by column blocks from the last:
    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]`` with ``C^-1`` already in place."""
    k = a.shape[0]
    for j in reversed(range(0, k, block)):
        e = min(j + block, k)
        inverse = np.tril(np.linalg.inv(a[j:e, j:e]))
        a[j:e, j:e] = inverse
        if e < k:
            a[e:, j:e] = -(a[e:, e:] @ a[e:, j:e]) @ inverse


def _reverse_in_place(a: np.ndarray) -> None:
    """``a <- J a J`` (rows and columns reversed) without a ``K x K`` copy."""
    k = a.shape[0]
    for i in range(k // 2):
        top = a[i, ::-1].copy()
        a[i] = a[k - 1 - i, ::-1]
        a[k - 1 - i] = top
    if k % 2:
        a[k // 2] = a[k // 2, ::-1].copy()


def _inverse_cholesky_upper(hessian: np.ndarray, damp: float, *, order: np.ndarray | None = None,
                            dtype: type = np.float64) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H_P + lambda I)^-1``, ``lambda = damp * mean(diag H_P)``, raised x10 on
    failure, where ``H_P = H[order][:, order]`` with zero diagonal entries (inputs that never fired)
    replaced by 1. ``hessian`` itself is not modified.

    With ``J`` the reversal permutation and ``J (H_P + lambda I) J = M M^T`` (lower Cholesky),
    ``(H_P + lambda I)^-1 = (J M^-1 J)^T (J M^-1 J)`` and ``J M^-1 J`` is upper triangular with a
    positive diagonal: the unique factor, from one factorisation.

    Memory: one ``K x K`` array of ``dtype`` (float64, or float32: :data:`GPTQ_PRECISIONS`), filled row
    by row with ``J H_P J`` and factorised, inverted and reversed in place by blocks
    (:func:`_cholesky_lower_in_place`, :func:`_invert_lower_in_place`), plus ``K x FACTOR_BLOCK``
    temporaries; ``np.linalg.cholesky`` and ``np.linalg.inv`` would each copy their input and output
    (about 5 ``K x K`` arrays, 1 GB each in float64 for a 7B ``down_proj``)."""
    k = hessian.shape[0]
    reverse = (np.arange(k) if order is None else np.asarray(order))[::-1]
    diagonal = np.diag(hessian)[reverse].astype(np.float64)
    diagonal[diagonal == 0] = 1.0
    mean_diag = float(np.mean(diagonal))
    if not mean_diag > 0:
        raise GraphqError("the GPTQ Hessian has a non-positive mean diagonal; the calibration inputs are unusable")
    fraction = damp
    a = np.empty((k, k), dtype=dtype)
    for attempt in range(_DAMP_RETRIES + 1):
        for row, source in enumerate(reverse):
            a[row] = hessian[source, reverse]
        a[np.diag_indices(k)] = diagonal + fraction * mean_diag
        try:
            _cholesky_lower_in_place(a)
            _invert_lower_in_place(a)
            _reverse_in_place(a)
            if np.isfinite(a).all() and (np.diag(a) > 0).all():
                return a
        except np.linalg.LinAlgError:
            pass
        if attempt == _DAMP_RETRIES:
            break
        new_fraction = fraction * 10 if fraction > 0 else 1e-3
        logger.warning("GPTQ: the damped Hessian is not positive definite at damp=%g; retrying with damp=%g",
                       fraction, new_fraction)
        fraction = new_fraction
    raise GraphqError(
        f"GPTQ: the Hessian is not positive definite even with damping {fraction:g} x mean(diag H); "
        "use more (or more varied) calibration data"
    )


@dataclasses.dataclass(frozen=True)
class GptqGrid:
    """The quantization grid GPTQ rounds each row onto: ``params(grouped [.., G, N], ratio)`` gives a
    group's scales (float32) and zero points (``config.zero_point_dtype``), ``round(row [N], scale [N], zero [N])`` a row's
    codes (uint8) and their dequantized values (float64, or float32 for a float32 row where the grid
    supports it), ``result`` the class holding the outcome."""

    params: Callable[[np.ndarray, np.ndarray | float], tuple[np.ndarray, np.ndarray]]
    round: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    result: type = QuantizedWeight


def uniform_grid(config: WeightQuantConfig) -> GptqGrid:
    """The evenly spaced grid of :func:`quantize_rtn` (module docstring)."""

    def round_row(row: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if row.dtype == np.float32:  # the same codes at float32 cost; ``(q - z) s`` rounded once to float32
            q = _codes_float32(row, scale, zero, config.qmax)
            return q, (q.astype(np.float32) - zero.astype(np.float32)) * scale
        q = _codes(row, scale, zero, config.qmax)
        return q, (q.astype(np.float64) - zero) * scale.astype(np.float64)

    return GptqGrid(lambda grouped, ratio: _params_from_groups(grouped, config, ratio), round_row)


@dataclasses.dataclass(frozen=True, eq=False)
class GptqFactor:
    """What GPTQ needs from ``H`` alone: the order rows are processed in (decreasing ``H[k, k]`` with
    ``act_order``, else ``0 .. K-1``) and the upper factor ``U`` of that order
    (:func:`_inverse_cholesky_upper`). MatMuls that share an input (q/k/v, gate/up) share it."""

    order: np.ndarray
    upper: np.ndarray


def gptq_factor(hessian: np.ndarray, *, damp: float = 0.01, act_order: bool = False,
                precision: str = "float64") -> GptqFactor:
    """:class:`GptqFactor` of ``H [K, K]`` (validated: square, finite, ``damp >= 0``), its ``U`` computed and
    stored in ``precision`` (:data:`GPTQ_PRECISIONS`); GPTQ then runs its updates in that precision."""
    if precision not in GPTQ_PRECISIONS:
        raise ValueError(f"GPTQ precision must be one of {GPTQ_PRECISIONS}, got '{precision}'")
    h = np.asarray(hessian)  # not copied (1 GB in float64 for a 7B down_proj)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"expected a square Hessian, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise GraphqError("the GPTQ Hessian contains NaN or infinity; check the calibration inputs")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    diagonal = np.diag(h).astype(np.float64)
    diagonal[diagonal == 0] = 1.0  # inputs that never fired: H[k, k] = 1 (module docstring)
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(h.shape[0])
    return GptqFactor(order, _inverse_cholesky_upper(h, damp, order=order, dtype=np.dtype(precision).type))


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, config: WeightQuantConfig, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, pad: bool = False,
                  clip_ratio: float | np.ndarray = 1.0, factor: GptqFactor | None = None,
                  grid: GptqGrid | None = None, precision: str = "float64") -> QuantizedWeight:
    """GPTQ of ``W [K, N]`` given ``H [K, K]`` (:func:`hessian_accumulate`); see the module docstring.

    ``clip_ratio`` (a scalar or ``[n_groups, N]``, e.g. from :func:`awq_clip_search`) shrinks each
    group's range before its scale is taken, as in :func:`quantize_rtn`. Columns are independent
    (the error feedback runs along K), so weights above :data:`GPTQ_CHUNK_ELEMENTS` go in column chunks,
    all with one :func:`gptq_factor` of ``H`` (``factor``: one computed by the caller with the same
    ``damp`` and ``act_order``, e.g. for several weights that read the same input). The updates run in
    the precision of the factor (``precision`` when none is given; module docstring)."""
    if factor is None:
        if np.ndim(weight) != 2 or np.shape(hessian) != (np.shape(weight)[0],) * 2:
            raise ValueError(f"Hessian shape {np.shape(hessian)} does not match a weight of shape {np.shape(weight)}")
        factor = gptq_factor(hessian, damp=damp, act_order=act_order, precision=precision)
    return by_column_chunks(_gptq_quantize, weight, GPTQ_CHUNK_ELEMENTS, clip_ratio, hessian=hessian, config=config,
                            factor=factor, block_size=block_size, act_order=act_order, pad=pad, grid=grid)


def _gptq_quantize(weight: np.ndarray, *, hessian: np.ndarray, config: WeightQuantConfig, factor: GptqFactor,
                   block_size: int = 128, act_order: bool = False, pad: bool = False,
                   clip_ratio: float | np.ndarray = 1.0, grid: GptqGrid | None = None) -> QuantizedWeight:
    grid = grid or uniform_grid(config)
    dtype = factor.upper.dtype
    w = _as_weight(weight, dtype)
    k, n = w.shape
    h = np.asarray(hessian)
    if h.shape != (k, k) or factor.upper.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match a weight with K = {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    g = config.group_length(k, pad=pad)
    n_groups = -(-k // g)
    ratios = _clip_ratios(clip_ratio, (n_groups, n))

    w[np.diag(h) == 0, :] = 0.0  # inputs that never fired

    scales = np.empty((n_groups, n), dtype=np.float32)
    zeros = np.empty((n_groups, n), dtype=config.zero_point_dtype)
    perm, upper = factor.order, factor.upper
    static = act_order or config.scale_dtype == POW2_SCALES  # q8-pow2 codes a column's scales together
    if static:
        scales[:], zeros[:] = grid.params(_group_view(w, g), ratios)  # static groups
        w = w[perm]
    group_of = perm // g  # the original group of each processed row

    codes = np.empty((k, n), dtype=np.uint8)
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = w[start:stop]  # a view: updated in place
        block_u = upper[start:stop, start:stop]
        errors = np.zeros((stop - start, n), dtype=dtype)
        for i in range(stop - start):
            row = start + i
            group = group_of[row]
            if not static and row % g == 0:
                end = min(row + g, k)
                current = block[i:end - start]
                if end > stop:  # the rows past this block still owe it the errors of rows start..row-1
                    pending = w[stop:end] - upper[start:row, stop:end].T @ errors[:i]
                    current = np.concatenate([current, pending])
                scales[group], zeros[group] = grid.params(current, ratios[group])
            q, dequantized = grid.round(block[i], scales[group], zeros[group])
            codes[row] = q
            errors[i] = (block[i] - dequantized) / block_u[i, i]
            block[i + 1:] -= np.outer(block_u[i, i + 1:], errors[i])
        w[stop:] -= upper[start:stop, stop:].T @ errors

    original = np.empty_like(codes)
    original[perm] = codes
    return grid.result(original, scales, zeros, config)


# ---------------------------------------------------------------------------------------------
# AWQ


class _OutputError:
    """``sum (x D)^2 / M`` for weight differences ``D [K, N]``: from a sample ``x [M, K]`` directly, or
    through the Gram matrix ``x^T x / M`` (cheaper when ``M > K``; also what a streamed GPTQ Hessian
    ``H = 2 x^T x / M`` gives without keeping any sample: pass ``hessian=H``)."""

    def __init__(self, x: np.ndarray | None, k: int, *, hessian: np.ndarray | None = None) -> None:
        if hessian is not None:
            h = np.asarray(hessian, dtype=np.float64)
            if h.shape != (k, k) or not np.isfinite(h).all():
                raise ValueError(f"expected a finite Hessian [{k}, {k}], got shape {h.shape}")
            self.gram, self.x = h / 2.0, None
            return
        if x is None:
            raise ValueError("give a calibration sample x or its Hessian")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != k or x.shape[0] == 0:
            raise ValueError(f"expected a sample [M, {k}] with M > 0, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("the sample contains NaN or infinity")
        self.gram = x.T @ x / x.shape[0] if x.shape[0] > k else None
        self.x = None if self.gram is not None else x

    def mean_sse(self, diff: np.ndarray) -> float:
        if self.gram is not None:
            return float(np.einsum("kn,kn->", diff, self.gram @ diff))
        out = self.x @ diff
        return float(np.einsum("mn,mn->", out, out)) / self.x.shape[0]


def awq_search(weight: np.ndarray, x_abs_mean: np.ndarray, x_sample: np.ndarray | None, config: WeightQuantConfig, *,
               grid: int = 20, pad: bool = False, hessian: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """AWQ per-input-channel scales ``s [K]`` (float32) and their loss ``mean (x W - (x/s) Q(W diag(s)))^2``.

    ``x_abs_mean [K]`` is the mean ``|x|`` per channel over the calibration set, ``x_sample [M, K]`` the
    inputs the loss is measured on. Fold the result as ``W <- diag(s) W`` and ``x <- x / s`` (into
    the producer of ``x``); weights that share one input (q/k/v) can be searched together by
    concatenating them along ``N``. ``alpha = 0`` (``s = 1``, plain RTN) is on the grid.
    """
    w = _as_weight(weight)
    k, n = w.shape
    a = np.asarray(x_abs_mean, dtype=np.float64)
    if a.shape != (k,) or not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"x_abs_mean must be {k} finite non-negative values, got shape {a.shape}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    meter = _OutputError(x_sample, k, hessian=hessian)
    base = np.maximum(a, AWQ_MIN_CHANNEL)
    best_loss, best_scales = math.inf, np.ones(k)
    for step in range(grid):
        alpha = step / grid
        s = base**alpha
        s = s / math.sqrt(s.max() * s.min())
        w_hat = quantize_rtn(w * s[:, None], config, pad=pad).dequantize().astype(np.float64) / s[:, None]
        loss = meter.mean_sse(w - w_hat) / n
        if loss < best_loss:
            best_loss, best_scales = loss, s
    return best_scales.astype(np.float32), float(best_loss)


def awq_clip_search(weight: np.ndarray, x_sample: np.ndarray | None, config: WeightQuantConfig, *, grid: int = 20,
                    max_shrink: float = 0.5, pad: bool = False, column_chunk: int = 4096,
                    hessian: np.ndarray | None = None, levels: GptqGrid | None = None,
                    precision: str = "float64") -> np.ndarray:
    """Per-group clip ratios ``[n_groups, N]`` (float64, for :func:`quantize_rtn`) minimising each group's
    output error ``mean_m (x_g[m] . (w_g - w_hat_g))^2`` on ``x_sample [M, K]``.

    Candidates are ``1 - i / grid`` for ``i = 0 .. round(max_shrink * grid)``; ratio 1 comes first
    and is only replaced by a strictly smaller error, so no group gets worse than unclipped RTN.
    With ``x_sample=None``, the per-group Gram matrices are the diagonal blocks of ``hessian = 2 x^T x / M``
    (the same minimiser: the error is a quadratic form in the group's rows). Works one group of rows
    and ``column_chunk`` output columns at a time: memory is ``O(G * column_chunk)``, and each
    candidate costs one ``G x G`` by ``G x column_chunk`` product (few, large BLAS calls rather than
    many small ones, which multi-threaded BLAS runs poorly on a busy machine).
    ``levels``: the grid the weights are rounded onto (default the uniform one; e.g. the cube-root grid).
    ``precision`` (:data:`GPTQ_PRECISIONS`): of the weights, Gram blocks and errors compared.
    """
    if precision not in GPTQ_PRECISIONS:
        raise ValueError(f"clip search precision must be one of {GPTQ_PRECISIONS}, got '{precision}'")
    dtype = np.dtype(precision).type
    w = _as_weight(weight, dtype)
    k, n = w.shape
    if grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"need grid >= 1 and max_shrink in [0, 1), got {grid}, {max_shrink}")
    if column_chunk < 1:
        raise ValueError(f"column_chunk must be >= 1, got {column_chunk}")
    g = config.group_length(k, pad=pad)
    n_groups = -(-k // g)
    if hessian is not None:
        h = np.asarray(hessian, dtype=np.float64)
        if h.shape != (k, k) or not np.isfinite(h).all():
            raise ValueError(f"expected a finite Hessian [{k}, {k}], got shape {h.shape}")

        def gram_of(rows: slice) -> np.ndarray:
            return (h[rows, rows] / 2.0).astype(dtype, copy=False)
    else:
        if x_sample is None:
            raise ValueError("give a calibration sample x or its Hessian")
        x = np.asarray(x_sample, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != k or x.shape[0] == 0 or not np.isfinite(x).all():
            raise ValueError(f"expected a finite sample [M, {k}] with M > 0, got shape {x.shape}")

        def gram_of(rows: slice) -> np.ndarray:
            return (x[:, rows].T @ x[:, rows]).astype(dtype, copy=False)  # x_g^T x_g
    ratios = [1.0 - i / grid for i in range(int(round(max_shrink * grid)) + 1)]
    if config.scale_dtype == POW2_SCALES:  # one group at a time: candidates compared with unrounded scales
        config = dataclasses.replace(config, scale_dtype="float32")
    rounding = levels or uniform_grid(config)
    best_ratio = np.ones((n_groups, n), dtype=np.float64)
    for index in range(n_groups):
        rows = slice(index * g, min((index + 1) * g, k))  # the last group may be shorter (pad)
        gram = gram_of(rows)
        for c0 in range(0, n, column_chunk):
            part = w[rows, c0:c0 + column_chunk]  # [G, nc]
            best_err = np.full(part.shape[1], np.inf)
            for ratio in ratios:
                scale, zero = rounding.params(part, ratio)
                _, deq = rounding.round(part, scale, zero)
                diff = part - deq
                err = np.einsum("in,in->n", diff, gram @ diff)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_ratio[index, c0:c0 + column_chunk][better] = ratio
    return best_ratio


# ---------------------------------------------------------------------------------------------
# ONNX Runtime MatMulNBits


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``q [K, N]`` -> uint8 ``[N, n_blocks, block_size * bits / 8]``: per column, ``K`` order, zero-padded
    to whole blocks, ``8 / bits`` codes per byte, low bits first."""
    if bits not in PACKABLE_BITS:
        raise GraphqError(f"MatMulNBits packs {', '.join(map(str, PACKABLE_BITS))} bits, not {bits}")
    per_byte = 8 // bits
    if block_size < 1 or block_size % per_byte:
        raise ValueError(f"block size {block_size} is not a multiple of {per_byte}")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"expected codes [K, N], got shape {codes.shape}")
    if codes.size and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes exceed {2**bits - 1} for {bits} bits")
    k, n = codes.shape
    n_blocks = -(-k // block_size)
    rows = n_blocks * block_size
    if rows != k or codes.dtype != np.uint8:
        padded = np.zeros((rows, n), dtype=np.uint8)
        padded[:k] = codes
        codes = padded
    packed = np.zeros((rows // per_byte, n), dtype=np.uint8)  # packed along K first: contiguous rows
    for j in range(per_byte):
        packed |= codes[j::per_byte] << np.uint8(bits * j)
    return _transposed(packed).reshape(n, n_blocks, block_size // per_byte)


def _transposed(array: np.ndarray, tile: int = 256) -> np.ndarray:
    """A C-contiguous copy of ``array.T`` (2-D), copied tile by tile: several times faster than numpy's
    strided copy for large byte matrices, which misses the cache on every element."""
    rows, cols = array.shape
    out = np.empty((cols, rows), dtype=array.dtype)
    for r in range(0, rows, tile):
        for c in range(0, cols, tile):
            out[c:c + tile, r:r + tile] = array[r:r + tile, c:c + tile].T
    return out


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``[N, n_blocks, blob] -> q [K, N]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = packed.shape[0]
    mask = 2**bits - 1
    fields = [(packed >> (bits * j)) & mask for j in range(8 // bits)]
    return np.stack(fields, axis=-1).reshape(n, -1)[:, :k].T.copy()


def packed_uint4(codes: np.ndarray, block_size: int) -> np.ndarray:
    """4-bit codes ``[K, N]`` packed for MatMulNBits: ``[N, n_blocks, block_size / 2]``, low nibble first."""
    return pack_codes(codes, 4, block_size)


def _pack_last_axis(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis (a multiple of ``8 / bits`` long), first value in the low bits."""
    per_byte = 8 // bits
    fields = values.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint8)
    out = np.zeros(fields.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        out |= (fields[..., j] << (bits * j)).astype(np.uint8)
    return out


def matmul_nbits_block_size(qw: QuantizedWeight) -> int:
    """MatMulNBits' ``block_size`` for ``qw``: the group length, which must be a power of two >= 16; a
    single group (per channel) may instead use the next such power above ``K`` (zero padding).
    2-bit blocks are limited to 256 (ONNX Runtime's CPU kernel)."""
    g = qw.group_length
    if g >= 16 and g & (g - 1) == 0:
        block = g
    elif qw.scales.shape[0] == 1:
        block = max(16, 1 << (qw.q.shape[0] - 1).bit_length())
    else:
        raise GraphqError(
            f"MatMulNBits needs a block size that is a power of two >= 16, got group size {g}; "
            "choose a group size of 16, 32, 64, 128 or 256"
        )
    if qw.config.bits == 2 and block > MAX_2BIT_BLOCK:
        raise GraphqError(f"ONNX Runtime's 2-bit MatMulNBits takes blocks of at most {MAX_2BIT_BLOCK}, got {block}; "
                          "use a smaller group size")
    return block


def split_float_zero_points(qw: QuantizedWeight) -> tuple[QuantizedWeight, np.ndarray]:
    """Float zero points as a symmetric weight plus per-group offsets, for kernels without them.

    With ``c = 2^(b-1)``, ``(q - z) s = (q - c) s + (c - z) s``: the same codes and scales read with the
    fixed zero point ``c`` (the symmetric form), plus an offset ``O[g, n] = (c - z[g, n]) s[g, n]`` that
    is constant over the rows of group ``g``. So ``x W_hat = x W_sym + S(x) O`` with the group sums
    ``S(x)[g] = sum_{k in g} x_k``. Returns ``(W_sym, O)``, ``O`` float32 ``[n_groups, N]`` (rounded to the
    storage type: with float16 scales, exactly the float16 offsets the numerics chose)."""
    if not qw.config.float_zero_points:
        raise ValueError("the weight has integer zero points")
    config = dataclasses.replace(qw.config, symmetric=True, float_zero_points=False)
    centre = config.symmetric_zero_point
    offsets = _stored((centre - qw.zero_points.astype(np.float64)) * qw.scales.astype(np.float64), qw.config, "offset")
    return QuantizedWeight(qw.q, qw.scales, np.full(qw.scales.shape, centre, dtype=np.uint8), config), offsets


def pack_matmul_nbits(qw: QuantizedWeight) -> dict:
    """The inputs and attributes of ``com.microsoft.MatMulNBits`` for ``qw`` (2, 4 or 8 bits).

    Returns ``B`` uint8 ``[N, n_blocks, blob_size]``, ``scales`` float32 ``[N * n_blocks]``,
    ``zero_points`` uint8 ``[N * ceil(n_blocks * bits / 8)]`` (None when symmetric: ORT then uses
    ``2^(bits-1)``; float32 ``[N * n_blocks]``, unpacked, with float zero points), and the attributes
    ``K``, ``N``, ``bits``, ``block_size``.
    """
    bits = qw.config.bits
    if bits not in PACKABLE_BITS:
        raise GraphqError(f"MatMulNBits packs {', '.join(map(str, PACKABLE_BITS))} bits, not {bits}")
    k, n = qw.q.shape
    block_size = matmul_nbits_block_size(qw)
    n_blocks = qw.scales.shape[0]
    zero_points = None
    if qw.config.float_zero_points:
        zero_points = np.ascontiguousarray(qw.zero_points.T, dtype=np.float32).reshape(-1)
    elif not qw.config.symmetric:
        per_byte = 8 // bits
        columns = np.zeros((n, -(-n_blocks // per_byte) * per_byte), dtype=np.uint8)
        columns[:, :n_blocks] = qw.zero_points.T
        zero_points = _pack_last_axis(columns, bits).reshape(-1)
    return {
        "B": pack_codes(qw.q, bits, block_size),
        "scales": np.ascontiguousarray(qw.scales.T, dtype=np.float32).reshape(-1),
        "zero_points": zero_points,
        "K": k,
        "N": n,
        "bits": bits,
        "block_size": block_size,
    }
