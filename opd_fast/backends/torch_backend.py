"""The pure-PyTorch backend: the CPU path of every op and the readable spec of what the kernels compute.

It is the shared sweep of :mod:`opd_fast.backends.sweep` (chunk plan, GEMMs, gradient accumulation) with
the per-tile math written as plain torch ops. Everything is computed in fp32 (fp64 for fp64 inputs):
low-precision hidden states and weights are upcast once per call, which costs O((N + V)·H) memory and
never O(N·V). The head's linear factors (its scale, and 1/τ when there is no softcap) are folded into
the upcast hidden states and bias, so for most heads the tiles are the final logits already.

The logits of a tile are z = post · softcap_c(pre · (h·Wᵀ + b)) (:class:`opd_fast.backends.sweep.Operand`),
and with the rows' log-probs lp = z − lse the logit gradients of the per-token divergence D are
(docs/design.md §2, ``center`` from the forward):

* reverse KL  D = Σ p_s (lp_s − lp_t):           ∂D/∂z_s = p_s ⊙ (lp_s − lp_t − D)
* forward KL  D = Σ p_t (lp_t − lp_s):           ∂D/∂z_s = p_s − p_t
* JSD(β)      D = β KL(p_t‖m) + (1−β) KL(p_s‖m), m = β p_t + (1−β) p_s:
              ∂D/∂z_s = p_s ⊙ ((1−β) log(p_s/m) − center),   center = (1−β) KL(p_s‖m),
              in the cancellation-free form of :func:`jsd_parts`
* skew KLs    KL(p_t ‖ m) (forward, β = α) and KL(p_s ‖ m) (reverse, β = 1 − α), and TVD ½ Σ |p_s − p_t|:
              ∂D/∂z_s = pg − p_s center with pg of :func:`terms_parts` (:func:`opd_fast.backends.sweep.terms_loss`)
* token       log p(y):                           ∂/∂z = [v = y] − p
* logsumexp   lse:                                ∂/∂z = p
* entropy     H = −Σ p log p:                     ∂H/∂z = −p (log p + H)   (mode "entropy": p (log p − center)
                                                  with center = −H, the row weight −w)

and the chain rule through the head multiplies by dz/d(h·Wᵀ) = post · pre · (1 − tanh²), tanh = z / (c·post).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.backends.sweep import (
    TERMS_MODES,
    TWO_MODEL_MODES,
    Operand,
    Sweep,
    TileHead,
    fold_linear,
    kl_shift,
    label_logits,
    lse_lo,
    split_lse,
    terms_loss,
)
from opd_fast.chunking import get_chunk_budget
from opd_fast.types import DivergenceStats, Grads, Need, Side

Tensor = torch.Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
    """(p_s, pg, fs, ft) per element for a mode of ``TERMS_MODES`` (:func:`opd_fast.backends.sweep.terms_loss`):
    Σ fs and Σ ft the divergence's parts, pg = p_s · ∂D/∂p_s up to a constant, so that G = pg − p_s Σ pg.

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


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[n, v] · b[n, v]."""
    return (a * b).sum(dim=-1)


def _token_logit(z: Tensor, ids: Tensor, v_lo: int) -> Tensor:
    """z[n, ids_n − v_lo] per row, 0 where the token is not among the tile's columns [v_lo, v_lo + width)."""
    col = ids - v_lo
    inside = (col >= 0) & (col < z.shape[1])
    return torch.where(inside, z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)


def _one_hot_minus(p: Tensor, ids: Tensor, v_lo: int) -> Tensor:
    """[v = ids_n] − p over the tile's columns [v_lo, v_lo + width), in place of ``p``."""
    col = ids - v_lo
    rows = ((col >= 0) & (col < p.shape[1])).nonzero().view(-1)
    g = p.neg_()
    g[rows, col[rows]] += 1.0
    return g


