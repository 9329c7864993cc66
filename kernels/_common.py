"""Shared pieces of the Triton kernels: the logits-tile matmul, op codes and autotune configurations.

Nothing here touches the GPU at import time; configurations are plain lists and the interpreter
(``TRITON_INTERPRET=1``, kernels run on the CPU with numpy) gets exactly one small configuration.
"""

from __future__ import annotations

import itertools
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from opd_fast.backends.epilogue import MODES

# Op codes, passed to the kernels as constexpr MODE: opd_fast.backends.epilogue.MODES (csrc/epilogue.h's enum Mode
# equals it). Those below TOKEN_LOGPROB involve two models; JSD to TVD are the "terms modes": their statistics pass
# keeps each model's online (max, Σ e^{z − max}) only, and a second pass over the tile sums their per-element terms
# (:func:`terms_parts`) once both rows' lse are final. ENTROPY is a gradient pass only (of the student's entropy).
REVERSE_KL: tl.constexpr = tl.constexpr(MODES["reverse_kl"])
FORWARD_KL: tl.constexpr = tl.constexpr(MODES["forward_kl"])
JSD: tl.constexpr = tl.constexpr(MODES["jsd"])
SKEW_FORWARD_KL: tl.constexpr = tl.constexpr(MODES["skew_forward_kl"])
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(MODES["skew_reverse_kl"])
TVD: tl.constexpr = tl.constexpr(MODES["tvd"])
TOKEN_LOGPROB: tl.constexpr = tl.constexpr(MODES["token_logprob"])
LOGSUMEXP: tl.constexpr = tl.constexpr(MODES["logsumexp"])
ENTROPY: tl.constexpr = tl.constexpr(MODES["entropy"])


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


def on_device(t: torch.Tensor):
    """The context that launches kernels on ``t``'s GPU (nothing to enter for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def epilogue_block(width: int) -> int:
    """Columns per step of the chunked plan's terms and gradient passes: one wide vector per row (2048 on a GPU, 256
    under the interpreter, whose cost is per operation, not per element)."""
    return min(256 if is_interpreter() else 2048, triton.next_power_of_2(max(width, 16)))


def row_vectors(*vectors):
    """Per-row fp32 kernel operands."""
    return tuple(t.float().contiguous() for t in vectors)


def head_args(head, like):
    """Kernel arguments of a model's head (bias | None, pre, softcap | None, post) or of an unused model:
    (bias pointer, pre, softcap, post) and the constexprs (HAS_BIAS, HAS_SOFTCAP)."""
    if head is None:
        return (like, 1.0, 1.0, 1.0), (False, False)
    bias, pre, softcap, post = head
    values = (like if bias is None else bias, float(pre), 1.0 if softcap is None else float(softcap), float(post))
    return values, (bias is not None, softcap is not None)


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
def row_log_probs(z, lse_ptr, lo_ptr, o_n, m_n):
    """log p = (z − lse) − lse_lo for a [BN, BV] tile of final logits of rows o_n: each row's lse and its fp32
    rounding residual kept apart (linear_softmax._merge), accurate to ~ulp(log p) rather than ~ulp(lse)."""
    lse = tl.load(lse_ptr + o_n, mask=m_n, other=0.0)
    lo = tl.load(lo_ptr + o_n, mask=m_n, other=0.0)
    return (z - lse[:, None]) - lo[:, None]


# ---- accurate elementwise math (Triton core has no expm1/log1p/tanh, and libdevice does not run under the
# interpreter). Kahan's tricks: the rounding error of 1 + x, or of e^x, cancels in the ratio.


@triton.jit
def expm1(x):
    """e^x − 1, accurate for small |x|."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(u)))


@triton.jit
def log1p(x):
    """log(1 + x), accurate for small |x|."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def tanh(x):
    """tanh(x) = −expm1(−2|x|) / (2 + expm1(−2|x|)) with the sign of x: accurate near 0, no overflow."""
    e = expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_head(x, bias_ptr, o_v, m_v, pre, softcap, post, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Final logits of raw logits x (columns o_v): post · softcap·tanh(pre · (x + b) / softcap), post = 1/τ."""
    if HAS_BIAS:
        x = x + tl.load(bias_ptr + o_v, mask=m_v, other=0.0)
    x = x * pre
    if HAS_SOFTCAP:
        x = softcap * tanh(x / softcap)
    return x * post


@triton.jit
def head_chain(z, pre, softcap, post, HAS_SOFTCAP: tl.constexpr):
    """dz/dx from the final logits z: pre · post, times 1 − tanh² = 1 − (z / (softcap · post))² under a softcap."""
    if HAS_SOFTCAP:
        t = z / (softcap * post)
        return (1.0 - t * t) * (pre * post)
    return z * 0.0 + pre * post


