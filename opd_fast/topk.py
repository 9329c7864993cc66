"""Top-k shared mass: overlap diagnostics and top-k distillation losses (docs/design.md §2).

Everything full-vocabulary here is streamed by the backends — the top-k selection with its log-sum-exp
and entropy (``opd_fast::topk``) and, when needed, a differentiable log-sum-exp — so no [N, V] tensor exists.
What remains is O(N · k): the logits at the selected ids, gathered with a chunked, recomputing
custom op (``opd_fast::gathered_logits``), and the divergence on the support, in
plain PyTorch. Input checks live in :mod:`opd_fast._validation`, the choice of backend in :mod:`opd_fast._dispatch`,
the custom ops in :mod:`opd_fast.library`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from opd_fast import _validation as check
from opd_fast import distributed as vp
from opd_fast._dispatch import CheckedPair, Placement
from opd_fast._rows import counted_rows, scatter_rows, select_rows
from opd_fast.library.gathered import linear_gathered_logits
from opd_fast.library.logits import linear_logsumexp
from opd_fast.library.topk import linear_topk
from opd_fast.types import Side, TopKOverlap

SUPPORTS = ("student", "teacher", "union", "intersection")
TOPK_DIVERGENCES = ("reverse_kl", "forward_kl")
# Floor of the leftover ("tail") masses inside logarithms: below it fp32 cannot resolve 1 − Σp anyway.
TAIL_FLOOR = 1e-12


def membership(ids: torch.Tensor, other_ids: torch.Tensor) -> torch.Tensor:
    """[n, k] bool: is ids[n, j] among other_ids[n, :]? (sort + binary search: O(k log k) per row)."""
    sorted_other = other_ids.sort(dim=-1).values
    pos = torch.searchsorted(sorted_other, ids).clamp_(max=other_ids.shape[1] - 1)
    return sorted_other.gather(1, pos) == ids


def overlap_statistics(s_ids, s_logprobs, t_ids, t_logprobs):
    """(overlap_ratio, overlap_mass_student, overlap_mass_teacher) from the two top-k lists."""
    s_shared = membership(s_ids, t_ids)
    t_shared = membership(t_ids, s_ids)
    ratio = s_shared.sum(dim=-1).float() / s_ids.shape[1]
    mass_s = torch.where(s_shared, s_logprobs.exp(), 0.0).sum(dim=-1)
    mass_t = torch.where(t_shared, t_logprobs.exp(), 0.0).sum(dim=-1)
    return ratio, mass_s.float(), mass_t.float()


def _side(pair: CheckedPair, rows: torch.Tensor | None, model: int) -> Side:
    """The counted ``rows`` of the student (``model`` 0) or the teacher (1) of a checked pair."""
    if model == 0:
        return Side(select_rows(pair.hs, rows), pair.ws, pair.bs, pair.heads[0])
    return Side(select_rows(pair.ht, rows), pair.wt, pair.bt, pair.heads[1])


def _restricted_log_softmax(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid entries of each row (0 at invalid ones; rows with none stay finite)."""
    has_any = valid.any(dim=-1, keepdim=True)
    z_in = torch.where(has_any, torch.where(valid, z, -torch.inf), 0.0)
    return torch.where(valid, z - torch.logsumexp(z_in, dim=-1, keepdim=True), 0.0)


def _support_divergence(lps: torch.Tensor, lpt: torch.Tensor, valid: torch.Tensor, divergence: str) -> torch.Tensor:
    if divergence == "reverse_kl":
        return (torch.where(valid, lps.exp(), 0.0) * (lps - lpt)).sum(dim=-1)
    return (torch.where(valid, lpt.exp(), 0.0) * (lpt - lps)).sum(dim=-1)


def _support_ids(support: str, s_ids, t_ids) -> torch.Tensor:
    """Token ids of the support per row, padded with -1 (union: up to 2k ids; intersection: up to k)."""
    if support == "student":
        return s_ids
    if support == "teacher":
        return t_ids
    if support == "intersection":
        return torch.where(membership(s_ids, t_ids), s_ids, -1)
    return torch.cat([s_ids, torch.where(membership(t_ids, s_ids), -1, t_ids)], dim=1)


