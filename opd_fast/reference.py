"""Materialized plain-PyTorch versions of every op: the test oracle (run in float64) and the "naive" baseline.

These build the full [N, V] logits and let autograd do the gradients, which is exactly what opd_fast
exists to avoid; they are written for clarity, from the definitions of docs/design.md §2 and independently
of the library (no helper or formula shared with the backends, opd_fast.topk or the validation layer), so
that tests of the library compare against separate code. The logits come out of the matmul in the input
dtype (bf16 inputs give bf16 logits, as in a plain training loop) and are then upcast to at least fp32.

Every weight argument may also be an :class:`opd_fast.LMHead`: its transform softcap(scale·(h·Wᵀ + b)) is
applied here from the head's fields, before the temperature divides the logits.
"""

from __future__ import annotations

import math

import torch

from opd_fast.heads import LMHead
from opd_fast.types import TopKOverlap

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _log_softmax(hidden: torch.Tensor, weight: torch.Tensor | LMHead, temperature: float) -> torch.Tensor:
    """log softmax(z / τ) over the full vocabulary, z the head's final logits [..., V]."""
    if isinstance(weight, LMHead):
        weight, bias, scale, softcap = weight.weight, weight.bias, weight.scale, weight.softcap
    else:
        bias, scale, softcap = None, 1.0, None
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits / temperature, dim=-1)


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


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q) over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _teacher(temperature: float, teacher_temperature: float | None) -> float:
    return temperature if teacher_temperature is None else teacher_temperature


def materialized_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | LMHead,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    teacher_temperature: float | None = None,
    skew: float = 0.1,
    labels: torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
) -> torch.Tensor:
    """The divergence of docs/design.md §2 from materialized logits; hidden states ``[..., H]``, weights ``[V, H]``.

    JSD(β) with β = 0 is forward KL and with β = 1 reverse KL (TRL's and Liger-Kernel's convention). The skew KLs
    (DistiLLM's) are KL(p_t ‖ α p_t + (1 − α) p_s) (``skew_forward_kl``) and KL(p_s ‖ α p_s + (1 − α) p_t)
    (``skew_reverse_kl``), α = ``skew``; ``tvd`` is ½ Σ |p_s − p_t|. The teacher's logits are divided by
    ``teacher_temperature`` (``temperature`` when None). With ``labels`` (ids ``[...]``, −100 = none, such tokens
    not counted), the per-token loss is w · CE + (1 − w) · D, CE = −log p_s(label), w = ``hard_label_weight``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if divergence.startswith("skew") and not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew!r}")
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    lps = _log_softmax(student_hidden, student_weight, temperature)
    with torch.no_grad():
        lpt = _log_softmax(teacher_hidden, teacher_weight, _teacher(temperature, teacher_temperature))
    if divergence == "reverse_kl":
        per_token = _kl(lps, lpt)
    elif divergence == "forward_kl":
        per_token = _kl(lpt, lps)
    elif divergence == "tvd":
        per_token = 0.5 * (lps.exp() - lpt.exp()).abs().sum(dim=-1)
    elif divergence == "skew_forward_kl":
        per_token = _kl(lpt, _log_mix(lpt, lps, skew))
    elif divergence == "skew_reverse_kl":
        per_token = _kl(lps, _log_mix(lps, lpt, skew))
    else:
        log_m = _log_mix(lpt, lps, beta)
        per_token = beta * _kl(lpt, log_m) + (1 - beta) * _kl(lps, log_m)
    if labels is not None:
        labelled = labels != -100
        cross_entropy = -lps.gather(-1, torch.where(labelled, labels, 0).unsqueeze(-1)).squeeze(-1)
        per_token = hard_label_weight * cross_entropy + (1 - hard_label_weight) * per_token
        mask = labelled if mask is None else mask & labelled
    return _reduce(per_token, mask, reduction)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w p + (1 − w) q), in log space (a weight of 0 or 1 drops its term)."""
    parts = [log_p + math.log(weight)] if weight > 0 else []
    parts += [log_q + math.log(1 - weight)] if weight < 1 else []
    return torch.logsumexp(torch.stack(parts), dim=0)


def materialized_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor | LMHead, token_ids: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(z/τ)[y] from materialized logits."""
    return _log_softmax(hidden, weight, temperature).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def materialized_entropy(
    hidden: torch.Tensor, weight: torch.Tensor | LMHead, *, temperature: float = 1.0
) -> torch.Tensor:
    """−Σ_v p log p of softmax(z/τ) per token, from materialized logits."""
    log_probs = _log_softmax(hidden, weight, temperature)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def _top_k(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k set of each row in the canonical order (log-prob descending, ties to the smaller id):
    (ids [..., k], their log-probs [..., k], membership bool [..., V]).

    A stable descending sort keeps tied entries in id order, which is exactly the tie rule.
    """
    order = log_probs.sort(dim=-1, descending=True, stable=True)
    ids, values = order.indices[..., :k], order.values[..., :k]
    members = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, ids, True)
    return ids, values, members


