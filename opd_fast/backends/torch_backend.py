"""The pure-PyTorch backend: the CPU path of every op, the shared sweep of :mod:`opd_fast.backends.sweep` on the
readable per-tile math of :class:`opd_fast.backends.torch_epilogue.TorchEpilogue`, and the one op only it computes,
per-entry clipping of the divergence (``entry_clip``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.backends.epilogue import Operand
from opd_fast.backends.hard_labels import label_logits
from opd_fast.backends.sweep import Sweep
from opd_fast.backends.torch_epilogue import TorchEpilogue
from opd_fast.backends.torch_math import final_logits, head_chain, one_hot_minus, rowdot
from opd_fast.chunking import get_chunk_budget
from opd_fast.types import DivergenceStats, Grads, Need, Side

Tensor = torch.Tensor


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
        ``labels``, the gradient is that of w · CE + (1 − w) · D (hard_labels.HardLabels: CE's is p_s − e_y)."""
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
                    g.mul_(1.0 - weight).add_(weight * one_hot_minus(lps.exp(), labels[rows], 0).neg_())
                g.mul_(head_chain(zs, head_s)).mul_(row_weight[rows].to(g.dtype)[:, None])
            out.loss[rows] = loss
            out.student_lse[rows] = torch.logsumexp(zs, dim=-1)
            out.teacher_lse[rows] = torch.logsumexp(zt, dim=-1)
            if spec.entropy:
                out.student_entropy[rows] = -rowdot(lps.exp(), lps)
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
