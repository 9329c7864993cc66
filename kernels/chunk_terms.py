"""The terms pass of the chunked plan's fused epilogue: JSD, the skew KLs and TVD, whose terms need the final lse.

``terms_update`` (one program per row, over a tile of the shared sweep as :mod:`opd_fast.kernels.chunk_stats`
describes it) adds the row's Σ fs, Σ ft and Σ pg of :func:`opd_fast.kernels._common.terms_parts` — for the mixture
m = β p_t + (1 − β) p_s, KL(p_s‖m) and KL(p_t‖m) in a cancellation-free form and the gradient's center; TVD's
½ Σ|p_s − p_t|. The Triton twin of csrc/softmax_stats.cu's terms pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from opd_fast.backends.epilogue import MODES, TERMS_MODES
from opd_fast.kernels._common import (
    apply_head,
    epilogue_block,
    head_args,
    on_device,
    row_vectors,
    terms_parts,
)


@triton.jit
def _terms_update_kernel(
    zs_ptr,
    zt_ptr,
    lse_s_ptr,
    lse_t_ptr,
    lo_s_ptr,
    lo_t_ptr,
    terms_ptr,
    bias_s_ptr,
    bias_t_ptr,
    n_terms,
    width,
    stride_z,
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
    lse_s = tl.load(lse_s_ptr + i_n)
    lse_t = tl.load(lse_t_ptr + i_n)
    lo_s = tl.load(lo_s_ptr + i_n)
    lo_t = tl.load(lo_t_ptr + i_n)
    b_fs = tl.zeros([BV], tl.float32)
    b_ft = tl.zeros([BV], tl.float32)
    b_pg = tl.zeros([BV], tl.float32)
    for c0 in range(0, width, BV):
        o_c = c0 + tl.arange(0, BV)
        m_c = o_c < width
        x = tl.load(zs_ptr + i_n * stride_z + o_c, mask=m_c, other=0.0)
        y = tl.load(zt_ptr + i_n * stride_z + o_c, mask=m_c, other=0.0)
        lp_s = (apply_head(x, bias_s_ptr, o_c, m_c, pre_s, cap_s, post_s, HAS_BIAS_S, HAS_SOFTCAP_S) - lse_s) - lo_s
        lp_t = (apply_head(y, bias_t_ptr, o_c, m_c, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T) - lse_t) - lo_t
        _, pg, fs, ft = terms_parts(lp_s, lp_t, beta, MODE)
        b_fs += tl.where(m_c, fs, 0.0)
        b_ft += tl.where(m_c, ft, 0.0)
        b_pg += tl.where(m_c, pg, 0.0)
    tl.store(terms_ptr + i_n, tl.load(terms_ptr + i_n) + tl.sum(b_fs, 0))
    tl.store(terms_ptr + n_terms + i_n, tl.load(terms_ptr + n_terms + i_n) + tl.sum(b_ft, 0))
    tl.store(terms_ptr + 2 * n_terms + i_n, tl.load(terms_ptr + 2 * n_terms + i_n) + tl.sum(b_pg, 0))


def terms_update(terms, zs, zt, lse, head_s, head_t, mode: str, beta: float) -> None:
    """terms [3, r] += (Σ fs, Σ ft, Σ pg) over the tile for ``mode`` (one of TERMS_MODES; the per-element parts of
    :func:`opd_fast.kernels._common.terms_parts`), given the rows' final ``lse`` = (lse_s, lse_t, lse_lo_s,
    lse_lo_t): log p = (z − lse) − lse_lo (opd_fast.backends.online_softmax.split_lse; :func:`opd_fast.backends.
    online_softmax.terms_loss` makes the loss and the gradient's center of the sums)."""
    if mode not in TERMS_MODES:
        raise ValueError(f"the terms pass serves {TERMS_MODES}, not {mode!r}")
    rows, width = zs.shape
    if rows == 0:
        return
    lse_s, lse_t, lo_s, lo_t = row_vectors(*lse)
    (bias_s, pre_s, cap_s, post_s), (has_bias_s, has_cap_s) = head_args(head_s, zs)
    (bias_t, pre_t, cap_t, post_t), (has_bias_t, has_cap_t) = head_args(head_t, zs)
    with on_device(zs):
        _terms_update_kernel[(rows,)](
            zs,
            zt,
            lse_s,
            lse_t,
            lo_s,
            lo_t,
            terms,
            bias_s,
            bias_t,
            terms.shape[1],
            width,
            zs.stride(0),
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
            BV=epilogue_block(width),
        )
