"""The torch backend's epilogue: the per-tile math in torch ops, the readable spec of what the kernels compute.

The torch backend (:mod:`opd_fast.backends.torch_backend`) is the shared sweep of :mod:`opd_fast.backends.sweep`
(chunk plan, GEMMs, gradient accumulation) with this per-tile math. Everything is computed in fp32 (fp64 for fp64
inputs): low-precision hidden states and weights are upcast once per call, which costs O((N + V)·H) memory and never
O(N·V). The head's linear factors (its scale, and 1/τ when there is no softcap) are folded into the upcast hidden states
and bias, so for most heads the tiles are the final logits already.

The logits of a tile are z = post · softcap_c(pre · (h·Wᵀ + b)) (:class:`opd_fast.backends.epilogue.Operand`),
and with the rows' log-probs lp = z − lse the logit gradients of the per-token divergence D are
(docs/design.md §2, ``center`` from the forward):

* reverse KL  D = Σ p_s (lp_s − lp_t):           ∂D/∂z_s = p_s ⊙ (lp_s − lp_t − D)
* forward KL  D = Σ p_t (lp_t − lp_s):           ∂D/∂z_s = p_s − p_t
* JSD(β)      D = β KL(p_t‖m) + (1−β) KL(p_s‖m), m = β p_t + (1−β) p_s:
              ∂D/∂z_s = p_s ⊙ ((1−β) log(p_s/m) − center),   center = (1−β) KL(p_s‖m),
              in the cancellation-free form of :func:`torch_math.jsd_parts`
* skew KLs    KL(p_t ‖ m) (forward, β = α) and KL(p_s ‖ m) (reverse, β = 1 − α), and TVD ½ Σ |p_s − p_t|:
              ∂D/∂z_s = pg − p_s center with pg of :func:`torch_math.terms_parts` (:func:`online_softmax.terms_loss`)
* token       log p(y):                           ∂/∂z = [v = y] − p
* logsumexp   lse:                                ∂/∂z = p
* entropy     H = −Σ p log p:                     ∂H/∂z = −p (log p + H)   (mode "entropy": p (log p − center)
                                                  with center = −H, the row weight −w)

and the chain rule through the head multiplies by dz/d(h·Wᵀ) = post · pre · (1 − tanh²), tanh = z / (c·post).
"""

from __future__ import annotations

import math

import torch

from opd_fast.backends.epilogue import TERMS_MODES, TWO_MODEL_MODES, Operand, fold_linear
from opd_fast.backends.online_softmax import lse_lo, split_lse, terms_loss
from opd_fast.backends.torch_math import (
    final_logits,
    head_chain,
    merge_entropy,
    merge_kl,
    merge_online,
    merge_topk,
    one_hot_minus,
    rowdot,
    shift_exp_sum,
    terms_parts,
    tile_sums,
    tile_topk,
    token_logit,
)
from opd_fast.types import DivergenceStats, Side, accumulation_dtype

Tensor = torch.Tensor


class TorchEpilogue:
    """The per-tile math in torch ops (see the module docstring)."""

    takes_row_stride = True  # torch ops take any view (the Triton epilogue inherits it: stride_z, stride_g)

    def __init__(self) -> None:
        self._tiles: dict[int, Tensor] = {}  # scratch tiles of :meth:`_tile`

    def prepare(self, side: Side, temperature: float, fold: bool = True) -> Operand:
        dtype = accumulation_dtype(side.hidden.dtype, side.weight.dtype)
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
            merge_kl((m_s, s_s), (m_t, s_t), acc, a, final_logits(zt, ht))
            return
        if mode == "forward_kl":
            merge_kl((m_t, s_t), (m_s, s_s), acc, final_logits(zt, ht), a)
            return
        merge_online(m_s, s_s, *tile_sums(a))
        if mode in TERMS_MODES:
            merge_online(m_t, s_t, *tile_sums(final_logits(zt, ht)))
            return
        if mode == "token_logprob":
            acc.add_(token_logit(a, ids, v_lo))

    @staticmethod
    def _log_probs(z: Tensor, lse: Tensor, lo: Tensor, in_place: bool = False) -> Tensor:
        """log p = (z − lse) − lse_lo (online_softmax.split_lse), over ``z`` when ``in_place``, else as a new tensor."""
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

        Each row is shifted by its max m in place, e = e^{z − m} and s = Σ e (:func:`shift_exp_sum`): log p = z − m
        − log s is accurate to ~ulp(log p), not ~ulp(lse), and p = e / s. The KLs are taken on the shifted logits,
        whose difference d = (z_s − m_s) − (z_t − m_t) differs from log p_s − log p_t by the row constant
        c = log s_s − log s_t (no z_s − z_t of size |z| that would cancel):

        reverse KL  D = Σ p_s d − c,   G = p_s (d − Σ p_s d) = (e_s d − (Σ p_s d) e_s) / s_s  (c drops out)
        forward KL  D = Σ p_t d' + c with d' = −d,   G = p_s − p_t = e_s / s_s − e_t / s_t
        entropy     H = −Σ p_s log p_s = log s_s − Σ e_s (z_s − m_s) / s_s  (``entropy``: one row dot more)

        ``center_shift`` c adds c · p_s to G (a hard-label term's p_s part, hard_labels.HardLabels): the gradient pass's
        center lowered by c.
        """
        a = final_logits(zs, hs)
        chain = head_chain(a, hs) if row_weight is not None else None
        zeros = a.new_zeros(a.shape[0])
        token = token_logit(a, ids, 0) if mode == "token_logprob" else zeros
        e_s = self._tile(0, a)
        m_s, s_s = shift_exp_sum(a, e_s)
        lse_s, lo_s = split_lse(m_s, s_s)
        student_entropy = s_s.log() - rowdot(e_s, a) / s_s if entropy else None
        if mode not in TWO_MODEL_MODES:
            stats = DivergenceStats(token, lse_s, lse_s, zeros, lo_s, lo_s, student_entropy)
            if row_weight is None:
                return stats, None
            g = torch.div(e_s, s_s[:, None], out=a)  # p
            if mode == "token_logprob":
                g = one_hot_minus(g, ids, 0)
            return stats, self._finish_grad(g, chain, row_weight, out)
        b = final_logits(zt, ht)
        e_t = self._tile(1, b)
        m_t, s_t = shift_exp_sum(b, e_t)
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
            g = one_hot_minus(p_s, ids, v_lo)
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
        ell_t, mu_t = -torch.log(p.amax(dim=-1)), rowdot(p, shifted)
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
