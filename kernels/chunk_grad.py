"""The gradient pass of the chunked plan's fused epilogue: the logit gradient G of a tile of the shared sweep.

``logit_grad`` (grid: rows × column blocks, purely elementwise, over a tile as :mod:`opd_fast.kernels.chunk_stats`
describes it) writes G = w · ∂D/∂x: the per-token weight and the head's chain rule folded in, in the gradient
buffer's dtype (bf16 for the GEMMs). The Triton twin of csrc/logit_grad.cu.
"""

from __future__ import annotations

import triton
import triton.language as tl

from opd_fast.backends.epilogue import MODES
from opd_fast.kernels._common import (
    ENTROPY,
    FORWARD_KL,
    REVERSE_KL,
    TOKEN_LOGPROB,
    apply_head,
    epilogue_block,
    head_args,
    head_chain,
    on_device,
    row_vectors,
    terms_grad,
)


@triton.jit
def _logit_grad_kernel(
    zs_ptr,
    zt_ptr,
    ids_ptr,
    loss_ptr,
    lse_s_ptr,
    lse_t_ptr,
    lo_s_ptr,
    lo_t_ptr,
    center_ptr,
    row_w_ptr,
    g_ptr,
    bias_s_ptr,
    bias_t_ptr,
    width,
    stride_z,
    stride_g,
    v_lo,
    beta,
    pre_s,
    cap_s,
    post_s,
    pre_t,
    cap_t,
    post_t,
    MODE: tl.constexpr,
    HAS_BIAS_S: tl.constexpr,
    HAS_SOFTCAP_S: tl.constexpr,
    HAS_BIAS_T: tl.constexpr,
    HAS_SOFTCAP_T: tl.constexpr,
    BV: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1) * BV + tl.arange(0, BV)
    m_c = o_c < width
    x = tl.load(zs_ptr + i_n * stride_z + o_c, mask=m_c, other=0.0)
    a = apply_head(x, bias_s_ptr, o_c, m_c, pre_s, cap_s, post_s, HAS_BIAS_S, HAS_SOFTCAP_S)
    lp_s = (a - tl.load(lse_s_ptr + i_n)) - tl.load(lo_s_ptr + i_n)  # shift and log Σ apart
    p_s = tl.exp(lp_s)
    if MODE < TOKEN_LOGPROB:  # two models
        y = tl.load(zt_ptr + i_n * stride_z + o_c, mask=m_c, other=0.0)
        lp_t = apply_head(y, bias_t_ptr, o_c, m_c, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T)
        lp_t = (lp_t - tl.load(lse_t_ptr + i_n)) - tl.load(lo_t_ptr + i_n)
    if MODE == REVERSE_KL:
        grad = p_s * (lp_s - lp_t - tl.load(loss_ptr + i_n))
    elif MODE == FORWARD_KL:
        # The center is 0 from the statistics; the sweep shifts it (as reverse KL's loss) for a hard-label term.
        grad = (p_s - tl.exp(lp_t)) - p_s * tl.load(center_ptr + i_n)
    elif MODE < TOKEN_LOGPROB:
        grad = terms_grad(lp_s, lp_t, p_s, tl.load(center_ptr + i_n), beta, MODE)
    elif MODE == TOKEN_LOGPROB:
        hit = o_c == tl.load(ids_ptr + i_n) - v_lo
        grad = tl.where(hit, 1.0, 0.0) - p_s
    elif MODE == ENTROPY:  # center −H and row weight −w: w ∂H/∂z = −w p_s (log p_s + H)
        grad = p_s * (lp_s - tl.load(center_ptr + i_n))
    else:
        grad = p_s
    grad = grad * head_chain(a, pre_s, cap_s, post_s, HAS_SOFTCAP_S) * tl.load(row_w_ptr + i_n)
    tl.store(g_ptr + i_n * stride_g + o_c, grad.to(g_ptr.dtype.element_ty), mask=m_c)


def logit_grad(zs, zt, ids, stats, row_weight, head_s, head_t, v_lo: int, mode: str, beta: float, out):
    """G [r, width] = row_weight · ∂D/∂x for the tile into ``out`` (or over ``zs``); ``stats`` holds the rows'
    final (loss, lse_s, lse_t, center, lse_lo_s, lse_lo_t), log p = (z − lse) − lse_lo."""
    rows, width = zs.shape
    g = zs if out is None else out
    if rows == 0:
        return g
    loss, lse_s, lse_t, center, lo_s, lo_t = row_vectors(*stats[:6])
    (bias_s, pre_s, cap_s, post_s), (has_bias_s, has_cap_s) = head_args(head_s, zs)
    (bias_t, pre_t, cap_t, post_t), (has_bias_t, has_cap_t) = head_args(head_t, zs)
    block = epilogue_block(width)
    with on_device(zs):
        _logit_grad_kernel[(rows, triton.cdiv(width, block))](
            zs,
            zs if zt is None else zt,
            zs if ids is None else ids,
            loss,
            lse_s,
            lse_t,
            lo_s,
            lo_t,
            center,
            row_weight.float().contiguous(),
            g,
            bias_s,
            bias_t,
            width,
            zs.stride(0),
            g.stride(0),
            v_lo,
            beta,
            pre_s,
            cap_s,
            post_s,
            pre_t,
            cap_t,
            post_t,
            MODE=MODES[mode],
            HAS_BIAS_S=has_bias_s,
            HAS_SOFTCAP_S=has_cap_s,
            HAS_BIAS_T=has_bias_t,
            HAS_SOFTCAP_T=has_cap_t,
            BV=block,
        )
    return g
