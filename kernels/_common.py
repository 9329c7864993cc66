"""Shared pieces of the Triton kernels: the logits-tile matmul, op codes and autotune configurations.

Nothing here touches the GPU at import time; configurations are plain lists and the interpreter
(``TRITON_INTERPRET=1``, kernels run on the CPU with numpy) gets exactly one small configuration.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

# Op codes, passed to the kernels as constexpr MODE. The first three involve two models.
REVERSE_KL: tl.constexpr = tl.constexpr(0)
FORWARD_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
TOKEN_LOGPROB: tl.constexpr = tl.constexpr(3)
LOGSUMEXP: tl.constexpr = tl.constexpr(4)

MODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "token_logprob": 3, "logsumexp": 4}


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


FIXED_CONFIG_ENV = "OPD_FAST_TRITON_FIXED_CONFIG"


def configs(space: dict[str, list[int]], warps: list[int], stages: list[int], interpreter: dict[str, int]):
    """All combinations of ``space`` × warps × stages as triton.Configs, the first being the default.

    Under the interpreter: one small config. With ``OPD_FAST_TRITON_FIXED_CONFIG=1``: only the default
    (no autotuning: reproducible timings, no tuning pause on the first call of each shape).
    """
    if is_interpreter():
        return [triton.Config(interpreter, num_warps=1, num_stages=1)]
    keys = list(space)
    all_configs = [
        triton.Config(dict(zip(keys, values)), num_warps=w, num_stages=s)
        for values in itertools.product(*space.values())
        for w in warps
        for s in stages
    ]
    return all_configs[:1] if os.environ.get(FIXED_CONFIG_ENV, "0") == "1" else all_configs


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision matching torch's matmul: fp32 inputs use TF32 only if torch allows it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    stride_h,
    stride_w,
    o_n,
    o_v,
    m_n,
    m_v,
    H,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BN, BV] fp32 tile of h Wᵀ for token rows o_n and vocabulary rows o_v, accumulated over H in BH steps."""
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)
        m_h = o_h < H
        b_h = tl.load(h_ptr + o_n[:, None] * stride_h + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_v[:, None] * stride_w + o_h[None, :], mask=m_v[:, None] & m_h[None, :], other=0.0)
        acc = tl.dot(b_h, tl.trans(b_w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def logaddexp(a, b):
    """log(e^a + e^b), stable for finite inputs."""
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))
