"""The sweep's GEMMs and gradient accumulation: logits and gradient products with fp32 (fp64) accumulation for every
input dtype, dH/dW/db accumulated over the token chunks and vocabulary tiles (:class:`GradientAccumulator`), the dtype
of the dW it makes (:func:`weight_grad_dtype`), and gradient filtering (:func:`live_columns`, :class:`FilterStats`).
"""

from __future__ import annotations

import functools

import torch

from opd_fast.backends.epilogue import Operand
from opd_fast.chunking import TilePlan, padded_stride, plan_tiles, single_dw_gemm
from opd_fast.types import Grads, Need, accumulation_dtype

Tensor = torch.Tensor


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


# ---- the gradients of a sweep ------------------------------------------------------------------------------


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
    fp32 (fp64) throughout; the kernel backends' operands are the inputs' common dtype
    (:func:`epilogue.kernel_dtype`)."""
    operands = torch.promote_types(hidden_dtype, weight_dtype)
    acc = accumulation_dtype(operands)
    if backend == "torch":
        return acc
    if n_rows == 0 or vocab == 0:
        return operands  # nothing to accumulate (an empty vocabulary shard)
    tiles = plan_tiles(n_rows, vocab, plan=plan, device=device)
    once = tiles.rows >= n_rows or keeps_all_g(tiles, n_rows, hidden, operands, torch.device(device), filter_eps or 0.0)
    return operands if once else acc


class GradientAccumulator:
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
        device, acc_dtype = op.hidden.device, accumulation_dtype(op.hidden.dtype)
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
