"""Kernels of end-to-end scale tuning (PyTorch, no graph code).

A quantized weight keeps its integer codes and learns only its group scales, as a multiplicative
correction ``theta`` (one per group and column, initialised at 0):

    W_hat[k, n] = c[k, n] * s0[g(k), n] * (1 + theta[g(k), n]),    c = q - z  (centred codes)

so ``dL/dtheta[g, n] = s0[g, n] * sum_{k in g} c[k, n] * dL/dW_hat[k, n]``. :class:`GroupScaledCodes`
computes that gradient itself and keeps only the int8 codes for the backward pass (autograd's own
product would keep two float32 ``[K, N]`` tensors per weight: 8x the memory).

The model with every such weight is trained to match the float model's next-token distribution on
calibration text (knowledge distillation; the E2E-QP step of EfficientQAT, Chen et al. 2024):

    L = 1/T sum_t KL(p_float(. | x_<t) || p_quant(. | x_<t))

Codes and zero points do not move, so the result stores exactly as before (the same bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GroupScaledCodes(torch.autograd.Function):
    """``W [K, N] = c * S[g(k)]`` for int8 centred codes ``c``, group scales ``S [G, N]`` and rows' groups ``g``."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scales: torch.Tensor, group_of_rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes, group_of_rows)
        ctx.groups = scales.shape[0]
        return codes.to(scales.dtype) * scales.index_select(0, group_of_rows)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        codes, group_of_rows = ctx.saved_tensors
        per_row = codes.to(grad_weight.dtype) * grad_weight
        grad_scales = torch.zeros((ctx.groups, per_row.shape[1]), dtype=grad_weight.dtype)
        grad_scales.index_add_(0, group_of_rows, per_row)
        return None, grad_scales, None


def tuned_weight(centred_codes: torch.Tensor, base_scales: torch.Tensor, theta: torch.Tensor,
                 group_of_rows: torch.Tensor) -> torch.Tensor:
    """``W_hat [K, N] = c * s0[g(k)] * (1 + theta[g(k)])`` from int8 ``c [K, N]``, ``s0, theta [G, N]`` and ``g(k) [K]``."""
    return GroupScaledCodes.apply(centred_codes, base_scales * (1.0 + theta), group_of_rows)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher) || softmax(student))`` for logits ``[..., vocab]``."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / student.shape[0]