def _shift_exp_sum(z: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the shift m (the max; 0 where it is not finite) and s = Σ e^{z − m}, in place: z ← z − m and
    e ← e^{z − m}, so that log p = z − log s and p = e / s, and lse = m + log s with its residual (sweep.split_lse).

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


def _tile_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """A tile's per-row (max m, Σ e^{x − m})."""
    m, shifted = _shifted(x)
    return m, shifted.exp_().sum(dim=-1)


def _merge_online(m: Tensor, s: Tensor, tile_m: Tensor, tile_s: Tensor) -> None:
    """Merge a tile's (max, Σ e^{x − max}) of :func:`_tile_sums` into the running (m, s), in place. The tile keeps
    its own max (not its rounded lse as the shift), so the row's (m, s) carry no ~ulp(lse) rounding from any tile."""
    m_new = torch.maximum(m, tile_m)
    old = torch.where(m == -math.inf, 0.0, torch.exp(m - m_new))
    new = torch.where(tile_m == -math.inf, 0.0, torch.exp(tile_m - m_new))
    s.mul_(old).add_(tile_s * new)
    m.copy_(m_new)


def _merge_kl(lead: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor], acc: Tensor, x: Tensor, y: Tensor) -> None:
    """Merge a tile into a KL state in place: the lead model's (m, s) (the KL's weights, logits x), the other's
    (logits y) and acc = Σ e^{x − m}((x − m) − (y − m_other)), relative to both maxes (sweep.finalize)."""
    (m, s), (m_o, s_o) = lead, other
    tile_m, dx = _shifted(x)
    tile_mo, dy = _shifted(y)
    e = dx.exp()
    tile_s, tile_so = e.sum(dim=-1), dy.exp().sum(dim=-1)
    tile_acc = _rowdot(e, dx.sub_(dy))
    m_new, mo_new = torch.maximum(m, tile_m), torch.maximum(m_o, tile_mo)
    acc.copy_(kl_shift(m, s, m_o, acc, m_new, mo_new) + kl_shift(tile_m, tile_s, tile_mo, tile_acc, m_new, mo_new))
    _merge_online(m, s, tile_m, tile_s)
    _merge_online(m_o, s_o, tile_mo, tile_so)


def merge_entropy(state: Tensor, z: Tensor) -> None:
    """Merge final logits ``z`` [r, c] into an entropy state [3, r] = (m, s, a = Σ e^{z − m}(z − m)) in place. a is
    a KL accumulator against a model whose logits are all 0 (:func:`opd_fast.backends.sweep.kl_shift` with the other
    max 0 before and after): when m grows, every term moves by m − m_new and its weight by e^{m − m_new}."""
    m, s, a = state
    tile_m, shifted = _shifted(z)
    e = shifted.exp()
    tile_s, tile_a = e.sum(dim=-1), _rowdot(e, shifted)
    m_new, zero = torch.maximum(m, tile_m), torch.zeros_like(m)
    a.copy_(kl_shift(m, s, zero, a, m_new, zero) + kl_shift(tile_m, tile_s, zero, tile_a, m_new, zero))
    _merge_online(m, s, tile_m, tile_s)


