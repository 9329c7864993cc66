"""Logits at a few ids per token as custom ops (``opd_fast::gathered_logits`` and its backward
``opd_fast::gathered_logits_backward``), for the top-k losses, and :func:`linear_gathered_logits`, which they call.

Token chunks keep the gathered weight rows [rows, M, H] within the chunk budget, and the backward gathers them
again instead of saving them, so memory stays O(N · M) beyond the budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd_fast import distributed as vp
from opd_fast._rows import scatter_add_rows
from opd_fast.chunking import get_chunk_budget
from opd_fast.library._common import custom_op, fake_grads, grad_outputs, input_grads
from opd_fast.types import Grads, Side, accumulation_dtype

if TYPE_CHECKING:
    from opd_fast._dispatch import Route

Tensor = torch.Tensor


def _row_chunks(n_rows: int, elements_per_row: int):
    step = max(1, get_chunk_budget() // max(1, elements_per_row))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


@custom_op("gathered_logits")
def gathered_logits(h: Tensor, w: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """z[n, m] = h_n · W[ids[n, m]] / τ, ``[N, M]`` in the accumulation dtype; ids < 0 are padding (z = 0)."""
    dtype = accumulation_dtype(h, w)
    valid = ids >= 0
    safe_ids = ids.clamp(min=0)
    z = h.new_zeros(ids.shape, dtype=dtype)
    for rows in _row_chunks(ids.shape[0] if w.shape[0] else 0, ids.shape[1] * h.shape[1]):
        gathered = w[safe_ids[rows]].to(dtype)  # [rows, M, H]
        z[rows] = torch.bmm(gathered, h[rows].to(dtype).unsqueeze(2)).squeeze(2) / temperature
    return torch.where(valid, z, 0.0)


@gathered_logits.register_fake
def _(h, w, ids, temperature):
    return h.new_empty(ids.shape, dtype=accumulation_dtype(h, w))


@custom_op("gathered_logits_backward")
def gathered_logits_backward(
    h: Tensor, w: Tensor, ids: Tensor, grad_out: Tensor, temperature: float, need: list[bool]
) -> tuple[Tensor, Tensor]:
    """(dH, dW) of Σ grad_out ⊙ :func:`gathered_logits`, in the inputs' dtypes (empty where ``need`` is False)."""
    dtype = accumulation_dtype(h, w)
    valid = ids >= 0
    grad = torch.where(valid, grad_out.to(dtype), 0.0) / temperature
    safe_ids = ids.clamp(min=0)
    dh = torch.zeros(h.shape, device=h.device, dtype=dtype) if need[0] else None
    dw = torch.zeros(w.shape, device=w.device, dtype=dtype) if need[1] else None
    for rows in _row_chunks(ids.shape[0] if w.shape[0] else 0, ids.shape[1] * h.shape[1]):
        if dh is not None:
            gathered = w[safe_ids[rows]].to(dtype)
            dh[rows] = torch.bmm(grad[rows].unsqueeze(1), gathered).squeeze(1)
        if dw is not None:
            keep = valid[rows].reshape(-1)
            values = (grad[rows].unsqueeze(2) * h[rows].to(dtype).unsqueeze(1)).reshape(-1, h.shape[1])
            scatter_add_rows(dw, safe_ids[rows].reshape(-1)[keep], values[keep])
    return grad_outputs(Grads(dh, dw), h, w, None)[:2]


@gathered_logits_backward.register_fake
def _(h, w, ids, grad_out, temperature, need):
    return fake_grads(need, h, w, None)


def _gathered_context(ctx, inputs, output) -> None:
    h, w, ids, ctx.temperature = inputs
    ctx.save_for_backward(h, w, ids)


def _gathered_backward(ctx, grad_out):
    h, w, ids = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:2])
    grads = gathered_logits_backward(h, w, ids, grad_out.contiguous(), ctx.temperature, need)
    return *input_grads(grads, need), None, None


gathered_logits.register_autograd(_gathered_backward, setup_context=_gathered_context)


def _unscaled(h: Tensor, w: Tensor, ids: Tensor) -> Tensor:
    return gathered_logits(h, w, ids, 1.0)


def linear_gathered_logits(route: Route, side: Side, ids: Tensor, temperature: float) -> Tensor:
    """Final logits softcap(scale·(h·W[ids]ᵀ + b[ids])) / τ at global ``ids`` ``[N, M]`` (-1 = padding, 0 there);
    differentiable w.r.t. h, W and the bias.

    h·W[ids]ᵀ + b[ids] comes from :func:`opd_fast.distributed.gathered_logits` (under vocabulary parallelism each
    shard contributes the ids it owns); the O(N·M) head transform is plain differentiable torch.
    """
    raw = vp.gathered_logits(_unscaled, side, ids, route.shard)
    head = side.head
    z = raw * head.scale if head.scale != 1.0 else raw
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return torch.where(ids >= 0, z / temperature, 0.0)