def _no_tokens(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An empty per-token loss still connected to both student tensors (their gradients are zeros)."""
    return hidden.sum(dim=-1) * 0.0 + weight.sum() * 0.0


def _reduce(per_token: torch.Tensor, rows, n_rows: int, lead: torch.Size, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return scatter_rows(per_token, rows, n_rows).view(lead)
    total = per_token.sum()
    if reduction == "mean" and per_token.numel():
        return total / per_token.numel()
    return total


def linear_topk_overlap(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    k: int = 16,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_size: int | None = None,
    check_finite: bool = False,
    plan: str = "chunked",
    teacher_temperature: float | None = None,
) -> TopKOverlap:
    """Top-k agreement diagnostics of docs/design.md §2 per token; see :class:`opd_fast.TopKOverlap`.

    Streams a running top-k and online softmax statistics over vocabulary tiles for both models, so it
    needs O(tokens · k) memory. Ties are ordered by the smaller token id. Not differentiable (a
    diagnostic). Arguments as in :func:`opd_fast.linear_divergence` (``teacher_temperature`` gives the
    teacher's probabilities and entropy), plus ``k`` in [1, V].
    """
    temperature = check.check_temperature(temperature)
    teacher_temperature = check.check_teacher_temperature(teacher_temperature, temperature)
    where = Placement.make(backend, plan, process_group)
    pair = CheckedPair.make(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, where
    ).narrowed()
    route = pair.route
    k = check.check_k(k, vp.global_vocab(route.shard, pair.ws.shape[0]))
    rows, n_rows = counted_rows(pair.mask), pair.hs.shape[0]
    with torch.no_grad():
        s_ids, s_lp, _, s_ent = linear_topk(route, _side(pair, rows, 0), k, temperature)
        t_ids, t_lp, _, t_ent = linear_topk(route, _side(pair, rows, 1), k, teacher_temperature)
        stats = overlap_statistics(s_ids, s_lp, t_ids, t_lp)
        fields = (s_ids, s_lp.float(), t_ids, t_lp.float(), *stats, s_ent.float(), t_ent.float())
    fills = (-1, -torch.inf, -1, -torch.inf, 0.0, 0.0, 0.0, 0.0, 0.0)
    lead = pair.lead
    return TopKOverlap(
        *(scatter_rows(field, rows, n_rows, fill).view((*lead, *field.shape[1:])) for field, fill in zip(fields, fills))
    )


class OverlapAverages(NamedTuple):
    """Averages of :class:`opd_fast.TopKOverlap`'s per-token statistics over the counted tokens, fp32 0-d tensors.

    The overlap masses have two averages in use, and they differ a lot when many top-k sets are disjoint:

    * ``*_all_tokens``: over every counted token, a token whose top-k sets do not intersect counting 0
      (the trainer's ``overlap/mass_student``, ``overlap/mass_teacher``, ``overlap/ratio``).
    * ``*_nonempty``: over the counted tokens whose top-k sets intersect (``overlap_ratio > 0``), as the
      released code of "Rethinking OPD" averages its ``student_p_sum_intersection``: the papers' 97–99% is
      this one. 0 when no counted token has a non-empty intersection (``nonempty_fraction`` is then 0).

    A disjoint token's masses are exactly 0, so ``mass_*_nonempty = mass_*_all_tokens / nonempty_fraction``.
    """

    ratio_all_tokens: torch.Tensor
    mass_student_all_tokens: torch.Tensor
    mass_teacher_all_tokens: torch.Tensor
    mass_student_nonempty: torch.Tensor
    mass_teacher_nonempty: torch.Tensor
    nonempty_fraction: torch.Tensor


def overlap_averages(stats: TopKOverlap, mask: torch.Tensor | None = None) -> OverlapAverages:
    """Both averages of the overlap masses (all tokens, non-empty intersections) of ``stats``; see
    :class:`OverlapAverages`.

    Args:
        stats: the output of :func:`linear_topk_overlap`. Its tokens left out by the op's mask (top-k ids -1)
            are never counted.
        mask: optional bool ``[...]`` (the statistics' leading shape), True where a token counts; it restricts
            the tokens further. Every average is 0 when no token counts.
    """
    counted = stats.student_topk_ids[..., 0] >= 0
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != counted.shape:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(counted.shape)} (the statistics' leading shape), got "
                f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {tuple(getattr(mask, 'shape', ()))}; pass the "
                "mask given to linear_topk_overlap"
            )
        counted = counted & mask.to(counted.device)
    nonempty = counted & (stats.overlap_ratio > 0)

    def mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return torch.where(where, values, 0.0).sum() / where.sum().clamp_min(1)

    return OverlapAverages(
        ratio_all_tokens=mean(stats.overlap_ratio, counted),
        mass_student_all_tokens=mean(stats.overlap_mass_student, counted),
        mass_teacher_all_tokens=mean(stats.overlap_mass_teacher, counted),
        mass_student_nonempty=mean(stats.overlap_mass_student, nonempty),
        mass_teacher_nonempty=mean(stats.overlap_mass_teacher, nonempty),
        nonempty_fraction=nonempty.sum() / counted.sum().clamp_min(1),
    )


def linear_topk_divergence(
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
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_size: int | None = None,
    check_finite: bool = False,
    filter_eps: float | None = None,
    plan: str = "chunked",
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """The divergence restricted to a top-k support of each token.

    The support S is the student's top-k ids (``"student"``), the teacher's (``"teacher"``), their union
    (up to 2k ids) or their intersection (possibly empty: that token's loss is 0). With
    ``renormalize=True`` both distributions are renormalized on S, p̃(v) = p(v) / Σ_{u∈S} p(u), and

        reverse KL = Σ_{v∈S} p̃_s (log p̃_s − log p̃_t),   forward KL = Σ_{v∈S} p̃_t (log p̃_t − log p̃_s);

    the gradient then reaches only the logits in S. With ``renormalize=False`` the full-vocabulary
    log-probs are used on S, and the gradient also flows through the student's log-sum-exp (one more
    streamed pass; ``filter_eps`` applies there). The support itself is not differentiated.

    Arguments as in :func:`opd_fast.linear_divergence`; ``divergence`` is ``"reverse_kl"`` or
    ``"forward_kl"``, ``k`` in [1, V]. Returns an fp32 loss (``[...]`` for ``reduction="none"``).
    """
    support = check.check_choice("support", support, SUPPORTS)
    divergence = check.check_choice("divergence", divergence, TOPK_DIVERGENCES)
    renormalize = check.check_flag("renormalize", renormalize)
    temperature = check.check_temperature(temperature)
    teacher_temperature = check.check_teacher_temperature(teacher_temperature, temperature)
    reduction = check.check_choice("reduction", reduction, check.REDUCTIONS)
    filter_eps = check.check_filter_eps(filter_eps)
    where = Placement.make(backend, plan, process_group)
    pair = CheckedPair.make(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, where
    ).narrowed()
    route = pair.route
    k = check.check_k(k, vp.global_vocab(route.shard, pair.ws.shape[0]))
    rows, lead, n_rows = counted_rows(pair.mask), pair.lead, pair.hs.shape[0]
    student, teacher = _side(pair, rows, 0), _side(pair, rows, 1)
    if student.hidden.shape[0] == 0:
        return _reduce(_no_tokens(student.hidden, pair.ws), rows, n_rows, lead, reduction)
    with torch.no_grad():
        frozen = student._replace(weight=pair.ws.detach(), bias=None if pair.bs is None else pair.bs.detach())
        s_ids = linear_topk(route, frozen, k, temperature)[0] if support != "teacher" else None
        t_ids = linear_topk(route, teacher, k, teacher_temperature)[0] if support != "student" else None
    ids = _support_ids(support, s_ids, t_ids)
    valid = ids >= 0
    zs = linear_gathered_logits(route, student, ids, temperature)
    zt = linear_gathered_logits(route, teacher, ids, teacher_temperature)
    if renormalize:
        lps, lpt = _restricted_log_softmax(zs, valid), _restricted_log_softmax(zt, valid)
    else:
        lse_s = linear_logsumexp(route, student, temperature, filter_eps)
        with torch.no_grad():
            lse_t = linear_logsumexp(route, teacher, teacher_temperature)
        lps = torch.where(valid, zs - lse_s.unsqueeze(1), 0.0)
        lpt = torch.where(valid, zt - lse_t.to(zt.dtype).unsqueeze(1), 0.0)
    return _reduce(_support_divergence(lps, lpt, valid, divergence), rows, n_rows, lead, reduction)


def linear_topk_target_divergence(
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
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    check_finite: bool = False,
    filter_eps: float | None = None,
    plan: str = "chunked",
) -> torch.Tensor:
    """Distill from a teacher that returns only its top-K log-probs per position (e.g. a vLLM server).

    On the teacher's ids S, with the student's full-vocabulary log-probs lp_s (temperature τ applies to
    the student; the teacher's log-probs are used as given):

        forward KL = Σ_{v∈S} p_t (lp_t − lp_s),   reverse KL = Σ_{v∈S} p_s (lp_s − lp_t)

    and with ``add_tail`` one more bucket matches the leftover masses, tail_t = 1 − Σ_S p_t against
    tail_s = 1 − Σ_S p_s (floored at ``TAIL_FLOOR`` inside logarithms). The student's log-sum-exp is
    streamed (differentiable; ``filter_eps`` applies to its gradient). The arguments not listed below are as in
    :func:`opd_fast.linear_divergence`; invalid teacher inputs raise ValueError/TypeError.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``.
        teacher_topk_ids: integer ``[..., K]``, distinct ids in [0, V) per position.
        teacher_topk_logprobs: float ``[..., K]``, log-probabilities (≤ 0, total mass ≤ 1 up to rounding).
    """
    divergence = check.check_choice("divergence", divergence, TOPK_DIVERGENCES)
    add_tail = check.check_flag("add_tail", add_tail)
    temperature = check.check_temperature(temperature)
    reduction = check.check_choice("reduction", reduction, check.REDUCTIONS)
    filter_eps = check.check_filter_eps(filter_eps)
    where = Placement.make(backend, plan, process_group)
    w, b, head = check.check_head("student_weight", student_weight, shard=process_group is not None)
    h = check.check_hidden("student_hidden", student_hidden, w, "student_weight")
    lead = h.shape[:-1]
    ids, lpt = check.check_teacher_topk(teacher_topk_ids, teacher_topk_logprobs, lead)
    mask = check.check_mask(mask, lead)
    check.check_same_device(
        student_hidden=h, student_weight=w, student_bias=b, teacher_topk_ids=ids, teacher_topk_logprobs=lpt, mask=mask
    )
    if check.check_flag("check_finite", check_finite):
        check.check_finite(student_hidden=h, student_weight=w, **({} if b is None else {"student_bias": b}))
    shard = where.shard(w.shape[0], h.device)
    rows = counted_rows(mask)
    h_c = select_rows(check.flatten(h), rows)
    ids_c = select_rows(ids.reshape(-1, ids.shape[-1]), rows).long()
    lpt_c = select_rows(lpt.reshape(-1, lpt.shape[-1]), rows).detach()
    check.check_teacher_values(ids_c, lpt_c, vp.global_vocab(shard, w.shape[0]))
    n_rows = check.flatten(h).shape[0]
    if h_c.shape[0] == 0:
        return _reduce(_no_tokens(h_c, w), rows, n_rows, lead, reduction)
    route = where.route(h.device, shard)
    student = Side(h_c, w, b, head)
    zs = linear_gathered_logits(route, student, ids_c, temperature)
    lse_s = linear_logsumexp(route, student, temperature, filter_eps)
    lps = zs - lse_s.unsqueeze(1)
    lpt_c = lpt_c.to(lps.dtype)
    if divergence == "forward_kl":
        per_token = torch.xlogy(lpt_c.exp(), lpt_c.exp()).sum(dim=-1) - (lpt_c.exp() * lps).sum(dim=-1)
    else:
        per_token = (lps.exp() * (lps - lpt_c.clamp_min(math.log(TAIL_FLOOR)))).sum(dim=-1)
    if add_tail:
        tail_t = (1.0 - lpt_c.exp().sum(dim=-1)).clamp_min(0.0)
        tail_s = (-torch.expm1(torch.logsumexp(lps, dim=-1))).clamp_min(TAIL_FLOOR)
        if divergence == "forward_kl":
            per_token = per_token + torch.xlogy(tail_t, tail_t) - tail_t * tail_s.log()
        else:
            per_token = per_token + tail_s * (tail_s.log() - tail_t.clamp_min(TAIL_FLOOR).log())
    return _reduce(per_token, rows, n_rows, lead, reduction)
