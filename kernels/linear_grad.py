"""The streaming plan's backward: logit gradients from recomputed tiles, then dH = G W and dW = Gᵀ H.

Memory plan. The vocabulary is processed in chunks of Vc columns, with N · Vc bounded by the workspace
budget (never N · V). For each chunk three kernels run:

1. ``_logit_grad_kernel`` (grid: token blocks × vocabulary tiles, rasterized in groups of token blocks so
   their H tiles stay in L2) recomputes the student's logits tile with tl.dot, applies the head (bias,
   scale, softcap, 1/τ), forms the gradient G w.r.t. the raw logits in registers — per-token weight and
   the head's chain rule folded in — and stores it, in the weights' dtype, into the chunk workspace, with
   the tile's column sums (for the bias gradient) beside it. **Gradient filtering** (opt-in,
   ``filter_eps > 0``): G is proportional to p_s (reverse KL, JSD, the skew KLs, TVD: their q = p_s p_t / m
   is at most p_s / β; entropy) or to max(p_s, p_t) (forward KL), so when every such probability of a tile is
   below ``filter_eps`` the tile is marked skipped: nothing is stored and, but for forward KL, the teacher's
   logits tile is not even computed.
2. the kept tiles are compacted on the host into per-row-block and per-column-block lists, so that
3. ``_grad_hidden_kernel`` (grid: token blocks × H blocks) runs dH[rows] += Σ_j G[rows, j] W[j] over the
   block's kept tiles only — a branch-free loop that the compiler pipelines — with one read-modify-write
   of dH per chunk by the only program that owns those rows, and ``_grad_weight_kernel`` (grid:
   vocabulary tiles × H blocks) writes dW[j] = Σ_i G[i, j]ᵀ H[i] over the tile's kept token blocks, once.

No atomics anywhere: every output element has exactly one writer and a fixed summation order, so the
gradients are bitwise deterministic.

Logit gradients by MODE (lp = (z − lse) − lse_lo the log-probs of the final logits z, with each row's lse
and its fp32 rounding residual kept apart (linear_softmax), D and ``center`` from the forward, w the row
weight, χ = dz/dx the head's chain factor):

    reverse KL:  G = w χ p_s (lp_s − lp_t − D)
    forward KL:  G = w χ (p_s − p_t − p_s · center)           (center 0 but for a hard-label term: the sweep
                                                              shifts it, as reverse KL's D)
    JSD, skew KLs, TVD:  G = w χ (pg − p_s · center)          (_common.terms_grad; center = Σ pg, the terms pass's)
    token:       G = w χ ([v = y] − p_s)                      (never skipped where a row's token lies)
    logsumexp:   G = w χ p_s
    entropy:     G = w χ p_s (lp_s − center)                  (center −H and w the negated row weight: ∂H/∂z)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opd_fast.backends.epilogue import MODES, TERMS_MODES
from opd_fast.kernels._common import (
    ENTROPY,
    FORWARD_KL,
    JSD,
    LOGSUMEXP,
    REVERSE_KL,
    TOKEN_LOGPROB,
    apply_head,
    configs,
    grouped_pid,
    head_args,
    head_chain,
    is_interpreter,
    logits_tile,
    on_device,
    row_log_probs,
    terms_grad,
)
from opd_fast.kernels.linear_softmax import GROUP_N


def tile_shape(mode: str | None = None) -> tuple[int, int]:
    """(BN, BV) of the gradient tiles; fixed per platform and mode because the skip flags index these tiles.

    The terms modes' gradients keep more tile-sized values live than the other modes (both log-probabilities and
    log(p_s / m)'s two branches while the teacher's tile is computed): JSD's over 64 × 128 spilled 448-536 B per
    thread at 8 warps on sm_90a and sm_80 (tests/kernels/test_triton_aot.py), so they take 64 × 64 tiles."""
    if is_interpreter():
        return (16, 32)
    return (64, 64) if mode in TERMS_MODES else (64, 128)


@triton.jit
def _tile_peak(p):
    """The tile's largest probability, a NaN counting as +inf: a NaN gradient must reach dH and dW, never be
    skipped as small (tl.max ignores NaN on the GPU, and a NaN never compares ≥ ε)."""
    return tl.max(tl.max(tl.where(p == p, p, float("inf")), 1), 0)


@triton.autotune(
    # 4 warps spill in token mode (240-430 B per thread, tests/kernels/test_triton_aot.py); the terms modes need their
    # smaller tile.
    configs=configs({"BH": [64, 32]}, warps=[8], stages=[3], interpreter={"BH": 16}),
    key=["HS", "HT", "MODE", "PRECISION"],
)
@triton.jit
def _logit_grad_kernel(
    hs_ptr,
    ws_ptr,
    ht_ptr,
    wt_ptr,
    ids_ptr,
    lse_s_ptr,
    lse_t_ptr,
    lo_s_ptr,
    lo_t_ptr,
    loss_ptr,
    center_ptr,
    row_w_ptr,
    g_ptr,
    colsum_ptr,
    flag_ptr,
    bias_s_ptr,
    bias_t_ptr,
    N,
    HS,
    HT,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    stride_g,
    stride_colsum,
    v_lo,
    v_hi,
    n_vtiles,
    beta,
    filter_eps,
    pre_s,
    cap_s,
    post_s,
    pre_t,
    cap_t,
    post_t,
    MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS_S: tl.constexpr,
    HAS_SOFTCAP_S: tl.constexpr,
    HAS_BIAS_T: tl.constexpr,
    HAS_SOFTCAP_T: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
):
    i_n, i_v = grouped_pid(tl.program_id(0), tl.cdiv(N, BN), n_vtiles, GROUP_N)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    o_v = (v_lo + i_v * BV + tl.arange(0, BV)).to(tl.int64)
    m_v = o_v < v_hi
    m_nv = m_n[:, None] & m_v[None, :]

    x_s = logits_tile(hs_ptr, ws_ptr, stride_hs, stride_ws, o_n, o_v, m_n, m_v, HS, BN, BV, BH, PRECISION)
    z_s = apply_head(x_s, bias_s_ptr, o_v, m_v, pre_s, cap_s, post_s, HAS_BIAS_S, HAS_SOFTCAP_S)
    lp_s = row_log_probs(z_s, lse_s_ptr, lo_s_ptr, o_n, m_n)
    p_s = tl.where(m_nv, tl.exp(lp_s), 0.0)
    b_w = tl.load(row_w_ptr + o_n, mask=m_n, other=0.0)
    peak = _tile_peak(p_s)

    if MODE == FORWARD_KL:  # G = p_s (1 − center) − p_t is small only where both are: the teacher tile is needed
        x_t = logits_tile(ht_ptr, wt_ptr, stride_ht, stride_wt, o_n, o_v, m_n, m_v, HT, BN, BV, BH, PRECISION)
        z_t = apply_head(x_t, bias_t_ptr, o_v, m_v, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T)
        lp_t = row_log_probs(z_t, lse_t_ptr, lo_t_ptr, o_n, m_n)
        p_t = tl.where(m_nv, tl.exp(lp_t), 0.0)
        peak = tl.maximum(peak, _tile_peak(p_t))
    if MODE == TOKEN_LOGPROB:
        b_y = tl.load(ids_ptr + o_n, mask=m_n, other=-1)
        hit = o_v[None, :] == b_y[:, None]
        peak = tl.maximum(peak, tl.max(tl.max(hit.to(tl.float32), 1), 0))

    keep = peak >= filter_eps
    if keep:
        if MODE == REVERSE_KL:
            x_t = logits_tile(ht_ptr, wt_ptr, stride_ht, stride_wt, o_n, o_v, m_n, m_v, HT, BN, BV, BH, PRECISION)
            z_t = apply_head(x_t, bias_t_ptr, o_v, m_v, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T)
            lp_t = row_log_probs(z_t, lse_t_ptr, lo_t_ptr, o_n, m_n)
            b_loss = tl.load(loss_ptr + o_n, mask=m_n, other=0.0)
            grad = p_s * (lp_s - lp_t - b_loss[:, None])
        if MODE == FORWARD_KL:
            b_center = tl.load(center_ptr + o_n, mask=m_n, other=0.0)
            grad = (p_s - p_t) - p_s * b_center[:, None]
        if (MODE >= JSD) & (MODE < TOKEN_LOGPROB):
            x_t = logits_tile(ht_ptr, wt_ptr, stride_ht, stride_wt, o_n, o_v, m_n, m_v, HT, BN, BV, BH, PRECISION)
            z_t = apply_head(x_t, bias_t_ptr, o_v, m_v, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T)
            lp_t = row_log_probs(z_t, lse_t_ptr, lo_t_ptr, o_n, m_n)
            b_center = tl.load(center_ptr + o_n, mask=m_n, other=0.0)
            grad = terms_grad(lp_s, lp_t, p_s, b_center[:, None], beta, MODE)
        if MODE == TOKEN_LOGPROB:
            grad = tl.where(hit, 1.0, 0.0) - p_s
        if MODE == LOGSUMEXP:
            grad = p_s
        if MODE == ENTROPY:  # center −H and row weight −w: w ∂H/∂z = −w p_s (log p_s + H)
            b_center = tl.load(center_ptr + o_n, mask=m_n, other=0.0)
            grad = p_s * (lp_s - b_center[:, None])
        grad = grad * head_chain(z_s, pre_s, cap_s, post_s, HAS_SOFTCAP_S)
        grad = tl.where(m_nv, grad * b_w[:, None], 0.0)
        p_g = g_ptr + o_n[:, None] * stride_g + (o_v - v_lo)[None, :]
        tl.store(p_g, grad.to(g_ptr.dtype.element_ty), mask=m_nv)
        tl.store(colsum_ptr + i_n * stride_colsum + (o_v - v_lo), tl.sum(grad, 0), mask=m_v)
    tl.store(flag_ptr + i_n * n_vtiles + i_v, keep.to(tl.int32))


def _matmul_configs(warps: list[int]):
    # num_stages = 4 compiled to the same code as 3 on sm_90a and sm_80 (tests/kernels/test_triton_aot.py): one stage
    # count.
    return configs({"BK": [128, 64]}, warps=warps, stages=[3], interpreter={"BK": 16})


# restore_value: the kernel adds into dh, so autotuning's trial runs must not accumulate.
@triton.autotune(configs=_matmul_configs([8, 4]), key=["H", "PRECISION"], restore_value=["dh_ptr"])
@triton.jit
def _grad_hidden_kernel(
    g_ptr,
    kept_ptr,
    count_ptr,
    w_ptr,
    dh_ptr,
    N,
    H,
    stride_g,
    stride_w,
    stride_dh,
    v_lo,
    v_hi,
    n_vtiles,
    PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
):
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < H
    acc = tl.zeros([BN, BK], tl.float32)
    for j in range(0, tl.load(count_ptr + i_n)):  # the row block's kept vocabulary tiles, in order
        i_v = tl.load(kept_ptr + i_n * n_vtiles + j)
        o_c = (i_v * BV + tl.arange(0, BV)).to(tl.int64)
        m_c = v_lo + o_c < v_hi
        b_g = tl.load(g_ptr + o_n[:, None] * stride_g + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0)
        p_w = w_ptr + (v_lo + o_c)[:, None] * stride_w + o_k[None, :]
        b_w = tl.load(p_w, mask=m_c[:, None] & m_k[None, :], other=0.0)
        acc = tl.dot(b_g, b_w, acc, input_precision=PRECISION)
    p_dh = dh_ptr + o_n[:, None] * stride_dh + o_k[None, :]
    m_dh = m_n[:, None] & m_k[None, :]
    tl.store(p_dh, tl.load(p_dh, mask=m_dh, other=0.0) + acc, mask=m_dh)


# 4 warps with BK = 128 spill on sm_80 (80 B per thread): 8 warps only.
@triton.autotune(configs=_matmul_configs([8]), key=["H", "PRECISION"])
@triton.jit
def _grad_weight_kernel(
    g_ptr,
    kept_ptr,
    count_ptr,
    h_ptr,
    dw_ptr,
    N,
    H,
    stride_g,
    stride_h,
    stride_dw,
    v_lo,
    v_hi,
    n_ntiles,
    PRECISION: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
):
    i_v, i_k = tl.program_id(0), tl.program_id(1)
    o_c = (i_v * BV + tl.arange(0, BV)).to(tl.int64)
    m_c = v_lo + o_c < v_hi
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < H
    acc = tl.zeros([BV, BK], tl.float32)
    for j in range(0, tl.load(count_ptr + i_v)):  # the column block's kept token blocks, in order
        i_n = tl.load(kept_ptr + i_v * n_ntiles + j)
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < N
        b_g = tl.load(g_ptr + o_n[:, None] * stride_g + o_c[None, :], mask=m_n[:, None] & m_c[None, :], other=0.0)
        b_h = tl.load(h_ptr + o_n[:, None] * stride_h + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        acc = tl.dot(tl.trans(b_g), b_h, acc, input_precision=PRECISION)
    p_dw = dw_ptr + (v_lo + o_c)[:, None] * stride_dw + o_k[None, :]
    tl.store(p_dw, acc.to(dw_ptr.dtype.element_ty), mask=m_c[:, None] & m_k[None, :])


def compact_kept(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [R, C] int32: each row's kept columns first, ascending; counts [R] int32) of 0/1 ``flags``."""
    order = torch.argsort(1 - flags, dim=1, stable=True)
    return order.to(torch.int32).contiguous(), flags.sum(dim=1, dtype=torch.int32)


