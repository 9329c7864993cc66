"""What is specific to the Triton backend's kernels; the contract every backend meets (values, gradients, plans,
dtypes, shapes, top-k) is tests/backends/test_backend_contract.py, and the kernels' compiled configurations are
tests/kernels/test_triton_aot.py.

The mixture divergences' kernels (the terms pass and the logit gradient of JSD, the skew KLs and TVD, and forward
KL's gradient with a center) are checked here one kernel at a time against the per-element formulas of
kernels/_common.py's terms_parts, evaluated in float64 on the very log-probabilities the kernel forms (identity
heads, logits given exactly: the streaming kernels take them through an identity weight), so that what is measured
is the kernel's own arithmetic: within a few fp32 ulps of each formula's parts, at any β.

Runs on the GPU when there is one, else in Triton's CPU interpreter (tiny shapes).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import DEVICE

from opd_fast import last_filter_stats, linear_token_logprobs
from opd_fast.backends import triton_backend

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(triton_backend is None, reason="no triton"),
    # the interpreter (NumPy) warns where a kernel computes inf or NaN in a branch that tl.where then discards
    pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning"),
]
TERMS_MODES = ["jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
BETAS = [1e-3, 0.3, 0.5, 0.9, 1 - 1e-3]
EPS = torch.finfo(torch.float32).eps
# Errors allowed, in fp32 ulps of the formulas' parts (their absolute values summed, spread as _formulas says): the
# kernels round each part a few times and sum the row in a tree (measured under the interpreter: at most 1.1).
ULPS = 8


def test_token_logprobs_filter_keeps_the_token_column():
    """Streaming plan: with a threshold above every probability only the tiles holding a row's token
    survive, and the gradient is exactly W_y − Σ_{v in those tiles} p_v W_v."""
    from opd_fast.kernels.linear_grad import tile_shape

    g = torch.Generator().manual_seed(8)
    h = torch.randn(8, 16, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(256, 16, generator=g) * 0.2).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 256, (8,), generator=g).to(DEVICE)
    out = linear_token_logprobs(h, w, ids, backend="triton", filter_eps=0.99, plan="streaming")
    (dh,) = torch.autograd.grad(out.sum(), h)
    assert last_filter_stats()["skipped"] > 0
    _, bv = tile_shape()
    kept_tiles = torch.zeros(-(-256 // bv), dtype=torch.bool, device=DEVICE)
    kept_tiles[ids // bv] = True  # all 8 rows share one row block
    kept = kept_tiles.repeat_interleave(bv)[:256]
    with torch.no_grad():
        p = torch.softmax(h @ w.T, dim=-1)
        expected = w[ids] - (p * kept) @ w
    torch.testing.assert_close(dh, expected, rtol=1e-4, atol=1e-5)


# ---- the mixture divergences, kernel by kernel ------------------------------------------------------------------


def _logit_pairs(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits [rows, width] in fp32 with the awkward rows: spread out, one or both peaked (on the
    same token and on different ones, e^-30 and less beside it), equal rows (TVD's sign 0, d = 0), near-equal ones
    (KLs of ~1e-7 that any cancellation would lose), and logits near 1e3 (an lse whose fp32 rounding matters)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(rows, width, generator=g) * 3
    zt = torch.randn(rows, width, generator=g) * 3
    hot = torch.randint(0, width, (2,), generator=g)
    zs[1, hot[0]] += 30
    zs[2, hot[0]] += 25
    zt[2, hot[1]] += 25
    zt[3, hot[1]] += 40
    zt[4] = zs[4]
    zt[5] = zs[5] + torch.randn(width, generator=g) * 1e-3
    zs[6] += 1e3
    zt[6] -= 5e2
    return zs, zt


def _row_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's lse as the kernels take it: rounded to fp32, and its residual."""
    lse = torch.logsumexp(z.double(), dim=-1)
    rounded = lse.float()
    return rounded, (lse - rounded.double()).float()


