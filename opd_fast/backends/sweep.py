"""The tile sweep every backend shares: GEMMs for the logits, a backend's epilogue for the math, GEMMs for
the gradients. A backend only writes the per-tile math (an :class:`Epilogue`); the loops, the chunk plan,
the GEMMs, gradient filtering and, on CUDA, the overlap of memory-bound epilogues with the GEMMs live here.

For each token chunk (rows) and vocabulary tile (cols) of :func:`opd_fast.chunking.plan_tiles`:

1. logits: ``z = h[rows] · W[cols]ᵀ`` into a reused fp32 workspace (cuBLAS; bf16/fp16 inputs accumulate
   and land in fp32 through ``out_dtype``), rows a padded stride apart on CUDA (:mod:`opd_fast.chunking`).
   The bias and the head's scale, softcap and 1/τ are applied by the epilogue, on the fly.
2. statistics: ``Epilogue.stats_update`` folds each tile into per-row online-softmax state
   (m_s, s_s, m_t, s_t, acc; see :func:`finalize`), JSD takes one more pass for its mixture terms.
3. gradient: ``Epilogue.grad`` turns the tile into the logit gradient G (per-token weight, 1/τ and the
   head's chain rule folded in), then ``dH[rows] += G · W[cols]``, ``dW[cols] += Gᵀ · h[rows]`` (an fp32
   accumulator when several token chunks add into it, written by the first with β = 0: never zero-filled; or,
   with :func:`opd_fast.chunking.dw_gemm` "single", one GEMM over every row's G at the end) and
   ``db[cols] += Σ_rows G``.

With the chunked plan a tile is a whole vocabulary row, so steps 1–3 share one computation of the logits:
forward + backward cost exactly the floor's GEMM FLOPs, 2·N·V·(Hs + Ht) + 4·N·V·Hs, and the logits of a
chunk die with it. With vocabulary tiles (the streaming plan, or rows that do not fit the budget) the
gradient sweep recomputes the tiles once the row's statistics are final.

Gradient filtering (``filter_eps > 0``, opt-in): G is proportional to p_s (and p_t for forward KL), so in
a chunk many vocabulary columns carry a gradient below any resolution. Columns whose |G| (per token,
before the token's weight) is below ``filter_eps`` in every row of the chunk are left out of the gradient
GEMMs: the live columns are gathered and only they are multiplied. :func:`last_filter_stats` reports the
share skipped.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.chunking import TilePlan, padded_stride, plan_tiles, single_dw_gemm
from opd_fast.types import DivergenceStats, Grads, HeadTransform, Need, Side

Tensor = torch.Tensor

# Op codes shared with the kernels (kernels/_common.py, csrc/epilogue.h). Those below token_logprob's are
# two-model; JSD, the skew KLs and TVD (TERMS_MODES) sum their loss in a second pass over each tile once both rows'
# log-sum-exps are final (:meth:`Epilogue.terms_update`).
MODES = {
    "reverse_kl": 0,
    "forward_kl": 1,
    "jsd": 2,
    "skew_forward_kl": 3,
    "skew_reverse_kl": 4,
    "tvd": 5,
    "token_logprob": 6,
    "logsumexp": 7,
    "entropy": 8,
}
TWO_MODEL_MODES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TERMS_MODES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


# ---- one model's operands, as the GEMMs and the epilogue take them -------------------------------------------


@dataclass(frozen=True)
class Operand:
    """A model's operands: GEMM inputs, the bias and the rest of the head transform.

    The logits are z = post · softcap_c(pre · (hidden · weightᵀ + bias)) with softcap_c(x) = c·tanh(x / c)
    (identity when ``softcap`` is None) and ``post`` = 1/τ. A backend may fold linear factors into
    ``hidden`` and ``bias`` (they are copies anyway); ``grad_scale`` is the factor so folded, which the
    hidden-state and bias gradients must be multiplied by (the weight gradient, Gᵀ·hidden, carries it).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    pre: float
    softcap: float | None
    post: float
    grad_scale: float = 1.0

    def tile(self, cols: slice) -> TileHead:
        return TileHead(None if self.bias is None else self.bias[cols], self.pre, self.softcap, self.post)


class TileHead(tuple):
    """(bias of the tile's columns | None, pre-scale, softcap | None, post-scale) for an epilogue call."""

    __slots__ = ()

    def __new__(cls, bias: Tensor | None, pre: float, softcap: float | None, post: float):
        return super().__new__(cls, (bias, pre, softcap, post))

    bias = property(lambda self: self[0])
    pre = property(lambda self: self[1])
    softcap = property(lambda self: self[2])
    post = property(lambda self: self[3])