@triton.jit
def x_minus_log1p(x):
    """x − log(1 + x) ≥ 0 without cancellation: with u = x / (2 + x), log1p(x) = 2 atanh(u), so
    x − log1p(x) = x² / (2 + x) − 2 (u³/3 + u⁵/5 + …); the series (|u| ≤ 1/3 for |x| ≤ 1/2) is cut where
    its terms drop below fp32 resolution. Larger |x| lose at most a few bits directly."""
    u = x / (2.0 + x)
    u2 = u * u
    series = 1.0 / 11 + u2 * (1.0 / 13 + u2 / 15)
    series = u * u2 * (1.0 / 3 + u2 * (1.0 / 5 + u2 * (1.0 / 7 + u2 * (1.0 / 9 + u2 * series))))
    small = x * x / (2.0 + x) - 2.0 * series
    return tl.where(tl.abs(x) <= 0.5, small, x - log1p(x))


@triton.jit
def logaddexp(a, b):
    """log(e^a + e^b) for a, b not both −inf."""
    high = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    return high + log1p(tl.exp(tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL) - high))


@triton.jit
def log_ratio_to_mixture(d, beta):
    """log(p / m) for m = (1 − β) p + β q and d = log q − log p: −log1p(x) with x = β·expm1(d) where that is
    accurate (x ≥ −1/2, d ≤ 30), else the log-add-exp of log(1 − β) and log β + d (exact where 1 + x would
    cancel, and for large d, where expm1 would overflow). For the student, (d, β); for the teacher, (−d, 1 − β)."""
    x = beta * expm1(tl.minimum(d, 30.0, propagate_nan=tl.PropagateNan.ALL))
    direct = (x >= -0.5) & (d <= 30.0)
    return tl.where(direct, -log1p(x), -logaddexp(tl.log(1.0 - beta), tl.log(beta) + d))


@triton.jit
def jsd_parts(lp_s, lp_t, beta):
    """JSD(β) per element, cancellation-free for every β (the closed forms of opd_fast.backends.jsd_math):
    (p_s, log(p_s / m), fs = p_s (x − log1p x), ft = p_t (y − log1p y)) with d = lp_t − lp_s, x = β·expm1(d),
    y = (1 − β)·expm1(−d); Σ fs = KL(p_s ‖ m) and Σ ft = KL(p_t ‖ m) since Σ p_s x = Σ p_t y = 0."""
    p_s = tl.exp(lp_s)
    p_t = tl.exp(lp_t)
    d = lp_t - lp_s
    x = beta * expm1(tl.minimum(d, 30.0, propagate_nan=tl.PropagateNan.ALL))
    y = (1.0 - beta) * expm1(tl.minimum(-d, 30.0, propagate_nan=tl.PropagateNan.ALL))
    # log(p_s / m) = −log1p(x) for d ≤ 30, except where 1 + x = (1 − β) + β e^d is small (x < −1/2): there
    # 1 + x would cancel and the log-add-exp of log(1 − β) and log β + d is exact (log_ratio_to_mixture's
    # branches; shared here with the teacher's side, which keeps this kernel's registers in bounds).
    log_beta = tl.log(beta)
    log_rest = tl.log(1.0 - beta)
    log_s = tl.where(x < -0.5, -logaddexp(log_rest, d + log_beta), -log1p(x))
    log_t = tl.where(y < -0.5, -logaddexp(log_beta, log_rest - d), -log1p(y))
    log_s = tl.where(d > 30.0, log_t - d, log_s)
    log_t = tl.where(d < -30.0, log_s + d, log_t)
    fs = tl.where(tl.abs(x) <= 0.5, p_s * x_minus_log1p(x), beta * (p_t - p_s) + p_s * log_s)
    ft = tl.where(tl.abs(y) <= 0.5, p_t * x_minus_log1p(y), (1.0 - beta) * (p_s - p_t) + p_t * log_t)
    return p_s, log_s, fs, ft


