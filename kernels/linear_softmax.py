"""The streaming plan's forward: statistics of log-softmax(z) for one or two models, z = the head's final
logits (bias, scale, softcap, 1/τ applied to each tl.dot tile), one pass over the vocabulary, no workspace.

Grid: (token blocks of BN rows) × (vocabulary splits), rasterized in groups of token blocks so that the
programs running together share their H tiles in L2 (``grouped_pid``). Each program walks its split's
vocabulary in tiles of BV, builds the logits tiles with tl.dot and keeps per row, in fp32 registers:

    m  = running max of z,   S = Σ e^{z − m}   (rescaled by e^{m_old − m_new} when m grows)

for the student (and the teacher), plus one accumulator that depends on MODE:

    reverse KL:  A = Σ e^{z_s − m_s} ((z_s − m_s) − (z_t − r))   →  D = A / S_s + (m_t − r) − log S_s + log S_t
    forward KL:  B = Σ e^{z_t − m_t} ((z_t − m_t) − (z_s − r))   →  D = B / S_t + (m_s − r) − log S_t + log S_s
    token:       z_y, the logit of the row's token  →  log p(y) = z_y − lse
    logsumexp:   nothing (one model, lse only)
    JSD, skew KLs, TVD:  nothing: their terms need the final lse (second pass, ``divergence_terms``, the
                 per-element parts of ``_common.terms_parts``)

The KL accumulators are kept relative to the lead model's running max m and to r, the other model's logit at the
column of that max (when the max grows, every earlier term moves by the change of both:
opd_fast.backends.online_softmax.kl_shift), so the divergence is a sum of small numbers and never the difference of
E_p[z_s − z_t] and lse_s − lse_t, which cancel to ~ulp(|z|) when the two heads' logits sit far apart; and the
dominant term of a row whose lead is one-hot in fp32 is exactly 0, so that D = fl(m_other − r) + … is the very
difference the gradient pass's log-probabilities form (its G = p (log p_s − log p_t − D) is then ~0, as autograd's,
not ~ulp(D)).
With WITH_ENTROPY (``softmax_stats(..., entropy=True)``, a divergence's ``return_entropy``) the pass also keeps the
student's A = Σ e^{z_s − m_s}(z_s − m_s) (moved by m_old − m_new as its max grows, against its own S), so that
H = log S − A / S needs no pass of its own. Partial results per split land in a [6, splits, N] buffer ([7, …] with
the entropy) and are merged on the host side with the same rescaling (O(N · splits) work). Each lse comes with its
fp32 rounding residual lse_lo = (m − lse) + log S, so that later passes take log p = (z − lse) − lse_lo: the row's
shift and log S kept apart, accurate to ~ulp(log p), where z − lse would carry ~ulp(lse). Memory: O(N) per output;
no [N, V] tensor exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opd_fast.backends.epilogue import MODES, TERMS_MODES
from opd_fast.kernels._common import (
    FORWARD_KL,
    REVERSE_KL,
    TOKEN_LOGPROB,
    apply_head,
    configs,
    grouped_pid,
    head_args,
    logits_tile,
    on_device,
    terms_parts,
)

# Token blocks per rasterization group (see grouped_pid).
GROUP_N: tl.constexpr = tl.constexpr(8)  # a constexpr: compiled kernels may read only constexpr globals


@triton.jit
def _lead_reference(m_old, m_new, z_lead, z_other, r):
    """Per row, the other model's logit at the lead model's running max: this tile's (at a column holding the
    tile's max) where the max grew here, else the earlier ``r``."""
    here = tl.max(tl.where(z_lead == m_new[:, None], z_other, -float("inf")), 1)
    return tl.where(m_new > m_old, here, r)


@triton.jit
def _kl_tile_add(acc, s_old, alpha, e, m_old, m_new, r_old, r_new, z_lead, z_other, m_v):
    """A tile into the KL accumulator Σ e^{x − m}((x − m) − (y − r)) of the lead model's logits x and the other's
    y: earlier terms move by (m_old − m_new) − (r_old − r_new) and are rescaled by alpha = e^{m_old − m_new} (an
    empty row moves by 0), the tile's terms e = e^{x − m_new} are added relative to (m_new, r_new)."""
    moved = acc + s_old * tl.where(m_old == -float("inf"), 0.0, (m_old - m_new) - (r_old - r_new))
    rel = tl.where(m_v[None, :], (z_lead - m_new[:, None]) - (z_other - r_new[:, None]), 0.0)
    return moved * alpha + tl.sum(e * rel, 1)


