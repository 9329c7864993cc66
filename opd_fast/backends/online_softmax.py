"""The online-softmax statistics every epilogue folds its tiles into, and what the sweep makes of them.

A row's state is (m_s, s_s, m_t, s_t, acc): each model's running max m and Σ e^{z − m}, and one accumulator whose
meaning depends on the mode (:func:`finalize`); the student's entropy has its own state (m, s, a)
(:func:`finalize_entropy`). Log-sum-exps are kept with their fp32 rounding residual (:func:`split_lse`), and the
divergences that need the final lse sum their terms in a second pass (:func:`terms_loss`).
"""

from __future__ import annotations

import math

import torch

from opd_fast.backends.epilogue import TWO_MODEL_MODES
from opd_fast.types import DivergenceStats

Tensor = torch.Tensor


def new_state(rows: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fresh online-softmax state [5, rows]: m = −inf, sums 0."""
    state = torch.zeros((5, rows), device=device, dtype=dtype)
    state[0] = state[2] = -math.inf
    return state


def split_lse(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, lse_lo) of rows with shift m and Σ e^{z − m} = s: lse = m + log s rounded, and its residual
    lse_lo = (m − lse) + log s (m − lse is exact by Sterbenz's lemma whenever |m| ≥ log s), 0 where lse is not
    finite. (z − lse) − lse_lo is then log p to ~ulp(log p); z − lse alone would carry ~ulp(lse)."""
    log_s = s.log()
    lse = m + log_s
    return lse, torch.where(torch.isfinite(lse), (m - lse) + log_s, 0.0)


def lse_lo(stats: DivergenceStats) -> tuple[Tensor, Tensor]:
    """The rows' (student, teacher) lse residuals, zeros where ``stats`` has none (only an lse was given)."""
    zeros = None
    if stats.student_lse_lo is None or stats.teacher_lse_lo is None:
        zeros = torch.zeros_like(stats.student_lse)
    return (
        zeros if stats.student_lse_lo is None else stats.student_lse_lo,
        zeros if stats.teacher_lse_lo is None else stats.teacher_lse_lo,
    )


def finalize(state: Tensor, mode: str) -> DivergenceStats:
    """Per-row statistics from the online state (m_s, s_s, m_t, s_t, acc), lse = m + log s kept with its
    residual (:func:`split_lse`). The KL accumulators are taken relative to both rows' maxes (:func:`kl_shift`),
    so that the loss is a difference of small numbers, log p_s − log p_t ≈ (z_s − m_s) − (z_t − m_t), and never
    of the lse's ~ulp(lse) (z_s − z_t and lse_s − lse_t cancel when the heads' logits sit far apart):

    reverse KL: acc = Σ e^{z_s − m_s}((z_s − m_s) − (z_t − m_t))  →  D = acc / s_s − log s_s + log s_t,  center = D
    forward KL: acc = Σ e^{z_t − m_t}((z_t − m_t) − (z_s − m_s))  →  D = acc / s_t − log s_t + log s_s,  center = 0
    token:      acc = z_y (0 where y is outside)  →  loss = z_y, the caller takes z_y − lse
    TERMS_MODES, logsumexp: acc unused (the loss and center come from :meth:`epilogue.Epilogue.terms_update`)
    """
    m_s, s_s, m_t, s_t, acc = state
    lse_s, lo_s = split_lse(m_s, s_s)
    zeros = torch.zeros_like(lse_s)
    if mode not in TWO_MODEL_MODES:
        return DivergenceStats(acc, lse_s, lse_s, zeros, lo_s, lo_s)
    lse_t, lo_t = split_lse(m_t, s_t)
    if mode == "reverse_kl":
        loss = acc / s_s - (s_s.log() - s_t.log())
        return DivergenceStats(loss, lse_s, lse_t, loss, lo_s, lo_t)
    if mode == "forward_kl":
        loss = acc / s_t - (s_t.log() - s_s.log())
        return DivergenceStats(loss, lse_s, lse_t, zeros, lo_s, lo_t)
    return DivergenceStats(zeros, lse_s, lse_t, zeros, lo_s, lo_t)


def new_entropy_state(rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fresh entropy state [3, rows]: m = −inf, s = 0, a = 0 (see :func:`finalize_entropy`)."""
    state = torch.zeros((3, rows), device=device, dtype=dtype)
    state[0] = -math.inf
    return state


def finalize_entropy(state: Tensor) -> Tensor:
    """The student's entropy from its state (m, s, a) with s = Σ e^{z − m}, a = Σ e^{z − m}(z − m):
    H = −Σ p log p = log s − a / s, a sum of terms of the size of H (no lse of size |z| cancels)."""
    _, s, a = state
    return s.log() - a / s


def kl_shift(m: Tensor, s: Tensor, m_other: Tensor, acc: Tensor, m_new: Tensor, m_other_new: Tensor) -> Tensor:
    """A KL accumulator acc = Σ e^{x − m}((x − m) − (y − m_other)) with weights s = Σ e^{x − m} moved to the
    larger maxes (m_new ≥ m, m_other_new ≥ m_other): every term's (x − m) − (y − m_other) moves by
    (m − m_new) − (m_other − m_other_new) and its weight by e^{m − m_new}. 0 for an empty state (m = −inf)."""
    moved = acc + s * ((m - m_new) - (m_other - m_other_new))
    return torch.where(m == -math.inf, 0.0, torch.exp(m - m_new) * moved)


def terms_loss(terms: Tensor, mode: str, beta: float) -> tuple[Tensor, Tensor]:
    """(D, center) of a mode of ``TERMS_MODES`` from the rows' ``terms`` [3, r] = (Σ fs, Σ ft, Σ pg)
    (:meth:`epilogue.Epilogue.terms_update`). With m = β p_t + (1 − β) p_s, fs and ft sum to KL(p_s ‖ m) and
    KL(p_t ‖ m) in cancellation-free form (TVD: fs = ½|p_s − p_t|, ft = 0), and pg is p_s times the derivative of D
    w.r.t. p_s (up to a constant, which the centering removes), so that ∂D/∂z_s = pg − p_s · center with center = Σ pg:

        JSD(β)           D = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)   pg = (1 − β) p_s log(p_s / m)
        skew forward KL  D = KL(p_t ‖ m)                            pg = −(1 − β) p_s (p_t / m − 1)
        skew reverse KL  D = KL(p_s ‖ m)                            pg = p_s (log(p_s / m) + β (p_t / m − 1))
        TVD              D = ½ Σ |p_s − p_t|                        pg = ½ p_s sign(p_s − p_t)

    (the skew KLs' pg without their derivatives' constants, so that every pg vanishes where p_s = p_t).

    The center is the summed Σ pg rather than D itself (JSD: (1 − β) KL(p_s ‖ m) differs from (1 − β) Σ p_s log(p_s /
    m) by β (Σ p_t − Σ p_s), zero in exact arithmetic but, with fp32 log-sum-exps of large logits, off by ~ulp(lse),
    which the gradient would amplify where its two parts nearly cancel): Σ pg is consistent with the per-element
    pg, as autograd's is."""
    fs, ft, pg = terms
    if mode == "jsd":
        return beta * ft + (1.0 - beta) * fs, pg
    if mode == "skew_forward_kl":
        return ft, pg
    return fs, pg  # skew reverse KL, TVD
