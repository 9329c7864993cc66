"""What users would pick instead of opd_fast, as reverse-KL losses with our argument order, for `opd-fast bench`.

* ``compiled_chunked_reverse_kl``: plain PyTorch compiled with ``torch.compile``, chunked over tokens the
  way Liger-Kernel's chunked losses are: for each chunk of ``CHUNK_TOKENS`` tokens a compiled
  ``torch.func.grad_and_value`` of the materialized-logits loss gives the chunk's loss and gradients in
  the forward, so only one chunk's logits exist at a time; the backward scales the stored gradients.
* ``liger_fused_linear_reverse_kl``: Liger-Kernel's fused linear JSD (Triton, CUDA only) with β = 1,
  which is the reverse KL.
* ``liger_chunked_reverse_kl``: Liger-Kernel's chunked JSD loss (``LigerFusedLinearJSDLoss``, compiled
  chunks) with β = 1, soft loss only.

The naive baseline (materialized logits, autograd) is :func:`opd_fast.reference.materialized_divergence`.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil

import torch

CHUNK_TOKENS = 1024


def _chunk_reverse_kl_sum(hs, ws, ht, wt):
    """Σ over the chunk's tokens of KL(p_s ‖ p_t) from materialized fp32 logits (plain PyTorch)."""
    lps = torch.log_softmax((hs @ ws.T).float(), dim=-1)
    lpt = torch.log_softmax((ht @ wt.T).float(), dim=-1)
    return (lps.exp() * (lps - lpt)).sum()


@functools.cache
def _compiled_chunk_grad():
    return torch.compile(torch.func.grad_and_value(_chunk_reverse_kl_sum, argnums=(0, 1)))


class _CompiledChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt):
        step = _compiled_chunk_grad()
        n_tokens = hs.shape[0]
        dh = torch.empty_like(hs)
        dw = torch.zeros_like(ws, dtype=torch.float32)
        total = hs.new_zeros((), dtype=torch.float32)
        for start in range(0, n_tokens, CHUNK_TOKENS):
            rows = slice(start, min(start + CHUNK_TOKENS, n_tokens))
            (grad_h, grad_w), loss = step(hs[rows], ws, ht[rows], wt)
            dh[rows] = grad_h
            dw += grad_w
            total += loss
        ctx.save_for_backward(dh, dw)
        ctx.n_tokens, ctx.weight_dtype = n_tokens, ws.dtype
        return total / n_tokens

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        scale = grad_out / ctx.n_tokens
        return dh * scale.to(dh.dtype), (dw * scale).to(ctx.weight_dtype), None, None


def compiled_chunked_reverse_kl(hs, ws, ht, wt):
    """Mean reverse KL over tokens, torch.compile'd per chunk (hs [N, Hs], ws [V, Hs], ht [N, Ht], wt [V, Ht])."""
    return _CompiledChunked.apply(hs, ws, ht.detach(), wt.detach())


def liger_fused_linear_reverse_kl(hs, ws, ht, wt):
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=1.0)(hs, ws, ht, wt)


@functools.cache
def _liger_chunked_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0)


def liger_chunked_reverse_kl(hs, ws, ht, wt):
    labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)  # unused (hard loss weight 0)
    return _liger_chunked_loss()(hs, ws, ht, wt, labels)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why the baseline ``name`` (compile, liger, liger_chunked) cannot run on ``device``; None if it can."""
    if name == "compile":
        if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on the CPU needs a C++ compiler (g++)"
        return None
    if importlib.util.find_spec("liger_kernel") is None:
        return "Liger-Kernel is not installed (pip install liger-kernel)"
    if name == "liger" and device.type != "cuda":
        return "Liger-Kernel's fused linear JSD runs Triton kernels on CUDA tensors only"
    return None


LOSSES = {
    "compile": compiled_chunked_reverse_kl,
    "liger": liger_fused_linear_reverse_kl,
    "liger_chunked": liger_chunked_reverse_kl,
}