class Epilogue(Protocol):
    """The per-tile math of a backend, on fp32 [r, c] logits tiles ``z = h·Wᵀ`` of columns [v_lo, v_lo + c).

    ``mode`` is a key of ``MODES``; one-model modes get ``zt = None``. Per-row vectors are fp32 [r].

    An epilogue with ``takes_row_stride = True`` gets its tiles and G buffers as views whose rows lie the plan's
    row stride apart (:func:`opd_fast.chunking.row_stride`: padded to 64 elements on CUDA; ``zs`` and ``zt``
    share it, G's may differ); without it (the default) every tile it sees is packed, rows c elements apart.
    """

    takes_row_stride: bool

    def prepare(self, side: Side, temperature: float, fold: bool = True) -> Operand:
        """The GEMM inputs of a model (dtype, strides, folding) and its head transform; ``fold=False`` keeps every
        factor of the head out of the GEMM inputs (the ranking ops: a factor folded into the hidden states rounds
        logits that tie in h·Wᵀ apart, and they would rank by that rounding instead of by id)."""

    def grad_dtype(self, operand: Operand) -> torch.dtype:
        """dtype of the logit gradient G handed to the gradient GEMMs."""

    # Optional: ``full_rows(zs, zt, ids, hs, ht, mode, beta, row_weight, out, entropy, center_shift) ->
    # (DivergenceStats, G | None)``, the statistics (with ``entropy``, the student's entropy too) and (with
    # ``row_weight``) the logit gradient of tiles that span the whole vocabulary, in one pass, its center lowered by
    # ``center_shift`` (:class:`HardLabels`); the sweep uses it instead of stats_update + terms_update + grad when a
    # chunk is one tile.

    def stats_update(
        self,
        state: Tensor,
        zs: Tensor,
        zt: Tensor | None,
        ids: Tensor | None,
        hs: TileHead,
        ht: TileHead | None,
        v_lo: int,
        mode: str,
        entropy: Tensor | None = None,
    ) -> None:
        """Merge the tile into ``state`` [5, r] = (m_s, s_s, m_t, s_t, acc) (see :func:`finalize`) and, when given,
        the student's tile into the ``entropy`` state [3, r] (see :func:`finalize_entropy`), in the same read."""

    def terms_update(
        self,
        terms: Tensor,
        zs: Tensor,
        zt: Tensor,
        stats: DivergenceStats,
        hs: TileHead,
        ht: TileHead,
        mode: str,
        beta: float,
    ) -> None:
        """terms [3, r] += (Σ fs, Σ ft, Σ pg) over the tile for a mode of ``TERMS_MODES`` (see :func:`terms_loss`;
        the per-element fs, ft, pg of opd_fast.backends.torch_backend.terms_parts), with log p = (z − lse) − lse_lo
        from the rows' final ``stats`` (:func:`lse_lo`)."""

    def grad(
        self,
        zs: Tensor,
        zt: Tensor | None,
        ids: Tensor | None,
        stats: DivergenceStats,
        row_weight: Tensor,
        hs: TileHead,
        ht: TileHead | None,
        v_lo: int,
        mode: str,
        beta: float,
        out: Tensor | None,
    ) -> Tensor:
        """G [r, c] = row_weight · ∂D/∂(h·Wᵀ) for the tile (the head's chain rule included), into ``out`` when
        given, else in a tile the epilogue may take from ``zs``; ``stats`` holds the rows' final (loss, lse_s,
        lse_t, center) and the lse residuals (:func:`lse_lo`). Per element, before the chain rule and the weight:
        reverse KL p_s (log p_s − log p_t − loss), forward KL p_s − p_t − p_s · center, the ``TERMS_MODES``
        pg − p_s · center (their center is Σ pg; forward KL's is 0 from the statistics, and the sweep shifts both
        for a hard-label term, :class:`HardLabels`), entropy p_s (log p_s − center) with center = −H (so that
        with the row weight −w it is w ∂H/∂z)."""

    def topk_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The empty entropy state of :meth:`topk` for ``rows`` rows."""

    def topk(self, z: Tensor, head: TileHead, k: int, v_lo: int, best, entropy_state: Tensor):
        """Merge a tile into the running top-k ``best`` (None at first) and entropy state [3, r]; returns the
        new ``best``, finalized by :meth:`topk_finalize`."""

    def topk_finalize(self, best, entropy_state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids int64 [r, k], log-probs [r, k], lse [r], entropy [r])."""


# ---- GEMMs with fp32 accumulation ------------------------------------------------------------------------------


def mm_out(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a @ b with fp32 (or fp64) accumulation and output for every input dtype."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out.dtype, out=out)  # cuBLAS: bf16/fp16 in, fp32 accumulate and out
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)  # CPU (host-build tests): through fp32 copies


@functools.cache
def _cuda_addmm_takes_a_wider_accumulator(device: torch.device) -> bool:
    """Whether ``torch.addmm(fp32 acc, bf16, bf16, out_dtype=fp32)`` runs here. Releases from before the check in
    ``_addmm_dtype_out_cuda`` was relaxed (late 2025: torch 2.8 and 2.9 by their dates) want acc in the operands'
    dtype; torch 2.14.1 takes it ("self dtype must match either out_dtype or mat1 dtype")."""
    operand = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
    acc = torch.zeros(16, 16, device=device)
    try:
        torch.addmm(acc, operand, operand, out_dtype=acc.dtype, out=acc)
    except RuntimeError:
        return False
    return True


def addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in acc's dtype, without rounding the product to a's dtype first (the out= form rather than
    Tensor.addmm_, which torch.utils.flop_counter does not count)."""
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, out=acc)
    elif a.is_cuda and _cuda_addmm_takes_a_wider_accumulator(a.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif a.is_cuda:  # one product in fp32, then added: a temporary of acc's size
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        torch.addmm(acc, a.to(acc.dtype), b.to(acc.dtype), out=acc)


# ---- statistics --------------------------------------------------------------------------------------------------


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
    TERMS_MODES, logsumexp: acc unused (the loss and center come from :meth:`Epilogue.terms_update`)
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
    (:meth:`Epilogue.terms_update`). With m = β p_t + (1 − β) p_s, fs and ft sum to KL(p_s ‖ m) and KL(p_t ‖ m) in
    cancellation-free form (TVD: fs = ½|p_s − p_t|, ft = 0), and pg is p_s times the derivative of D w.r.t. p_s
    (up to a constant, which the centering removes), so that ∂D/∂z_s = pg − p_s · center with center = Σ pg:

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


# ---- hard labels: a cross-entropy term folded into a divergence's sweep ----------------------------------------


@dataclass(frozen=True)
class HardLabels:
    """The cross-entropy part of a loss w · CE(p_s, y) + (1 − w) · D (``hard_label_weight`` w < 1), folded into the
    sweep of D so that it costs no pass over the vocabulary.

    CE = lse_s − z_y, and its logit gradient is p_s − e_y. Every epilogue forms D's gradient as p_s (g − center)
    (reverse KL with its loss as the center; forward KL as p_s − p_t − p_s · center, its center 0): with the row
    weights scaled by (1 − w) and the center lowered by ``shift`` = w / (1 − w) (:func:`shifted_center`),
    (1 − w) p_s (g − center + shift) = (1 − w) G_D + w p_s, CE's p_s part. Its one-hot part, −w e_y per row, is
    subtracted from each G tile at the label's column (:func:`add_one_hot`) before the gradient GEMMs, times the
    head's chain factor at the label's logit: dH, dW and db then carry it like every other column.

    ``ids`` [N]: each row's label as a column of these vocabulary rows (−1: another shard holds it); ``chain`` [N]:
    dz/dx at the label's logit (:func:`label_logits`; 0 at −1)."""

    ids: Tensor
    chain: Tensor
    shift: float


