"""Streaming top-k of softmax(z) per row, z the head's final logits (bias, scale, softcap, 1/τ), with the
row's log-sum-exp and entropy; never [N, V]. The streaming plan's top-k (the chunked plan ranks each chunk's
logits with torch.topk).

Grid: (token blocks) × (vocabulary splits). Each program walks its split in tiles of BV columns and
keeps per row, in registers: the online softmax statistics m, S = Σ e^{z−m} and T = Σ e^{z−m}(z − m)
(H = log S − T/S at the end), and its running top-K as **packed int64 keys**:

    key = (sortable(z) << 32) | (2³² − 1 − id)

where sortable() maps the fp32 bit pattern to an int32 with the same order as the float. One integer
comparison then orders by logit, and equal logits by the smaller token id first — the documented tie
rule — so the selection is exact and deterministic, and duplicates cannot arise. Per tile, the tile's
top-K (``tl.topk``, a bitonic network) is merged with the running top-K by one more ``tl.topk`` over
the 2K candidates. Splits are merged on the host with ``torch.topk`` over the same keys.

K is the requested k rounded up to a power of two; top-k lists longer than ``MAX_K`` do not fit in
registers and are left to the torch backend's streaming implementation (same results).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from opd_fast.kernels._common import (
    apply_head,
    configs,
    grouped_pid,
    head_args,
    is_interpreter,
    logits_tile,
    on_device,
)
from opd_fast.kernels.linear_softmax import GROUP_N, vocab_splits

# The largest K whose default configuration compiles in seconds without spilling (tests/kernels/test_triton_aot.py):
# K = 128 uses 249 registers; K = 256 spills on sm_90a and takes ptxas ~2 minutes, K = 1024 over 23 minutes.
MAX_K = 128
_LOW_MASK = (1 << 32) - 1


def _topk_configs():
    # At K = MAX_K, BN = 64 spills (60 B-5 KB per thread) and BN = 32 with 4 warps ran past 120 s of ptxas on sm_80
    # (tests/kernels/test_triton_aot.py): one configuration.
    return configs({"BN": [32], "BH": [64]}, warps=[8], stages=[3], interpreter={"BN": 16, "BH": 16})


@triton.jit
def _pack_keys(z, o_v):
    """int64 keys ordered like (z, −id); z must not be −0.0 (callers add 0.0 first)."""
    bits = z.to(tl.int32, bitcast=True)
    sortable = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits to reverse their order
    return (sortable.to(tl.int64) << 32) | (0xFFFFFFFF - o_v)


@triton.autotune(configs=_topk_configs(), key=["H", "K", "PRECISION"])
@triton.jit
def _topk_stats_kernel(
    h_ptr,
    w_ptr,
    keys_ptr,
    part_ptr,
    bias_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    v_per_split,
    n_splits,
    pre,
    softcap,
    post,
    K: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
):
    i_n, i_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BN), n_splits, GROUP_N)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = o_n < N
    v_start = i_s * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, V)

    b_m = tl.full([BN], -float("inf"), tl.float32)
    b_s = tl.zeros([BN], tl.float32)
    b_t = tl.zeros([BN], tl.float32)
    best = tl.full([BN, K], -9223372036854775808, tl.int64)
    for v0 in range(v_start, v_stop, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_stop
        z = logits_tile(h_ptr, w_ptr, stride_h, stride_w, o_n, o_v, m_n, m_v, H, BN, BV, BH, PRECISION)
        z = apply_head(z, bias_ptr, o_v, m_v, pre, softcap, post, HAS_BIAS, HAS_SOFTCAP)
        z = z + 0.0  # turns −0.0 into +0.0, so equal logits pack to equal values
        m_new = tl.maximum(b_m, tl.max(tl.where(m_v[None, :], z, -float("inf")), 1), propagate_nan=tl.PropagateNan.ALL)
        alpha = tl.exp(b_m - m_new)
        shift = z - m_new[:, None]
        e = tl.where(m_v[None, :], tl.exp(shift), 0.0)
        # T(m) = Σ e^{z−m}(z−m); moving to m' gives α·(T + (m − m')·S). On the first tile S = 0.
        b_t = alpha * (b_t + tl.where(b_s > 0, b_m - m_new, 0.0) * b_s) + tl.sum(e * shift, 1)
        b_s = b_s * alpha + tl.sum(e, 1)
        b_m = m_new
        keys = tl.where(m_v[None, :], _pack_keys(z, o_v), -9223372036854775808)
        candidates = tl.reshape(tl.join(best, tl.topk(keys, K)), [BN, 2 * K])
        best = tl.topk(candidates, K)

    o_k = tl.arange(0, K)
    p_keys = keys_ptr + (i_s * N + o_n)[:, None] * K + o_k[None, :]
    tl.store(p_keys, best, mask=m_n[:, None])
    p_out = part_ptr + i_s * N + o_n
    stride_k = n_splits * N
    tl.store(p_out, b_m, mask=m_n)
    tl.store(p_out + stride_k, b_s, mask=m_n)
    tl.store(p_out + 2 * stride_k, b_t, mask=m_n)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, int64 ids) from packed keys (the inverse of ``_pack_keys``; the bit map is an involution)."""
    sortable = (keys >> 32).to(torch.int32)
    bits = sortable ^ ((sortable >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


def topk_stats(h, w, k: int, head, *, precision: str, n_splits: int | None = None):
    """(ids int64 [N, k], final logits fp32 [N, k] sorted descending, lse fp32 [N], entropy fp32 [N]);
    ``head`` = (bias | None, pre, softcap | None, post = 1/τ)."""
    n_rows, vocab = h.shape[0], w.shape[0]
    pad_k = triton.next_power_of_2(k)
    block_v = max(pad_k, 32 if is_interpreter() else 128)
    splits, v_per_split = vocab_splits(n_rows, vocab, h.device, n_splits)
    v_per_split = triton.cdiv(v_per_split, block_v) * block_v
    splits = triton.cdiv(vocab, v_per_split)
    keys = torch.empty((splits, n_rows, pad_k), device=h.device, dtype=torch.int64)
    part = torch.empty((3, splits, n_rows), device=h.device, dtype=torch.float32)
    (bias, pre, softcap, post), (has_bias, has_softcap) = head_args(head, h)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BN"]) * splits,)  # noqa: E731
    with on_device(h):
        _topk_stats_kernel[grid](
            h,
            w,
            keys,
            part,
            bias,
            n_rows,
            vocab,
            h.shape[1],
            h.stride(0),
            w.stride(0),
            v_per_split,
            splits,
            pre,
            softcap,
            post,
            K=pad_k,
            PRECISION=precision,
            HAS_BIAS=has_bias,
            HAS_SOFTCAP=has_softcap,
            BV=block_v,
        )
    merged = keys.permute(1, 0, 2).reshape(n_rows, splits * pad_k)
    best = merged.topk(k, dim=1).values if splits > 1 or pad_k != k else merged
    logits, ids = unpack_keys(best)
    m, s, t = part
    m_all = m.amax(0)
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(0)
    t_all = (scale * (t + torch.where(s > 0, (m - m_all) * s, 0.0))).sum(0)
    lse = m_all + torch.log(s_all)
    return ids, logits, lse, torch.log(s_all) - t_all / s_all
