"""Triton backend: the ops of :mod:`opd_fast.backends` on the fused kernels of :mod:`opd_fast.kernels`.

Forward: one pass of ``softmax_stats`` over the vocabulary gives each row's log-sum-exps and the
divergence for reverse/forward KL; JSD takes a second pass (``jsd_terms``) because its mixture needs the
final log-sum-exps. Backward: ``logit_grad_backward`` recomputes logits tiles chunk by chunk and
accumulates dH and dW deterministically, with gradient filtering (see :mod:`opd_fast.kernels.linear_grad`).

Inputs: fp32, bf16 or fp16 (each model's hidden states and weight are brought to a common dtype); the
kernels accumulate in fp32. The gradient workspace holds ``WORKSPACE_FACTOR × chunk budget`` elements.
"""

from __future__ import annotations

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.chunking import get_chunk_budget
from opd_fast.kernels._common import dot_precision
from opd_fast.kernels.linear_grad import FilterStats, logit_grad_backward
from opd_fast.kernels.linear_softmax import jsd_terms as linear_jsd_terms
from opd_fast.kernels.linear_softmax import softmax_stats
from opd_fast.kernels.linear_topk import MAX_K, topk_stats
from opd_fast.types import DivergenceStats

WORKSPACE_FACTOR = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_last_filter_stats = FilterStats()


def default_filter_eps(dtype: torch.dtype) -> float:
    """Probabilities below the dtype's resolution (finfo.eps / 32; 2**-12 for bf16) are skipped."""
    return torch.finfo(dtype).eps / 32


def last_filter_stats() -> dict:
    """Tiles seen and skipped by gradient filtering in the most recent backward on this backend."""
    return _last_filter_stats.as_dict()


def _prepare(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dtype per model and unit stride along H, as tl.dot tiles want."""
    for name, t in (("hidden states", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='triton' takes float32, bfloat16 or float16 {name}, got {t.dtype}; "
                f"use backend='torch' for {t.dtype}"
            )
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return (
        hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
    )


def _filter_eps(filter_eps: float | None, weight: torch.Tensor) -> float:
    return default_filter_eps(weight.dtype) if filter_eps is None else filter_eps


def divergence_forward(hs, ws, ht, wt, spec: DivergenceSpec) -> DivergenceStats:
    hs, ws = _prepare(hs, ws)
    ht, wt = _prepare(ht, wt)
    kw = dict(temperature=spec.temperature, precision=dot_precision(ws.dtype))
    lse_s, lse_t, mean = softmax_stats(hs, ws, ht, wt, None, mode=spec.kind, **kw)
    if spec.kind == "reverse_kl":
        loss = mean - lse_s + lse_t
        return DivergenceStats(loss, lse_s, lse_t, loss)
    if spec.kind == "forward_kl":
        return DivergenceStats(mean - lse_t + lse_s, lse_s, lse_t, torch.zeros_like(lse_s))
    kl_student, kl_teacher = linear_jsd_terms(hs, ws, ht, wt, lse_s, lse_t, beta=spec.beta, **kw)
    loss = spec.beta * kl_teacher + (1.0 - spec.beta) * kl_student
    return DivergenceStats(loss, lse_s, lse_t, (1.0 - spec.beta) * kl_student)


def jsd_terms(hs, ws, ht, wt, lse_s, lse_t, spec: DivergenceSpec):
    """(KL(p_s ‖ m), KL(p_t ‖ m)) per row over these vocabulary rows with the given log-sum-exps."""
    hs, ws = _prepare(hs, ws)
    ht, wt = _prepare(ht, wt)
    kw = dict(beta=spec.beta, temperature=spec.temperature, precision=dot_precision(ws.dtype))
    return linear_jsd_terms(hs, ws, ht, wt, lse_s.float().contiguous(), lse_t.float().contiguous(), **kw)


def divergence_backward(hs, ws, ht, wt, stats: DivergenceStats, grad, spec: DivergenceSpec, need_dh, need_dw):
    hs, ws = _prepare(hs, ws)
    ht, wt = _prepare(ht, wt)
    kw = dict(
        temperature=spec.temperature, beta=spec.beta, filter_eps=spec.filter_eps, need_dh=need_dh, need_dw=need_dw
    )
    return _backward(
        hs, ws, ht, wt, None, stats.student_lse, stats.teacher_lse, stats.loss, stats.center, grad, mode=spec.kind, **kw
    )


def divergence_forward_backward(hs, ws, ht, wt, grad, spec: DivergenceSpec, need_dh, need_dw):
    stats = divergence_forward(hs, ws, ht, wt, spec)
    dh, dw = divergence_backward(hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw)
    return stats, dh, dw


def _backward(
    h, w, ht, wt, ids, lse, lse_t, loss, center, grad, *, mode, temperature, beta, filter_eps, need_dh, need_dw
):
    global _last_filter_stats
    dh, dw, _last_filter_stats = logit_grad_backward(
        h,
        w,
        ht,
        wt,
        ids,
        lse,
        lse_t,
        loss,
        center,
        grad.float().contiguous(),
        mode=mode,
        temperature=temperature,
        beta=beta,
        filter_eps=_filter_eps(filter_eps, w),
        precision=dot_precision(w.dtype),
        need_dh=need_dh,
        need_dw=need_dw,
        workspace_elements=WORKSPACE_FACTOR * get_chunk_budget(),
    )
    return dh, dw


def logsumexp_forward(h, w, temperature: float):
    h, w = _prepare(h, w)
    kw = dict(mode="logsumexp", temperature=temperature, precision=dot_precision(w.dtype))
    return softmax_stats(h, w, None, None, None, **kw)[0]


def logsumexp_backward(h, w, lse, grad, temperature, need_dh, need_dw, filter_eps=None):
    h, w = _prepare(h, w)
    kw = dict(temperature=temperature, beta=0.0, filter_eps=filter_eps, need_dh=need_dh, need_dw=need_dw)
    return _backward(h, w, None, None, None, lse, None, None, None, grad, mode="logsumexp", **kw)


def token_logprobs_forward(h, w, ids, temperature: float):
    h, w = _prepare(h, w)
    kw = dict(mode="token_logprob", temperature=temperature, precision=dot_precision(w.dtype))
    lse, _, picked = softmax_stats(h, w, None, None, ids, **kw)
    return picked - lse, lse


def token_logprobs_backward(h, w, ids, lse, grad, temperature, need_dh, need_dw, filter_eps=None):
    h, w = _prepare(h, w)
    kw = dict(temperature=temperature, beta=0.0, filter_eps=filter_eps, need_dh=need_dh, need_dw=need_dw)
    return _backward(h, w, None, None, ids, lse, None, None, None, grad, mode="token_logprob", **kw)


def topk(h, w, k: int, temperature: float):
    """(ids, log-probs, lse, entropy) like the torch backend's; top-k lists longer than the kernel's
    register budget (k > MAX_K) are streamed by the torch implementation on the same device."""
    if k > MAX_K:
        from opd_fast.backends import torch_backend

        return torch_backend.topk(h, w, k, temperature)
    h, w = _prepare(h, w)
    ids, logits, lse, entropy = topk_stats(h, w, k, temperature=temperature, precision=dot_precision(w.dtype))
    return ids, logits - lse[:, None], lse, entropy