class TorchEpilogue:
    """The per-tile math in torch ops (see the module docstring)."""

    takes_row_stride = True  # torch ops take any view (the Triton epilogue inherits it: stride_z, stride_g)

    def __init__(self) -> None:
        self._tiles: dict[int, Tensor] = {}  # scratch tiles of :meth:`_tile`

    def prepare(self, side: Side, temperature: float, fold: bool = True) -> Operand:
        dtype = compute_dtype(side.hidden, side.weight)
        if fold:
            return fold_linear(side, temperature, dtype, lambda t: t)
        bias = None if side.bias is None else side.bias.to(dtype)
        head = side.head
        return Operand(side.hidden.to(dtype), side.weight.to(dtype), bias, head.scale, head.softcap, 1.0 / temperature)

    def grad_dtype(self, operand: Operand) -> torch.dtype:
        return operand.hidden.dtype

    def stats_update(self, state, zs, zt, ids, hs, ht, v_lo, mode, entropy=None) -> None:
        a = final_logits(zs, hs)
        if entropy is not None:
            merge_entropy(entropy, a)
        m_s, s_s, m_t, s_t, acc = state
        if mode == "reverse_kl":
            _merge_kl((m_s, s_s), (m_t, s_t), acc, a, final_logits(zt, ht))
            return
        if mode == "forward_kl":
            _merge_kl((m_t, s_t), (m_s, s_s), acc, final_logits(zt, ht), a)
            return
        _merge_online(m_s, s_s, *_tile_sums(a))
        if mode in TERMS_MODES:
            _merge_online(m_t, s_t, *_tile_sums(final_logits(zt, ht)))
            return
        if mode == "token_logprob":
            acc.add_(_token_logit(a, ids, v_lo))

    @staticmethod
    def _log_probs(z: Tensor, lse: Tensor, lo: Tensor, in_place: bool = False) -> Tensor:
        """log p = (z − lse) − lse_lo (sweep.split_lse), over ``z`` when ``in_place``, else as a new tensor."""
        shifted = z.sub_(lse[:, None]) if in_place else z - lse[:, None]
        return shifted.sub_(lo[:, None])

    def terms_update(self, terms, zs, zt, stats, hs, ht, mode, beta) -> None:
        lo_s, lo_t = lse_lo(stats)
        lp_s = self._log_probs(final_logits(zs, hs), stats.student_lse, lo_s)
        lp_t = self._log_probs(final_logits(zt, ht), stats.teacher_lse, lo_t)
        _, pg, fs, ft = terms_parts(lp_s, lp_t, mode, beta)
        terms[0] += fs.sum(dim=-1)
        terms[1] += ft.sum(dim=-1)
        terms[2] += pg.sum(dim=-1)

    def _tile(self, slot: int, like: Tensor) -> Tensor:
        """A scratch tile shaped like ``like`` that lives as long as this epilogue (one op call) and serves every
        chunk. On the CPU a fresh 16 MB temporary per chunk is page-faulted anew each time (glibc hands the freed
        block back to the kernel): four per chunk cost 490k page faults and ~1 s of system time per forward+backward
        at N = 4096, V = 32768, a third of the CPU time."""
        buf = self._tiles.get(slot)
        if buf is None or buf.numel() < like.numel() or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._tiles[slot] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)

    def full_rows(
        self, zs, zt, ids, hs, ht, mode, beta, row_weight, out, entropy: bool = False, center_shift: float = 0.0
    ) -> tuple[DivergenceStats, Tensor | None]:
        """Statistics and logit gradient of whole vocabulary rows, with a few passes over each model's tile and no
        temporary beyond two scratch tiles (fewer passes than the online merge + grad path the tiled plan needs).

        Each row is shifted by its max m in place, e = e^{z − m} and s = Σ e (:func:`_shift_exp_sum`): log p = z − m
        − log s is accurate to ~ulp(log p), not ~ulp(lse), and p = e / s. The KLs are taken on the shifted logits,
        whose difference d = (z_s − m_s) − (z_t − m_t) differs from log p_s − log p_t by the row constant
        c = log s_s − log s_t (no z_s − z_t of size |z| that would cancel):

        reverse KL  D = Σ p_s d − c,   G = p_s (d − Σ p_s d) = (e_s d − (Σ p_s d) e_s) / s_s  (c drops out)
        forward KL  D = Σ p_t d' + c with d' = −d,   G = p_s − p_t = e_s / s_s − e_t / s_t
        entropy     H = −Σ p_s log p_s = log s_s − Σ e_s (z_s − m_s) / s_s  (``entropy``: one row dot more)

        ``center_shift`` c adds c · p_s to G (a hard-label term's p_s part, sweep.HardLabels): the gradient pass's
        center lowered by c.
        """
        a = final_logits(zs, hs)
        chain = head_chain(a, hs) if row_weight is not None else None
        zeros = a.new_zeros(a.shape[0])
        token = _token_logit(a, ids, 0) if mode == "token_logprob" else zeros
        e_s = self._tile(0, a)
        m_s, s_s = _shift_exp_sum(a, e_s)
        lse_s, lo_s = split_lse(m_s, s_s)
        student_entropy = s_s.log() - _rowdot(e_s, a) / s_s if entropy else None
        if mode not in TWO_MODEL_MODES:
            stats = DivergenceStats(token, lse_s, lse_s, zeros, lo_s, lo_s, student_entropy)
            if row_weight is None:
                return stats, None
            g = torch.div(e_s, s_s[:, None], out=a)  # p
            if mode == "token_logprob":
                g = _one_hot_minus(g, ids, 0)
            return stats, self._finish_grad(g, chain, row_weight, out)
        b = final_logits(zt, ht)
        e_t = self._tile(1, b)
        m_t, s_t = _shift_exp_sum(b, e_t)
        lse_t, lo_t = split_lse(m_t, s_t)
        log_s_s, log_s_t = s_s.log(), s_t.log()
        g = None
        if mode == "reverse_kl":
            weighted = a.sub_(b).mul_(e_s)  # e_s · d
            mean_d = weighted.sum(dim=-1) / s_s  # Σ p_s d
            loss = center = mean_d - (log_s_s - log_s_t)
            if row_weight is not None:
                g = weighted.addcmul_(e_s, (center_shift - mean_d)[:, None])
                g = self._finish_grad(g, chain, row_weight / s_s, out)
        elif mode == "forward_kl":
            weighted = b.sub_(a).mul_(e_t)  # e_t · d'
            loss, center = weighted.sum(dim=-1) / s_t + (log_s_s - log_s_t), zeros
            if row_weight is not None:
                # w p_s − w p_t with the row weight (and a constant chain factor) in both scales: equal rows cancel
                weight = row_weight if isinstance(chain, Tensor) else row_weight * chain
                target = a if out is None else out
                student = weight * (1.0 + center_shift) / s_s
                g = torch.mul(e_s, student[:, None], out=target).sub_(e_t.mul_((weight / s_t)[:, None]))
                if isinstance(chain, Tensor):
                    g.mul_(chain)
        else:
            lp_s, lp_t = a.sub_(log_s_s[:, None]), b.sub_(log_s_t[:, None])
            p_s, pg, fs, ft = terms_parts(lp_s, lp_t, mode, beta)
            loss, center = terms_loss(torch.stack([fs.sum(dim=-1), ft.sum(dim=-1), pg.sum(dim=-1)]), mode, beta)
            # G = pg − p_s · center sums to 0 over the row, as the exact gradient does, only if the center is the
            # mean of pg / p_s under the computed p_s, to the last bit: Σ p_s is 1 only to rounding, and the center's
            # own rounding is ~ulp(center). Either error shifts every G_v by p_s,v times it, and such errors add up
            # coherently in dH = G · W where W's rows share a large component (logits far from 0). So the center is
            # normalized by Σ p_s, and the gradient's residual mean, Σ G / Σ p_s (of the size of those errors, so
            # itself accurate to ~ulp of them), is taken out once more.
            mass = p_s.sum(dim=-1)
            center = center / mass
            if row_weight is not None:
                g = pg.addcmul_(p_s, -center[:, None])
                residual = g.sum(dim=-1) / mass
                g = self._finish_grad(g.addcmul_(p_s, (center_shift - residual)[:, None]), chain, row_weight, out)
                center = center + residual
        return DivergenceStats(loss, lse_s, lse_t, center, lo_s, lo_t, student_entropy), g

    @staticmethod
    def _finish_grad(g: Tensor, chain: Tensor | float, row_scale: Tensor, out: Tensor | None) -> Tensor:
        """g · χ · c (χ the head's chain factor, c a per-row scale: the row weights, over s where g holds e^{z − m}),
        in place, or written into ``out`` when given."""
        if isinstance(chain, Tensor):
            g.mul_(chain)
            factor = row_scale[:, None]
        else:
            factor = (row_scale * chain)[:, None]
        return g.mul_(factor) if out is None else torch.mul(g, factor, out=out)

    def grad(self, zs, zt, ids, stats: DivergenceStats, row_weight, hs, ht, v_lo, mode, beta, out) -> Tensor:
        """dL/d(h·Wᵀ) of one tile (copied into ``out`` when given). The grad is the sweep's last use of the tile,
        so ``zt`` and the temporaries are overwritten in place: the workspace stays at a few tiles."""
        a = final_logits(zs, hs)
        chain = head_chain(a, hs)
        lo_s, lo_t = lse_lo(stats)
        lp_s = self._log_probs(a, stats.student_lse, lo_s)
        p_s = lp_s.exp()
        if mode == "reverse_kl":
            lp_t = self._log_probs(final_logits(zt, ht), stats.teacher_lse, lo_t, in_place=True)
            g = lp_s.sub_(lp_t).sub_(stats.loss[:, None]).mul_(p_s)
        elif mode == "forward_kl":
            p_t = self._log_probs(final_logits(zt, ht), stats.teacher_lse, lo_t, in_place=True).exp_()
            g = p_s.mul_((1.0 - stats.center)[:, None]).sub_(p_t)  # p_s − p_t − p_s · center
        elif mode in TERMS_MODES:
            lp_t = self._log_probs(final_logits(zt, ht), stats.teacher_lse, lo_t)
            _, pg, _, _ = terms_parts(lp_s, lp_t, mode, beta)
            g = pg.addcmul_(p_s, -stats.center[:, None])
        elif mode == "token_logprob":
            g = _one_hot_minus(p_s, ids, v_lo)
        elif mode == "entropy":
            g = lp_s.sub_(stats.center[:, None]).mul_(p_s)
        else:
            g = p_s
        return self._finish_grad(g, chain, row_weight, out)

    def topk_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(m, ℓ, μ) of :meth:`topk`, empty: m = ℓ = −inf, μ = 0."""
        state = torch.zeros((3, rows), device=device, dtype=dtype)
        state[:2] = -math.inf
        return state

    def topk(self, z, head, k, v_lo, best, state):
        """Running top-k over tiles plus entropy statistics relative to the running max m (accurate for
        peaked rows): ℓ = log Σ e^{z−m} and μ = E_p[z] − m, so that lse = m + ℓ and H = ℓ − μ. A tile with
        max m_t, softmax p, ℓ_t = −log max(p) and μ_t = Σ p (z − m_t) merges as a two-part mixture with
        weights ∝ e^{ℓ + m} and e^{ℓ_t + m_t}."""
        z = final_logits(z, head)
        values, ids = tile_topk(z, min(k, z.shape[1]))
        best = merge_topk(best, (values, ids + v_lo), k)
        m, ell, mu = state
        m_t = z.amax(dim=-1)
        shifted = z - m_t[:, None]
        p = torch.softmax(shifted, dim=-1)
        ell_t, mu_t = -torch.log(p.amax(dim=-1)), _rowdot(p, shifted)
        m_new = torch.maximum(m, m_t)
        log_old, log_new = ell + (m - m_new), ell_t + (m_t - m_new)
        ell_new = torch.logaddexp(log_old, log_new)
        w_old, w_new = torch.exp(log_old - ell_new), torch.exp(log_new - ell_new)
        mu.copy_(torch.where(w_old > 0, w_old * (mu + m - m_new), 0.0) + w_new * (mu_t + m_t - m_new))
        ell.copy_(ell_new)
        m.copy_(m_new)
        return best

    def topk_finalize(self, best, state):
        m, ell, mu = state
        logprobs = (best[0] - m[:, None]).sub_(ell[:, None])  # shift and log Σ apart: ~ulp(log p), not ~ulp(lse)
        return best[1], logprobs, m + ell, ell - mu


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


def _log_mixture(lps: Tensor, lpt: Tensor, beta: float) -> Tensor:
    """log m, m = β p_t + (1 − β) p_s, for 0 < β < 1."""
    return torch.logaddexp(lps + math.log1p(-beta), lpt + math.log(beta))


def _entry_terms(lps: Tensor, lpt: Tensor, spec: DivergenceSpec) -> Tensor:
    """The divergence's per-entry terms ℓ_v (summing to D over the vocabulary), as a differentiable tile."""
    if spec.kind == "reverse_kl":
        return lps.exp() * (lps - lpt)
    if spec.kind == "forward_kl":
        return lpt.exp() * (lpt - lps)
    if spec.kind == "tvd":
        return 0.5 * (lps.exp() - lpt.exp()).abs()
    log_m = _log_mixture(lps, lpt, spec.beta)
    to_teacher, to_student = lpt.exp() * (lpt - log_m), lps.exp() * (lps - log_m)
    if spec.kind == "skew_forward_kl":
        return to_teacher
    if spec.kind == "skew_reverse_kl":
        return to_student
    return spec.beta * to_teacher + (1.0 - spec.beta) * to_student


