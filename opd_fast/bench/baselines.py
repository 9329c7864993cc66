"""What users would pick instead of opd_fast, as OPD losses with our argument order, for `opd-fast bench`.

Each baseline computes the mean over tokens of a divergence between the student's and the teacher's
next-token distributions — reverse KL, forward KL or JSD with β = 0.5 — from hidden states and lm_head
weights (hs [N, Hs], ws [V, Hs], ht [N, Ht], wt [V, Ht]), with gradients w.r.t. hs and ws:

* ``compile``: plain PyTorch compiled with ``torch.compile``, chunked over tokens the way Liger-Kernel's
  chunked losses are: for each chunk of ``CHUNK_TOKENS`` tokens a compiled ``torch.func.grad_and_value``
  of the materialized-logits loss gives the chunk's loss and gradients in the forward, so only one
  chunk's logits exist at a time; the backward scales the stored gradients.
* ``liger``: Liger-Kernel's fused linear JSD (``LigerFusedLinearJSD``, Triton, CUDA only).
* ``liger_chunked``: Liger-Kernel's chunked JSD loss (``LigerFusedLinearJSDLoss``, compiled chunks), soft
  loss only.
* ``trl``: TRL's chunked divergence (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, TRL ≥ 1.16),
  the loss inside ``trl.DistillationTrainer``: cuBLAS logits on [4096-token × 32768-vocabulary] tiles with
  online log-sum-exp statistics (Triton on CUDA, torch elsewhere); its backward projects the tiles again.

Liger-Kernel and TRL share one β convention with ours (docs/design.md §2): the mixture is m = β p_t + (1 − β) p_s,
β = 0 is the forward KL(p_t ‖ p_s) and β = 1 the reverse KL(p_s ‖ p_t) (``BETA``).

The naive baseline (materialized logits, autograd) is :func:`opd_fast.reference.materialized_divergence`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import shutil
from collections.abc import Callable

import torch

CHUNK_TOKENS = 1024
NAMES = ("compile", "liger", "liger_chunked", "trl")
BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # the baselines' β for each divergence


def _chunk_divergence_sum(hs, ws, ht, wt, beta: float):
    """Σ over the chunk's tokens of the β-divergence from materialized fp32 logits (plain PyTorch)."""
    lps = torch.log_softmax((hs @ ws.T).float(), dim=-1)
    lpt = torch.log_softmax((ht @ wt.T).float(), dim=-1)
    if beta == 1.0:
        return (lps.exp() * (lps - lpt)).sum()
    if beta == 0.0:
        return (lpt.exp() * (lpt - lps)).sum()
    log_m = torch.logaddexp(lpt + math.log(beta), lps + math.log(1 - beta))
    return beta * (lpt.exp() * (lpt - log_m)).sum() + (1 - beta) * (lps.exp() * (lps - log_m)).sum()


@functools.cache
def _compiled_chunk_grad(beta: float):
    loss = functools.partial(_chunk_divergence_sum, beta=beta)
    return torch.compile(torch.func.grad_and_value(loss, argnums=(0, 1)))


class _CompiledChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, beta):
        step = _compiled_chunk_grad(beta)
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
        return dh * scale.to(dh.dtype), (dw * scale).to(ctx.weight_dtype), None, None, None


def compiled_chunked_divergence(hs, ws, ht, wt, beta: float = 1.0):
    """Mean β-divergence over tokens, torch.compile'd per chunk of ``CHUNK_TOKENS`` tokens."""
    return _CompiledChunked.apply(hs, ws, ht.detach(), wt.detach(), beta)


def liger_fused_linear_divergence(hs, ws, ht, wt, beta: float = 1.0):
    """Mean β-divergence over tokens by Liger-Kernel's fused linear JSD (CUDA tensors only)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=beta)(hs, ws, ht, wt)


@functools.cache
def _liger_chunked_loss(beta: float):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)


def liger_chunked_divergence(hs, ws, ht, wt, beta: float = 1.0):
    """Mean β-divergence over tokens by Liger-Kernel's chunked JSD loss (soft loss only)."""
    labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)  # unused (hard loss weight 0)
    return _liger_chunked_loss(beta)(hs, ws, ht, wt, labels)


def trl_chunked_divergence(hs, ws, ht, wt, beta: float = 1.0):
    """Mean β-divergence over tokens by TRL's chunked divergence, reduced as ``trl.DistillationTrainer`` does."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    per_token, _entropy = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta)
    return per_token.mean()


_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "compile": compiled_chunked_divergence,
    "liger": liger_fused_linear_divergence,
    "liger_chunked": liger_chunked_divergence,
    "trl": trl_chunked_divergence,
}


def divergence_loss(name: str, divergence: str) -> Callable[..., torch.Tensor]:
    """fn(hs, ws, ht, wt) -> mean ``divergence`` ("reverse_kl", "forward_kl", "jsd") by the baseline ``name``."""
    if name not in _LOSSES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(NAMES)}")
    if divergence not in BETA:
        raise ValueError(f"baselines compute {', '.join(BETA)}, not {divergence!r}")
    return functools.partial(_LOSSES[name], beta=BETA[divergence])


def _import_error(module: str, hint: str) -> str | None:
    """Why ``module`` cannot be imported (with ``hint``), or None when it can."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module.split('.')[0]} is not installed ({hint})"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a missing dependency of the package (e.g. TRL's datasets) or a broken install
        return f"importing {module} failed: {type(exc).__name__}: {exc} ({hint})"
    return None


def baseline_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why the baseline ``name`` (compile, liger, liger_chunked, trl) cannot run on ``device``; None if it can."""
    if name == "compile":
        if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on the CPU needs a C++ compiler (g++)"
        return None
    if name == "trl":
        return _import_error("trl.kernels.chunked_divergence", "pip install 'trl>=1.16'")
    reason = _import_error("liger_kernel", "pip install liger-kernel")
    if reason is None and name == "liger" and device.type != "cuda":
        return "Liger-Kernel's fused linear JSD runs Triton kernels on CUDA tensors only"
    return reason