def materialized_topk_overlap(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | LMHead,
    *,
    k: int = 16,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
) -> TopKOverlap:
    """Top-k statistics from the full-vocabulary log-probs: the two top-k sets S_s and S_t as membership masks
    over the vocabulary, their intersection I, and the masses Σ_{v∈I} p(v) summed over the vocabulary."""
    with torch.no_grad():
        lps = _log_softmax(student_hidden, student_weight, temperature)
        lpt = _log_softmax(teacher_hidden, teacher_weight, _teacher(temperature, teacher_temperature))
        s_ids, s_lp, in_s = _top_k(lps, k)
        t_ids, t_lp, in_t = _top_k(lpt, k)
        shared = in_s & in_t
        ps, pt = lps.exp(), lpt.exp()
        return TopKOverlap(
            student_topk_ids=s_ids,
            student_topk_logprobs=s_lp.float(),
            teacher_topk_ids=t_ids,
            teacher_topk_logprobs=t_lp.float(),
            overlap_ratio=(shared.sum(dim=-1) / k).float(),
            overlap_mass_student=(ps * shared).sum(dim=-1).float(),
            overlap_mass_teacher=(pt * shared).sum(dim=-1).float(),
            student_entropy=(-(ps * lps).sum(dim=-1)).float(),
            teacher_entropy=(-(pt * lpt).sum(dim=-1)).float(),
        )


def materialized_topk_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | LMHead,
    *,
    k: int = 16,
    support: str = "student",
    divergence: str = "reverse_kl",
    renormalize: bool = True,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """The top-k-support divergence of :func:`opd_fast.linear_topk_divergence` from materialized logits.

    The support S is a membership mask over the vocabulary; the divergence sums over v ∈ S only, of the
    full-vocabulary log-probs or (``renormalize``) of p̃ = p / Σ_{u∈S} p(u).
    """
    lps = _log_softmax(student_hidden, student_weight, temperature)
    with torch.no_grad():
        lpt = _log_softmax(teacher_hidden, teacher_weight, _teacher(temperature, teacher_temperature))
        in_s, in_t = _top_k(lps, k)[2], _top_k(lpt, k)[2]
        chosen = {"student": in_s, "teacher": in_t, "union": in_s | in_t, "intersection": in_s & in_t}[support]
    if renormalize:
        # log p̃ = log p − log Σ_{u∈S} p(u), the sum a log-sum-exp over S; a row with an empty S (its loss is 0)
        # sums zeros instead, so that no −inf − (−inf) reaches the gradient.
        nonempty = chosen.any(dim=-1, keepdim=True)

        def restricted(lp: torch.Tensor) -> torch.Tensor:
            on_support = torch.where(nonempty, torch.where(chosen, lp, -torch.inf), 0.0)
            return torch.where(chosen, lp - torch.logsumexp(on_support, dim=-1, keepdim=True), 0.0)

        lps, lpt = restricted(lps), restricted(lpt)
    if divergence == "reverse_kl":
        terms = torch.where(chosen, lps.exp() * (lps - lpt), 0.0)
    else:
        terms = torch.where(chosen, lpt.exp() * (lpt - lps), 0.0)
    return _reduce(terms.sum(dim=-1), mask, reduction)


def materialized_topk_target_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
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
    """:func:`opd_fast.linear_topk_target_divergence` from the student's full-vocabulary log-probs.

    Both models become distributions over K (+1) buckets: the teacher's K ids S, and with ``add_tail`` one
    more bucket holding the rest of the vocabulary. The student's tail is its mass outside S, summed over
    those vocabulary entries; the teacher's is 1 − Σ_S p_t (all a top-K teacher tells), at least 0. Then

        forward KL = Σ_b P_t(b) (log P_t(b) − log P_s(b)),   reverse KL = Σ_b P_s(b) (log P_s(b) − log P_t(b)),

    with 0 · log 0 = 0, and ``tail_floor`` bounding from below the probabilities whose logarithms may be of 0:
    the teacher's (given as log-probs, possibly −inf) in reverse KL and the student's tail in both.
    """
    lps = _log_softmax(student_hidden, student_weight, temperature)
    kept = torch.zeros_like(lps, dtype=torch.bool).scatter_(-1, teacher_topk_ids, True)
    log_ps = lps.gather(-1, teacher_topk_ids)  # [..., K]
    pt = teacher_topk_logprobs.to(lps.dtype).exp()
    ps = log_ps.exp()
    if add_tail:
        student_tail = torch.where(kept, 0.0, lps.exp()).sum(dim=-1, keepdim=True)
        teacher_tail = (1.0 - pt.sum(dim=-1, keepdim=True)).clamp_min(0.0)
        log_ps = torch.cat([log_ps, student_tail.clamp_min(tail_floor).log()], dim=-1)
        ps = torch.cat([ps, student_tail], dim=-1)
        pt = torch.cat([pt, teacher_tail], dim=-1)
    if divergence == "forward_kl":
        per_token = (torch.xlogy(pt, pt) - pt * log_ps).sum(dim=-1)
    elif divergence == "reverse_kl":
        per_token = (ps * (log_ps - pt.clamp_min(tail_floor).log())).sum(dim=-1)
    else:
        raise ValueError(f"divergence must be 'forward_kl' or 'reverse_kl', got {divergence!r}")
    return _reduce(per_token, mask, reduction)