def _clipped_terms_grad(lps: Tensor, lpt: Tensor, terms: Tensor, spec: DivergenceSpec) -> Tensor:
    """∂/∂z_s of Σ_v min(ℓ_v, clip), in closed form (the ops run below autograd, inside torch.library ops).

    Each term ℓ_v depends on the student only through p_s,v, with a_v = ∂ℓ_v/∂p_s,v; with the softmax Jacobian
    ∂p_v/∂z_j = p_v (δ_vj − p_j) and k_v = [ℓ_v ≤ clip] (the clamp's gradient), g = k ⊙ p a − p Σ_v k_v p_v a_v.
    p a is p_s (lp_s − lp_t + 1) for reverse KL, −p_t for forward KL, (1 − β) p_s log(p_s / m) for JSD (the terms
    in p_t and in m's dependence on p_s cancel to that), −(1 − β) p_s p_t / m for the skew forward KL KL(p_t ‖ m),
    p_s (log(p_s / m) + 1) − (1 − β) p_s² / m for the skew reverse KL KL(p_s ‖ m), and ½ p_s sign(p_s − p_t) for
    TVD."""
    p = lps.exp()
    if spec.kind == "reverse_kl":
        pa = p * (lps - lpt + 1.0)
    elif spec.kind == "forward_kl":
        pa = lpt.exp().neg_()
    elif spec.kind == "tvd":
        pa = 0.5 * p * torch.sign(p - lpt.exp())
    else:
        log_m = _log_mixture(lps, lpt, spec.beta)
        if spec.kind == "jsd":
            pa = (1.0 - spec.beta) * p * (lps - log_m)
        elif spec.kind == "skew_forward_kl":
            pa = -(1.0 - spec.beta) * (lps + lpt - log_m).exp()
        else:
            pa = p * (lps - log_m + 1.0) - (1.0 - spec.beta) * (2.0 * lps - log_m).exp()
    kept = torch.where(terms <= spec.entry_clip, pa, 0.0)
    return kept.sub_(p * kept.sum(dim=-1, keepdim=True))


