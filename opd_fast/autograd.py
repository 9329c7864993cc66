"""One autograd.Function per op; each dispatches to the backend module chosen by :mod:`opd_fast.backends`.

Inputs here are already validated and flattened to 2-D ``[N, H]`` hidden states. ``rows`` holds the
indices of the tokens that count (``None`` = all), so backends only ever see the counted rows.

Gradient timing. For "mean" and "sum" the per-token gradient weights are known in the forward, so the
student gradients are computed there (in one sweep over the logits when a vocabulary row fits the chunk
budget) and the backward only scales them by the incoming scalar; a second backward through the same
graph is refused because the buffers are scaled in place. For "none" the forward keeps O(N) statistics
and the backward sweeps the logits once more with the per-token incoming gradient. Nothing gradient-
related runs when grad mode is off or no student tensor requires grad.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from opd_fast import distributed as vp
from opd_fast._rows import scatter_rows, select_rows
from opd_fast._validation import DivergenceSpec

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


def _divergence_forward(backend, shard, hs, ws, ht, wt, spec):
    if shard is None:
        return backend.divergence_forward(hs, ws, ht, wt, spec)
    return vp.divergence_stats(backend, hs, ws, ht, wt, spec, shard)


def _divergence_backward(backend, shard, hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw):
    if shard is None:
        return backend.divergence_backward(hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw)
    return vp.divergence_backward(backend, hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw, shard)


def _cast_grad(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if grad is None else grad.to(dtype)


class LinearDivergence(torch.autograd.Function):
    """Per-token divergence between softmax(hs Wsᵀ/τ) and softmax(ht Wtᵀ/τ), reduced; grads for hs, Ws."""

    @staticmethod
    def forward(
        ctx, hs, ws, ht, wt, rows, backend: ModuleType, spec: DivergenceSpec, reduction: str, grad_on: bool, shard=None
    ):
        n_rows = hs.shape[0]
        hs_c, ht_c = select_rows(hs, rows), select_rows(ht, rows)
        count = hs_c.shape[0]
        need_dh = grad_on and ctx.needs_input_grad[0]
        need_dw = grad_on and ctx.needs_input_grad[1]
        ctx.reduction, ctx.hidden_dtype, ctx.weight_dtype = reduction, hs.dtype, ws.dtype
        out_dtype = _result_dtype(hs, ws, ht, wt)
        ctx.backend, ctx.spec, ctx.need_dh, ctx.need_dw, ctx.shard = backend, spec, need_dh, need_dw, shard
        if reduction == "none":
            stats = _divergence_forward(backend, shard, hs_c, ws, ht_c, wt, spec) if count else None
            if need_dh or need_dw:
                ctx.save_for_backward(hs, ws, ht, wt, rows)
                ctx.stats = stats
            if stats is None:
                return hs.new_zeros(n_rows, dtype=out_dtype)
            return scatter_rows(stats.loss.to(out_dtype), rows, n_rows)

        weight = 1.0 / count if reduction == "mean" and count else 1.0
        if not count:
            ctx.dh = torch.zeros_like(hs) if need_dh else None
            ctx.dw = torch.zeros_like(ws) if need_dw else None
            return hs.new_zeros((), dtype=out_dtype)
        if need_dh or need_dw:
            grad = hs_c.new_full((count,), weight, dtype=out_dtype)
            if shard is None:  # one call: a backend may fuse the forward and the gradient sweep
                stats, dh, dw = backend.divergence_forward_backward(hs_c, ws, ht_c, wt, grad, spec, need_dh, need_dw)
            else:
                stats = _divergence_forward(backend, shard, hs_c, ws, ht_c, wt, spec)
                dh, dw = _divergence_backward(backend, shard, hs_c, ws, ht_c, wt, stats, grad, spec, need_dh, need_dw)
            ctx.dh = None if dh is None else scatter_rows(dh, rows, n_rows)
            ctx.dw = dw
        else:
            stats = _divergence_forward(backend, shard, hs_c, ws, ht_c, wt, spec)
        return stats.loss.to(out_dtype).sum() * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hs, ws, ht, wt, rows = ctx.saved_tensors
            dh = dw = None
            if ctx.stats is not None:
                grad_c = select_rows(grad_out, rows)
                dh, dw = _divergence_backward(
                    ctx.backend,
                    ctx.shard,
                    select_rows(hs, rows),
                    ws,
                    select_rows(ht, rows),
                    wt,
                    ctx.stats,
                    grad_c,
                    ctx.spec,
                    ctx.need_dh,
                    ctx.need_dw,
                )
                dh = None if dh is None else scatter_rows(dh, rows, hs.shape[0])
            else:
                dh = torch.zeros_like(hs) if ctx.need_dh else None
                dw = torch.zeros_like(ws) if ctx.need_dw else None
            return _cast_grad(dh, hs.dtype), _cast_grad(dw, ws.dtype), *([None] * 8)

        if (ctx.need_dh and ctx.dh is None) or (ctx.need_dw and ctx.dw is None):
            raise RuntimeError(_SECOND_BACKWARD)
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None
        dh = None if dh is None else _cast_grad(dh.mul_(grad_out.to(dh.dtype)), ctx.hidden_dtype)
        dw = None if dw is None else _cast_grad(dw.mul_(grad_out.to(dw.dtype)), ctx.weight_dtype)
        return dh, dw, *([None] * 8)


class LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(h Wᵀ/τ)[y] per token, differentiable w.r.t. h and W (``shard``: W is a vocabulary shard)."""

    @staticmethod
    def forward(ctx, h, w, ids, backend: ModuleType, temperature: float, filter_eps, grad_on: bool, shard=None):
        if shard is None:
            logprobs, lse = backend.token_logprobs_forward(h, w, ids, temperature)
        else:
            logprobs, lse = vp.token_logprobs_forward(backend, h, w, ids, temperature, shard)
        ctx.backend, ctx.temperature, ctx.filter_eps, ctx.shard = backend, temperature, filter_eps, shard
        ctx.need_dh = grad_on and ctx.needs_input_grad[0]
        ctx.need_dw = grad_on and ctx.needs_input_grad[1]
        if ctx.need_dh or ctx.need_dw:
            ctx.save_for_backward(h, w, ids, lse)
        return logprobs.to(_result_dtype(h, w))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, w, ids, lse = ctx.saved_tensors
        args = (h, w, ids, lse, grad_out, ctx.temperature, ctx.need_dh, ctx.need_dw, ctx.filter_eps)
        if ctx.shard is None:
            dh, dw = ctx.backend.token_logprobs_backward(*args)
        else:
            dh, dw = vp.token_logprobs_backward(ctx.backend, *args, ctx.shard)
        return _cast_grad(dh, h.dtype), _cast_grad(dw, w.dtype), *([None] * 6)


