"""Triton backend: the ops of :mod:`opd_fast.backends` on the kernels of :mod:`opd_fast.kernels`, for both plans.

* **chunked** (default): the shared sweep of :mod:`opd_fast.backends.sweep` — cuBLAS chunk logits, the fused
  Triton epilogue of :mod:`opd_fast.kernels.chunk_stats` (statistics, with the student's entropy in the same read
  when asked), :mod:`opd_fast.kernels.chunk_terms` (the terms of JSD, the skew KLs and TVD) and
  :mod:`opd_fast.kernels.chunk_grad` (logit gradients), with the head applied on the fly,
  cuBLAS gradient GEMMs. Top-k ranks each chunk's final logits with ``torch.topk`` (a radix select over a row
  already in memory) and its entropy with torch ops.
* **streaming** (low memory, no logits workspace): the fused tl.dot kernels — one pass of
  ``softmax_stats`` over the vocabulary for the log-sum-exps, the divergence and (``return_entropy``) the student's
  entropy (JSD, the skew KLs and TVD take a second pass, ``divergence_terms``), ``logit_grad_backward`` recomputing
  the logits tiles chunk by chunk for dH, dW (and the bias gradient), with opt-in gradient filtering; top-k by the
  streaming ``topk_stats`` kernel.

Inputs: fp32, bf16 or fp16 (each model's hidden states and weight are brought to a common dtype); the
kernels accumulate in fp32. The logit gradient G feeds the gradient GEMMs in the GEMM inputs' dtype; fp16 cannot
hold it (its values, ~ w·p/τ per token, fall below fp16's normal range, 6.1e-5, at any realistic vocabulary and
lose their digits to its subnormals: 7e-2 relative error on dH at τ = 100), so fp16 inputs run in fp32 on both
plans (TF32 where torch's matmul precision allows it); bf16 keeps fp32's exponent range. Under Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which has no bf16 ``tl.dot``, the streaming kernels take bf16 inputs upcast
to fp32 (the chunked plan's GEMMs are torch's). The chunked plan's bf16 GEMMs on CUDA write fp32 through
``torch.mm(..., out_dtype=)``, added in torch 2.8: older releases are refused with that reason.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.backends import BackendUnavailableError
from opd_fast.backends.epilogue import Operand, kernel_dtype, kernel_operand, unit_stride
from opd_fast.backends.gemms import FilterStats, set_filter_stats
from opd_fast.backends.hard_labels import label_logits, shifted_center
from opd_fast.backends.online_softmax import lse_lo, terms_loss
from opd_fast.backends.sweep import Sweep
from opd_fast.backends.torch_epilogue import TorchEpilogue
from opd_fast.chunking import get_chunk_budget
from opd_fast.kernels import chunk_grad, chunk_stats, chunk_terms
from opd_fast.kernels._common import dot_precision, is_interpreter
from opd_fast.kernels.linear_grad import logit_grad_backward
from opd_fast.kernels.linear_softmax import divergence_terms as linear_divergence_terms
from opd_fast.kernels.linear_softmax import softmax_stats
from opd_fast.kernels.linear_topk import MAX_K, topk_stats
from opd_fast.types import DivergenceStats, Grads, Need, Side

# The streaming backward's gradient workspace holds WORKSPACE_FACTOR × chunk budget elements.
WORKSPACE_FACTOR = 8
Tensor = torch.Tensor


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the Triton backend runs the GEMMs of inputs in ``dtype`` (their common dtype) in: fp32 for fp16,
    whose range cannot hold the logit gradient G (see the module docstring), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


@functools.cache
def mm_out_dtype_error(device: torch.device) -> str | None:
    """Why torch cannot write a bf16 GEMM's product in fp32 on ``device`` (``torch.mm(..., out_dtype=)``, as the
    chunked plan's logits and gradient GEMMs do), None when it can: one tiny GEMM tried once per device."""
    operand = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
    try:
        torch.mm(operand, operand, out_dtype=torch.float32)
    except TypeError:
        return (
            f"torch {torch.__version__} lacks torch.mm(..., out_dtype=) (added in torch 2.8), which the chunked "
            "plan's bfloat16 GEMMs use on CUDA; upgrade torch, or use plan='streaming' or backend='torch'"
        )
    return None


