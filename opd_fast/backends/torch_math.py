"""The torch epilogue's math on logits tiles, in plain torch ops: the head transform and its chain factor, the
divergences' cancellation-free per-element parts, a tile's online-softmax merges into a row's state, and the top-k of
a tile (:mod:`opd_fast.backends.torch_epilogue` puts them together; the kernels compute the same).
"""

from __future__ import annotations

import math

import torch

from opd_fast.backends.epilogue import TileHead
from opd_fast.backends.online_softmax import kl_shift

Tensor = torch.Tensor


def final_logits(z: Tensor, head: TileHead) -> Tensor:
    """z_final = post · softcap_c(pre · (z + b)); ``z`` itself (no copy) when the head is the identity."""
    if head.bias is None and head.pre == 1.0 and head.softcap is None and head.post == 1.0:
        return z
    x = z if head.bias is None else z + head.bias
    if head.pre != 1.0:
        x = x * head.pre
    if head.softcap is not None:
        x = torch.tanh(x / head.softcap) * (head.softcap * head.post)
    elif head.post != 1.0:
        x = x * head.post
    return x


def head_chain(z_final: Tensor, head: TileHead) -> Tensor | float:
    """dz_final / d(h·Wᵀ): pre · post, times 1 − tanh² = 1 − (z_final / (c · post))² under a softcap."""
    factor = head.pre * head.post
    if head.softcap is None:
        return factor
    tanh = z_final / (head.softcap * head.post)
    return (1.0 - tanh * tanh) * factor


def x_minus_log1p(x: Tensor) -> Tensor:
    """x − log(1 + x) ≥ 0 without cancellation near 0: with u = x / (2 + x), log1p(x) = 2 atanh(u), so
    x − log1p(x) = x² / (2 + x) − 2 (u³/3 + u⁵/5 + …), the series cut where it drops below the dtype's
    resolution for |u| ≤ 1/3 (|x| ≤ 1/2): through u¹⁵ in float32, u³⁵ in float64. Larger |x| lose at most a
    few bits directly."""
    u = x / (2.0 + x)
    u2 = u * u
    terms = 17 if x.dtype == torch.float64 else 7
    poly = torch.full_like(u, 1.0 / (2 * terms + 1))
    for k in range(terms - 1, 0, -1):
        poly = 1.0 / (2 * k + 1) + u2 * poly
    return torch.where(x.abs() <= 0.5, x * x / (2.0 + x) - 2.0 * u * u2 * poly, x - torch.log1p(x))