def _log_probs(z: torch.Tensor, lse: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The fp32 log-probabilities (z − lse) − lse_lo the kernels form, in float64."""
    return ((z - lse[0][:, None]) - lse[1][:, None]).double()


def _formulas(lp_s: torch.Tensor, lp_t: torch.Tensor, mode: str, beta: float):
    """Per element in float64, the terms pass's (fs, ft, pg) and, for each, the size of what fp32 rounds in it: the
    table of kernels/_common.py's terms_parts, with jsd_parts' fs = p_s (x − log1p x), ft = p_t (y − log1p y),
    x = β expm1(d), y = (1 − β) expm1(−d), d = lp_t − lp_s. A size is the sum of the parts' absolute values (where
    |x| ≤ 1/2 fs has no cancelling parts, the series: its size is itself) times 1 + |lp_s| + |lp_t|: the exponential
    of an fp32 argument of size L, or of a log-ratio formed from such arguments, is good to ~L ulps only (the GPU's
    e^x is 2^(x log2 e), its argument rounded)."""
    p_s, p_t = lp_s.exp(), lp_t.exp()
    spread = 1 + lp_s.abs() + lp_t.abs()
    if mode == "tvd":
        diff = p_s - p_t
        fs, pg = 0.5 * diff.abs(), 0.5 * p_s * torch.sign(diff)
        return (fs, torch.zeros_like(fs), pg), (0.5 * (p_s + p_t) * spread, torch.zeros_like(fs), pg.abs() * spread)
    d = lp_t - lp_s
    x, y = beta * torch.expm1(d), (1 - beta) * torch.expm1(-d)
    fs, ft = p_s * (x - torch.log1p(x)), p_t * (y - torch.log1p(y))
    size_fs = torch.where(x.abs() <= 0.5, fs, p_s * (x.abs() + torch.log1p(x).abs()))
    size_ft = torch.where(y.abs() <= 0.5, ft, p_t * (y.abs() + torch.log1p(y).abs()))
    log_s = -torch.log1p(x)  # log(p_s / m), m / p_s = 1 + x: exactly 0 where d = 0, unlike lp_s − log m
    log_t = log_s + d  # log(p_t / m), as the kernels form it
    # p_s expm1(log(p_t / m)) and its size: itself, and p_s p_t / m for what the rounding of an fp32 log_t leaves
    # in it (that is all where p_s = p_t and log_t = 0 exactly, and the f of either skew KL, and G, vanish)
    expm1_t = p_s * torch.expm1(log_t)
    size_t = expm1_t.abs() + p_s * log_t.exp()
    if mode == "jsd":
        pg = size_pg = (1 - beta) * p_s * log_s
    elif mode == "skew_forward_kl":  # f = −(1 − β) expm1(log(p_t / m))
        pg, size_pg = -(1 - beta) * expm1_t, (1 - beta) * size_t
    else:  # f = log(p_s / m) + β expm1(log(p_t / m))
        pg, size_pg = p_s * log_s + beta * expm1_t, p_s * log_s.abs() + beta * size_t
    return (fs, ft, pg), (size_fs * spread, size_ft * spread, size_pg.abs() * spread)


def _within_ulps(ours: torch.Tensor, exact: torch.Tensor, size: torch.Tensor, ulps: float = ULPS) -> bool:
    return bool(((ours.double().cpu() - exact).abs() <= ulps * EPS * size + 1e-30).all())


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mode", TERMS_MODES)
def test_chunk_terms_update_sums_the_formulas(mode, beta):
    """chunk_terms.terms_update over two tiles of a row (the sweep's vocabulary tiles: the sums add up), 600 and
    77 columns (several blocks and a masked one), with a bias on the student's head."""
    from opd_fast.kernels.chunk_terms import terms_update

    zs, zt = _logit_pairs(7, 677, seed=1)
    bias = torch.randn(677, generator=torch.Generator().manual_seed(2))
    zs_final = zs + bias
    lse_s, lse_t = _row_lse(zs_final), _row_lse(zt)
    terms = torch.zeros(3, 7, device=DEVICE)
    lse = tuple(x.to(DEVICE) for x in (*lse_s[:1], *lse_t[:1], *lse_s[1:], *lse_t[1:]))
    for lo, hi in [(0, 600), (600, 677)]:
        head_s = (bias[lo:hi].to(DEVICE), 1.0, None, 1.0)
        terms_update(terms, zs[:, lo:hi].to(DEVICE), zt[:, lo:hi].to(DEVICE), lse, head_s, None, mode, beta)
    exact, size = _formulas(_log_probs(zs_final, lse_s), _log_probs(zt, lse_t), mode, beta)
    for name, ours, e, sz in zip(("fs", "ft", "pg"), terms, exact, size):
        assert _within_ulps(ours, e.sum(-1), sz.sum(-1)), (name, (ours.double().cpu() - e.sum(-1)).abs().max())


def _gradient(lp_s, lp_t, center, mode, beta):
    """G = pg − p_s · center (forward KL: p_s − p_t − p_s · center) in float64, and the size of its parts."""
    p_s = lp_s.exp()
    if mode == "forward_kl":
        p_t = lp_t.exp()
        spread = 1 + lp_s.abs() + lp_t.abs()
        return p_s - p_t - p_s * center[:, None], (p_s + p_t + p_s * center.abs()[:, None]) * spread
    (_, _, pg), (_, _, size) = _formulas(lp_s, lp_t, mode, beta)
    return pg - p_s * center[:, None], size + p_s * center.abs()[:, None] * (1 + lp_s.abs())


def _centers(lp_s, lp_t, mode, beta) -> torch.Tensor:
    """The rows' center as the gradient pass reads it, fp32: Σ pg (forward KL: the shift −w/(1 − w) of a hard-label
    weight w = 0.3 on one row, 0 on the others)."""
    if mode == "forward_kl":
        center = torch.zeros(lp_s.shape[0])
        center[2] = -0.3 / 0.7
        return center
    return _formulas(lp_s, lp_t, mode, beta)[0][2].sum(-1).float()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mode", [*TERMS_MODES, "forward_kl"])
def test_chunk_logit_grad_is_pg_minus_p_s_times_the_center(mode, beta):
    """chunk_grad.logit_grad of the mixture divergences and of forward KL (which reads the center now) on a
    tile of 300 columns at v_lo = 0, fp32 out, the row weights folded in."""
    from opd_fast.kernels.chunk_grad import logit_grad

    zs, zt = _logit_pairs(7, 300, seed=3)
    lse_s, lse_t = _row_lse(zs), _row_lse(zt)
    lp_s, lp_t = _log_probs(zs, lse_s), _log_probs(zt, lse_t)
    center = _centers(lp_s, lp_t, mode, beta)
    row_weight = torch.linspace(0.5, 2.0, 7)
    stats = [torch.zeros(7), lse_s[0], lse_t[0], center, lse_s[1], lse_t[1]]
    out = torch.empty(7, 300, device=DEVICE)
    args = (None, [x.to(DEVICE) for x in stats], row_weight.to(DEVICE), None, None, 0, mode, beta, out)
    logit_grad(zs.to(DEVICE), zt.to(DEVICE), *args)
    exact, size = _gradient(lp_s, lp_t, center.double(), mode, beta)
    w = row_weight.double()[:, None]
    assert _within_ulps(out, exact * w, size * w), (out.double().cpu() - exact * w).abs().max()


def _identity_operands(zs: torch.Tensor, zt: torch.Tensor):
    """Streaming operands whose logits are ``zs`` and ``zt`` exactly: the logits as hidden states of an identity
    weight (each logit one product, the rest exact zeros, also in an fp32 'ieee' tl.dot)."""
    eye = torch.eye(zs.shape[1], device=DEVICE)
    return zs.to(DEVICE).contiguous(), eye, zt.to(DEVICE).contiguous(), eye


@pytest.mark.parametrize("beta", [1e-3, 0.5, 1 - 1e-3])
@pytest.mark.parametrize("mode", TERMS_MODES)
def test_streaming_divergence_terms_sums_the_formulas(mode, beta):
    """linear_softmax.divergence_terms over 150 columns in two vocabulary splits (128 + 22), 7 rows."""
    from opd_fast.kernels.linear_softmax import divergence_terms

    zs, zt = _logit_pairs(7, 150, seed=4)
    lse_s, lse_t = _row_lse(zs), _row_lse(zt)
    lse = [tuple(x.to(DEVICE) for x in pair) for pair in (lse_s, lse_t)]
    hs, ws, ht, wt = _identity_operands(zs, zt)
    terms = divergence_terms(hs, ws, ht, wt, *lse, None, None, mode=mode, beta=beta, precision="ieee", n_splits=2)
    exact, size = _formulas(_log_probs(zs, lse_s), _log_probs(zt, lse_t), mode, beta)
    for name, ours, e, sz in zip(("fs", "ft", "pg"), terms, exact, size):
        assert _within_ulps(ours, e.sum(-1), sz.sum(-1)), (name, (ours.double().cpu() - e.sum(-1)).abs().max())


@pytest.mark.parametrize("beta", [1e-3, 0.5, 1 - 1e-3])
@pytest.mark.parametrize("mode", [*TERMS_MODES, "forward_kl"])
def test_streaming_logit_grad_is_pg_minus_p_s_times_the_center(mode, beta):
    """linear_grad.logit_grad_backward with an identity weight, where dH = G exactly and db its column sums."""
    from opd_fast.backends.gemms import FilterStats
    from opd_fast.kernels.linear_grad import logit_grad_backward

    zs, zt = _logit_pairs(7, 150, seed=5)
    lse_s, lse_t = _row_lse(zs), _row_lse(zt)
    lp_s, lp_t = _log_probs(zs, lse_s), _log_probs(zt, lse_t)
    center = _centers(lp_s, lp_t, mode, beta)
    row_weight = torch.linspace(0.5, 2.0, 7)
    hs, ws, ht, wt = _identity_operands(zs, zt)
    lse = [tuple(x.to(DEVICE) for x in pair) for pair in (lse_s, lse_t)]
    dh, _, db = logit_grad_backward(
        hs, ws, ht, wt, None, *lse, torch.zeros(7, device=DEVICE), center.to(DEVICE), row_weight.to(DEVICE),
        (torch.zeros(150, device=DEVICE), 1.0, None, 1.0), None, mode=mode, beta=beta, filter_eps=0.0,
        precision="ieee", need_dh=True, need_dw=False, need_db=True, workspace_elements=7 * 64, stats=FilterStats(),
    )  # fmt: skip
    exact, size = _gradient(lp_s, lp_t, center.double(), mode, beta)
    w = row_weight.double()[:, None]
    assert _within_ulps(dh, exact * w, size * w), (dh.double().cpu() - exact * w).abs().max()
    assert _within_ulps(db, (exact * w).sum(0), (size * w).sum(0))


@pytest.mark.parametrize("mode", TERMS_MODES)
def test_terms_modes_keep_jsd_statistics(mode):
    """The statistics passes of the terms modes are JSD's (each model's online max and Σ exp, no accumulator):
    bitwise the same state, chunked and streaming."""
    from opd_fast.kernels.chunk_stats import stats_update
    from opd_fast.kernels.linear_softmax import softmax_stats

    zs, zt = (z.to(DEVICE) for z in _logit_pairs(7, 300, seed=6))
    states = []
    for m in ("jsd", mode):
        state = torch.zeros(5, 7, device=DEVICE)
        state[0] = state[2] = -math.inf
        stats_update(state, zs, zt, None, None, None, 0, m)
        states.append(state)
    assert torch.equal(*states)
    hs, ws, ht, wt = _identity_operands(zs, zt)
    ours, jsd = (softmax_stats(hs, ws, ht, wt, None, None, None, mode=m, precision="ieee") for m in (mode, "jsd"))
    for a, b in zip(ours, jsd):
        for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
            assert torch.equal(x, y)


def _terms_and_grad(zs: torch.Tensor, zt: torch.Tensor, mode: str, beta: float, plan: str):
    """(terms [3, r], G [r, V]) of the kernels of ``plan`` on logits ``zs``, ``zt``: the terms pass, then the logit
    gradient with the center it summed (streaming: G is dH through an identity weight), unit row weights."""
    from opd_fast.backends.gemms import FilterStats
    from opd_fast.backends.online_softmax import terms_loss
    from opd_fast.kernels.chunk_grad import logit_grad
    from opd_fast.kernels.chunk_terms import terms_update
    from opd_fast.kernels.linear_grad import logit_grad_backward
    from opd_fast.kernels.linear_softmax import divergence_terms

    rows = zs.shape[0]
    lse_s, lse_t = (tuple(x.to(DEVICE) for x in _row_lse(z)) for z in (zs, zt))
    ones, zeros = torch.ones(rows, device=DEVICE), torch.zeros(rows, device=DEVICE)
    if plan == "chunked":
        zs, zt = zs.to(DEVICE), zt.to(DEVICE)
        terms = torch.zeros(3, rows, device=DEVICE)
        terms_update(terms, zs, zt, (lse_s[0], lse_t[0], lse_s[1], lse_t[1]), None, None, mode, beta)
        center = terms_loss(terms, mode, beta)[1]
        g = torch.empty_like(zs)
        stats = (zeros, lse_s[0], lse_t[0], center, lse_s[1], lse_t[1])
        return terms, logit_grad(zs, zt, None, stats, ones, None, None, 0, mode, beta, g)
    operands = _identity_operands(zs, zt)
    terms = divergence_terms(*operands, lse_s, lse_t, None, None, mode=mode, beta=beta, precision="ieee")
    center = terms_loss(terms, mode, beta)[1]
    dh, _, _ = logit_grad_backward(
        *operands, None, lse_s, lse_t, zeros, center, ones, None, None, mode=mode, beta=beta, filter_eps=0.0,
        precision="ieee", need_dh=True, need_dw=False, need_db=False, workspace_elements=1 << 20, stats=FilterStats(),
    )  # fmt: skip
    return terms, dh


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize("beta", [0.1, 0.9])
@pytest.mark.parametrize("mode", TERMS_MODES)
def test_one_hot_student_rows_have_an_exactly_zero_gradient(mode, beta, plan):
    """A student whose mass sits on one column in fp32 (p_s = 1 there, 0 elsewhere) has a zero logit gradient, as
    autograd's softmax backward gives it exactly: the gradient pass forms the terms pass's own factor f at that
    column, and p_s (f − center) is then f − f. Teachers: spread out, and one-hot elsewhere."""
    zs = torch.full((2, 100), -1e4)
    zs[:, 17] = 0.0
    zt = torch.randn(2, 100, generator=torch.Generator().manual_seed(7)) * 2
    zt[1] = -1e4
    zt[1, 60] = 0.0
    _, g = _terms_and_grad(zs, zt, mode, beta, plan)
    assert torch.equal(g.cpu(), torch.zeros_like(zs))


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize("mode", TERMS_MODES)
def test_a_nan_teacher_logit_makes_its_row_nan(mode, plan):
    """A NaN teacher logit (its row's lse NaN, so every log p_t) makes the row's terms and every G of the row NaN,
    the other rows untouched: TVD's sign keeps NaN, as torch.sign, where a plain comparison would give 0 and a finite
    gradient."""
    g = torch.Generator().manual_seed(9)
    zs, zt = torch.randn(3, 80, generator=g), torch.randn(3, 80, generator=g)
    zt[1, 5] = math.nan
    terms, grad = _terms_and_grad(zs, zt, mode, 0.5, plan)
    terms, grad = terms.cpu(), grad.cpu()
    summed = [0, 2] if mode == "tvd" else [0, 1, 2]  # TVD's ft is 0
    assert torch.isnan(terms[summed, 1]).all() and torch.isnan(grad[1]).all()
    assert torch.isfinite(terms[:, [0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
def test_entropy_mode_gradient_is_p_s_times_log_p_s_minus_the_center(plan):
    """Mode "entropy" (the sweep's entropy_backward): G = w p_s (lp_s − center), with center −H and w the negated
    row weight the gradient of w H; here any center, against float64."""
    from opd_fast.backends.gemms import FilterStats
    from opd_fast.kernels.chunk_grad import logit_grad
    from opd_fast.kernels.linear_grad import logit_grad_backward

    zs = _logit_pairs(7, 150, seed=10)[0]
    lse = _row_lse(zs)
    lp_s = _log_probs(zs, lse)
    center, weight = torch.linspace(-3.0, 1.0, 7), torch.linspace(-2.0, 0.5, 7)
    exact = (lp_s.exp() * (lp_s - center.double()[:, None])) * weight.double()[:, None]
    size = (lp_s.exp() * (lp_s.abs() + center.double().abs()[:, None])) * weight.double().abs()[:, None]
    lse, center, weight = (tuple(x.to(DEVICE) for x in lse), center.to(DEVICE), weight.to(DEVICE))
    if plan == "chunked":
        stats = (torch.zeros_like(weight), lse[0], lse[0], center, lse[1], lse[1])
        out = torch.empty(7, 150, device=DEVICE)
        logit_grad(zs.to(DEVICE), None, None, stats, weight, None, None, 0, "entropy", 0.0, out)
    else:
        hs, ws, _, _ = _identity_operands(zs, zs)
        out, _, _ = logit_grad_backward(
            hs, ws, None, None, None, lse, None, torch.zeros_like(weight), center, weight, None, None,
            mode="entropy", beta=0.0, filter_eps=0.0, precision="ieee", need_dh=True, need_dw=False, need_db=False,
            workspace_elements=1 << 20, stats=FilterStats(),
        )  # fmt: skip
    assert _within_ulps(out, exact, size * (1 + lp_s.abs())), (out.double().cpu() - exact).abs().max()


# ---- the student's entropy, fused into the statistics passes -----------------------------------------------------

STATS_MODES = ["reverse_kl", "forward_kl", *TERMS_MODES, "token_logprob", "logsumexp"]
TWO_MODEL_MODES = ["reverse_kl", "forward_kl", *TERMS_MODES]


def _head_f32(x: torch.Tensor, head) -> torch.Tensor:
    """_common.apply_head in fp32 and its order of operations (bias, pre, softcap, post): the final logits the
    kernels see (torch's tanh for the kernels' expm1 form: a few ulps of the softcap apart)."""
    if head is None:
        return x
    bias, pre, softcap, post = head
    u = (x if bias is None else x + bias) * pre
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u * post


def _entropy_f64(z: torch.Tensor) -> torch.Tensor:
    log_p = z.double().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def _padded(z: torch.Tensor, stride: int, offset: int = 0) -> torch.Tensor:
    """``z`` as a view of rows ``stride`` floats apart, starting ``offset`` floats into its buffer."""
    buf = torch.full((z.shape[0] * stride + offset,), math.nan)
    view = buf[offset:].as_strided(z.shape, (stride, 1))
    view.copy_(z)
    return view


def _entropy_cases():
    """(name, zs, zt, head_s, head_t): raw fp32 logit tiles at odd widths, spread, peaked (most columns e^-100 and
    less below the max) and one-hot rows, logits near ±1e4, rows whose max sits in the last column, padded rows
    whose row stride is no multiple of 16, and bias, softcap and temperature heads."""
    g = torch.Generator().manual_seed(33)

    def randn(*shape, scale=3.0):
        return torch.randn(*shape, generator=g) * scale

    zs, zt = randn(7, 37), randn(7, 37)
    zs[1] *= 12  # peaked
    zs[2] += 1e4  # lse ≈ 1e4
    zs[3] -= 1e4
    zs[4, -1] += 60  # one-hot in fp32, at the last column (the masked block of a tile)
    zs[5] = zs[5] * 0.01  # near-uniform
    yield "width 37", zs, zt, None, None
    yield "width 1", randn(3, 1), randn(3, 1), None, None
    wide_s, wide_t = randn(4, 203), randn(4, 203)
    wide_s[1] *= 20
    tau = (None, 1.0, None, 0.7)
    yield "width 203, rows 211 apart", _padded(wide_s, 211), _padded(wide_t, 211, offset=1), None, tau
    bias_s, bias_t = randn(300, scale=1.0), randn(300, scale=1.0)
    zs = randn(5, 300)
    zs[2] *= 15
    capped = (bias_s, 0.7, 3.0, 1.25)  # softcap 3 at τ = 0.8
    yield "bias, softcap, temperature, width 300", zs, randn(5, 300), capped, (bias_t, 1.0, None, 0.8)
    yield "peaked under a softcap", randn(3, 64, scale=30.0), randn(3, 64, scale=30.0), (None, 1.0, 2.0, 1.0), None


def _tile_sets(width: int) -> list[list[tuple[int, int]]]:
    """The whole width, and uneven tiles merged in sequence (a one-column tile among them)."""
    cuts = sorted({0, width, *(c for c in (1, 6, 19, 20, 87, 290) if c < width)})
    return [[(0, width)], list(itertools.pairwise(cuts))]


def _tile_head(head, lo: int, hi: int):
    if head is None:
        return None
    bias, *rest = head
    return (None if bias is None else bias[lo:hi].to(DEVICE), *rest)


def _chunk_stats(mode, zs, zt, head_s, head_t, tiles, entropy=None):
    """chunk_stats.stats_update over the column ranges ``tiles`` in order, as the sweep merges a chunk's vocabulary
    tiles, with the ``entropy`` state (updated in place) or without; returns the statistics state [5, r]."""
    from opd_fast.backends.online_softmax import new_state
    from opd_fast.kernels.chunk_stats import stats_update

    rows, width = zs.shape
    ids = (torch.arange(rows) * 7 % width).to(DEVICE) if mode == "token_logprob" else None
    two = mode in TWO_MODEL_MODES
    state = new_state(rows, DEVICE)
    for lo, hi in tiles:
        zt_tile = zt[:, lo:hi].to(DEVICE) if two else None
        hs, ht = _tile_head(head_s, lo, hi), _tile_head(head_t, lo, hi) if two else None
        stats_update(state, zs[:, lo:hi].to(DEVICE), zt_tile, ids, hs, ht, lo, mode, entropy)
    return state


@pytest.mark.parametrize("mode", STATS_MODES)
def test_chunk_stats_fused_entropy_matches_float64(mode):
    """chunk_stats.stats_update with an entropy state (m, s, a): merged over uneven tiles in sequence,
    H = log s − a / s (online_softmax.finalize_entropy) is the float64 entropy of the same final logits within fp32
    rounding, on odd widths, padded rows, peaked and one-hot rows, logits near ±1e4 and bias/softcap/temperature heads;
    its (m, s) are the statistics state's student (m, s), bit for bit, and that state's bits are those without it."""
    from opd_fast.backends.online_softmax import finalize_entropy, new_entropy_state

    worst = 0.0
    for name, zs, zt, head_s, head_t in _entropy_cases():
        ref = _entropy_f64(_head_f32(zs, head_s))
        for tiles in _tile_sets(zs.shape[1]):
            entropy = new_entropy_state(zs.shape[0], DEVICE, torch.float32)
            state = _chunk_stats(mode, zs, zt, head_s, head_t, tiles, entropy)
            plain = _chunk_stats(mode, zs, zt, head_s, head_t, tiles)
            assert torch.equal(state.view(torch.int32), plain.view(torch.int32)), (name, tiles)
            assert torch.equal(entropy[:2], state[:2]), (name, tiles)
            err = ((finalize_entropy(entropy).double().cpu() - ref).abs() / (1 + ref)).max().item()
            worst = max(worst, err)
            assert err <= 1e-6, (name, tiles, err)
    print(f"{mode}: worst |H − H64| / (1 + H64) = {worst:.2e}")


@pytest.mark.parametrize("mode", ["reverse_kl", "forward_kl", "jsd", "logsumexp"])
def test_chunk_stats_fused_entropy_of_a_nan_row_is_nan(mode):
    """A NaN student logit makes that row's entropy NaN (as its statistics); the other rows keep theirs."""
    from opd_fast.backends.online_softmax import finalize_entropy, new_entropy_state

    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(3, 45, generator=g) * 3, torch.randn(3, 45, generator=g) * 3
    zs[1, 17] = math.nan
    entropy = new_entropy_state(3, DEVICE, torch.float32)
    _chunk_stats(mode, zs, zt, None, None, [(0, 10), (10, 45)], entropy)
    h = finalize_entropy(entropy).cpu()
    assert torch.isnan(h[1]), h
    torch.testing.assert_close(h[[0, 2]].double(), _entropy_f64(zs[[0, 2]]), rtol=1e-6, atol=1e-6)


def test_triton_epilogue_fuses_the_entropy_into_stats_update(monkeypatch):
    """TritonEpilogue.stats_update(..., entropy): the protocol's entropy argument reaches the statistics kernel,
    which reads each tile once for both (no torch pass over the tile: merge_entropy is never called)."""
    from opd_fast.backends import torch_epilogue
    from opd_fast.backends.epilogue import TileHead
    from opd_fast.backends.online_softmax import finalize_entropy, new_entropy_state, new_state

    def no_torch_pass(*args, **kwargs):
        raise AssertionError("the Triton epilogue merged the entropy with a torch pass")

    monkeypatch.setattr(torch_epilogue, "merge_entropy", no_torch_pass)
    epilogue = triton_backend.TritonEpilogue()
    g = torch.Generator().manual_seed(6)
    zs, zt, bias = (torch.randn(*shape, generator=g).to(DEVICE) * 3 for shape in ((4, 37), (4, 37), (37,)))
    entropy = new_entropy_state(4, DEVICE, torch.float32)
    state, plain = new_state(4, DEVICE), new_state(4, DEVICE)
    for lo, hi in [(0, 13), (13, 37)]:
        hs, ht = TileHead(bias[lo:hi], 0.7, 3.0, 1.25), TileHead(None, 1.0, None, 0.8)
        epilogue.stats_update(state, zs[:, lo:hi], zt[:, lo:hi], None, hs, ht, lo, "jsd", entropy)
        epilogue.stats_update(plain, zs[:, lo:hi], zt[:, lo:hi], None, hs, ht, lo, "jsd")
    assert torch.equal(state, plain)
    ref = _entropy_f64(_head_f32(zs.cpu(), (bias.cpu(), 0.7, 3.0, 1.25)))
    torch.testing.assert_close(finalize_entropy(entropy).double().cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", STATS_MODES)
def test_streaming_stats_fused_entropy_matches_float64(mode):
    """linear_softmax.softmax_stats(entropy=True): the student's entropy from the statistics pass itself (the
    splits' (m, S, A) merged on the host) against float64, through an identity weight (the logits exact), in one,
    two and three vocabulary splits, with and without a head; every other output bitwise that of the plain pass."""
    from opd_fast.kernels.linear_softmax import softmax_stats

    two = mode in TWO_MODEL_MODES
    for name, zs, zt, head_s, head_t in _entropy_cases():
        rows, width = zs.shape
        if width < 37:
            continue  # the splits need columns
        ref = _entropy_f64(_head_f32(zs, head_s))
        hs, ws, ht, wt = _identity_operands(zs.contiguous(), zt.contiguous())
        ids = (torch.arange(rows) * 7 % width).to(DEVICE) if mode == "token_logprob" else None
        head_s = None if head_s is None else (None if head_s[0] is None else head_s[0].to(DEVICE), *head_s[1:])
        head_t = None if head_t is None else (None if head_t[0] is None else head_t[0].to(DEVICE), *head_t[1:])
        args = (hs, ws, ht if two else None, wt if two else None, ids, head_s, head_t if two else None)
        for splits in (1, 2, 3):
            plain = softmax_stats(*args, mode=mode, precision="ieee", n_splits=splits)
            *fused, entropy = softmax_stats(*args, mode=mode, precision="ieee", n_splits=splits, entropy=True)
            for a, b in zip(plain, fused):
                for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                    assert (x is None and y is None) or torch.equal(x, y), (name, splits)
            err = ((entropy.double().cpu() - ref).abs() / (1 + ref)).max().item()
            assert err <= 1e-6, (name, splits, err)


def test_streaming_divergence_takes_the_entropy_from_its_statistics_pass(monkeypatch):
    """TritonStreamingOps with return_entropy: no top-k pass (the k = 1 topk_stats of before) — the statistics
    kernel gives the entropy — and the value is the float64 one."""
    from opd_fast import linear_divergence

    def no_topk_pass(*args, **kwargs):
        raise AssertionError("the streaming plan streamed the vocabulary once more for the entropy")

    monkeypatch.setattr(triton_backend, "topk_stats", no_topk_pass)
    g = torch.Generator().manual_seed(11)
    hs, ht = torch.randn(6, 16, generator=g).to(DEVICE), torch.randn(6, 24, generator=g).to(DEVICE)
    ws, wt = torch.randn(131, 16, generator=g).to(DEVICE), torch.randn(131, 24, generator=g).to(DEVICE)
    for divergence in ("reverse_kl", "jsd"):
        out = linear_divergence(
            hs, ws, ht, wt, divergence=divergence, backend="triton", plan="streaming", reduction="none",
            temperature=1.3, return_entropy=True,
        )  # fmt: skip
        ref = _entropy_f64((hs.double() @ ws.double().T).cpu() / 1.3)
        torch.testing.assert_close(out.student_entropy.double().cpu(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize("beta", [1e-3, 0.3, 0.9])
@pytest.mark.parametrize("mode", TERMS_MODES)
def test_identical_near_uniform_rows_have_an_exactly_zero_gradient(mode, beta, plan):
    """Student and teacher rows equal and near-uniform: every per-element f vanishes where p_s = p_t (the skew KLs'
    constants are out of f: −(1 − β) expm1(log(p_t / m)) and log(p_s / m) + β expm1(log(p_t / m))), so the terms,
    the center and G are exactly 0 — with the constants in, the centering left ~β (Σ p_s − 1) p_s, a few 1e-9."""
    z = torch.randn(3, 500, generator=torch.Generator().manual_seed(12)) * 1e-2
    terms, g = _terms_and_grad(z, z.clone(), mode, beta, plan)
    assert torch.equal(g.cpu(), torch.zeros_like(z)), g.abs().max()
    assert torch.equal(terms.cpu(), torch.zeros_like(terms.cpu())), terms
