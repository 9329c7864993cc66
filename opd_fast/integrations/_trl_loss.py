"""The loss of TRL's distillation trainers from final hidden states and output heads: shared by
:mod:`opd_fast.integrations.trl` (which exports it) and :mod:`opd_fast.integrations._trl_gkd`, and free of TRL itself,
so that neither trainer module imports the other.
"""

from __future__ import annotations

import torch

from opd_fast.functional import linear_divergence
from opd_fast.heads import LMHead


def divergence_for_trl_beta(beta: float) -> tuple[str, float]:
    """TRL's generalized-JSD β → ``(divergence, beta)`` of :func:`opd_fast.linear_divergence`.

    TRL computes β = 0 as the forward KL(p_t ‖ p_s) and β = 1 as the reverse KL(p_s ‖ p_t) (the JSD itself would
    be 0 at both ends); between, the same JSD(β) as opd_fast's.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"TRL's beta must be in [0, 1], got {beta}; set it in the trainer's config")
    if beta == 0.0:
        return "forward_kl", beta
    if beta == 1.0:
        return "reverse_kl", beta
    return "jsd", beta


def trl_divergence_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    *,
    mask: torch.Tensor,
    beta: float,
    temperature: float,
    num_items_in_batch: torch.Tensor | int | float | None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The divergence TRL's distillation trainers compute, reduced as they reduce it.

    Args:
        student_hidden: ``[B, T, Hs]`` the student's final hidden states at the positions that predict a token.
        student_head: the student's :class:`opd_fast.LMHead` (gradients reach its weight and bias).
        teacher_hidden: ``[B, T, Ht]`` the teacher's at the same positions.
        teacher_head: the teacher's :class:`opd_fast.LMHead` (never differentiated).
        mask: ``[B, T]`` bool or 0/1 integers, nonzero where the token counts.
        beta: TRL's β (see :func:`divergence_for_trl_beta`).
        temperature: τ > 0 dividing both models' logits.
        num_items_in_batch: the number of counted tokens the sum is divided by (TRL's count over the global
            batch, for gradient accumulation), or None for the mean over the counted tokens here.

        return_entropy: also the student's per-token entropy ``[B, T]`` (0 where ``mask`` is 0), from the same
            sweep.

    Returns:
        fp32 scalar loss (fp64 for fp64 inputs), differentiable w.r.t. the student's hidden states and head; with
        ``return_entropy``, ``(loss, entropy)``.
    """
    divergence, beta = divergence_for_trl_beta(beta)
    device = student_head.weight.device
    kwargs = dict(divergence=divergence, beta=beta, temperature=temperature, mask=mask.to(device) != 0)
    kwargs["return_entropy"] = return_entropy
    # Backbones may end on another device than the head (device_map) or, under autocast, in another dtype.
    student_hidden = student_hidden.to(device=device, dtype=student_head.weight.dtype)
    teacher_hidden = teacher_hidden.to(device=device, dtype=teacher_head.weight.dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    out = linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head, reduction=reduction, **kwargs)
    loss, entropy = out if return_entropy else (out, None)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return (loss, entropy) if return_entropy else loss
