"""Non-uniform quantization by cube-root companding (seed 004), pure numpy.

Companding. ``f(x) = sign(x) |x|^(1/3)`` and its inverse ``f^-1(v) = v^3``. Quantizing ``f(x)`` on a
uniform grid and cubing back puts the levels of ``x`` at ``(k d)^3``: dense near 0, sparse at the
extremes, so small values (which the seed finds the most vulnerable) get small absolute errors and
large values larger ones.

Weights (``W [K, N]``, groups of ``G`` rows along ``K`` as in :mod:`graphq.numerics.weight_only`;
``G = K`` per channel). With ``b`` bits, ``Z = 2^(b-1)`` and the group's signed value of largest
magnitude ``e``, the group scale is

    sigma = e / -Z^3      (float32; 1 for an all-zero group)

and a weight's level is ``k = clip(round(f(w / sigma)), -Z, Z - 1)``, stored as the unsigned code
``q = k + Z`` (``0 .. 2^b - 1``). Since ``f(w / sigma) = Z f(w / -e)``, this is the uniform grid of
step ``1 / Z`` on ``f(w / max|w|)`` with the sign trick of the uniform RTN: ``e`` lands on
``k = -Z`` exactly and the ``2^b`` levels are all used; a value of the other sign beyond
``f``-distance ``Z - 1/2`` is clipped to ``k = Z - 1`` (less than one step in the companded domain).
Dequantization is

    w_hat = sigma * codebook[q],   codebook[q] = (q - Z)^3      (exact integers in float32)

so ``w_hat = |e| ((k / Z))^3 * sign``: the seed's ``s (q d)^3`` with ``s = |e|`` and ``d = 1 / Z``.
The product is one float32 rounding, which is what the ``codebook`` graph form computes
(``Gather`` of the codebook, times the group scale). The ``dq-cube`` form computes instead
``y = k t`` (``DequantizeLinear`` of int4/int8 ``k`` with ``t = float32(cbrt(sigma))``) then
``y * y * y`` (``Pow(y, 3)``, which ONNX Runtime evaluates as ``(y * y) * y``):
:meth:`CubeRootWeight.dequantize_cube_form` reproduces it, within a few float32 ulps of the codebook
form.

Bits: 4 (uint4 / int4 storage, two codes per byte) or 8; other widths are refused (no packed
storage type to emit). Symmetric only: companding is odd about 0, a zero point would break it.

Activations (W8A8). The same map with ``Z = 127`` on a symmetric int8 grid (zero point 0):
``s = f(r) / 127`` for a range ``r`` (static: the calibrated ``max |x|``; ``f`` is monotone, so the
range of ``f(x)`` is ``f(r)``; per token: ``r_t = max_k |x[t, k]|``), ``q = clip(round(f(x) / s),
-127, 127)``, ``x_hat = (q s)^3``. The MatMul then reads cubed values, which no integer kernel can
consume: ``x_hat . w_hat = s^3 sigma sum_k q_k^3 c_k`` would need products of cubed codes (up to
``127^6``), far outside int8 x int8 -> int32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphq.errors import GraphqError
from graphq.numerics.weight_only import GptqGrid, QuantizedWeight, WeightQuantConfig, _as_weight, _group_view, gptq_quantize

CUBEROOT_BITS = (4, 8)
ACTIVATION_QMAX = 127
# Guards a per-token scale of an all-zero row.
MIN_SCALE = 1e-12


def compand(x: np.ndarray) -> np.ndarray:
    """``f(x) = sign(x) |x|^(1/3)`` (numpy's ``cbrt`` is exactly that, odd and monotone)."""
    return np.cbrt(x)


def expand(v: np.ndarray) -> np.ndarray:
    """``f^-1(v) = v^3``."""
    return v * v * v


def check_cuberoot_config(config: WeightQuantConfig) -> None:
    """Refuse what cube-root weight quantization cannot emit (bits other than 4/8, zero points)."""
    if config.bits not in CUBEROOT_BITS:
        raise GraphqError(f"cube-root quantization supports {' or '.join(map(str, CUBEROOT_BITS))} bits, got {config.bits}")
    if not config.symmetric:
        raise GraphqError("cube-root quantization is symmetric (companding is odd about 0); drop --asym")
    if config.scale_dtype != "float32":
        raise GraphqError("cube-root weights keep float32 group scales (the dq-cube form stores their cube roots); "
                          "use scale_dtype float32")


def codebook(bits: int) -> np.ndarray:
    """``(q - 2^(b-1))^3`` for every code ``q`` (float32, exact)."""
    centred = np.arange(2**bits, dtype=np.float64) - 2 ** (bits - 1)
    return (centred**3).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class CubeRootWeight(QuantizedWeight):
    """Codes and group scales ``sigma`` of a cube-root quantized ``W [K, N]`` (module docstring).

    ``zero_points`` are ``2^(b-1)`` everywhere (the code of level 0); ``scales`` are ``sigma``."""

    def dequantize(self) -> np.ndarray:
        """``W_hat[k, n] = sigma[g(k), n] * codebook[q[k, n]]`` as float32 ``[K, N]``."""
        rows = self.group_of_rows()
        return (codebook(self.config.bits)[self.q] * self.scales[rows]).astype(np.float32)

    @property
    def levels(self) -> np.ndarray:
        """Signed levels ``k = q - 2^(b-1)`` (int8)."""
        return (self.q.astype(np.int16) - self.config.symmetric_zero_point).astype(np.int8)

    @property
    def cube_scales(self) -> np.ndarray:
        """``t = float32(cbrt(sigma))`` per group, the DequantizeLinear scale of the ``dq-cube`` form."""
        return np.cbrt(self.scales.astype(np.float64)).astype(np.float32)

    def dequantize_cube_form(self) -> np.ndarray:
        """``y = k t`` then ``(y * y) * y`` in float32: what ``DequantizeLinear -> Pow(., 3)`` computes."""
        y = (self.levels.astype(np.float32) * self.cube_scales[self.group_of_rows()]).astype(np.float32)
        return (y * y) * y


def cuberoot_group_params(grouped: np.ndarray, config: WeightQuantConfig, ratio: np.ndarray | float = 1.0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``sigma = r e / -Z^3`` (float32; 1 for an all-zero group) and the zero points ``Z`` for groups
    along axis -2 (``[..., G, N] -> [..., N]``); ``r`` shrinks the group's extreme ``e`` (clip ratio)."""
    lo, hi = grouped.min(axis=-2), grouped.max(axis=-2)
    extreme = np.where(hi >= -lo, hi, lo) * ratio
    z = config.symmetric_zero_point
    sigma = (extreme / -float(z) ** 3).astype(np.float32)
    sigma = np.where(sigma == 0, np.float32(1.0), sigma).astype(np.float32)
    return sigma, np.full(sigma.shape, z, dtype=np.uint8)


def _cuberoot_codes(w: np.ndarray, sigma: np.ndarray, config: WeightQuantConfig) -> np.ndarray:
    z = config.symmetric_zero_point
    levels = np.clip(np.rint(compand(w / sigma.astype(np.float64))), -z, z - 1)
    return (levels + z).astype(np.uint8)


def quantize_cuberoot(weight: np.ndarray, config: WeightQuantConfig, *, pad: bool = False) -> CubeRootWeight:
    """Round ``f(w / sigma)`` to the nearest level, per group (module docstring)."""
    check_cuberoot_config(config)
    w = _as_weight(weight)
    k = w.shape[0]
    g = config.group_length(k, pad=pad)
    sigma, zeros = cuberoot_group_params(_group_view(w, g), config)
    rows = np.arange(k) // g
    return CubeRootWeight(_cuberoot_codes(w, sigma[rows], config), sigma, zeros, config)


def cuberoot_grid(config: WeightQuantConfig) -> GptqGrid:
    """The cube-root grid for GPTQ: each row rounds ``f(w / sigma)`` to the nearest level and its
    error ``w - sigma (q - Z)^3`` is spread over the rows not yet quantized, as on the uniform grid."""
    check_cuberoot_config(config)
    table = codebook(config.bits).astype(np.float64)

    def round_row(row: np.ndarray, sigma: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _cuberoot_codes(row, sigma, config)
        return q, table[q] * sigma.astype(np.float64)

    return GptqGrid(lambda grouped, ratio: cuberoot_group_params(grouped, config, ratio), round_row, CubeRootWeight)


def gptq_cuberoot(weight: np.ndarray, hessian: np.ndarray, config: WeightQuantConfig, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, pad: bool = False) -> CubeRootWeight:
    """GPTQ (:func:`graphq.numerics.weight_only.gptq_quantize`) on the cube-root grid."""
    return gptq_quantize(weight, hessian, config, damp=damp, block_size=block_size, act_order=act_order, pad=pad,
                         grid=cuberoot_grid(config))


# ---------------------------------------------------------------------------------------------
# Activations


def activation_scale(abs_max: np.ndarray | float) -> np.ndarray:
    """``s = f(r) / 127`` (float32) for a range ``r = max |x|``; ``s = 1`` where ``r = 0``."""
    r = np.asarray(abs_max, dtype=np.float64)
    scale = (compand(r) / ACTIVATION_QMAX).astype(np.float32)
    return np.where(r > 0, scale, np.float32(1.0)).astype(np.float32)


def fake_quantize_activation(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(clip(round(f(x) / s), -127, 127) s)^3`` in float32; ``s`` broadcasts against ``x``."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    q = np.clip(np.rint(compand(x) / scale), -ACTIVATION_QMAX, ACTIVATION_QMAX).astype(np.float32)
    y = (q * scale).astype(np.float32)
    return (y * y) * y


def fake_quantize_activation_per_token(x: np.ndarray) -> np.ndarray:
    """Per-token (last axis) cube-root int8: ``s_t = max(f(max_k |x[t, k]|) / 127, MIN_SCALE)``."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.maximum(compand(np.abs(x)).max(axis=-1, keepdims=True) / np.float32(ACTIVATION_QMAX), np.float32(MIN_SCALE))
    return fake_quantize_activation(x, scale.astype(np.float32))
