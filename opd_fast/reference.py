"""Materialized plain-PyTorch versions of every op: the test oracle (run in float64) and the "naive" baseline.

These build the full [N, V] logits and let autograd do the gradients, which is exactly what opd_fast
exists to avoid; they are written for clarity, independently of the chunked backend, so that tests of
the backends compare against separate code. The logits come out of the matmul in the input dtype
(bf16 inputs give bf16 logits, as in a plain training loop) and are then upcast to at least fp32.
"""

from __future__ import annotations

import math

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.types import TopKOverlap


def _log_softmax(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.log_softmax(logits, dim=-1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        per_token = torch.where(mask, per_token, 0.0)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = per_token.numel() if mask is None else int(mask.sum())
    return total / count if count else total * 0.0


def materialized_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The divergence of docs/design.md §2 from materialized logits; hidden states ``[..., H]``, weights ``[V, H]``."""
    spec = DivergenceSpec.make(divergence, beta, temperature)
    lps = _log_softmax(student_hidden, student_weight, temperature)
    with torch.no_grad():
        lpt = _log_softmax(teacher_hidden, teacher_weight, temperature)
    if spec.kind == "reverse_kl":
        per_token = (lps.exp() * (lps - lpt)).sum(dim=-1)
    elif spec.kind == "forward_kl":
        per_token = (lpt.exp() * (lpt - lps)).sum(dim=-1)
    else:
        b = spec.beta
        log_m = torch.logsumexp(torch.stack([lpt + math.log(b), lps + math.log(1 - b)]), dim=0)
        kl_teacher = (lpt.exp() * (lpt - log_m)).sum(dim=-1)
        kl_student = (lps.exp() * (lps - log_m)).sum(dim=-1)
        per_token = b * kl_teacher + (1 - b) * kl_student
    return _reduce(per_token, mask, reduction)


def materialized_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(h Wᵀ/τ)[y] from materialized logits."""
    return _log_softmax(hidden, weight, temperature).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def materialized_topk_overlap(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    k: int = 16,
    temperature: float = 1.0,
) -> TopKOverlap:
    """Top-k statistics from materialized log-probs; ties ordered by the smaller token id (a stable sort)."""
    with torch.no_grad():
        lps = _log_softmax(student_hidden, student_weight, temperature)
        lpt = _log_softmax(teacher_hidden, teacher_weight, temperature)
        s_lp, s_ids = lps.sort(dim=-1, descending=True, stable=True)
        t_lp, t_ids = lpt.sort(dim=-1, descending=True, stable=True)
        s_lp, s_ids, t_lp, t_ids = s_lp[..., :k], s_ids[..., :k], t_lp[..., :k], t_ids[..., :k]
        in_student = torch.zeros_like(lps, dtype=torch.bool).scatter_(-1, s_ids, True)
        in_teacher = torch.zeros_like(lpt, dtype=torch.bool).scatter_(-1, t_ids, True)
        shared = in_student & in_teacher
        return TopKOverlap(
            student_topk_ids=s_ids,
            student_topk_logprobs=s_lp.float(),
            teacher_topk_ids=t_ids,
            teacher_topk_logprobs=t_lp.float(),
            overlap_ratio=(shared.sum(dim=-1) / k).float(),
            overlap_mass_student=torch.where(shared, lps.exp(), 0.0).sum(dim=-1).float(),
            overlap_mass_teacher=torch.where(shared, lpt.exp(), 0.0).sum(dim=-1).float(),
            student_entropy=(-(lps.exp() * lps).sum(dim=-1)).float(),
            teacher_entropy=(-(lpt.exp() * lpt).sum(dim=-1)).float(),
        )


def _topk_mask(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [..., V]: the k largest entries per row, ties to the smaller id (a stable sort)."""
    ids = log_probs.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, ids, True)


def _masked_kl(lp_a: torch.Tensor, lp_b: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Σ_{v ∈ support} p_a (lp_a − lp_b), with 0 · anything = 0 outside the support."""
    terms = torch.where(support, lp_a.exp() * (lp_a - lp_b), 0.0)
    return terms.sum(dim=-1)


def materialized_topk_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    k: int = 16,
    support: str = "student",
    divergence: str = "reverse_kl",
    renormalize: bool = True,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The top-k-support divergence of :func:`opd_fast.linear_topk_divergence` from materialized logits."""
    lps = _log_softmax(student_hidden, student_weight, temperature)
    with torch.no_grad():
        lpt = _log_softmax(teacher_hidden, teacher_weight, temperature)
        in_s, in_t = _topk_mask(lps, k), _topk_mask(lpt, k)
        chosen = {"student": in_s, "teacher": in_t, "union": in_s | in_t, "intersection": in_s & in_t}[support]
    if renormalize:
        # log p̃ = lp − log Σ_S p over the support; rows with an empty support normalize over a dummy.
        nonempty = chosen.any(dim=-1, keepdim=True)

        def renorm(lp):
            norm = torch.logsumexp(
                torch.where(nonempty, torch.where(chosen, lp, -torch.inf), 0.0), dim=-1, keepdim=True
            )
            return torch.where(chosen, lp - norm, 0.0)

        lps, lpt = renorm(lps), renorm(lpt)
    per_token = _masked_kl(lps, lpt, chosen) if divergence == "reverse_kl" else _masked_kl(lpt, lps, chosen)
    return _reduce(per_token, mask, reduction)


def materialized_topk_target_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    add_tail: bool = True,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail_floor: float = 1e-12,
) -> torch.Tensor:
    """:func:`opd_fast.linear_topk_target_divergence` from materialized student log-probs."""
    lps = _log_softmax(student_hidden, student_weight, temperature).gather(-1, teacher_topk_ids)
    lpt = teacher_topk_logprobs.to(lps.dtype)
    pt, ps = lpt.exp(), lps.exp()
    if divergence == "forward_kl":
        per_token = (torch.xlogy(pt, pt) - pt * lps).sum(dim=-1)
    else:
        per_token = (ps * (lps - lpt.clamp_min(math.log(tail_floor)))).sum(dim=-1)
    if add_tail:
        tail_t = (1 - pt.sum(dim=-1)).clamp_min(0.0)
        tail_s = (1 - ps.sum(dim=-1)).clamp_min(tail_floor)
        if divergence == "forward_kl":
            per_token = per_token + torch.xlogy(tail_t, tail_t) - tail_t * tail_s.log()
        else:
            per_token = per_token + tail_s * (tail_s.log() - tail_t.clamp_min(tail_floor).log())
    return _reduce(per_token, mask, reduction)