def _stats_configs():
    # Pruned by tests/kernels/test_triton_aot.py (reverse KL, bf16): BN = 128 × BV = 128 and 4 warps with BV = 128 or
    # BN = 128 spill 0.3-2.3 KB per thread on sm_90a and sm_80.
    return configs(
        {"BN": [64], "BV": [128, 64], "BH": [64]},
        warps=[8],
        stages=[3],
        interpreter={"BN": 16, "BV": 32, "BH": 16},
    )


@triton.autotune(configs=_stats_configs(), key=["HS", "HT", "MODE", "PRECISION"])
@triton.jit
def _softmax_stats_fwd_kernel(
    hs_ptr,
    ws_ptr,
    ht_ptr,
    wt_ptr,
    ids_ptr,
    part_ptr,
    bias_s_ptr,
    bias_t_ptr,
    N,
    V,
    HS,
    HT,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    v_per_split,
    n_splits,
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
    WITH_ENTROPY: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
):
    i_n, i_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BN), n_splits, GROUP_N)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    v_start = i_s * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, V)

    b_as = tl.zeros([BN], tl.float32)  # WITH_ENTROPY: the student's Σ e^{z − m_s}(z − m_s)
    b_ms = tl.full([BN], -float("inf"), tl.float32)
    b_ss = tl.zeros([BN], tl.float32)
    b_mt = tl.full([BN], -float("inf"), tl.float32)
    b_st = tl.zeros([BN], tl.float32)
    b_acc = tl.zeros([BN], tl.float32)
    b_r = tl.zeros([BN], tl.float32)  # KL: the other model's logit at the lead model's running max
    if MODE == TOKEN_LOGPROB:
        b_y = tl.load(ids_ptr + o_n, mask=m_n, other=-1)

    for v0 in range(v_start, v_stop, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_stop
        z_s = logits_tile(hs_ptr, ws_ptr, stride_hs, stride_ws, o_n, o_v, m_n, m_v, HS, BN, BV, BH, PRECISION)
        z_s = apply_head(z_s, bias_s_ptr, o_v, m_v, pre_s, cap_s, post_s, HAS_BIAS_S, HAS_SOFTCAP_S)
        # Online softmax: rescale what was summed against the old max before adding this tile.
        # Masked columns get z = −inf, so e^{z − m} = 0 there.
        zm_s = tl.where(m_v[None, :], z_s, -float("inf"))
        ms_new = tl.maximum(b_ms, tl.max(zm_s, 1), propagate_nan=tl.PropagateNan.ALL)
        alpha_s = tl.exp(b_ms - ms_new)
        e_s = tl.exp(zm_s - ms_new[:, None])
        b_ss_old = b_ss
        b_ss = b_ss * alpha_s + tl.sum(e_s, 1)
        if WITH_ENTROPY:  # earlier terms move by m_old − m_new (none on the first tile); masked columns' e_s is 0
            moved = b_as + b_ss_old * tl.where(b_ms == -float("inf"), 0.0, b_ms - ms_new)
            b_as = moved * alpha_s + tl.sum(e_s * (z_s - ms_new[:, None]), 1)
        if MODE < TOKEN_LOGPROB:  # two models (the terms modes keep each one's (m, S) alone)
            z_t = logits_tile(ht_ptr, wt_ptr, stride_ht, stride_wt, o_n, o_v, m_n, m_v, HT, BN, BV, BH, PRECISION)
            z_t = apply_head(z_t, bias_t_ptr, o_v, m_v, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T)
            zm_t = tl.where(m_v[None, :], z_t, -float("inf"))
            mt_new = tl.maximum(b_mt, tl.max(zm_t, 1), propagate_nan=tl.PropagateNan.ALL)
            alpha_t = tl.exp(b_mt - mt_new)
            e_t = tl.exp(zm_t - mt_new[:, None])
            b_st_old = b_st
            b_st = b_st * alpha_t + tl.sum(e_t, 1)
            # Each term relative to the lead's max and r: earlier terms move by the change of both (0 on the first
            # tile, whose acc and weights are 0: the guard keeps −inf − (−inf) out of it).
            if MODE == REVERSE_KL:
                r_new = _lead_reference(b_ms, ms_new, zm_s, z_t, b_r)
                b_acc = _kl_tile_add(b_acc, b_ss_old, alpha_s, e_s, b_ms, ms_new, b_r, r_new, z_s, z_t, m_v)
            if MODE == FORWARD_KL:
                r_new = _lead_reference(b_mt, mt_new, zm_t, z_s, b_r)
                b_acc = _kl_tile_add(b_acc, b_st_old, alpha_t, e_t, b_mt, mt_new, b_r, r_new, z_t, z_s, m_v)
            if MODE <= FORWARD_KL:
                b_r = r_new
            b_mt = mt_new
        b_ms = ms_new
        if MODE == TOKEN_LOGPROB:
            b_acc += tl.sum(tl.where(o_v[None, :] == b_y[:, None], z_s, 0.0), 1)

    stride_k = n_splits * N
    p_out = part_ptr + i_s * N + o_n
    tl.store(p_out, b_ms, mask=m_n)
    tl.store(p_out + stride_k, b_ss, mask=m_n)
    tl.store(p_out + 2 * stride_k, b_mt, mask=m_n)
    tl.store(p_out + 3 * stride_k, b_st, mask=m_n)
    tl.store(p_out + 4 * stride_k, b_acc, mask=m_n)
    tl.store(p_out + 5 * stride_k, b_r, mask=m_n)
    if WITH_ENTROPY:
        tl.store(p_out + 6 * stride_k, b_as, mask=m_n)


def vocab_splits(n_rows: int, vocab: int, device: torch.device, n_splits: int | None) -> tuple[int, int]:
    """(splits, columns per split): enough splits that token blocks × splits fill the GPU about twice
    over; each split a multiple of 128 columns (every BV divides it). ``n_splits`` forces a count."""
    if n_splits is None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n_splits = min(triton.cdiv(2 * sms, triton.cdiv(n_rows, 64)), triton.cdiv(vocab, 1024))
    elif n_splits is None:
        n_splits = 2  # the interpreter: exercise the merge of splits
    per_split = triton.cdiv(triton.cdiv(vocab, max(1, n_splits)), 128) * 128
    return triton.cdiv(vocab, per_split), per_split


def softmax_stats(
    hs, ws, ht, wt, ids, head_s, head_t, *, mode: str, precision: str, n_splits: int | None = None, entropy=False
):
    """Per-row ((lse_s, lse_lo_s), (lse_t, lse_lo_t), value) of the module docstring; ``ht``/``wt``/``head_t`` are
    None in one-model modes.

    Heads are (bias | None, pre, softcap | None, post = 1/τ) of the whole vocabulary. Returns fp32 [N]
    tensors: each model's lse and its residual (one model: the teacher's pair is None), and the value: the
    divergence D for the two KLs, z_y for tokens, zeros otherwise (the terms modes: see :func:`divergence_terms`).
    With ``entropy``, a fourth: the student's entropy H from the same pass (:func:`_merged_entropy`).
    """
    n_rows, vocab = hs.shape[0], ws.shape[0]
    splits, v_per_split = vocab_splits(n_rows, vocab, hs.device, n_splits)
    part = torch.empty((7 if entropy else 6, splits, n_rows), device=hs.device, dtype=torch.float32)
    teacher = ht is not None
    (bias_s, pre_s, cap_s, post_s), (has_bias_s, has_cap_s) = head_args(head_s, hs)
    (bias_t, pre_t, cap_t, post_t), (has_bias_t, has_cap_t) = head_args(head_t, hs)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BN"]) * splits,)  # noqa: E731
    with on_device(hs):
        _softmax_stats_fwd_kernel[grid](
            hs,
            ws,
            ht if teacher else hs,
            wt if teacher else ws,
            ids if ids is not None else hs,
            part,
            bias_s,
            bias_t,
            n_rows,
            vocab,
            hs.shape[1],
            ht.shape[1] if teacher else 1,
            hs.stride(0),
            ws.stride(0),
            ht.stride(0) if teacher else 0,
            wt.stride(0) if teacher else 0,
            v_per_split,
            splits,
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
            WITH_ENTROPY=entropy,
        )
    m_s, s_s, m_t, s_t, acc, ref = part[:6]
    (lse_s, lo_s), m_all_s, log_s_s = _merge(m_s, s_s)
    extra = (_merged_entropy(m_s, s_s, part[6], m_all_s),) if entropy else ()
    if mode in ("token_logprob", "logsumexp"):
        return (lse_s, lo_s), None, acc.sum(0), *extra
    (lse_t, lo_t), m_all_t, log_s_t = _merge(m_t, s_t)
    if mode == "reverse_kl":
        value = _merged_kl(m_s, s_s, ref, acc, m_all_s, m_all_t) - (log_s_s - log_s_t)
    elif mode == "forward_kl":
        value = _merged_kl(m_t, s_t, ref, acc, m_all_t, m_all_s) - (log_s_t - log_s_s)
    else:
        value = torch.zeros_like(lse_s)
    return (lse_s, lo_s), (lse_t, lo_t), value, *extra


def _merge(m: torch.Tensor, s: torch.Tensor):
    """((lse, lse_lo), row max, log S) over splits from per-split (max, Σ e^{z − max}): lse rounded to fp32 and
    its residual lse_lo = (m − lse) + log S, m the row max (m − lse is exact by Sterbenz's lemma whenever
    |m| ≥ log S; 0 where lse is not finite), as opd_fast.backends.online_softmax.split_lse."""
    m_all = m.amax(0)
    log_sum = torch.log(torch.where(m == -torch.inf, 0.0, torch.exp(m - m_all) * s).sum(0))
    lse = m_all + log_sum
    return (lse, torch.where(torch.isfinite(lse), (m_all - lse) + log_sum, 0.0)), m_all, log_sum


def _merged_entropy(m, s, a, m_all):
    """The student's entropy H = log S − A / S from the splits' (max m, Σ e^{z − m}, A = Σ e^{z − m}(z − m)): each
    split's A moved to the row max (opd_fast.backends.online_softmax.kl_shift against a zero model: + S (m − m_all),
    weighed by e^{m − m_all}; 0 for an empty split), as opd_fast.backends.online_softmax.finalize_entropy takes it."""
    empty = m == -torch.inf
    scale = torch.where(empty, 0.0, torch.exp(m - m_all))
    s_all = (scale * s).sum(0)
    a_all = (scale * (a + s * torch.where(empty, 0.0, m - m_all))).sum(0)
    return s_all.log() - a_all / s_all


def _merged_kl(m, s, ref, acc, m_all, m_other_all):
    """Σ_v p_lead ((x − m_all) − (y − m_other_all)) from the splits' KL accumulators (relative to each split's lead
    max m and ``ref``, the other model's logit there): each moved to the row's lead max and the ``ref`` of a split
    holding it (the rescaling of opd_fast.backends.online_softmax.kl_shift, split by split), divided by the lead model's
    S, then moved once to the other model's max."""
    ref_all = torch.where(m == m_all, ref, -torch.inf).amax(0)
    scale = torch.where(m == -torch.inf, 0.0, torch.exp(m - m_all))
    moved = acc + s * ((m - m_all) - (ref - ref_all))
    return (scale * moved).sum(0) / (scale * s).sum(0) + (m_other_all - ref_all)


def _terms_configs():
    # Two logits tiles, both rows' (lse, residual) and jsd_parts' temporaries: BN = 64 × BV = 64 at 8 warps spills
    # 52-84 B per thread on sm_90a and sm_80 since the residuals came in (tests/kernels/test_triton_aot.py; wider tiles
    # and 4 warps spill 1.4-27 KB), BV = 32 compiles to ~130-140 registers without spilling.
    return configs(
        {"BN": [64], "BV": [32], "BH": [64]}, warps=[8], stages=[3], interpreter={"BN": 16, "BV": 32, "BH": 16}
    )


@triton.autotune(configs=_terms_configs(), key=["HS", "HT", "MODE", "PRECISION"])
@triton.jit
def _divergence_terms_kernel(
    hs_ptr,
    ws_ptr,
    ht_ptr,
    wt_ptr,
    lse_s_ptr,
    lse_t_ptr,
    lo_s_ptr,
    lo_t_ptr,
    part_ptr,
    bias_s_ptr,
    bias_t_ptr,
    N,
    V,
    HS,
    HT,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    v_per_split,
    n_splits,
    beta,
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
    """The terms pass of JSD, the skew KLs and TVD: Σ fs, Σ ft and Σ pg of ``_common.terms_parts`` per row."""
    i_n, i_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BN), n_splits, GROUP_N)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    v_start = i_s * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, V)
    b_lse_s = tl.load(lse_s_ptr + o_n, mask=m_n, other=0.0)
    b_lse_t = tl.load(lse_t_ptr + o_n, mask=m_n, other=0.0)
    b_lo_s = tl.load(lo_s_ptr + o_n, mask=m_n, other=0.0)
    b_lo_t = tl.load(lo_t_ptr + o_n, mask=m_n, other=0.0)
    b_fs = tl.zeros([BN], tl.float32)
    b_ft = tl.zeros([BN], tl.float32)
    b_pg = tl.zeros([BN], tl.float32)
    for v0 in range(v_start, v_stop, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_stop
        m_nv = m_n[:, None] & m_v[None, :]
        z_s = logits_tile(hs_ptr, ws_ptr, stride_hs, stride_ws, o_n, o_v, m_n, m_v, HS, BN, BV, BH, PRECISION)
        z_t = logits_tile(ht_ptr, wt_ptr, stride_ht, stride_wt, o_n, o_v, m_n, m_v, HT, BN, BV, BH, PRECISION)
        z_s = apply_head(z_s, bias_s_ptr, o_v, m_v, pre_s, cap_s, post_s, HAS_BIAS_S, HAS_SOFTCAP_S)
        z_t = apply_head(z_t, bias_t_ptr, o_v, m_v, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T)
        lp_s = (z_s - b_lse_s[:, None]) - b_lo_s[:, None]  # the rows' lse and residual apart: ~ulp(log p)
        lp_t = (z_t - b_lse_t[:, None]) - b_lo_t[:, None]
        _, pg, fs, ft = terms_parts(lp_s, lp_t, beta, MODE)
        b_fs += tl.sum(tl.where(m_nv, fs, 0.0), 1)
        b_ft += tl.sum(tl.where(m_nv, ft, 0.0), 1)
        b_pg += tl.sum(tl.where(m_nv, pg, 0.0), 1)
    p_out = part_ptr + i_s * N + o_n
    tl.store(p_out, b_fs, mask=m_n)
    tl.store(p_out + n_splits * N, b_ft, mask=m_n)
    tl.store(p_out + 2 * n_splits * N, b_pg, mask=m_n)


def divergence_terms(
    hs, ws, ht, wt, lse_s, lse_t, head_s, head_t, *, mode: str, beta: float, precision: str, n_splits=None
):
    """The terms (Σ fs, Σ ft, Σ pg) of ``mode`` (one of TERMS_MODES) per row, fp32 [3, N], given both rows'
    (lse, lse_lo), fp32 [N] each (see opd_fast.backends.online_softmax.terms_loss)."""
    if mode not in TERMS_MODES:
        raise ValueError(f"the terms pass serves {TERMS_MODES}, not {mode!r}")
    (lse_s, lo_s), (lse_t, lo_t) = lse_s, lse_t
    n_rows, vocab = hs.shape[0], ws.shape[0]
    splits, v_per_split = vocab_splits(n_rows, vocab, hs.device, n_splits)
    part = torch.empty((3, splits, n_rows), device=hs.device, dtype=torch.float32)
    (bias_s, pre_s, cap_s, post_s), (has_bias_s, has_cap_s) = head_args(head_s, hs)
    (bias_t, pre_t, cap_t, post_t), (has_bias_t, has_cap_t) = head_args(head_t, hs)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BN"]) * splits,)  # noqa: E731
    with on_device(hs):
        _divergence_terms_kernel[grid](
            hs,
            ws,
            ht,
            wt,
            lse_s,
            lse_t,
            lo_s,
            lo_t,
            part,
            bias_s,
            bias_t,
            n_rows,
            vocab,
            hs.shape[1],
            ht.shape[1],
            hs.stride(0),
            ws.stride(0),
            ht.stride(0),
            wt.stride(0),
            v_per_split,
            splits,
            beta,
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
        )
    return part.sum(1)