def jsd_parts(lp_s: Tensor, lp_t: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """JSD(β) per element without cancellation at any β: (p_s, log(p_s / m), fs, ft, log(p_t / m)) with
    Σ fs = KL(p_s ‖ m) and Σ ft = KL(p_t ‖ m), m = β p_t + (1 − β) p_s.

    With d = lp_t − lp_s, m / p_s = 1 + x for x = β·expm1(d) and m / p_t = 1 + y for y = (1 − β)·expm1(−d).
    Because Σ p_s x = β Σ (p_t − p_s) = 0 (and likewise Σ p_t y = 0), KL(p_s ‖ m) = Σ p_s (x − log1p x):
    every term is ≥ 0 and O(β²) when β → 0, where the textbook Σ p_s (log p_s − log m) sums terms of size
    β that cancel to β². The gradient is p_s ((1 − β) log(p_s / m) − center), with log(p_s / m) = −log1p(x)
    accurate to a few ulps at every β (not β (p_s − p_t) + fs, whose terms cancel). For |d| > 30 the
    exponential of the other side is used (log(p_s/m) = log(p_t/m) − d), so nothing overflows.
    """
    p_s, p_t = lp_s.exp(), lp_t.exp()
    d = lp_t - lp_s
    x = beta * torch.expm1(d.clamp(max=30.0))
    y = (1.0 - beta) * torch.expm1((-d).clamp(max=30.0))
    # log(p_s / m) = −log1p(x), except where 1 + x = (1 − β) + β e^d is small (x < −1/2, e.g. β → 1 and
    # p_t ≪ p_s): 1 + x would cancel, so log((1 − β) + β e^d) is taken as a log-add-exp. Likewise for y.
    log_beta = math.log(beta) if beta > 0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1 else -math.inf
    log_s = torch.where(x < -0.5, -torch.logaddexp(torch.full_like(d, log_rest), d + log_beta), -torch.log1p(x))
    log_t = torch.where(y < -0.5, -torch.logaddexp(torch.full_like(d, log_beta), log_rest - d), -torch.log1p(y))
    log_s = torch.where(d > 30.0, log_t - d, log_s)
    log_t = torch.where(d < -30.0, log_s + d, log_t)
    fs = torch.where(x.abs() <= 0.5, p_s * x_minus_log1p(x), beta * (p_t - p_s) + p_s * log_s)
    ft = torch.where(y.abs() <= 0.5, p_t * x_minus_log1p(y), (1.0 - beta) * (p_s - p_t) + p_t * log_t)
    return p_s, log_s, fs, ft, log_t


def terms_parts(lp_s: Tensor, lp_t: Tensor, mode: str, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(p_s, pg, fs, ft) per element for a mode of ``TERMS_MODES``
    (:func:`opd_fast.backends.online_softmax.terms_loss`): Σ fs and Σ ft the divergence's parts, pg = p_s · ∂D/∂p_s up
    to a constant, so that G = pg − p_s Σ pg.

    The skew KLs' derivatives hold p_t / m (KL(p_t ‖ m): −(1 − β) p_t / m; KL(p_s ‖ m): log(p_s / m) + 1 −
    (1 − β) p_s / m = log(p_s / m) + β p_t / m up to the constant 1). Their constant parts, −(1 − β) and β, are
    taken out, leaving −(1 − β) expm1(log(p_t / m)) and log(p_s / m) + β expm1(log(p_t / m)): each vanishes where
    p_s = p_t, as JSD's (1 − β) log(p_s / m) does, so that the centering does not subtract a constant of size β from
    itself (on near-uniform rows that left ~Σ p_s − 1 times β in every G). log(p_t / m) ≤ log(1 / β): nothing
    overflows."""
    if mode == "tvd":
        p_s, p_t = lp_s.exp(), lp_t.exp()
        diff = p_s - p_t
        return p_s, 0.5 * p_s * torch.sign(diff), 0.5 * diff.abs(), torch.zeros_like(p_s)
    p_s, log_s, fs, ft, log_t = jsd_parts(lp_s, lp_t, beta)
    if mode == "jsd":
        return p_s, (1.0 - beta) * p_s * log_s, fs, ft
    if mode == "skew_forward_kl":
        return p_s, -(1.0 - beta) * p_s * torch.expm1(log_t), fs, ft
    return p_s, p_s * (log_s + beta * torch.expm1(log_t)), fs, ft  # skew reverse KL


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[n, v] · b[n, v]."""
    return (a * b).sum(dim=-1)


def token_logit(z: Tensor, ids: Tensor, v_lo: int) -> Tensor:
    """z[n, ids_n − v_lo] per row, 0 where the token is not among the tile's columns [v_lo, v_lo + width)."""
    col = ids - v_lo
    inside = (col >= 0) & (col < z.shape[1])
    return torch.where(inside, z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)


def one_hot_minus(p: Tensor, ids: Tensor, v_lo: int) -> Tensor:
    """[v = ids_n] − p over the tile's columns [v_lo, v_lo + width), in place of ``p``."""
    col = ids - v_lo
    rows = ((col >= 0) & (col < p.shape[1])).nonzero().view(-1)
    g = p.neg_()
    g[rows, col[rows]] += 1.0
    return g


def shift_exp_sum(z: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the shift m (the max; 0 where it is not finite) and s = Σ e^{z − m}, in place: z ← z − m and
    e ← e^{z − m}, so that log p = z − log s and p = e / s, and lse = m + log s with its residual
    (online_softmax.split_lse).

    s is torch.sum's cascade sum, accurate to a few ulps at any V. (log_softmax's own Σ e^{z − m} runs sequentially
    per vector lane: its log Σ carries ~V/16 ulps, 1.9e-6 at V = 32749 against 7.6e-8, an error shared by every log p
    of the row, which whole rows then had and vocabulary tiles did not.)"""
    m = z.amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    z.sub_(m[:, None])
    torch.exp(z, out=e)
    return m, e.sum(dim=-1)


def _shifted(x: Tensor) -> tuple[Tensor, Tensor]:
    """A tile's per-row max m and x − m (a tile-sized temporary; rows of −inf are shifted by 0)."""
    m = x.amax(dim=-1)
    return m, x - torch.where(torch.isfinite(m), m, 0.0)[:, None]


def tile_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """A tile's per-row (max m, Σ e^{x − m})."""
    m, shifted = _shifted(x)
    return m, shifted.exp_().sum(dim=-1)


def merge_online(m: Tensor, s: Tensor, tile_m: Tensor, tile_s: Tensor) -> None:
    """Merge a tile's (max, Σ e^{x − max}) of :func:`tile_sums` into the running (m, s), in place. The tile keeps
    its own max (not its rounded lse as the shift), so the row's (m, s) carry no ~ulp(lse) rounding from any tile."""
    m_new = torch.maximum(m, tile_m)
    old = torch.where(m == -math.inf, 0.0, torch.exp(m - m_new))
    new = torch.where(tile_m == -math.inf, 0.0, torch.exp(tile_m - m_new))
    s.mul_(old).add_(tile_s * new)
    m.copy_(m_new)


def merge_kl(lead: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor], acc: Tensor, x: Tensor, y: Tensor) -> None:
    """Merge a tile into a KL state in place: the lead model's (m, s) (the KL's weights, logits x), the other's
    (logits y) and acc = Σ e^{x − m}((x − m) − (y − m_other)), relative to both maxes (online_softmax.finalize)."""
    (m, s), (m_o, s_o) = lead, other
    tile_m, dx = _shifted(x)
    tile_mo, dy = _shifted(y)
    e = dx.exp()
    tile_s, tile_so = e.sum(dim=-1), dy.exp().sum(dim=-1)
    tile_acc = rowdot(e, dx.sub_(dy))
    m_new, mo_new = torch.maximum(m, tile_m), torch.maximum(m_o, tile_mo)
    acc.copy_(kl_shift(m, s, m_o, acc, m_new, mo_new) + kl_shift(tile_m, tile_s, tile_mo, tile_acc, m_new, mo_new))
    merge_online(m, s, tile_m, tile_s)
    merge_online(m_o, s_o, tile_mo, tile_so)