class TritonEpilogue(TorchEpilogue):
    """The chunked plan's per-tile math as Triton kernels (top-k stays torch's: see the module docstring)."""

    full_rows = None  # statistics and gradient come from the Triton kernels, not the torch one-pass path

    def prepare(self, side: Side, temperature: float, fold: bool = True) -> Operand:
        operand = kernel_operand(side, temperature, "triton")  # never folds: the epilogue applies the head
        dtype = gemm_dtype(operand.weight.dtype)
        if dtype != operand.weight.dtype:
            return dataclasses.replace(operand, hidden=operand.hidden.to(dtype), weight=operand.weight.to(dtype))
        if dtype != torch.float32 and operand.weight.is_cuda:
            error = mm_out_dtype_error(operand.weight.device)
            if error is not None:
                raise BackendUnavailableError(f"backend='triton' with plan='chunked' cannot run here: {error}")
        return operand

    def grad_dtype(self, operand: Operand) -> torch.dtype:
        return operand.weight.dtype

    def stats_update(self, state, zs, zt, ids, hs, ht, v_lo, mode, entropy=None) -> None:
        """The statistics kernel, with ``entropy`` also merging the student's tile into that state in the same read
        (its (m, s) are the statistics' own student (m, s), and one more per-lane sum)."""
        chunk_stats.stats_update(state, zs, zt, ids, hs, ht, v_lo, mode, entropy)

    def terms_update(self, terms, zs, zt, stats, hs, ht, mode, beta) -> None:
        lse = (stats.student_lse, stats.teacher_lse, *lse_lo(stats))
        chunk_terms.terms_update(terms, zs, zt, lse, hs, ht, mode, beta)

    def grad(self, zs, zt, ids, stats, row_weight, hs, ht, v_lo, mode, beta, out) -> Tensor:
        lo_s, lo_t = lse_lo(stats)
        stats = stats._replace(student_lse_lo=lo_s, teacher_lse_lo=lo_t)
        return chunk_grad.logit_grad(zs, zt, ids, stats, row_weight, hs, ht, v_lo, mode, beta, out)


class _Prepared:
    """A model's operands for the streaming kernels: 2-D tensors and the head (bias | None, pre, softcap, post)."""

    def __init__(self, side: Side, temperature: float):
        dtype = gemm_dtype(kernel_dtype(side, "triton"))
        if is_interpreter() and dtype == torch.bfloat16:
            dtype = torch.float32  # the interpreter has no bf16 tl.dot
        self.hidden = unit_stride(side.hidden.to(dtype))
        self.weight = unit_stride(side.weight.to(dtype))
        bias = None if side.bias is None else side.bias.float().contiguous()
        self.head = (bias, side.head.scale, side.head.softcap, 1.0 / temperature)
        self.precision = dot_precision(self.weight.dtype)
        self.grad_dtype = side.weight.dtype