def logit_grad_backward(
    hs,
    ws,
    ht,
    wt,
    ids,
    lse_s,
    lse_t,
    loss,
    center,
    row_weight,
    head_s,
    head_t,
    *,
    mode: str,
    beta: float,
    filter_eps: float,
    precision: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    workspace_elements: int,
    stats,
):
    """(dh fp32 [N, Hs] | None, dw in ws.dtype [V, Hs] | None, db fp32 [V] | None) for the given mode; the
    kept/skipped tiles are added to ``stats`` (:class:`opd_fast.backends.gemms.FilterStats`).

    ``lse_s``/``lse_t`` are each row's (lse, lse_lo), fp32 [N] each (linear_softmax.softmax_stats). ``ht``/``wt``/
    ``lse_t``/``head_t`` are unused (may be None) in one-model modes, ``ids`` outside token mode, ``center``
    but for forward KL, the terms modes and entropy. Heads are (bias | None, pre, softcap | None, post = 1/τ).
    """
    (lse_s, lo_s), (lse_t, lo_t) = lse_s, lse_t if lse_t is not None else lse_s
    n_rows, hidden = hs.shape
    vocab = ws.shape[0]
    bn, bv = tile_shape(mode)
    chunk = max(bv, (workspace_elements // max(n_rows, 1)) // bv * bv)
    chunk = min(chunk, triton.cdiv(vocab, bv) * bv)
    n_ntiles = triton.cdiv(n_rows, bn)
    g_buf = torch.empty((n_rows, chunk), device=hs.device, dtype=ws.dtype)
    colsum = torch.empty((n_ntiles, chunk), device=hs.device, dtype=torch.float32)
    dh = torch.zeros((n_rows, hidden), device=hs.device, dtype=torch.float32) if need_dh else None
    dw = torch.empty_like(ws) if need_dw else None
    db = torch.zeros(vocab, device=hs.device, dtype=torch.float32) if need_db else None
    teacher = ht is not None
    dummy = hs
    (bias_s, pre_s, cap_s, post_s), (has_bias_s, has_cap_s) = head_args(head_s, hs)
    (bias_t, pre_t, cap_t, post_t), (has_bias_t, has_cap_t) = head_args(head_t, hs)
    with on_device(hs):
        for v_lo in range(0, vocab, chunk):
            v_hi = min(v_lo + chunk, vocab)
            n_vtiles = triton.cdiv(v_hi - v_lo, bv)
            flags = torch.empty((n_ntiles, n_vtiles), device=hs.device, dtype=torch.int32)
            if need_db:
                colsum.zero_()
            _logit_grad_kernel[(n_ntiles * n_vtiles,)](
                hs,
                ws,
                ht if teacher else dummy,
                wt if teacher else dummy,
                ids if ids is not None else dummy,
                lse_s,
                lse_t,
                lo_s,
                lo_t,
                loss if loss is not None else lse_s,
                center if center is not None else lse_s,
                row_weight,
                g_buf,
                colsum,
                flags,
                bias_s,
                bias_t,
                n_rows,
                hidden,
                ht.shape[1] if teacher else 1,
                hs.stride(0),
                ws.stride(0),
                ht.stride(0) if teacher else 0,
                wt.stride(0) if teacher else 0,
                g_buf.stride(0),
                colsum.stride(0),
                v_lo,
                v_hi,
                n_vtiles,
                beta,
                filter_eps,
                pre_s,
                cap_s,
                post_s,
                pre_t,
                cap_t,
                post_t,
                MODE=MODES[mode],
                PRECISION=precision,
                HAS_BIAS_S=has_bias_s,
                HAS_SOFTCAP_S=has_cap_s,
                HAS_BIAS_T=has_bias_t,
                HAS_SOFTCAP_T=has_cap_t,
                BN=bn,
                BV=bv,
            )
            stats.add(flags.numel(), (flags == 0).sum())
            if db is not None:
                db[v_lo:v_hi] += colsum[:, : v_hi - v_lo].sum(dim=0)
            if dh is not None:
                kept, counts = compact_kept(flags)
                grid = lambda meta: (n_ntiles, triton.cdiv(hidden, meta["BK"]))  # noqa: E731
                _grad_hidden_kernel[grid](
                    g_buf,
                    kept,
                    counts,
                    ws,
                    dh,
                    n_rows,
                    hidden,
                    g_buf.stride(0),
                    ws.stride(0),
                    dh.stride(0),
                    v_lo,
                    v_hi,
                    n_vtiles,
                    PRECISION=precision,
                    BN=bn,
                    BV=bv,
                )
            if dw is not None:
                kept, counts = compact_kept(flags.T.contiguous())
                grid = lambda meta, n=n_vtiles: (n, triton.cdiv(hidden, meta["BK"]))  # noqa: E731
                _grad_weight_kernel[grid](
                    g_buf,
                    kept,
                    counts,
                    hs,
                    dw,
                    n_rows,
                    hidden,
                    g_buf.stride(0),
                    hs.stride(0),
                    dw.stride(0),
                    v_lo,
                    v_hi,
                    n_ntiles,
                    PRECISION=precision,
                    BN=bn,
                    BV=bv,
                )
    return dh, dw, db
