"""One autograd.Function per op; each calls the ops object chosen by :func:`opd_fast.backends.get_backend`.

Inputs here are already validated and flattened to 2-D ``[N, H]`` hidden states. ``rows`` holds the
indices of the tokens that count (``None`` = all), so the ops only ever see the counted rows. Each model's
output head is its weight, its bias (or None) and a :class:`opd_fast.types.HeadTransform`; gradients flow
to the student's hidden states, weight and bias (the teacher never gets any).

Gradient timing. For "mean" and "sum" the per-token gradient weights are known in the forward, so the
student gradients are made in the same sweep over the logits (the floor's FLOPs: no recompute) and the
backward only scales them by the incoming scalar; a second backward through the same graph is refused
because the buffers are scaled in place. For "none" the forward keeps O(N) statistics and the backward
sweeps the logits once more with the per-token incoming gradient. Nothing gradient-related runs when grad
mode is off or no student tensor requires grad.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from opd_fast._rows import scatter_add_rows, scatter_rows, select_rows
from opd_fast._validation import DivergenceSpec
from opd_fast.chunking import get_chunk_budget
from opd_fast.types import Grads, HeadTransform, Need, Side

_SECOND_BACKWARD = (
    "opd_fast computed this loss's gradients in the forward and has already handed them out; a second "
    "backward through the same graph (retain_graph=True) is not supported — recompute the loss instead"
)


def _result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _need(ctx, grad_on: bool, hidden: int, weight: int, bias: int) -> Need:
    """Which student gradients the graph asks for (``hidden``/``weight``/``bias``: input positions)."""
    if not grad_on:
        return Need()
    wants = ctx.needs_input_grad
    return Need(wants[hidden], wants[weight], wants[bias])


def _cast(grads: Grads, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale=None) -> tuple:
    """Gradients in their inputs' dtypes, optionally multiplied (in place) by the incoming scalar."""
    out = []
    for grad, like in zip(grads, (h, w, b)):
        if grad is None:
            out.append(None)
            continue
        if scale is not None:
            grad = grad.mul_(scale.to(grad.dtype))
        out.append(grad.to(like.dtype))
    return tuple(out)


class LinearDivergence(torch.autograd.Function):
    """Per-token divergence between the student's and the teacher's next-token distributions, reduced."""

    @staticmethod
    def forward(
        ctx,
        hs,
        ws,
        bs,
        ht,
        wt,
        bt,
        rows,
        ops,
        spec: DivergenceSpec,
        heads: tuple[HeadTransform, HeadTransform],
        reduction: str,
        grad_on: bool,
    ):
        n_rows = hs.shape[0]
        s = Side(select_rows(hs, rows), ws, bs, heads[0])
        t = Side(select_rows(ht, rows), wt, bt, heads[1])
        count = s.hidden.shape[0]
        need = _need(ctx, grad_on, 0, 1, 2)
        out_dtype = _result_dtype(hs, ws, ht, wt)
        ctx.reduction, ctx.ops, ctx.spec, ctx.need, ctx.heads = reduction, ops, spec, need, heads
        if reduction == "none":
            stats = ops.divergence(s, t, spec, None, Need())[0] if count else None
            if need.any:
                ctx.save_for_backward(hs, ws, bs, ht, wt, bt, rows)
                ctx.stats = stats
            if stats is None:
                return hs.new_zeros(n_rows, dtype=out_dtype)
            return scatter_rows(stats.loss.to(out_dtype), rows, n_rows)

        weight = 1.0 / count if reduction == "mean" and count else 1.0
        ctx.like = (hs, ws, bs)
        if not count:
            zeros = Grads(
                torch.zeros_like(hs) if need.hidden else None,
                torch.zeros_like(ws) if need.weight else None,
                torch.zeros_like(bs) if need.bias else None,
            )
            ctx.grads = zeros
            return hs.new_zeros((), dtype=out_dtype)
        row_weight = s.hidden.new_full((count,), weight, dtype=out_dtype) if need.any else None
        stats, grads = ops.divergence(s, t, spec, row_weight, need)
        if grads.hidden is not None:
            grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, n_rows))
        ctx.grads = grads
        return stats.loss.to(out_dtype).sum() * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt, rows = ctx.saved_tensors
            if ctx.stats is None:
                grads = Grads(
                    torch.zeros_like(hs) if ctx.need.hidden else None,
                    torch.zeros_like(ws) if ctx.need.weight else None,
                    torch.zeros_like(bs) if ctx.need.bias else None,
                )
            else:
                s = Side(select_rows(hs, rows), ws, bs, ctx.heads[0])
                t = Side(select_rows(ht, rows), wt, bt, ctx.heads[1])
                row_weight = select_rows(grad_out, rows).contiguous()
                grads = ctx.ops.divergence_backward(s, t, ctx.spec, ctx.stats, row_weight, ctx.need)
                if grads.hidden is not None:
                    grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, hs.shape[0]))
            return *_cast(grads, hs, ws, bs), *([None] * 9)

        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(_SECOND_BACKWARD)
        return *_cast(grads, *ctx.like, scale=grad_out), *([None] * 9)


class LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(z)[y] per token, z = the head's logits / τ; differentiable w.r.t. h, W and the bias."""

    @staticmethod
    def forward(ctx, h, w, b, ids, ops, head: HeadTransform, temperature: float, filter_eps, grad_on: bool):
        side = Side(h, w, b, head)
        picked, lse = ops.token_logits(side, ids, temperature)
        ctx.ops, ctx.head, ctx.temperature, ctx.filter_eps = ops, head, temperature, filter_eps
        ctx.need = _need(ctx, grad_on, 0, 1, 2)
        if ctx.need.any:
            ctx.save_for_backward(h, w, b, ids, lse)
        return (picked - lse).to(_result_dtype(h, w))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, w, b, ids, lse = ctx.saved_tensors
        side = Side(h, w, b, ctx.head)
        weight = grad_out.contiguous()
        grads = ctx.ops.logits_backward(side, ids, lse, weight, ctx.temperature, ctx.need, ctx.filter_eps)
        return *_cast(grads, h, w, b), *([None] * 6)


class LinearLogSumExp(torch.autograd.Function):
    """log Σ_v exp(z_v) per token, z = the head's logits / τ; differentiable w.r.t. h, W and the bias."""

    @staticmethod
    def forward(ctx, h, w, b, ops, head: HeadTransform, temperature: float, filter_eps, grad_on: bool):
        lse = ops.logsumexp(Side(h, w, b, head), temperature)
        ctx.ops, ctx.head, ctx.temperature, ctx.filter_eps = ops, head, temperature, filter_eps
        ctx.need = _need(ctx, grad_on, 0, 1, 2)
        if ctx.need.any:
            ctx.save_for_backward(h, w, b, lse)
        return lse.to(_result_dtype(h, w))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, w, b, lse = ctx.saved_tensors
        side = Side(h, w, b, ctx.head)
        weight = grad_out.contiguous()
        grads = ctx.ops.logits_backward(side, None, lse, weight, ctx.temperature, ctx.need, ctx.filter_eps)
        return *_cast(grads, h, w, b), *([None] * 5)


class LinearGatheredLogits(torch.autograd.Function):
    """z[n, m] = h_n · W[ids[n, m]] / τ for a few ids per token; ids < 0 are padding (z = 0, no gradient).

    Token chunks keep the gathered weight rows [rows, M, H] within the chunk budget, and the backward
    gathers them again instead of saving them, so memory stays O(N · M) beyond the budget.
    """

    @staticmethod
    def forward(ctx, h, w, ids, temperature: float, grad_on: bool):
        dtype = torch.promote_types(torch.promote_types(h.dtype, w.dtype), torch.float32)
        valid = ids >= 0
        safe_ids = ids.clamp(min=0)
        z = h.new_zeros(ids.shape, dtype=dtype)
        for rows in _row_chunks(ids.shape[0] if w.shape[0] else 0, ids.shape[1] * h.shape[1]):
            gathered = w[safe_ids[rows]].to(dtype)  # [rows, M, H]
            z[rows] = torch.bmm(gathered, h[rows].to(dtype).unsqueeze(2)).squeeze(2) / temperature
        z = torch.where(valid, z, 0.0)
        ctx.temperature, ctx.dtype = temperature, dtype
        ctx.need_dh = grad_on and ctx.needs_input_grad[0]
        ctx.need_dw = grad_on and ctx.needs_input_grad[1]
        if ctx.need_dh or ctx.need_dw:
            ctx.save_for_backward(h, w, ids)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, w, ids = ctx.saved_tensors
        dtype, tau = ctx.dtype, ctx.temperature
        valid = ids >= 0
        grad = torch.where(valid, grad_out.to(dtype), 0.0) / tau
        safe_ids = ids.clamp(min=0)
        dh = torch.zeros(h.shape, device=h.device, dtype=dtype) if ctx.need_dh else None
        dw = torch.zeros(w.shape, device=w.device, dtype=dtype) if ctx.need_dw else None
        n_ids = ids.shape[1]
        for rows in _row_chunks(ids.shape[0] if w.shape[0] else 0, n_ids * h.shape[1]):
            if dh is not None:
                gathered = w[safe_ids[rows]].to(dtype)
                dh[rows] = torch.bmm(grad[rows].unsqueeze(1), gathered).squeeze(1)
            if dw is not None:
                keep = valid[rows].reshape(-1)
                values = (grad[rows].unsqueeze(2) * h[rows].to(dtype).unsqueeze(1)).reshape(-1, h.shape[1])
                scatter_add_rows(dw, safe_ids[rows].reshape(-1)[keep], values[keep])
        return (
            None if dh is None else dh.to(h.dtype),
            None if dw is None else dw.to(w.dtype),
            None,
            None,
            None,
        )


def _row_chunks(n_rows: int, elements_per_row: int):
    step = max(1, get_chunk_budget() // max(1, elements_per_row))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))
