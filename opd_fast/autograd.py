"""The differentiable ops the public functions call, on the custom ops of :mod:`opd_fast.library`.

Inputs here are already validated and flattened to 2-D ``[N, H]`` hidden states; ``mask`` is the flattened
bool mask (None = every token counts), applied inside the ops. Each model's output head is its weight, its
bias (or None) and a :class:`opd_fast.types.HeadTransform`; gradients flow to the student's hidden states,
weight and bias (the teacher never gets any). ``route`` says which backend computes
(:class:`opd_fast._dispatch.Route`).

Gradient timing. For "mean" and "sum" the per-token gradient weights are known in the forward, so the
student gradients are made in the same sweep over the logits (the floor's FLOPs: no recompute) and the
backward only scales them by the incoming scalar; a second backward through the same graph is refused
because the buffers are scaled in place. For "none" the forward keeps O(N) statistics and the backward
sweeps the logits once more with the per-token incoming gradient. Nothing gradient-related runs when grad
mode is off or no student tensor requires grad. The same code runs eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import torch

from opd_fast import library
from opd_fast._validation import CheckedPair, DivergenceSpec
from opd_fast.library import head_args
from opd_fast.types import HeadTransform

Tensor = torch.Tensor


def _wants_grad(*tensors: Tensor | None) -> list[bool]:
    """Which of the student's tensors the graph will ask gradients of."""
    grad_on = torch.is_grad_enabled()
    return [grad_on and t is not None and t.requires_grad for t in tensors]


def linear_divergence(
    pair: CheckedPair, route, spec: DivergenceSpec, reduction: str, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The divergence of a checked pair, reduced (a scalar, or ``[N]`` for ``reduction="none"``), and the student's
    entropy ``[N]`` where ``spec.entropy`` asks for it (else empty). With ``labels`` (int64 ``[N]``, every counted
    token's in the vocabulary), the loss is w · CE + (1 − w) · D for w = ``spec.hard_label_weight``."""
    out = library.divergence(
        pair.hs, pair.ws, pair.bs, pair.ht, pair.wt, pair.bt, pair.mask, *route.args,
        head_args(pair.heads[0]), head_args(pair.heads[1]),
        spec.kind, spec.beta, spec.temperature, spec.teacher_temperature, spec.filter_eps, spec.entry_clip,
        reduction, _wants_grad(pair.hs, pair.ws, pair.bs), pair.cut, spec.entropy, labels, spec.hard_label_weight,
        spec.entropy_grad,
    )  # fmt: skip
    return out[0], out[5]


def linear_token_logprobs(
    h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, route, head: HeadTransform, temperature: float, filter_eps
) -> Tensor:
    """log softmax(z)[y] per token ``[N]``, z = the head's logits / τ; differentiable w.r.t. h, W and the bias."""
    return library.token_logprobs(h, w, b, ids, *route.args, head_args(head), temperature, filter_eps)[0]


def linear_logsumexp(
    h: Tensor, w: Tensor, b: Tensor | None, route, head: HeadTransform, temperature: float, filter_eps=None
) -> Tensor:
    """log Σ_v exp(z_v) per token ``[N]``; differentiable w.r.t. h, W and the bias."""
    return library.logsumexp(h, w, b, *route.args, head_args(head), temperature, filter_eps)


def linear_topk(h: Tensor, w: Tensor, b: Tensor | None, k: int, route, head: HeadTransform, temperature: float):
    """(ids int64 [N, k], log-probs [N, k], lse [N], entropy [N]) of the top k per token; not differentiable."""
    return library.topk(h, w, b, k, *route.args, head_args(head), temperature)


def linear_gathered_logits(h: Tensor, w: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """z[n, m] = h_n · W[ids[n, m]] / τ ``[N, M]`` for a few ids per token (ids < 0: padding, z = 0 there, no
    gradient); differentiable w.r.t. h and W."""
    return library.gathered_logits(h, w, ids, temperature)