def _logits_layout(weight: Tensor) -> Tensor:
    """``weight`` [V, H] stored column-major (a view of a row-major Wᵀ) for a logits GEMM h · Wᵀ on the CPU at a
    small H: MKL's fp32 GEMM then runs without transposing B, 1.6× as fast at H = 64 (3.8 vs 6.1 ms for a
    [128, 64] · [64, 32768] tile on one core) and 1.3× at H = 128; from H = 256 on it makes no difference. The
    dH GEMM G · W runs ~25% slower from this layout, so it serves weights without a gradient only."""
    if weight.device.type != "cpu" or weight.shape[1] > 128 or weight.stride(0) == 1:
        return weight
    return weight.T.contiguous().T


class TorchOps(Sweep):
    """The torch backend's ops; ``entry_clip`` (per-entry clipping of the divergence) is computed here only."""

    def __init__(self, plan: str = "chunked"):
        super().__init__("torch", TorchEpilogue(), plan)

    def _operands(self, sides: list[Side], temperatures: list[float], fold: bool = True) -> list[Operand]:
        """The models' operands; the teacher's weight (the second model's, which enters only its logits GEMM) in
        the layout that GEMM runs fastest from (:func:`_logits_layout`)."""
        ops = super()._operands(sides, temperatures, fold)
        return [ops[0], *(dataclasses.replace(op, weight=_logits_layout(op.weight)) for op in ops[1:])]

    def divergence(self, s: Side, t: Side, spec: DivergenceSpec, row_weight, need: Need, labels=None):
        if spec.entry_clip is None:
            return super().divergence(s, t, spec, row_weight, need, labels)
        return self._clipped(s, t, spec, row_weight, need, labels)

    def divergence_backward(self, s, t, spec, stats, row_weight, need, labels=None):
        if spec.entry_clip is None:
            return super().divergence_backward(s, t, spec, stats, row_weight, need, labels)
        return self._clipped(s, t, spec, row_weight, need, labels)[1]

    def _clipped(self, s: Side, t: Side, spec: DivergenceSpec, row_weight, need: Need, labels=None):
        """D = Σ_v min(ℓ_v, entry_clip) per token, with its gradient (zero where clipped, :func:`_clipped_terms_grad`)
        from each token chunk's logits; a whole vocabulary row per chunk (the clip needs every term of a row). With
        ``labels``, the gradient is that of w · CE + (1 − w) · D (sweep.HardLabels: CE's is p_s − e_y)."""
        epi = self.epilogue
        op_s, op_t = epi.prepare(s, spec.temperature), epi.prepare(t, spec.teacher_temperature)
        weight = spec.hard_label_weight if labels is not None else 0.0
        head_s, head_t = op_s.tile(slice(None)), op_t.tile(slice(None))
        n_tokens, vocab = op_s.hidden.shape[0], op_s.weight.shape[0]
        rows_per_chunk = max(1, get_chunk_budget(op_s.hidden.device) // vocab)
        out = DivergenceStats(*(op_s.hidden.new_zeros(n_tokens) for _ in range(4)))
        if spec.entropy:
            out = out._replace(student_entropy=op_s.hidden.new_zeros(n_tokens))
        want_grad = row_weight is not None and need.any
        dh = op_s.hidden.new_zeros(op_s.hidden.shape) if want_grad and need.hidden else None
        dw = op_s.weight.new_zeros(op_s.weight.shape) if want_grad and need.weight else None
        db = op_s.hidden.new_zeros(vocab) if want_grad and need.bias else None
        for start in range(0, n_tokens, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, n_tokens))
            zs = final_logits(op_s.hidden[rows] @ op_s.weight.T, head_s)
            zt = final_logits(op_t.hidden[rows] @ op_t.weight.T, head_t)
            lps, lpt = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
            terms = _entry_terms(lps, lpt, spec)
            loss = terms.clamp(max=spec.entry_clip).sum(dim=-1)
            if want_grad:
                g = _clipped_terms_grad(lps, lpt, terms, spec)
                if labels is not None:
                    g.mul_(1.0 - weight).add_(weight * _one_hot_minus(lps.exp(), labels[rows], 0).neg_())
                g.mul_(head_chain(zs, head_s)).mul_(row_weight[rows].to(g.dtype)[:, None])
            out.loss[rows] = loss
            out.student_lse[rows] = torch.logsumexp(zs, dim=-1)
            out.teacher_lse[rows] = torch.logsumexp(zt, dim=-1)
            if spec.entropy:
                out.student_entropy[rows] = -_rowdot(lps.exp(), lps)
            if want_grad:
                if dh is not None:
                    dh[rows] = g @ op_s.weight
                if dw is not None:
                    dw += g.T @ op_s.hidden[rows]
                if db is not None:
                    db += g.sum(dim=0)
        scale = op_s.grad_scale
        if dh is not None:
            dh *= scale
        if db is not None:
            db *= scale
        if labels is not None:
            out = out._replace(label_logit=label_logits(op_s, labels)[0])
        return out, Grads(dh, dw, db)
