"""The statistics pass of the chunked plan's fused epilogue, on fp32 logits tiles that cuBLAS wrote.

The Triton twin of csrc/softmax_stats.cu's statistics pass, for the shared sweep of :mod:`opd_fast.backends.sweep`
(with :mod:`opd_fast.kernels.chunk_terms` and :mod:`opd_fast.kernels.chunk_grad`, the per-tile math of
``TritonEpilogue``): a tile holds the raw logits x = h·Wᵀ of ``width`` vocabulary columns [v_lo, v_lo + width) for
r token rows (row stride ``stride_z``); each model's head (bias, scale, softcap) and 1/τ turn them into final
logits z on the fly (:func:`opd_fast.kernels._common.apply_head`).

``stats_update`` (grid: one program per row) walks the row in blocks of BV columns keeping per-lane
online-softmax state — m = max z, s = Σ e^{z − m}, one exponential per model and element
(:func:`_online_step`), and one accumulator (reverse KL: Σ e^{z_s − m_s}((z_s − m_s) − (z_t − r)), relative to
the student's max and to r, the teacher's logit at that max, so that nothing of size |z| cancels and a
dominant token's own term is exactly 0; forward KL: the same with the models' roles swapped; token: z_y) —
then combines the lanes (a tree, so fp32 error does not grow with the row length) and merges the result into
the row's running state [5, r] from earlier tiles, its accumulator relative to both models' maxes. Same layout
and meaning as csrc/epilogue.h and opd_fast.backends.online_softmax.finalize. Full blocks load without a mask
(128-bit loads where the row stride is a multiple of 16 elements: the sweep pads it to 64 on CUDA), the row's last
partial block with one. Given an entropy state [3, r] (WITH_ENTROPY), the same read also merges the student's
tile into it: per lane one more sum a = Σ e^{z_s − m_s}(z_s − m_s) next to the student's own (m_s, s_s), moved
with them at no exponential of its own (:func:`_entropy_lane_add`), combined across lanes and merged into the
row's (m, s, a) (:func:`_entropy_row_merge`; H = log s − a / s, opd_fast.backends.online_softmax.finalize_entropy).
Without it the kernel compiles to the same code as before the entropy came in.

Every program reads its tile once from HBM: with the chunked plan, this pass, the terms pass and the gradient pass
(L2 for the second pass when it fits) are the only memory traffic besides the GEMMs'.
"""

from __future__ import annotations

import triton
import triton.language as tl

from opd_fast.backends.epilogue import MODES
from opd_fast.kernels._common import (
    FORWARD_KL,
    REVERSE_KL,
    TOKEN_LOGPROB,
    apply_head,
    head_args,
    is_interpreter,
    on_device,
)


def _stats_block(width: int) -> int:
    """Columns per step of the statistics pass: 1024 on a GPU, 8 per thread of its 4 warps, two 128-bit loads per
    model and step, the lanes' state (six values for KL, seven with the student's entropy) and a step in flight
    within 128 registers (four blocks of 128 threads per SM; tests/kernels/test_triton_aot.py holds every mode to it,
    with and without the entropy); 256 under the interpreter."""
    return min(256 if is_interpreter() else 1024, triton.next_power_of_2(max(width, 16)))


@triton.jit
def _rescaled(m, s, m_new):
    """Σ e^{z − m} = s brought to the larger max m_new (0 for an empty state, m = −inf; NaN stays NaN)."""
    return tl.where(m == -float("inf"), 0.0, tl.exp(m - m_new) * s)


@triton.jit
def _kl_shift(m, s, m_other, acc, m_new, m_other_new):
    """A KL accumulator Σ e^{x − m}((x − m) − (y − m_other)) with weights s moved to larger references m_new ≥ m
    and m_other_new (opd_fast.backends.online_softmax.kl_shift); 0 for an empty state."""
    return _rescaled(m, acc + s * ((m - m_new) - (m_other - m_other_new)), m_new)