@triton.jit
def sign(x):
    """−1, 0 or 1 as the sign of x; NaN stays NaN (as torch.sign), so that a NaN logit reaches TVD's gradient."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x))


@triton.jit
def expm1_poly(x):
    """e^x − 1 without a logarithm or a division (:func:`expm1` takes both, and their registers): for |x| ≤ 1/2 its
    Taylor series through x⁸/8! (the rest is below 2e-8 relative), else e^x − 1 (at most ~2 ulps lost there, where
    |e^x − 1| ≥ 0.39). NaN stays NaN; −inf gives −1."""
    p = 1.0 / 40320
    p = 1.0 / 5040 + x * p
    p = 1.0 / 720 + x * p
    p = 1.0 / 120 + x * p
    p = 1.0 / 24 + x * p
    p = 1.0 / 6 + x * p
    p = 0.5 + x * p
    p = x + (x * x) * p
    return tl.where(tl.abs(x) <= 0.5, p, tl.exp(x) - 1.0)


@triton.jit
def mixture_factor(d, log_s, beta, MODE: tl.constexpr):
    """f = ∂D/∂p_s up to a constant (which the gradient's center removes) of the divergences through the mixture
    m = β p_t + (1 − β) p_s (MODE JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL), from log(p_s / m) = ``log_s`` and
    d = lp_t − lp_s, with log(p_t / m) = log_s + d ≤ log(1 / β) (nothing overflows):

        JSD(β)           D = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)   f = (1 − β) log(p_s / m)
        skew forward KL  D = KL(p_t ‖ m)                            f = −(1 − β) expm1(log(p_t / m))
        skew reverse KL  D = KL(p_s ‖ m)                            f = log(p_s / m) + β expm1(log(p_t / m))

    The skew KLs' derivatives, −(1 − β) p_t / m and log(p_s / m) + 1 − (1 − β) p_s / m = log(p_s / m) + β p_t / m,
    lose their constants (−(1 − β) and β): like JSD's, each f then vanishes where p_s = p_t, so that on
    near-uniform rows the centering does not subtract a constant of size β from itself (which left ~(Σ p_s − 1) β,
    a few 1e-9, in every G where plain fp32 gives ~2e-10). The same definitions as
    opd_fast.backends.torch_math.terms_parts and csrc/epilogue.h; expm1 as :func:`expm1_poly`, one exponential as
    p_t / m took (the terms pass of the streaming plan spilled on sm_80 with :func:`expm1`'s logarithm and
    division). e^{log_s + d} is as accurate as e^{log(p_t / m)}: where |d| is large its rounding, ~ulp(|d|), is what
    any fp32 log-ratio of log-probabilities of that size carries."""
    if MODE == JSD:
        f = (1.0 - beta) * log_s
    elif MODE == SKEW_FORWARD_KL:
        f = -(1.0 - beta) * expm1_poly(log_s + d)
    else:
        f = log_s + beta * expm1_poly(log_s + d)
    return f


@triton.jit
def terms_parts(lp_s, lp_t, beta, MODE: tl.constexpr):
    """The terms pass of JSD, the skew KLs and TVD (MODE) per element, from the final log-probs lp_s, lp_t:
    (p_s, pg, fs, ft). The pass sums (fs, ft, pg) per row into terms[0..2], and
    opd_fast.backends.online_softmax.terms_loss makes the row's D of them (JSD β Σ ft + (1 − β) Σ fs, skew forward KL
    Σ ft, skew reverse KL and TVD Σ fs) and its center Σ pg. fs and ft are jsd_parts' (Σ fs = KL(p_s ‖ m),
    Σ ft = KL(p_t ‖ m)), TVD's ½ |p_s − p_t| and 0; pg = p_s f with f = ∂D/∂p_s up to a constant
    (:func:`mixture_factor`; TVD ½ sign(p_s − p_t)), so that the logit gradient is p_s (f − center)
    (:func:`terms_grad`). pg is (1 − β) p_s log(p_s / m) (JSD), −(1 − β) p_s expm1(log(p_t / m)) (skew forward KL),
    p_s (log(p_s / m) + β expm1(log(p_t / m))) (skew reverse KL) and
    ½ p_s sign(p_s − p_t) (TVD)."""
    if MODE == TVD:
        p_s = tl.exp(lp_s)
        diff = p_s - tl.exp(lp_t)
        fs = 0.5 * tl.abs(diff)
        ft = tl.zeros_like(fs)
        f = 0.5 * sign(diff)
    else:
        p_s, log_s, fs, ft = jsd_parts(lp_s, lp_t, beta)
        f = mixture_factor(lp_t - lp_s, log_s, beta, MODE)
    return p_s, p_s * f, fs, ft


@triton.jit
def terms_grad(lp_s, lp_t, p_s, center, beta, MODE: tl.constexpr):
    """The logit gradient pg − p_s · center = p_s (f − center) of JSD, the skew KLs and TVD (before the head's chain
    factor and the row weight), ``center`` the row's Σ pg broadcast to the tile. Factored, the center meets the part
    of f it cancels against before any rounding by p_s; and f is the terms pass's own (log_ratio_to_mixture takes
    jsd_parts' branches where d ≤ 30, and alone it keeps the gradient kernels' registers in bounds: they hold a
    logits tile, both log-probs and the teacher's tile at once), so where a row's mass sits on one column in fp32
    (p_s = 1 there, 0 elsewhere) the center is that column's f to the last bit and G is exactly 0, as autograd's."""
    if MODE == TVD:
        f = 0.5 * sign(p_s - tl.exp(lp_t))
    else:
        d = lp_t - lp_s
        f = mixture_factor(d, log_ratio_to_mixture(d, beta), beta, MODE)
    return p_s * (f - center)


@triton.jit
def grouped_pid(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row block, column block) of a 1-D program id, rasterized in groups of GROUP row blocks: the programs
    that run together share a few row blocks (their H tiles stay in L2) and sweep the column blocks in step
    (each W tile is read once per group), as in Triton's matmul tutorial."""
    per_group = GROUP * n_cols
    first_row = (pid // per_group) * GROUP
    rows_here = tl.minimum(n_rows - first_row, GROUP)
    i_row = first_row + (pid % per_group) % rows_here
    i_col = (pid % per_group) // rows_here
    return i_row, i_col
