"""Token log-probs and the log-sum-exp as custom ops (``opd_fast::token_logprobs``, ``opd_fast::logsumexp``), their
shared backward (``opd_fast::logits_backward``: one more sweep over the logits with the per-token incoming gradient)
and autograd formulas, and the typed functions the public API calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd_fast._validation import check_token_range
from opd_fast.library._common import (
    backend_ops,
    custom_op,
    fake_grads,
    global_vocab,
    grad_outputs,
    head_args,
    head_transform,
    input_grads,
)
from opd_fast.types import Need, Side, accumulation_dtype

if TYPE_CHECKING:
    from opd_fast._dispatch import Route

Tensor = torch.Tensor


@custom_op("token_logprobs")
def token_logprobs(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    ids: Tensor,
    backend: str,
    plan: str,
    shard: str,
    head: list[float],
    temperature: float,
    filter_eps: float | None,
) -> tuple[Tensor, Tensor]:
    """(log p(ids_n) ``[N]``, (lse, lse_lo) ``[2, N]``), both in the accumulation dtype; ``ids`` int64 ``[N]``
    (``filter_eps``: the backward's gradient filtering).

    The ids' range is checked here, on real values: a compiled graph cannot read them."""
    check_token_range(ids, global_vocab(shard, w.shape[0]))
    ops = backend_ops(backend, plan, shard)
    picked, lse, lse_lo = ops.token_logits(Side(h, w, b, head_transform(head)), ids, temperature)
    dtype = accumulation_dtype(h, w)
    return ((picked - lse) - lse_lo).to(dtype), torch.stack((lse, lse_lo)).to(dtype)


@token_logprobs.register_fake
def _(h, w, b, ids, backend, plan, shard, head, temperature, filter_eps):
    dtype = accumulation_dtype(h, w)
    return h.new_empty(h.shape[0], dtype=dtype), h.new_empty((2, h.shape[0]), dtype=dtype)


@custom_op("logsumexp")
def logsumexp(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    backend: str,
    plan: str,
    shard: str,
    head: list[float],
    temperature: float,
    filter_eps: float | None,
) -> Tensor:
    """lse ``[N]`` of the head's logits / τ, in the accumulation dtype."""
    ops = backend_ops(backend, plan, shard)
    return ops.logsumexp(Side(h, w, b, head_transform(head)), temperature).to(accumulation_dtype(h, w))


@logsumexp.register_fake
def _(h, w, b, backend, plan, shard, head, temperature, filter_eps):
    return h.new_empty(h.shape[0], dtype=accumulation_dtype(h, w))


@custom_op("logits_backward")
def logits_backward(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    ids: Tensor | None,
    lse: Tensor,
    grad_out: Tensor,
    backend: str,
    plan: str,
    shard: str,
    head: list[float],
    temperature: float,
    filter_eps: float | None,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dH, dW, db) of Σ_n grad_out_n lse_n (``ids`` None) or Σ_n grad_out_n log p(ids_n), in the inputs'
    dtypes (empty where ``need`` is False). ``lse``: ``[N]``, or ``[2, N]`` (lse, lse_lo) from the token op."""
    ops = backend_ops(backend, plan, shard)
    side = Side(h, w, b, head_transform(head))
    lse, lse_lo = (lse[0], lse[1]) if lse.dim() == 2 else (lse, None)  # the token op's (lse, lse_lo)
    grads = ops.logits_backward(side, ids, lse, grad_out.contiguous(), temperature, Need(*need), filter_eps, lse_lo)
    return grad_outputs(grads, h, w, b)


@logits_backward.register_fake
def _(h, w, b, ids, lse, grad_out, backend, plan, shard, head, temperature, filter_eps, need):
    return fake_grads(need, h, w, b)


def _token_context(ctx, inputs, output) -> None:
    h, w, b, ids, *options = inputs
    ctx.options = options
    ctx.save_for_backward(h, w, b, ids, output[1])


def _logsumexp_context(ctx, inputs, output) -> None:
    h, w, b, *options = inputs
    ctx.options = options
    ctx.save_for_backward(h, w, b, None, output)


def _logits_grads(ctx, grad_out: Tensor) -> tuple:
    """dH, dW, db of the saved (h, w, b) for the incoming per-token gradient (None where not wanted)."""
    h, w, b, ids, lse = ctx.saved_tensors
    wants = ctx.needs_input_grad
    need = [wants[0], wants[1], b is not None and wants[2]]
    grads = logits_backward(h, w, b, ids, lse, grad_out.contiguous(), *ctx.options, need)
    return input_grads(grads, need)


def _token_backward(ctx, grad_logprobs, grad_lse):
    # lse is an output for the backward's sake; Σ g_n lse_n is not a quantity anyone differentiates.
    return *_logits_grads(ctx, grad_logprobs), *([None] * 7)


def _logsumexp_backward(ctx, grad_lse):
    return *_logits_grads(ctx, grad_lse), *([None] * 6)


token_logprobs.register_autograd(_token_backward, setup_context=_token_context)
logsumexp.register_autograd(_logsumexp_backward, setup_context=_logsumexp_context)


def linear_token_logprobs(
    route: Route, side: Side, ids: Tensor, temperature: float, filter_eps: float | None
) -> Tensor:
    """log softmax(z)[y] per token ``[N]``, z = the head's logits / τ; differentiable w.r.t. h, W and the bias."""
    return token_logprobs(
        side.hidden, side.weight, side.bias, ids, *route.args, head_args(side.head), temperature, filter_eps
    )[0]


def linear_logsumexp(route: Route, side: Side, temperature: float, filter_eps: float | None = None) -> Tensor:
    """log Σ_v exp(z_v) per token ``[N]``; differentiable w.r.t. h, W and the bias."""
    return logsumexp(side.hidden, side.weight, side.bias, *route.args, head_args(side.head), temperature, filter_eps)