@triton.jit
def _online_step(m, x):
    """One element x per lane into an online (max m, Σ e^{z − m}) state with a single exponential: of m and x the
    larger becomes the max and e^{−|x − m|} weighs the smaller — the old sum when x is the new max (``grow``),
    x's own term otherwise. Returns (new max, grow, factor of the old sum, weight of x, and the exponent −|x − m|
    itself, m − x or x − m). An empty state (m = −inf) or x = −inf gives weight 0 (the shift is 0 when both are
    −inf, never −inf + inf); NaN in m or x makes the max and x's weight NaN, and a NaN max stays
    (``propagate_nan``)."""
    m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    grow = x > m
    shift = tl.where(grow, m, x) - tl.where(m_new == -float("inf"), 0.0, m_new)
    t = tl.exp(shift)
    return m_new, grow, tl.where(grow, t, 1.0), tl.where(grow, 1.0, t), shift


@triton.jit
def _lane_add(m, s, x):
    """Per lane: add one block of logits x (−inf past the row's end) to the online state (m, s)."""
    m_new, _, old, new, _ = _online_step(m, x)
    return m_new, s * old + new


@triton.jit
def _entropy_lane_add(a, s, grow, old, new, shift):
    """Per lane: the entropy sum a = Σ e^{x − m}(x − m) of logits x (weights s = Σ e^{x − m}) after the online step
    of :func:`_online_step` that gave (grow, old, new, shift): no exponential of its own. When x is the new max the
    old terms move by m − x = shift and are weighed by old = e^{shift} (the rule of :func:`_kl_shift` against a
    model whose logits are all 0) and x's own term is 0; else a gains x's term new · (x − m), x − m = shift. An
    exponent of −inf (an empty state, or x = −inf past the row's end) has weight 0: taken as −FLT_MAX there, its
    product is 0, not NaN. NaN stays."""
    d = tl.maximum(shift, -3.4028234663852886e38, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(grow, old * (a + s * d), a + new * d)


@triton.jit
def _kl_lane_add(m, s, r, acc, m_o, s_o, x, y, valid, t, MASKED: tl.constexpr, TRACK: tl.constexpr):
    """Per lane: add one block of the lead model's logits x and the other's y to the KL state: the lead's (m, s),
    the other's (m_o, s_o) and acc = Σ e^{x − m}((x − m) − (y − r)), relative to the lead's max m and to r, the
    other's logit where the lead's max is (not the other's max: the lead's dominant term is then exactly 0 and
    stays so, and moving to the other's row max later is one rounding, :func:`_kl_row_merge`). When x is a new
    max, the old terms move by (m − x) − (r − y) and x's own term is 0. MASKED: lanes past the row's end
    (valid = False, x = y = −inf) add nothing. TRACK (1: the lead's logits x, 2: the other's y, 0: none): t is the
    entropy sum of those logits (:func:`_entropy_lane_add`), moved along with their (m, s); returned unchanged
    otherwise."""
    m_new, grow, old, new, shift = _online_step(m, x)
    r_new = tl.where(grow, y, r)
    moved = tl.where(m == -float("inf"), 0.0, old * (acc + s * ((m - m_new) - (r - r_new))))
    term = new * ((x - m_new) - (y - r_new))
    if MASKED:
        term = tl.where(valid, term, 0.0)
    mo_new, grow_o, old_o, new_o, shift_o = _online_step(m_o, y)
    if TRACK == 1:
        t = _entropy_lane_add(t, s, grow, old, new, shift)
    elif TRACK == 2:
        t = _entropy_lane_add(t, s_o, grow_o, old_o, new_o, shift_o)
    return m_new, s * old + new, r_new, moved + term, mo_new, s_o * old_o + new_o, t


@triton.jit
def _lanes_to_row(m, s):
    """The lanes' (max, Σ e^{z − max}) combined into the row's: a tree sum, so fp32 error does not grow with the
    row's length."""
    row_m = tl.max(m, 0)
    return row_m, tl.sum(_rescaled(m, s, row_m), 0)


@triton.jit
def _row_merge(state, n_state, row_m, row_s):
    """Merge a tile's row (max, Σ e^{z − max}) into the row's running (m, s) at ``state`` (stride n_state); the
    tile keeps its own max as the shift."""
    old_m = tl.load(state)
    new_m = tl.maximum(old_m, row_m, propagate_nan=tl.PropagateNan.ALL)
    tl.store(state, new_m)
    tl.store(state + n_state, _rescaled(old_m, tl.load(state + n_state), new_m) + _rescaled(row_m, row_s, new_m))


@triton.jit
def _entropy_row_merge(p_entropy, n_entropy, m, s, a):
    """Lanes → row, then merged into the row's running entropy state (m, s, a) at ``p_entropy`` (stride
    n_entropy; opd_fast.backends.online_softmax.finalize_entropy): every lane's a moved to the row's max (the rule of
    :func:`_kl_shift` against a zero model) and summed in a tree, then the row's and the state's moved to their
    common max (opd_fast.backends.torch_math.merge_entropy). (m, s) merge as :func:`_row_merge` merges the
    statistics' own: from the same lanes, the same bits."""
    row_m, row_s = _lanes_to_row(m, s)
    row_a = tl.sum(_kl_shift(m, s, 0.0, a, row_m, 0.0), 0)
    old_m = tl.load(p_entropy)
    new_m = tl.maximum(old_m, row_m, propagate_nan=tl.PropagateNan.ALL)
    old_a = _kl_shift(old_m, tl.load(p_entropy + n_entropy), 0.0, tl.load(p_entropy + 2 * n_entropy), new_m, 0.0)
    tl.store(p_entropy + 2 * n_entropy, old_a + _kl_shift(row_m, row_s, 0.0, row_a, new_m, 0.0))
    _row_merge(p_entropy, n_entropy, row_m, row_s)


@triton.jit
def _kl_row_merge(state_lead, state_other, acc_ptr, n_state, m, s, r, acc, m_o, s_o):
    """Lanes → row, then merged into the row's running KL state: the lead model's (m, s) at ``state_lead``
    (stride n_state), the other's at ``state_other`` and the accumulator, relative to both models' maxes (the
    state's convention, opd_fast.backends.online_softmax.finalize), at ``acc_ptr``.

    Every lane's accumulator moves to the row's lead max and to r at it (the lane that holds the max moves by 0),
    then the sum moves once to the other model's row max: Σ e^{x − m}((x − m) − (y − m_o)) = acc + s (m_o − r).
    Where the lead is one-hot in fp32 (s = 1: the other terms sum below half an ulp of 1) the accumulator is thus
    m_o − y at the lead's token rounded once, and D the same rounding of log p_s − log p_t there as the gradient
    pass forms (when the other model is one-hot too), so that their difference in G = p_s (log p_s − log p_t − D)
    is 0, as in autograd's, not ~ulp(D) from a rounding per move."""
    row_m, row_s = _lanes_to_row(m, s)
    row_mo, row_so = _lanes_to_row(m_o, s_o)
    row_r = tl.max(tl.where(m == row_m, r, -float("inf")), 0)
    row_acc = tl.sum(_kl_shift(m, s, r, acc, row_m, row_r), 0) + row_s * (row_mo - row_r)
    old_m = tl.load(state_lead)
    old_mo = tl.load(state_other)
    new_m = tl.maximum(old_m, row_m, propagate_nan=tl.PropagateNan.ALL)
    new_mo = tl.maximum(old_mo, row_mo, propagate_nan=tl.PropagateNan.ALL)
    acc_sum = _kl_shift(old_m, tl.load(state_lead + n_state), old_mo, tl.load(acc_ptr), new_m, new_mo)
    tl.store(acc_ptr, acc_sum + _kl_shift(row_m, row_s, row_mo, row_acc, new_m, new_mo))
    _row_merge(state_lead, n_state, row_m, row_s)
    _row_merge(state_other, n_state, row_mo, row_so)


@triton.jit
def _final_logits(p_z, bias_ptr, o_c, valid, pre, cap, post, HAS_BIAS, HAS_SOFTCAP, MASKED: tl.constexpr):
    """A block of a row's final logits at columns o_c. A full block loads without a mask — contiguous and, when
    the row stride is a multiple of 16 elements, 128-bit loads; MASKED (the row's last, partial block): columns
    past the end (valid = False) read as −inf."""
    x = tl.load(p_z + o_c, mask=valid, other=0.0) if MASKED else tl.load(p_z + o_c)
    z = apply_head(x, bias_ptr, o_c, valid, pre, cap, post, HAS_BIAS, HAS_SOFTCAP)
    if MASKED:
        z = tl.where(valid, z, -float("inf"))
    return z


@triton.jit
def _stats_step(
    p_zs,
    p_zt,
    o_c,
    width,
    col,
    bias_s_ptr,
    bias_t_ptr,
    pre_s,
    cap_s,
    post_s,
    pre_t,
    cap_t,
    post_t,
    m_s,
    s_s,
    m_t,
    s_t,
    r,
    acc,
    a_e,
    MODE: tl.constexpr,
    HAS_BIAS_S: tl.constexpr,
    HAS_SOFTCAP_S: tl.constexpr,
    HAS_BIAS_T: tl.constexpr,
    HAS_SOFTCAP_T: tl.constexpr,
    MASKED: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """One block of columns o_c into the lanes' state (m_s, s_s, m_t, s_t, r, acc) of ``_stats_update_kernel`` and,
    WITH_ENTROPY, the student's entropy sum a_e (relative to the lanes' own (m_s, s_s), its exponential theirs)."""
    valid = o_c < width
    a = _final_logits(p_zs, bias_s_ptr, o_c, valid, pre_s, cap_s, post_s, HAS_BIAS_S, HAS_SOFTCAP_S, MASKED)
    if MODE < TOKEN_LOGPROB:  # two models
        b = _final_logits(p_zt, bias_t_ptr, o_c, valid, pre_t, cap_t, post_t, HAS_BIAS_T, HAS_SOFTCAP_T, MASKED)
    if MODE == REVERSE_KL:  # the student leads
        m_s, s_s, r, acc, m_t, s_t, a_e = _kl_lane_add(
            m_s, s_s, r, acc, m_t, s_t, a, b, valid, a_e, MASKED, 1 if WITH_ENTROPY else 0
        )
    elif MODE == FORWARD_KL:  # the teacher leads
        m_t, s_t, r, acc, m_s, s_s, a_e = _kl_lane_add(
            m_t, s_t, r, acc, m_s, s_s, b, a, valid, a_e, MASKED, 2 if WITH_ENTROPY else 0
        )
    else:
        if WITH_ENTROPY:
            m_new, grow, old, new, shift = _online_step(m_s, a)  # _lane_add's step, shared with a_e
            a_e = _entropy_lane_add(a_e, s_s, grow, old, new, shift)
            m_s, s_s = m_new, s_s * old + new
        else:
            m_s, s_s = _lane_add(m_s, s_s, a)
        if MODE < TOKEN_LOGPROB:  # the terms modes: each model's (m, s) alone
            m_t, s_t = _lane_add(m_t, s_t, b)
        if MODE == TOKEN_LOGPROB:
            acc += tl.where((o_c == col) & valid, a, 0.0)
    return m_s, s_s, m_t, s_t, r, acc, a_e


@triton.jit
def _stats_update_kernel(
    zs_ptr,
    zt_ptr,
    ids_ptr,
    state_ptr,
    bias_s_ptr,
    bias_t_ptr,
    n_state,
    width,
    stride_z,
    v_lo,
    pre_s,
    cap_s,
    post_s,
    pre_t,
    cap_t,
    post_t,
    entropy_ptr,
    n_entropy,
    MODE: tl.constexpr,
    HAS_BIAS_S: tl.constexpr,
    HAS_SOFTCAP_S: tl.constexpr,
    HAS_BIAS_T: tl.constexpr,
    HAS_SOFTCAP_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BV: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    p_zs = zs_ptr + i_n * stride_z
    p_zt = zt_ptr + i_n * stride_z
    col = 0
    if MODE == TOKEN_LOGPROB:
        col = tl.load(ids_ptr + i_n) - v_lo  # the token's column in this tile (outside [0, width): not here)
    # Per-lane online state: lane j sees columns j, j + BV, …; combined once at the end. r: KL's reference. a_e:
    # WITH_ENTROPY, the student's Σ e^{z − m_s}(z − m_s) (without it, never changed: the loop does not carry it).
    m_s = tl.full([BV], -float("inf"), tl.float32)
    s_s = tl.zeros([BV], tl.float32)
    m_t = tl.full([BV], -float("inf"), tl.float32)
    s_t = tl.zeros([BV], tl.float32)
    r = tl.zeros([BV], tl.float32)
    acc = tl.zeros([BV], tl.float32)
    a_e = tl.zeros([BV], tl.float32)
    full = width - width % BV
    for c0 in range(0, full, BV):
        m_s, s_s, m_t, s_t, r, acc, a_e = _stats_step(
            p_zs, p_zt, c0 + tl.arange(0, BV), width, col, bias_s_ptr, bias_t_ptr,
            pre_s, cap_s, post_s, pre_t, cap_t, post_t, m_s, s_s, m_t, s_t, r, acc, a_e,
            MODE, HAS_BIAS_S, HAS_SOFTCAP_S, HAS_BIAS_T, HAS_SOFTCAP_T, False, WITH_ENTROPY,
        )  # fmt: skip
    if full < width:
        m_s, s_s, m_t, s_t, r, acc, a_e = _stats_step(
            p_zs, p_zt, full + tl.arange(0, BV), width, col, bias_s_ptr, bias_t_ptr,
            pre_s, cap_s, post_s, pre_t, cap_t, post_t, m_s, s_s, m_t, s_t, r, acc, a_e,
            MODE, HAS_BIAS_S, HAS_SOFTCAP_S, HAS_BIAS_T, HAS_SOFTCAP_T, True, WITH_ENTROPY,
        )  # fmt: skip

    # Lanes → row (a tree reduction), then merge into the running state of earlier tiles.
    p_state = state_ptr + i_n
    if MODE == REVERSE_KL:
        _kl_row_merge(p_state, p_state + 2 * n_state, p_state + 4 * n_state, n_state, m_s, s_s, r, acc, m_t, s_t)
    elif MODE == FORWARD_KL:
        _kl_row_merge(p_state + 2 * n_state, p_state, p_state + 4 * n_state, n_state, m_t, s_t, r, acc, m_s, s_s)
    else:
        _row_merge(p_state, n_state, *_lanes_to_row(m_s, s_s))
        if MODE < TOKEN_LOGPROB:
            _row_merge(p_state + 2 * n_state, n_state, *_lanes_to_row(m_t, s_t))
        if MODE == TOKEN_LOGPROB:
            tl.store(p_state + 4 * n_state, tl.load(p_state + 4 * n_state) + tl.sum(acc, 0))
    if WITH_ENTROPY:
        _entropy_row_merge(entropy_ptr + i_n, n_entropy, m_s, s_s, a_e)


def stats_update(state, zs, zt, ids, head_s, head_t, v_lo: int, mode: str, entropy=None) -> None:
    """Merge a tile into ``state`` [5, r] (m_s, s_s, m_t, s_t, acc) and, when given, the student's tile into the
    ``entropy`` state [3, r] (m, s, a = Σ e^{z − m}(z − m); opd_fast.backends.online_softmax.finalize_entropy) in the
    same read; see the module docstring. ``zs`` and ``zt`` share their row stride (the sweep's workspace)."""
    rows, width = zs.shape
    if rows == 0:
        return
    if zt is not None and zt.stride() != zs.stride():
        raise ValueError(f"the two models' tiles must share their strides, got {zs.stride()} and {zt.stride()}")
    if entropy is not None and (entropy.shape != (3, rows) or entropy.stride(1) != 1 or entropy.dtype != state.dtype):
        raise ValueError(
            f"the entropy state must be [3, {rows}] with unit column stride in the state's dtype {state.dtype}, got "
            f"{list(entropy.shape)} with strides {entropy.stride()} in {entropy.dtype}"
        )
    (bias_s, pre_s, cap_s, post_s), (has_bias_s, has_cap_s) = head_args(head_s, zs)
    (bias_t, pre_t, cap_t, post_t), (has_bias_t, has_cap_t) = head_args(head_t, zs)
    with on_device(zs):
        _stats_update_kernel[(rows,)](
            zs,
            zs if zt is None else zt,
            zs if ids is None else ids,
            state,
            bias_s,
            bias_t,
            state.shape[1],
            width,
            zs.stride(0),
            v_lo,
            pre_s,
            cap_s,
            post_s,
            pre_t,
            cap_t,
            post_t,
            state if entropy is None else entropy,  # the entropy state (unread without it)
            0 if entropy is None else entropy.stride(0),
            MODE=MODES[mode],
            HAS_BIAS_S=has_bias_s,
            HAS_SOFTCAP_S=has_cap_s,
            HAS_BIAS_T=has_bias_t,
            HAS_SOFTCAP_T=has_cap_t,
            WITH_ENTROPY=entropy is not None,
            BV=_stats_block(width),
        )