class TritonStreamingOps:
    """The streaming plan on the fused tl.dot kernels (see the module docstring)."""

    name, plan = "triton", "streaming"

    def __init__(self, plan: str = "streaming"):
        self.plan = plan

    def _stats(self, s: _Prepared, t: _Prepared, spec: DivergenceSpec) -> DivergenceStats:
        """The statistics pass (with spec.entropy, the student's entropy from the same pass), then the terms pass of
        the TERMS_MODES."""
        (lse_s, lo_s), (lse_t, lo_t), loss, *entropy = softmax_stats(
            s.hidden, s.weight, t.hidden, t.weight, None, s.head, t.head, mode=spec.kind, precision=s.precision,
            entropy=spec.entropy,
        )  # fmt: skip
        zeros = torch.zeros_like(lse_s)
        if spec.kind == "reverse_kl":
            stats = DivergenceStats(loss, lse_s, lse_t, loss, lo_s, lo_t)
        elif spec.kind == "forward_kl":
            stats = DivergenceStats(loss, lse_s, lse_t, zeros, lo_s, lo_t)
        else:
            stats = DivergenceStats(zeros, lse_s, lse_t, zeros, lo_s, lo_t)
            loss, center = terms_loss(self._terms(s, t, spec, stats), spec.kind, spec.beta)
            stats = stats._replace(loss=loss, center=center)
        return stats._replace(student_entropy=entropy[0]) if entropy else stats

    @staticmethod
    def _row_lse(stats: DivergenceStats) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Each model's (lse, residual) as fp32 [N] kernel operands (residual 0 where only the lse is known)."""
        lo_s, lo_t = lse_lo(stats)
        pairs = ((stats.student_lse, lo_s), (stats.teacher_lse, lo_t))
        return tuple(tuple(x.float().contiguous() for x in pair) for pair in pairs)

    def _terms(self, s: _Prepared, t: _Prepared, spec: DivergenceSpec, stats: DivergenceStats):
        """The terms pass of JSD, the skew KLs and TVD (spec.kind) given the rows' final lse: [3, N]."""
        args = (s.hidden, s.weight, t.hidden, t.weight, *self._row_lse(stats), s.head, t.head)
        return linear_divergence_terms(*args, mode=spec.kind, beta=spec.beta, precision=s.precision)

    def _grads(self, mode, s: _Prepared, t: _Prepared | None, ids, stats, row_weight, beta, need: Need, filter_eps):
        filter_stats = FilterStats()
        loss, center = stats.loss.float().contiguous(), stats.center.float().contiguous()
        lse_s, lse_t = self._row_lse(stats)
        dh, dw, db = logit_grad_backward(
            s.hidden,
            s.weight,
            None if t is None else t.hidden,
            None if t is None else t.weight,
            ids,
            lse_s,
            None if t is None else lse_t,
            loss,
            center,
            row_weight.float().contiguous(),
            s.head,
            None if t is None else t.head,
            mode=mode,
            beta=beta,
            filter_eps=filter_eps or 0.0,
            precision=s.precision,
            need_dh=need.hidden,
            need_dw=need.weight,
            need_db=need.bias,
            workspace_elements=WORKSPACE_FACTOR * get_chunk_budget(s.hidden.device),
            stats=filter_stats,
        )
        set_filter_stats(filter_stats)
        return Grads(dh, dw, db)

    def _label_logits(self, p: _Prepared, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(z_y, dz_y/dx_y) at each row's label column (both 0 at −1): hard_labels.label_logits, one row dot each."""
        return label_logits(Operand(p.hidden, p.weight, *p.head), labels)

    def _divergence_grads(self, spec: DivergenceSpec, s: _Prepared, t: _Prepared, stats, row_weight, need, labels):
        """Gradients of Σ w_n L_n: L = D, or with ``labels`` w_h · CE + (1 − w_h) · D (w_h = spec.hard_label_weight).
        CE's p_s part folds into D's gradient pass as in the sweep (hard_labels.HardLabels: row weights times 1 − w_h,
        the center lowered by w_h / (1 − w_h)); its one-hot part, −w w_h χ_y at each row's label column, is added here,
        O(N · H): to dH the label's weight row, to dW (in the weight's dtype, after the kernel's rounding) the row's
        hidden state, to db the coefficient."""
        if labels is None:
            return self._grads(spec.kind, s, t, None, stats, row_weight, spec.beta, need, spec.filter_eps)
        weight = spec.hard_label_weight
        stats = shifted_center(stats, spec.kind, weight / (1.0 - weight))
        grads = self._grads(spec.kind, s, t, None, stats, row_weight * (1.0 - weight), spec.beta, need, spec.filter_eps)
        coef = row_weight.float() * weight * self._label_logits(s, labels)[1]  # 0 where another shard holds the label
        ids = labels.clamp_min(0)
        if grads.hidden is not None:
            grads.hidden.sub_(coef[:, None] * s.weight.index_select(0, ids).float())
        if grads.weight is not None:
            grads.weight.index_add_(0, ids, (coef[:, None] * s.hidden.float()).to(grads.weight.dtype), alpha=-1)
        if grads.bias is not None:
            grads.bias.index_add_(0, ids, coef, alpha=-1)
        return grads

    def divergence(self, s: Side, t: Side, spec: DivergenceSpec, row_weight, need: Need, labels=None):
        ps, pt = _Prepared(s, spec.temperature), _Prepared(t, spec.teacher_temperature)
        stats = self._stats(ps, pt, spec)
        if labels is not None:  # the statistics keep D; the caller adds the cross-entropy lse_s − z_y
            stats = stats._replace(label_logit=self._label_logits(ps, labels)[0])
        if row_weight is None or not need.any:
            return stats, Grads()
        return stats, self._divergence_grads(spec, ps, pt, stats, row_weight, need, labels)

    def divergence_backward(
        self, s: Side, t: Side, spec: DivergenceSpec, stats, row_weight, need: Need, labels=None
    ) -> Grads:
        ps, pt = _Prepared(s, spec.temperature), _Prepared(t, spec.teacher_temperature)
        return self._divergence_grads(spec, ps, pt, stats, row_weight, need, labels)

    def divergence_label_logits(self, s: Side, spec: DivergenceSpec, labels: Tensor) -> Tensor:
        """The student's final logit at each row's label column (0 where ``labels`` is −1)."""
        return self._label_logits(_Prepared(s, spec.temperature), labels)[0]

    def divergence_terms(
        self, s: Side, t: Side, spec: DivergenceSpec, lse_s: Tensor, lse_t: Tensor, lo_s=None, lo_t=None
    ):
        stats = DivergenceStats(torch.zeros_like(lse_s), lse_s, lse_t, torch.zeros_like(lse_s), lo_s, lo_t)
        return self._terms(_Prepared(s, spec.temperature), _Prepared(t, spec.teacher_temperature), spec, stats)

    def token_logits(self, side: Side, ids: Tensor, temperature: float):
        p = _Prepared(side, temperature)
        (lse, lse_lo), _, picked = softmax_stats(
            p.hidden, p.weight, None, None, ids, p.head, None, mode="token_logprob", precision=p.precision
        )
        return picked, lse, lse_lo

    def logsumexp(self, side: Side, temperature: float) -> Tensor:
        p = _Prepared(side, temperature)
        return softmax_stats(
            p.hidden, p.weight, None, None, None, p.head, None, mode="logsumexp", precision=p.precision
        )[0][0]

    def logits_backward(
        self, side: Side, ids, lse, row_weight, temperature, need: Need, filter_eps=None, lse_lo=None
    ) -> Grads:
        """``lse_lo``: the rows' lse residuals from :meth:`token_logits` (None: 0, where only the lse is known); with
        them p = e^{(z − lse) − lse_lo} is accurate to ~ulp(log p), without them to ~ulp(lse)."""
        p = _Prepared(side, temperature)
        lse = lse.float().contiguous()
        zeros = torch.zeros_like(lse)
        lo = None if lse_lo is None else lse_lo.float().contiguous()
        stats = DivergenceStats(zeros, lse, lse, zeros, lo, lo)
        mode = "logsumexp" if ids is None else "token_logprob"
        return self._grads(mode, p, None, ids, stats, row_weight, 0.0, need, filter_eps)

    def entropy_backward(
        self, side: Side, lse, lse_lo, entropy, row_weight, temperature: float, need: Need, filter_eps=None
    ) -> Grads:
        """Gradients of Σ w_n H_n from the rows' (lse, lse_lo) and entropy H: the gradient pass of mode "entropy",
        p_s (log p_s − center) with center −H and row weights −w, i.e. w ∂H/∂z = −w p_s (log p_s + H)."""
        p = _Prepared(side, temperature)
        lse, lo, center = (x.float().contiguous() for x in (lse, lse_lo, -entropy))
        stats = DivergenceStats(torch.zeros_like(lse), lse, lse, center, lo, lo)
        return self._grads("entropy", p, None, None, stats, -row_weight, 0.0, need, filter_eps)

    def topk(self, side: Side, k: int, temperature: float):
        """Top-k lists longer than the kernel's register budget (k > MAX_K) are streamed by the torch
        backend's epilogue on the same device."""
        if k > MAX_K:
            return Sweep("torch", TorchEpilogue(), "streaming").topk(side, k, temperature)
        p = _Prepared(side, temperature)
        ids, logits, lse, entropy = topk_stats(p.hidden, p.weight, k, p.head, precision=p.precision)
        return ids, logits - lse[:, None], lse, entropy


def TritonOps(plan: str = "chunked"):
    """The Triton backend's ops for ``plan``."""
    if plan == "streaming":
        return TritonStreamingOps()
    return Sweep("triton", TritonEpilogue(), plan)