def merge_entropy(state: Tensor, z: Tensor) -> None:
    """Merge final logits ``z`` [r, c] into an entropy state [3, r] = (m, s, a = Σ e^{z − m}(z − m)) in place. a is
    a KL accumulator against a model whose logits are all 0 (:func:`opd_fast.backends.online_softmax.kl_shift` with the
    other max 0 before and after): when m grows, every term moves by m − m_new and its weight by e^{m − m_new}."""
    m, s, a = state
    tile_m, shifted = _shifted(z)
    e = shifted.exp()
    tile_s, tile_a = e.sum(dim=-1), rowdot(e, shifted)
    m_new, zero = torch.maximum(m, tile_m), torch.zeros_like(m)
    a.copy_(kl_shift(m, s, zero, a, m_new, zero) + kl_shift(tile_m, tile_s, zero, tile_a, m_new, zero))
    merge_online(m, s, tile_m, tile_s)


def tile_topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``z`` in canonical order: value descending, ties by smaller column first.

    torch.topk picks arbitrarily among values tied with the k-th largest; such a tie exists exactly when
    the (k+1)-th largest equals the k-th, and those rows are re-selected exactly (all values above the
    k-th, then the tied ones with the smallest columns).
    """
    width = z.shape[1]
    values, cols = torch.topk(z, min(k + 1, width), dim=-1)
    if width > k:
        tied_rows = (values[:, k] == values[:, k - 1]).nonzero().view(-1)
        values, cols = values[:, :k], cols[:, :k]
        if tied_rows.numel():
            sub, sub_kth = z[tied_rows], values[tied_rows, k - 1 :]
            above = sub > sub_kth
            at = sub == sub_kth
            needed = k - above.sum(dim=-1, keepdim=True)
            chosen = above | (at & (at.cumsum(dim=-1) <= needed))
            sub_cols = chosen.nonzero()[:, 1].view(-1, k)
            cols[tied_rows] = sub_cols
            values[tied_rows] = sub.gather(1, sub_cols)
    cols, order = cols.sort(dim=-1)
    values = values.gather(1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, cols.gather(1, order)


def merge_topk(best, tile_best, k: int):
    """Merge running and tile top-k lists; running ids are all smaller, so a stable sort keeps ties canonical."""
    if best is None:
        return tile_best
    values = torch.cat([best[0], tile_best[0]], dim=1)
    ids = torch.cat([best[1], tile_best[1]], dim=1)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values[:, :k], ids.gather(1, order[:, :k])
