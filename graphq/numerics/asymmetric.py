"""Asymmetric calibration for GPTQ (GPTAQ / "GPTQv2", Li et al. 2025): match the float model's output,
not the quantized layer's own float output (pure numpy).

Plain GPTQ quantizes a MatMul ``y = x W`` (``W [K, N]``) to minimise ``||X_q (W - W_hat)||^2``, where
``X_q [n, K]`` are the layer's calibration inputs as the already-quantized model produces them. The
error the blocks (and MatMuls) upstream have already made is then never corrected. Asymmetric
calibration minimises instead the distance to the *float* model's output,

    ||X_q W_hat - X_f W||^2,     X_f: the float model's input to the same MatMul.

With ``A = X_q^T X_q`` and ``B = X_q^T (X_f - X_q)`` (``K x K``), and ``W'`` the ridge solution

    W' = argmin_V ||X_q V - X_f W||^2 + mu ||V - W||^2 = W + (A + mu I)^-1 B W,

the objective is ``||X_q (W_hat - W')||^2 + const`` exactly when ``mu = 0`` (``X_q^T (X_q W' - X_f W) = 0``,
so the cross term vanishes) and up to ``mu (W_hat - W')^T (W' - W)`` terms otherwise. So asymmetric GPTQ
is plain GPTQ of the *target* ``W'`` with the usual ``H``. In the streamed normalisation of
:func:`graphq.numerics.weight_only.hessian_accumulate`, ``H = 2 A / n`` and ``C = 2 B / n``
(:func:`cross_accumulate`), and GPTQ's damped ``H + lambda I`` (``lambda = damp * mean(diag H)``) gives
``mu = n lambda / 2``:

    W' = W + alpha (H + lambda I)^-1 C W,

computed with the factor GPTQ already has, ``(H_P + lambda I)^-1 = U^T U`` in its row order ``P``
(:class:`graphq.numerics.weight_only.GptqFactor`): no second factorisation, the same damping
(raised x10 on the same failures) and the same treatment of inputs that never fired (their rows of
``C`` are zero, so their rows of ``W'`` are ``W``'s). ``alpha`` in ``[0, 1]`` scales the correction
(``1``: the least-squares target; the GPTAQ reference scales its in-loop correction term by 0.25).

``X_f = X_q`` gives ``C = 0`` and ``W' = W`` exactly, so the result is then plain GPTQ bit for bit.

Memory: ``C`` is ``K x K`` float64, like ``H`` (1 GB for a 7B ``down_proj``, ``K = 11008``); the
correction is ``K x N`` float64 while it is applied.
"""

from __future__ import annotations

import numpy as np

from graphq.numerics.weight_only import GptqFactor, fold_product_in_place, running_matrix


def cross_accumulate(cross: np.ndarray | None, x: np.ndarray, x_reference: np.ndarray, count: int
                     ) -> tuple[np.ndarray, int]:
    """Fold a batch into the running ``C = 2 X^T (X_ref - X) / n`` of ``count`` rows (float64, in place
    once started; ``(None, 0)`` to start). ``x`` and ``x_reference`` are ``[..., K]`` of the same shape:
    the quantized model's and the float model's input to the same MatMul, token for token. Returns the
    new ``(C, count)``; an empty batch changes nothing."""
    x = np.asarray(x)
    x_reference = np.asarray(x_reference)
    if x.ndim == 0 or x.shape != x_reference.shape:
        raise ValueError(f"expected two batches [..., K] of one shape, got {x.shape} and {x_reference.shape}")
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64, copy=False)
    delta = x_reference.reshape(-1, x.shape[-1]).astype(np.float64) - rows
    k, m = rows.shape[1], rows.shape[0]
    cross = running_matrix(cross, count, k, "cross matrix")
    if m == 0:
        return cross, count
    if not (np.isfinite(rows).all() and np.isfinite(delta).all()):
        raise ValueError("the batch contains NaN or infinity")
    return fold_product_in_place(cross, rows, delta, count), count + m


def asymmetric_target(weight: np.ndarray, cross: np.ndarray, factor: GptqFactor, *, alpha: float = 1.0) -> np.ndarray:
    """``W' = W + alpha (H + lambda I)^-1 C W`` (module docstring) as float64 ``[K, N]``, with ``factor`` the
    :func:`graphq.numerics.weight_only.gptq_factor` of ``H`` that GPTQ then uses on ``W'``."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or cross.shape != (w.shape[0],) * 2 or factor.upper.shape != cross.shape:
        raise ValueError(f"weight {w.shape}, cross matrix {cross.shape} and factor {factor.upper.shape} do not match")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 0 or not cross.any():
        return w.copy()
    order, upper = factor.order, factor.upper
    right = (cross @ w)[order]  # rows in the factor's order: (H_P + lambda I)^-1 = U^T U
    correction = np.empty_like(right)
    correction[order] = upper.T @ (upper @ right)
    correction *= alpha
    return w + correction