def label_logits(op: Operand, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(z_y, dz_y/dx_y) per row: the final logit post · softcap(pre · (h · W[y] + b[y])) at each row's label, from a
    row-by-row dot of the hidden state with the label's weight row (O(N·H), no vocabulary pass), and the head's
    chain factor there; both 0 where ``ids`` is −1."""
    dtype = torch.promote_types(op.hidden.dtype, torch.float32)
    owned = ids >= 0
    rows = op.weight.index_select(0, ids.clamp_min(0)).to(dtype)
    x = (op.hidden.to(dtype) * rows).sum(dim=-1)
    if op.bias is not None:
        x = x + op.bias.index_select(0, ids.clamp_min(0)).to(dtype)
    x = x * op.pre
    chain = torch.full_like(x, op.pre * op.post)
    if op.softcap is not None:
        tanh = torch.tanh(x / op.softcap)
        x = tanh * op.softcap
        chain = chain * (1.0 - tanh * tanh)
    z = x * op.post
    return torch.where(owned, z, 0.0), torch.where(owned, chain, 0.0)


def shifted_center(stats: DivergenceStats, mode: str, shift: float) -> DivergenceStats:
    """The statistics a gradient pass reads, their center lowered by ``shift`` (:class:`HardLabels`); reverse KL's
    gradient passes read the loss as the center."""
    if shift == 0.0:
        return stats
    center = stats.center - shift
    if mode == "reverse_kl":
        return stats._replace(loss=stats.loss - shift, center=center)
    return stats._replace(center=center)


def add_one_hot(g: Tensor, ids: Tensor, v_lo: int, coef: Tensor) -> None:
    """g[n, ids_n − v_lo] −= coef_n in place, for the rows whose label lies among the tile's columns."""
    col = ids - v_lo
    rows = ((col >= 0) & (col < g.shape[1])).nonzero().view(-1)
    if rows.numel():
        cols = col.index_select(0, rows)
        g[rows, cols] -= coef.index_select(0, rows).to(g.dtype)


# ---- gradient filtering -----------------------------------------------------------------------------------------


class FilterStats:
    """Vocabulary columns (or tiles) seen and skipped by gradient filtering, counted on the device."""

    def __init__(self) -> None:
        self.total = 0
        self.skipped: Tensor | int = 0

    def add(self, total: int, skipped: Tensor | int) -> None:
        self.total += total
        self.skipped = self.skipped + skipped

    def as_dict(self) -> dict:
        skipped = int(self.skipped)
        return {
            "tiles": self.total,
            "skipped": skipped,
            "skipped_fraction": skipped / self.total if self.total else 0.0,
        }


_last_filter_stats = FilterStats()


def last_filter_stats() -> dict:
    """Columns/tiles seen and skipped by gradient filtering in the most recent gradient sweep (any backend)."""
    return _last_filter_stats.as_dict()


def set_filter_stats(stats: FilterStats) -> None:
    global _last_filter_stats
    _last_filter_stats = stats


def live_columns(g: Tensor, row_weight: Tensor, filter_eps: float) -> Tensor:
    """Indices of the tile's columns where some row's unweighted |G| reaches ``filter_eps`` or is NaN (a NaN
    gradient must reach dH and dW, never be skipped as small; amax propagates it)."""
    scale = row_weight.abs().to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    peak = (g.abs().to(torch.float32) / scale[:, None]).amax(dim=0)
    return (~(peak < filter_eps)).nonzero().view(-1)


# ---- the sweep ---------------------------------------------------------------------------------------------------


def keeps_all_g(
    plan: TilePlan, n_rows: int, hidden: int, g_dtype: torch.dtype, device: torch.device, filter_eps: float
) -> bool:
    """Whether a sweep of ``n_rows`` rows makes dW with one GEMM over every row's G (kept in ``g_dtype``)
    rather than chunk by chunk: several chunks of whole vocabulary rows, no gradient filtering (its live
    columns are a chunk's), and :func:`opd_fast.chunking.single_dw_gemm` (sized with the CUDA row stride, against
    the fp32 [V, hidden] accumulator it replaces)."""
    return (
        plan.rows < n_rows
        and plan.vocab_tiles == 1
        and filter_eps == 0
        and single_dw_gemm(n_rows, padded_stride(plan.cols), g_dtype.itemsize, device, plan.vocab * hidden * 4)
    )


def weight_grad_dtype(
    backend: str,
    plan: str,
    n_rows: int,
    vocab: int,
    hidden: int,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    device: torch.device,
    filter_eps: float | None,
) -> torch.dtype:
    """The dtype of the dW that backend ``backend``'s ops make for ``n_rows`` rows, from shapes alone (a custom
    op's fake implementation declares it): the GEMM operands' dtype when dW is written once (one token chunk, or
    the single dW GEMM), the fp32 (fp64) accumulator's when chunks add into it. The torch backend computes in
    fp32 (fp64) throughout; the kernel backends' operands are the inputs' common dtype (:func:`kernel_dtype`)."""
    operands = torch.promote_types(hidden_dtype, weight_dtype)
    acc = torch.promote_types(operands, torch.float32)
    if backend == "torch":
        return acc
    if n_rows == 0 or vocab == 0:
        return operands  # nothing to accumulate (an empty vocabulary shard)
    tiles = plan_tiles(n_rows, vocab, plan=plan, device=device)
    once = tiles.rows >= n_rows or keeps_all_g(tiles, n_rows, hidden, operands, torch.device(device), filter_eps or 0.0)
    return operands if once else acc


class _Accumulator:
    """dH, dW, db of one model over the sweep; no [N, H] or [V, H] buffer is zero-filled when every element is
    written (only gradient filtering, which adds the live columns alone, starts from zeros).

    dH rows are written by a chunk's first vocabulary tile (β = 0) and added to by the others (β = 1). dW is
    written once per tile in the GEMM operands' dtype when one token chunk covers all rows; with several chunks
    it is either an fp32 accumulator that the first chunk writes (β = 0) and the later ones add into (β = 1),
    or, given ``g_all`` (every row's G, :func:`opd_fast.chunking.single_dw_gemm`), one GEMM Gᵀ·H over all rows
    at the end, written once in the operands' dtype.
    """

    def __init__(
        self, op: Operand, need: Need, plan: TilePlan, n_rows: int, filter_eps: float, g_all: Tensor | None = None
    ):
        self.op, self.need, self.plan, self.filter_eps, self.g_all = op, need, plan, filter_eps, g_all
        device, acc_dtype = op.hidden.device, torch.promote_types(op.hidden.dtype, torch.float32)
        self.acc_dtype = acc_dtype
        unwritten = n_rows == 0 or op.weight.shape[0] == 0  # no GEMM runs: the gradients are zeros
        dh_new = torch.zeros if unwritten else torch.empty
        dw_new = torch.zeros if unwritten or filter_eps > 0 else torch.empty
        self.dh = dh_new(op.hidden.shape, device=device, dtype=acc_dtype) if need.hidden else None
        dw_dtype = acc_dtype if plan.rows < n_rows and g_all is None else op.weight.dtype
        self.dw = dw_new(op.weight.shape, device=device, dtype=dw_dtype) if need.weight else None
        self.db = torch.zeros(op.weight.shape[0], device=device, dtype=acc_dtype) if need.bias else None
        self.filter = FilterStats()

    def add(self, g: Tensor, rows: slice, cols: slice, row_weight: Tensor) -> None:
        w, h = self.op.weight[cols], self.op.hidden[rows]
        index = None
        if self.filter_eps > 0:
            index = live_columns(g, row_weight, self.filter_eps)
            self.filter.add(g.shape[1], g.shape[1] - index.numel())
            g, w = g.index_select(1, index), w.index_select(0, index)
        if self.dh is not None:
            if cols.start == 0:  # the chunk's first vocabulary tile writes its dH rows
                mm_out(g, w, self.dh[rows])
            else:
                addmm_(self.dh[rows], g, w)
        if self.dw is not None and self.g_all is None:
            target = self.dw[cols]
            if index is not None:
                update = torch.empty((index.numel(), h.shape[1]), device=g.device, dtype=self.acc_dtype)
                mm_out(g.T, h, update)
                target.index_add_(0, index, update.to(target.dtype))  # unique indices: one writer per row
            elif rows.start == 0:  # the first token chunk writes dW (β = 0), the later ones add (β = 1)
                mm_out(g.T, h, target)
            else:
                addmm_(target, g.T, h)
        if self.db is not None:
            col_sum = g.sum(dim=0, dtype=self.acc_dtype)
            if index is None:
                self.db[cols] += col_sum
            else:
                self.db[cols].index_add_(0, index, col_sum)

    def result(self) -> Grads:
        if self.filter_eps > 0:
            set_filter_stats(self.filter)
        if self.dw is not None and self.g_all is not None:
            mm_out(self.g_all.T, self.op.hidden, self.dw)  # the single dW GEMM
        scale = self.op.grad_scale
        dh = self.dh if self.dh is None or scale == 1.0 else self.dh.mul_(scale)
        db = self.db if self.db is None or scale == 1.0 else self.db.mul_(scale)
        return Grads(dh, self.dw, db)


def _store_rows(out: DivergenceStats, stats: DivergenceStats, rows: slice) -> None:
    """Write a chunk's statistics into ``rows`` of the sweep's outputs (those it has: the entropy when asked)."""
    for field, value in zip(out, stats):
        if field is not None:
            field[rows] = value


def _select(stats: DivergenceStats, rows: slice) -> DivergenceStats:
    return DivergenceStats(*(None if t is None else t[rows] for t in stats))


OVERLAP_ENV = "OPD_FAST_OVERLAP"


class _Overlap:
    """On CUDA, each chunk's memory-bound epilogue runs on a side stream while the main stream runs the
    previous chunk's gradient GEMMs (dH, dW: about half of all GEMM FLOPs), with two G buffers:

        main:  Z(i) ─ dH/dW(i−1) ─ wait E(i) ─ Z(i+1) ─ dH/dW(i) ─ …
        side:      └ wait Z(i) ─ E(i) (stats, G(i)) ┘          └ E(i+1) …

    Disabled (everything in order on the current stream) off CUDA, for vocabulary-tiled plans, in place
    fp32 gradients, or with ``OPD_FAST_OVERLAP=0``.
    """

    def __init__(self, device: torch.device, wanted: bool):
        self.enabled = wanted and device.type == "cuda" and os.environ.get(OVERLAP_ENV, "1") != "0"
        self.side = torch.cuda.Stream(device) if self.enabled else None
        self.main = torch.cuda.current_stream(device) if self.enabled else None
        self.done = None

    def mark(self):
        return self.main.record_event() if self.enabled else None

    @contextmanager
    def epilogue(self, logits_ready):
        if not self.enabled:
            yield
            return
        self.side.wait_event(logits_ready)
        with torch.cuda.stream(self.side):
            yield
        self.done = self.side.record_event()

    def wait_epilogue(self) -> None:
        if self.enabled and self.done is not None:
            self.main.wait_event(self.done)

    def finish(self) -> None:
        if self.enabled:
            self.main.wait_stream(self.side)


def _hard_labels(
    op: Operand, spec: DivergenceSpec, labels: Tensor | None, row_weight: Tensor | None
) -> tuple[HardLabels | None, Tensor | None, Tensor | None]:
    """(the sweep's :class:`HardLabels`, D's row weights, the labels' logits) for ``labels`` (None: none of them)."""
    if labels is None:
        return None, row_weight, None
    weight = spec.hard_label_weight
    z_y, chain = label_logits(op, labels)
    if row_weight is not None:
        row_weight = row_weight * (1.0 - weight)
    return HardLabels(labels, chain, weight / (1.0 - weight)), row_weight, z_y


class Sweep:
    """The ops of :mod:`opd_fast.backends` for a plan, on an :class:`Epilogue`."""

    def __init__(self, name: str, epilogue: Epilogue, plan: str = "chunked"):
        self.name, self.epilogue, self.plan = name, epilogue, plan
        # Tiles with the plan's (padded) row stride, or packed [r, c] for an epilogue that wants contiguous ones.
        self.strided = getattr(epilogue, "takes_row_stride", False)

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _plan(self, n_rows: int, vocab: int, device: torch.device) -> TilePlan:
        return plan_tiles(n_rows, vocab, plan=self.plan, device=device)

    def _view(self, buf: Tensor, plan: TilePlan, rows: slice, width: int) -> Tensor:
        """The [r, width] tile of token ``rows`` (counted from the buffer's first row) in a flat buffer: rows
        ``plan.stride`` elements apart, or packed when the epilogue takes no row stride."""
        ld = plan.stride if self.strided else width
        return buf[rows.start * ld : rows.stop * ld].view(rows.stop - rows.start, ld)[:, :width]

    def _workspace(self, plan: TilePlan, n_models: int, device: torch.device, dtype: torch.dtype):
        """Reused flat fp32 buffers, one per model, each big enough for one [rows, cols] tile."""
        return [torch.empty(plan.rows * plan.stride, device=device, dtype=dtype) for _ in range(n_models)]

    def _logits(self, op: Operand, rows: slice, cols: slice, buf: Tensor, plan: TilePlan) -> Tensor:
        tile = self._view(buf, plan, slice(0, rows.stop - rows.start), cols.stop - cols.start)
        return mm_out(op.hidden[rows], op.weight[cols].T, tile)

    def _grad_buffer(self, op: Operand, plan: TilePlan, acc_dtype: torch.dtype, n_rows: int | None = None):
        """A flat buffer for G of ``n_rows`` rows (one chunk's by default); None when G may overwrite the
        student's fp32 logits tile in place (only one chunk's G is kept)."""
        dtype = self.epilogue.grad_dtype(op)
        if dtype == acc_dtype and n_rows is None:
            return None
        return torch.empty((n_rows or plan.rows) * plan.stride, device=op.hidden.device, dtype=dtype)

    def _tile_source(self, plan: TilePlan, ops: list[Operand], bufs: list[Tensor], rows: slice):
        """A callable giving a token chunk's (cols, [logits per model]) tiles: computed once and handed out
        on every call when one tile spans the vocabulary, recomputed on every call otherwise."""
        if plan.vocab_tiles == 1:
            cols = slice(0, plan.vocab)
            tile = [self._logits(op, rows, cols, buf, plan) for op, buf in zip(ops, bufs)]
            return lambda: [(cols, tile)]
        return lambda: (
            (cols, [self._logits(op, rows, cols, buf, plan) for op, buf in zip(ops, bufs)]) for cols in plan.col_tiles()
        )

    def _chunk_stats(self, mode, s, t, tiles, ids, beta, r, dtype, entropy: bool = False) -> DivergenceStats:
        """One token chunk's statistics: a sweep of online-softmax merges (with ``entropy``, the student's entropy
        from the same tiles), plus the terms pass of the ``TERMS_MODES``."""
        epi = self.epilogue
        state = new_state(r, s.hidden.device, dtype)
        entropy_state = new_entropy_state(r, s.hidden.device, dtype) if entropy else None
        for cols, zz in tiles():
            zt, ht = (zz[1], t.tile(cols)) if t is not None else (None, None)
            epi.stats_update(state, zz[0], zt, ids, s.tile(cols), ht, cols.start, mode, entropy_state)
        stats = finalize(state, mode)
        if entropy:
            stats = stats._replace(student_entropy=finalize_entropy(entropy_state))
        if mode not in TERMS_MODES:
            return stats
        terms = torch.zeros((3, r), device=s.hidden.device, dtype=dtype)
        for cols, (zs, zt) in tiles():
            epi.terms_update(terms, zs, zt, stats, s.tile(cols), t.tile(cols), mode, beta)
        loss, center = terms_loss(terms, mode, beta)
        return stats._replace(loss=loss, center=center)

    # -- the generic sweep ---------------------------------------------------------------------------------------

    def _sweep(
        self,
        mode: str,
        ops: list[Operand],
        ids: Tensor | None,
        beta: float,
        row_weight: Tensor | None,
        given: DivergenceStats | None,
        need: Need,
        filter_eps: float,
        terms_lse: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        entropy: bool = False,
        hard: HardLabels | None = None,
    ) -> tuple[DivergenceStats | None, Grads]:
        """Statistics (unless ``given``; with ``entropy``, the first model's entropy too) and, with ``row_weight``,
        the first model's gradients (with ``hard``, a cross-entropy term's folded in: :class:`HardLabels`; the row
        weights are then D's, (1 − w) times the loss's).

        ``terms_lse`` (vocabulary parallelism): the rows' global (lse_s, lse_t, lse_lo_s, lse_lo_t); the sweep then
        only adds up the terms of these vocabulary rows and returns them ([3, N], see :func:`terms_loss`) in place
        of the stats.
        """
        epi, s = self.epilogue, ops[0]
        t = ops[1] if len(ops) > 1 else None
        n_rows, vocab, device = s.hidden.shape[0], s.weight.shape[0], s.hidden.device
        plan = self._plan(n_rows, vocab, device)
        acc_dtype = torch.promote_types(s.hidden.dtype, torch.float32)
        want_grad = row_weight is not None and need.any
        g_all = None  # every row's G, for the single dW GEMM
        if (
            want_grad
            and need.weight
            and keeps_all_g(plan, n_rows, s.hidden.shape[1], epi.grad_dtype(s), device, filter_eps)
        ):
            g_all = self._grad_buffer(s, plan, acc_dtype, n_rows)
        g_all_rows = None if g_all is None else self._view(g_all, plan, slice(0, n_rows), vocab)
        acc = _Accumulator(s, need, plan, n_rows, filter_eps, g_all_rows) if want_grad else None
        want_stats = given is None
        out = None
        if terms_lse is not None:
            out = torch.zeros((3, n_rows), device=device, dtype=acc_dtype)
        elif want_stats:
            out = DivergenceStats(*(torch.empty(n_rows, device=device, dtype=acc_dtype) for _ in range(6)))
            if entropy:
                out = out._replace(student_entropy=torch.empty(n_rows, device=device, dtype=acc_dtype))
        if n_rows == 0 or vocab == 0:
            return out, Grads() if acc is None else acc.result()
        bufs = self._workspace(plan, len(ops), device, acc_dtype)
        g_bufs = [self._grad_buffer(s, plan, acc_dtype)] if want_grad and g_all is None else [None]
        separate_g = g_all is not None or g_bufs[0] is not None
        overlap = _Overlap(device, want_grad and plan.vocab_tiles == 1 and separate_g)
        if overlap.enabled and g_all is None:
            g_bufs.append(self._grad_buffer(s, plan, acc_dtype))  # chunk i's G is read while i + 1's is written

        def g_out(i: int, rows: slice, width: int) -> Tensor | None:
            """Where chunk i's G goes: its rows of ``g_all``, a G buffer, or (None) over the student's logits."""
            if g_all is not None:
                return self._view(g_all, plan, rows, width)
            g_buf = g_bufs[i % len(g_bufs)]
            return None if g_buf is None else self._view(g_buf, plan, slice(0, rows.stop - rows.start), width)

        pending = None  # the previous chunk's (G, rows, cols, weights), its gradient GEMMs not yet enqueued
        for i, rows in enumerate(plan.row_chunks(n_rows)):
            r = rows.stop - rows.start
            ids_r = None if ids is None else ids[rows]
            overlap.wait_epilogue()  # the logits workspace is free again
            tiles = self._tile_source(plan, ops, bufs, rows)
            logits_ready = overlap.mark()
            if pending is not None:
                acc.add(*pending)  # overlaps this chunk's epilogue on the side stream
                pending = None
            if terms_lse is not None:
                terms = torch.zeros((3, r), device=device, dtype=acc_dtype)
                zeros = terms[0].clone()
                row_lse = DivergenceStats(
                    zeros, *(x[rows] for x in terms_lse[:2]), zeros, *(x[rows] for x in terms_lse[2:])
                )
                for cols, (zs, zt) in tiles():
                    epi.terms_update(terms, zs, zt, row_lse, s.tile(cols), t.tile(cols), mode, beta)
                out[:, rows] = terms
                continue
            with overlap.epilogue(logits_ready):
                weight_r = row_weight[rows].to(acc_dtype) if want_grad else None
                if want_stats and plan.vocab_tiles == 1 and getattr(epi, "full_rows", None) is not None:
                    ((cols, zz),) = tiles()
                    g_to = g_out(i, rows, plan.vocab) if want_grad else None
                    zt, ht = (zz[1], t.tile(cols)) if t is not None else (None, None)
                    shift = 0.0 if hard is None else hard.shift
                    stats, g = epi.full_rows(
                        zz[0], zt, ids_r, s.tile(cols), ht, mode, beta, weight_r, g_to, entropy, shift
                    )
                    _store_rows(out, stats, rows)
                    if g is not None:
                        if hard is not None:
                            add_one_hot(g, hard.ids[rows], cols.start, weight_r * shift * hard.chain[rows])
                        pending = self._emit(g, rows, cols, weight_r, acc, overlap)
                    continue
                if want_stats:
                    stats = self._chunk_stats(mode, s, t, tiles, ids_r, beta, r, acc_dtype, entropy)
                    _store_rows(out, stats, rows)
                else:
                    stats = _select(given, rows)
                if not want_grad:
                    continue
                if hard is not None:
                    stats = shifted_center(stats, mode, hard.shift)
                for cols, zz in tiles():
                    g_to = g_out(i, rows, cols.stop - cols.start)
                    zt = zz[1] if t is not None else None
                    ht = t.tile(cols) if t is not None else None
                    g = epi.grad(zz[0], zt, ids_r, stats, weight_r, s.tile(cols), ht, cols.start, mode, beta, g_to)
                    if hard is not None:
                        add_one_hot(g, hard.ids[rows], cols.start, weight_r * hard.shift * hard.chain[rows])
                    pending = self._emit(g, rows, cols, weight_r, acc, overlap)
        overlap.wait_epilogue()
        if pending is not None:
            acc.add(*pending)
        overlap.finish()
        return out, Grads() if acc is None else acc.result()

    @staticmethod
    def _emit(g: Tensor, rows: slice, cols: slice, weight_r: Tensor, acc: _Accumulator, overlap: _Overlap):
        """Hand a tile's logit gradient to the dH/dW GEMMs: now, or (overlapping) as the pending tile."""
        if overlap.enabled:
            weight_r.record_stream(overlap.main)  # made on the side stream, read on the main one
            return (g, rows, cols, weight_r)
        acc.add(g, rows, cols, weight_r)
        return None

    # -- the ops -------------------------------------------------------------------------------------------------

    def _operands(self, sides: list[Side], temperatures: list[float], fold: bool = True) -> list[Operand]:
        """Each model's operand, its logits divided by its own temperature."""
        return [self.epilogue.prepare(side, tau, fold) for side, tau in zip(sides, temperatures, strict=True)]

    def _pair(self, s: Side, t: Side, spec: DivergenceSpec) -> list[Operand]:
        """The student's and the teacher's operands at τ and τ_t."""
        return self._operands([s, t], [spec.temperature, spec.teacher_temperature])

    def divergence(
        self,
        s: Side,
        t: Side,
        spec: DivergenceSpec,
        row_weight: Tensor | None,
        need: Need,
        labels: Tensor | None = None,
    ) -> tuple[DivergenceStats, Grads]:
        """Per-token statistics and, when ``row_weight`` [N] is given, the gradients of Σ_n w_n L_n, L = D or, with
        ``labels`` (each row's label column in these vocabulary rows, −1 where another shard holds it), L =
        w · CE + (1 − w) · D for w = ``spec.hard_label_weight``; the statistics then hold the label's logit and D
        (the caller adds the cross-entropy, lse_s − z_y, once the lse is global)."""
        ops = self._pair(s, t, spec)
        hard, row_weight, z_y = _hard_labels(ops[0], spec, labels, row_weight)
        stats, grads = self._sweep(
            spec.kind, ops, None, spec.beta, row_weight, None, need, spec.filter_eps or 0.0, None, spec.entropy, hard
        )
        return (stats if z_y is None else stats._replace(label_logit=z_y)), grads

    def divergence_label_logits(self, s: Side, spec: DivergenceSpec, labels: Tensor) -> Tensor:
        """The student's final logit at each row's label column (0 where ``labels`` is −1; :func:`label_logits`)."""
        return label_logits(self._operands([s], [spec.temperature])[0], labels)[0]

    def divergence_backward(
        self,
        s: Side,
        t: Side,
        spec: DivergenceSpec,
        stats: DivergenceStats,
        row_weight: Tensor,
        need: Need,
        labels: Tensor | None = None,
    ) -> Grads:
        """Gradients of Σ_n w_n L_n (:meth:`divergence`) from given (e.g. global) statistics; recomputes the
        logits."""
        ops = self._pair(s, t, spec)
        dtype = torch.promote_types(ops[0].hidden.dtype, torch.float32)
        given = DivergenceStats(*(None if x is None else x.to(dtype) for x in stats))
        hard, row_weight, _ = _hard_labels(ops[0], spec, labels, row_weight)
        filter_eps = spec.filter_eps or 0.0
        return self._sweep(spec.kind, ops, None, spec.beta, row_weight, given, need, filter_eps, hard=hard)[1]

    def divergence_terms(
        self, s: Side, t: Side, spec: DivergenceSpec, lse_s: Tensor, lse_t: Tensor, lo_s=None, lo_t=None
    ) -> Tensor:
        """The terms [3, N] of a ``TERMS_MODES`` divergence (see :func:`terms_loss`) summed over these vocabulary
        rows, given the rows' (global) lse and, when known, their residuals (None: 0)."""
        ops = self._pair(s, t, spec)
        dtype = torch.promote_types(ops[0].hidden.dtype, torch.float32)
        zeros = torch.zeros_like(lse_s, dtype=dtype)
        lse = tuple(zeros if x is None else x.to(dtype) for x in (lse_s, lse_t, lo_s, lo_t))
        return self._sweep(spec.kind, ops, None, spec.beta, None, None, Need(), 0.0, terms_lse=lse)[0]

    def token_logits(self, side: Side, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """(z_y [N], lse [N], lse_lo [N]): the logit of each row's token (0 where ``ids`` is outside these rows,
        e.g. −1), the row's log-sum-exp and its residual."""
        ops = self._operands([side], [temperature])
        stats, _ = self._sweep("token_logprob", ops, ids, 0.0, None, None, Need(), 0.0)
        return stats.loss, stats.student_lse, lse_lo(stats)[0]

    def logsumexp(self, side: Side, temperature: float) -> Tensor:
        ops = self._operands([side], [temperature])
        return self._sweep("logsumexp", ops, None, 0.0, None, None, Need(), 0.0)[0].student_lse

    def logits_backward(
        self,
        side: Side,
        ids: Tensor | None,
        lse: Tensor,
        row_weight: Tensor,
        temperature: float,
        need: Need,
        filter_eps: float | None = None,
        lse_lo: Tensor | None = None,
    ) -> Grads:
        """Gradients of Σ_n w_n lse_n (``ids`` None) or of Σ_n w_n log p(ids_n) (``ids`` −1 where the token
        lies outside these rows: only the −p part). ``lse_lo``: the rows' lse residuals from :meth:`token_logits`
        (None: 0, where only the lse is known); with them p = e^{(z − lse) − lse_lo} is accurate to ~ulp(log p),
        without them to ~ulp(lse)."""
        ops = self._operands([side], [temperature])
        dtype = torch.promote_types(ops[0].hidden.dtype, torch.float32)
        lse = lse.to(dtype)
        zeros = torch.zeros_like(lse)
        lo = None if lse_lo is None else lse_lo.to(dtype)
        given = DivergenceStats(zeros, lse, lse, zeros, lo, lo)
        mode = "logsumexp" if ids is None else "token_logprob"
        return self._sweep(mode, ops, ids, 0.0, row_weight, given, need, filter_eps or 0.0)[1]

    def entropy_backward(
        self,
        side: Side,
        lse: Tensor,
        lse_lo: Tensor,
        entropy: Tensor,
        row_weight: Tensor,
        temperature: float,
        need: Need,
        filter_eps: float | None = None,
    ) -> Grads:
        """Gradients of Σ_n w_n H_n, H = −Σ_v p log p the rows' (global) entropy with their (lse, lse_lo):
        ∂H/∂z = −p (log p + H), the gradient pass of mode "entropy" with center −H and row weights −w; recomputes
        the logits."""
        ops = self._operands([side], [temperature])
        dtype = torch.promote_types(ops[0].hidden.dtype, torch.float32)
        lse, lo, center = lse.to(dtype), lse_lo.to(dtype), -entropy.to(dtype)
        given = DivergenceStats(torch.zeros_like(lse), lse, lse, center, lo, lo)
        return self._sweep("entropy", ops, None, 0.0, -row_weight, given, need, filter_eps or 0.0)[1]

    def topk(self, side: Side, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids int64 [N, k], log-probs [N, k] descending with ties by the smaller id, lse [N], entropy [N])."""
        (op,) = self._operands([side], [temperature], fold=False)
        n_rows, vocab, device = op.hidden.shape[0], op.weight.shape[0], op.hidden.device
        plan = self._plan(n_rows, vocab, device)
        dtype = torch.promote_types(op.hidden.dtype, torch.float32)
        ids = torch.empty((n_rows, k), device=device, dtype=torch.int64)
        logprobs = torch.empty((n_rows, k), device=device, dtype=dtype)
        lse = torch.empty(n_rows, device=device, dtype=dtype)
        entropy = torch.empty(n_rows, device=device, dtype=dtype)
        (buf,) = self._workspace(plan, 1, device, dtype)
        for rows in plan.row_chunks(n_rows):
            state = self.epilogue.topk_state(rows.stop - rows.start, device, dtype)
            best = None
            for cols in plan.col_tiles():
                z = self._logits(op, rows, cols, buf, plan)
                best = self.epilogue.topk(z, op.tile(cols), k, cols.start, best, state)
            ids[rows], logprobs[rows], lse[rows], entropy[rows] = self.epilogue.topk_finalize(best, state)
        return ids, logprobs, lse, entropy


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_dtype(side: Side, backend: str) -> torch.dtype:
    """The GEMM dtype of a model on a kernel backend (fp32, bf16, fp16; the two tensors' promotion)."""
    for name, t in (("hidden states", side.hidden), ("weight", side.weight)):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"backend={backend!r} takes float32, bfloat16 or float16 {name}, got {t.dtype}; "
                f"use backend='torch' for {t.dtype}"
            )
    return torch.promote_types(side.hidden.dtype, side.weight.dtype)


def unit_stride(t: Tensor) -> Tensor:
    """Unit stride along H, as the GEMMs and tl.dot tiles want."""
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_operand(side: Side, temperature: float, backend: str) -> Operand:
    """A model's :class:`Operand` for the kernel epilogues: the GEMM inputs in their common dtype and the head
    applied in the epilogue (bias in fp32, pre = scale, softcap, post = 1/τ)."""
    dtype = kernel_dtype(side, backend)
    bias = None if side.bias is None else side.bias.float().contiguous()
    head = side.head
    hidden, weight = unit_stride(side.hidden.to(dtype)), unit_stride(side.weight.to(dtype))
    return Operand(hidden, weight, bias, head.scale, head.softcap, 1.0 / temperature)


def fold_linear(side: Side, temperature: float, dtype: torch.dtype, contiguous: Callable[[Tensor], Tensor]) -> Operand:
    """An :class:`Operand` in ``dtype`` with the head's linear factors folded into the hidden states and bias
    (scale · 1/τ when there is no softcap, the scale alone before a softcap): for backends that copy the
    hidden states anyway, the epilogue then sees final logits and skips the transform."""
    head: HeadTransform = side.head
    factor = head.scale / temperature if head.softcap is None else head.scale
    hidden = side.hidden.to(dtype)
    bias = None if side.bias is None else side.bias.to(dtype)
    if factor != 1.0:
        hidden = hidden * factor
        bias = None if bias is None else bias * factor
    post = 1.0 if head.softcap is None else 1.0 / temperature
    return Operand(contiguous(hidden), contiguous(side.weight.to(dtype)), bias, 1.0, head.softcap, post, factor)
