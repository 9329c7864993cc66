"""Result types shared by the public API and the backends."""

from __future__ import annotations

from typing import NamedTuple

import torch


def accumulation_dtype(*inputs: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype of every statistic, accumulator and result for these inputs (tensors or dtypes): fp32 for
    fp32/bf16/fp16, fp64 when any input is fp64 (the one rule every layer follows)."""
    dtype = torch.float32
    for other in inputs:
        dtype = torch.promote_types(dtype, other.dtype if isinstance(other, torch.Tensor) else other)
    return dtype


class TopKOverlap(NamedTuple):
    """Per-token top-k agreement between student and teacher (docs/design.md §2).

    ``*_topk_ids`` are int64 and ``*_topk_logprobs`` fp32, both ``[..., k]``, sorted by descending
    log-prob with ties broken by the smaller token id. The rest are fp32 ``[...]``: ``overlap_ratio`` =
    |S_s ∩ S_t| / k, ``overlap_mass_student`` / ``overlap_mass_teacher`` = the full-vocabulary
    probability of the shared tokens under each model, and the entropies H(p_s), H(p_t) in nats.
    Tokens left out by ``mask`` hold ids -1, log-probs -inf and statistics 0.
    """

    student_topk_ids: torch.Tensor
    student_topk_logprobs: torch.Tensor
    teacher_topk_ids: torch.Tensor
    teacher_topk_logprobs: torch.Tensor
    overlap_ratio: torch.Tensor
    overlap_mass_student: torch.Tensor
    overlap_mass_teacher: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor


class LossWithEntropy(NamedTuple):
    """:func:`opd_fast.linear_divergence` with ``return_entropy=True``: the loss as it returns it, and the student's
    per-token entropy −Σ_v p_s log p_s ``[...]`` (nats, at the student's temperature; 0 at tokens the mask leaves
    out; detached) from the same sweep."""

    loss: torch.Tensor
    student_entropy: torch.Tensor


class DivergenceStats(NamedTuple):
    """Per-token results of a divergence forward, all fp32 ``[N]``; O(N) is all the backward needs (the first six:
    ``student_entropy`` and ``label_logit`` are outputs only).

    ``center`` is Σ_v p_s,v g_v where g = ∂D/∂p_s, so that ∂D/∂z_s = p_s ⊙ (g − center): D itself for
    reverse KL, (1 − β)·KL(p_s ‖ m) for JSD, and unused (zero) for forward KL, whose logit gradient is
    simply p_s − p_t.

    ``student_lse_lo`` / ``teacher_lse_lo`` (or None: 0) are the log-sum-exps' fp32 rounding residuals,
    lse_lo = (m − lse) + log Σ_v e^{z_v − m} with m the row max: the pair keeps the row's shift and log Σ apart,
    so that a log-probability is (z − lse) − lse_lo, accurate to ~ulp(log p) rather than ~ulp(lse) (z − lse
    is exact by Sterbenz's lemma wherever p is not negligible). Where only an lse is known (the API saved just
    it), the residual is None and log p is z − lse.
    """

    loss: torch.Tensor
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    center: torch.Tensor
    student_lse_lo: torch.Tensor | None = None
    teacher_lse_lo: torch.Tensor | None = None
    # The student's entropy −Σ_v p_s log p_s per row, when the spec asked for it (DivergenceSpec.entropy), else None.
    student_entropy: torch.Tensor | None = None
    # The student's final logit at each row's hard label (0 where another vocabulary shard holds it), when the op
    # was given labels (DivergenceSpec.hard_label_weight), else None.
    label_logit: torch.Tensor | None = None


class HeadTransform(NamedTuple):
    """The scalar part of an output head: logits z = softcap(scale · (h·Wᵀ + b)) / τ (docs/design.md §2).

    ``softcap`` None means no capping; otherwise z ← softcap · tanh(z / softcap) after the scale, as
    transformers' Gemma models apply ``final_logit_softcapping``. The temperature τ is the op's own.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


IDENTITY_HEAD = HeadTransform()


class Side(NamedTuple):
    """One model's inputs to an op, 2-D and already restricted to the counted tokens.

    ``hidden`` [N, H]; ``weight`` [V, H] (a vocabulary shard under vocabulary parallelism); ``bias`` [V]
    or None; ``head`` the scalar transform of the logits.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    head: HeadTransform = IDENTITY_HEAD


class Need(NamedTuple):
    """Which student gradients to compute: w.r.t. the hidden states, the weight, the bias."""

    hidden: bool = False
    weight: bool = False
    bias: bool = False

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class Grads(NamedTuple):
    """Gradients w.r.t. (hidden [N, H], weight [V, H], bias [V]); None where not needed."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
