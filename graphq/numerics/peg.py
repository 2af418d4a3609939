"""Per-embedding-group (PEG) activation quantization (Bondarenko et al. 2021, seed 001): pure numpy.

An activation ``x [..., C]`` feeding ``y = x @ W`` (``W [C, N]``) is split along its hidden axis into
``K`` groups of ``C / K`` channels, each quantized with its own scale ``s_g = r_g / Q`` (``r_g`` the
calibrated range of the group, ``Q = 127``). The product is the sum of the group products

    y = sum_g  (s_g * xq_g) @ W[I_g]          (I_g: the channel indices of group g)

so every group is one int8 x int8 MatMul with a per-tensor activation scale, and the float
function is unchanged by the split (a sum over a partition of the channels).

**Range-based permutation.** With ``r_c`` the calibrated range (``max |x[..., c]|``) of channel
``c``, the channels are ordered by decreasing ``r_c`` (ties by index, a stable sort) and cut into
``K`` consecutive groups of that order: ``I_g = perm[g C/K : (g+1) C/K]``. The few outlier channels
then share the first group and the ``K - 1`` others get ranges close to those of ordinary channels.
Without permutation the groups are the contiguous slices ``I_g = [g C/K, (g+1) C/K)``.
Each group's indices are returned sorted (a permutation inside a group changes nothing numerically
and sorted indices read memory in order).

The group range under min-max calibration is ``r_g = max_{c in I_g} r_c``.
"""

from __future__ import annotations

import numpy as np


def range_permutation(channel_ranges: np.ndarray) -> np.ndarray:
    """Channel indices by decreasing range (stable: equal ranges keep index order)."""
    ranges = np.asarray(channel_ranges, dtype=np.float64)
    if ranges.ndim != 1 or ranges.size == 0:
        raise ValueError(f"expected a non-empty vector of channel ranges, got shape {ranges.shape}")
    return np.argsort(-ranges, kind="stable")


def embedding_groups(channel_ranges: np.ndarray, groups: int, *, permute: bool = True) -> list[np.ndarray]:
    """The ``groups`` index sets ``I_g`` (each sorted, int64) partitioning the ``C`` channels (module docstring)."""
    channels = range_permutation(channel_ranges).size  # validates the shape
    if groups < 1 or channels % groups:
        raise ValueError(f"{groups} groups do not divide {channels} channels")
    order = range_permutation(channel_ranges) if permute else np.arange(channels)
    size = channels // groups
    return [np.sort(order[g * size:(g + 1) * size]).astype(np.int64) for g in range(groups)]


def group_ranges(channel_ranges: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Min-max range of each group: ``r_g = max_{c in I_g} r_c``."""
    ranges = np.asarray(channel_ranges, dtype=np.float64)
    return np.array([ranges[index].max() for index in groups], dtype=np.float64)


def peg_fake_quantize(x: np.ndarray, groups: list[np.ndarray], scales: np.ndarray, bits: int = 8) -> np.ndarray:
    """Reference: ``x`` with each group's channels fake-quantized (symmetric) with that group's scale."""
    from graphq.numerics.quantize import fake_quantize

    out = np.empty_like(x, dtype=np.float32)
    for index, scale in zip(groups, scales):
        out[..., index] = fake_quantize(x[..., index], np.float32(scale), bits)
    return out