class LinearLogSumExp(torch.autograd.Function):
    """log Σ_v exp(h W_vᵀ / τ) per token, differentiable w.r.t. h and W (∂/∂z = softmax)."""

    @staticmethod
    def forward(ctx, h, w, backend: ModuleType, temperature: float, filter_eps, grad_on: bool, shard=None):
        if shard is None:
            lse = backend.logsumexp_forward(h, w, temperature)
        else:
            lse = vp.logsumexp_forward(backend, h, w, temperature, shard)
        ctx.backend, ctx.temperature, ctx.filter_eps, ctx.shard = backend, temperature, filter_eps, shard
        ctx.need_dh = grad_on and ctx.needs_input_grad[0]
        ctx.need_dw = grad_on and ctx.needs_input_grad[1]
        if ctx.need_dh or ctx.need_dw:
            ctx.save_for_backward(h, w, lse)
        return lse.to(_result_dtype(h, w))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, w, lse = ctx.saved_tensors
        args = (h, w, lse, grad_out, ctx.temperature, ctx.need_dh, ctx.need_dw, ctx.filter_eps)
        if ctx.shard is None:
            dh, dw = ctx.backend.logsumexp_backward(*args)
        else:
            dh, dw = vp.logsumexp_backward(ctx.backend, *args, ctx.shard)
        return _cast_grad(dh, h.dtype), _cast_grad(dw, w.dtype), *([None] * 5)
