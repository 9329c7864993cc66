"""The divergence as custom ops: ``opd_fast::divergence``, its backward for reduction "none"
(``opd_fast::divergence_backward``) and the gradient of the student's entropy (``opd_fast::entropy_backward``),
with their autograd formula, and :func:`linear_divergence`, which the public functions call.

Gradient timing. For "mean" and "sum" the per-token gradient weights are known in the forward, so the
student gradients are made in the same sweep over the logits (the floor's FLOPs: no recompute) and the
backward only scales them by the incoming scalar; a second backward through the same graph is refused
because the buffers are scaled in place. For "none" the forward keeps O(N) statistics and the backward
sweeps the logits once more with the per-token incoming gradient; so does a backward that reaches a
differentiable entropy (``entropy_grad``). Nothing gradient-related runs when grad mode is off or no student
tensor requires grad.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd_fast._rows import counted_rows, scatter_rows, select_rows
from opd_fast._validation import DivergenceSpec, check_label_range
from opd_fast.backends.gemms import weight_grad_dtype
from opd_fast.backends.online_softmax import lse_lo
from opd_fast.library._common import (
    backend_ops,
    custom_op,
    empty,
    fake_grads,
    global_vocab,
    grad_outputs,
    head_args,
    head_transform,
    input_grads,
    wants_grad,
    zero_grads,
)
from opd_fast.types import DivergenceStats, Need, Side, accumulation_dtype

if TYPE_CHECKING:
    from opd_fast._dispatch import CheckedPair

Tensor = torch.Tensor

_SECOND_BACKWARD = (
    "opd_fast computed this loss's gradients in the forward and has already handed them out; a second "
    "backward through the same graph (retain_graph=True) is not supported — recompute the loss instead"
)

# The statistics rows the backward of reduction="none" needs: DivergenceStats' first six fields.
STATS_ROWS = 6


def _sides(hs, ws, bs, ht, wt, bt, rows, head_s, head_t, vocab: int | None = None) -> tuple[Side, Side]:
    """Both models' sides for the counted ``rows``, the student's head cut to its first ``vocab`` rows (None:
    all) here, inside the op: a slice outside would make autograd zero-fill a full-size weight gradient."""
    if vocab is not None:
        ws, bs = ws[:vocab], None if bs is None else bs[:vocab]
    student = Side(select_rows(hs, rows), ws, bs, head_transform(head_s))
    return student, Side(select_rows(ht, rows), wt, bt, head_transform(head_t))


def _forward_grad_layout(hs, ws, out_dtype, backend, plan, filter_eps, vocab, need) -> list[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of the dH, dW, db outputs of :func:`divergence` for "mean"/"sum": dH and db in ``out_dtype``,
    dW as the backend makes it (:func:`opd_fast.backends.gemms.weight_grad_dtype`: the weight's dtype when written
    once, the fp32 accumulator's otherwise, so that no pass converts it before the backward's one), the weight and
    bias of the vocabulary's rows only; empty where ``need`` is False."""
    rows = ws.shape[0] if vocab is None else vocab
    dw_dtype = weight_grad_dtype(
        backend, plan, hs.shape[0], rows, hs.shape[1], hs.dtype, ws.dtype, hs.device, filter_eps
    )
    shapes = ((hs.shape[0], hs.shape[1]), (rows, ws.shape[1]), (rows,))
    dtypes = (out_dtype, dw_dtype, out_dtype)
    return [(shape if wanted else (0,), dtype) for shape, wanted, dtype in zip(shapes, need, dtypes)]


@custom_op("divergence")
def divergence(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    ht: Tensor,
    wt: Tensor,
    bt: Tensor | None,
    mask: Tensor | None,
    backend: str,
    plan: str,
    shard: str,
    head_s: list[float],
    head_t: list[float],
    kind: str,
    beta: float,
    temperature: float,
    teacher_temperature: float,
    filter_eps: float | None,
    entry_clip: float | None,
    reduction: str,
    need: list[bool],
    vocab: int | None = None,
    entropy: bool = False,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, statistics, dH, dW, db) of the divergence ``kind`` between student (s) and teacher (t), over the
    first ``vocab`` rows of the student's head (None: all; the teacher's come cut to them).

    loss: a scalar for "mean" (over the rows ``mask`` counts; 0 when none) and "sum", fp32 ``[N]`` for "none"
    (0 at rows left out). statistics: for "none", ``[6, N]`` (loss, lse_s, lse_t, center, lse_lo_s, lse_lo_t) for
    the backward, else empty. dH, dW, db: for "mean"/"sum", the gradients of the loss w.r.t. hs and the ``vocab``
    rows of ws, bs where ``need`` says, else empty (:func:`_forward_grad_layout`); the backward scales them and
    makes the full-size gradients. entropy: with ``entropy``, the student's entropy ``[N]`` from the same sweep (0
    at rows left out; not differentiable), else empty. labels: int64 ``[N]`` (global ids in the counted rows) for a
    loss w · CE(p_s, labels) + (1 − w) · D with w = ``hard_label_weight`` (the statistics keep D alone); their range
    is checked here, on real values: a compiled graph cannot read them. entropy_grad: the entropy is differentiable
    (its backward is :func:`entropy_backward`, one more sweep over the student's logits), and the statistics
    ``[6, N]`` come out for every reduction (its backward needs the rows' lse).
    """
    if labels is not None:
        check_label_range(labels, global_vocab(shard, ws.shape[0] if vocab is None else vocab))
    ops = backend_ops(backend, plan, shard)
    spec = DivergenceSpec(
        kind, beta, temperature, filter_eps, entry_clip, teacher_temperature, entropy=entropy,
        hard_label_weight=hard_label_weight,
    )  # fmt: skip
    rows = counted_rows(mask)
    s, t = _sides(hs, ws, bs, ht, wt, bt, rows, head_s, head_t, vocab)
    row_labels = None if labels is None else select_rows(labels, rows)
    n_rows, count = hs.shape[0], s.hidden.shape[0]
    out_dtype = accumulation_dtype(hs, ws, ht, wt)
    none = empty(hs, out_dtype)
    zero_entropy = hs.new_zeros(n_rows if entropy else 0, dtype=out_dtype)
    if reduction == "none":
        stats = hs.new_zeros((STATS_ROWS, n_rows), dtype=out_dtype)
        if count:
            per_token = ops.divergence(s, t, spec, None, Need(), row_labels)[0]
            stats = _stats_rows(per_token, rows, n_rows, out_dtype)
            loss = scatter_rows(_with_hard_labels(per_token, spec).to(out_dtype), rows, n_rows)
            return loss, stats, none, none.clone(), none.clone(), _entropy(per_token, rows, n_rows)
        return stats[0].clone(), stats, none, none.clone(), none.clone(), zero_entropy
    wanted = Need(*need)
    layout = _forward_grad_layout(hs, ws, out_dtype, backend, plan, filter_eps, vocab, need)
    if not count:
        zeros = (hs.new_zeros(shape, dtype=dtype) for shape, dtype in layout)
        stats = hs.new_zeros((STATS_ROWS, n_rows), dtype=out_dtype) if entropy_grad else none
        return hs.new_zeros((), dtype=out_dtype), stats, *zeros, zero_entropy
    weight = 1.0 / count if reduction == "mean" else 1.0
    row_weight = s.hidden.new_full((count,), weight, dtype=out_dtype) if wanted.any else None
    stats, grads = ops.divergence(s, t, spec, row_weight, wanted, row_labels)
    if grads.hidden is not None:
        grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, n_rows))
    loss = _with_hard_labels(stats, spec).to(out_dtype).sum() * weight
    # .to: a no-op but where a mask leaves one chunk of the rows the layout planned several for (or the reverse)
    outputs = (hs.new_empty(0, dtype=dtype) if g is None else g.to(dtype) for g, (_, dtype) in zip(grads, layout))
    kept = _stats_rows(stats, rows, n_rows, out_dtype) if entropy_grad else none
    return loss, kept, *outputs, _entropy(stats, rows, n_rows)


def _stats_rows(stats: DivergenceStats, rows: Tensor | None, n_rows: int, dtype: torch.dtype) -> Tensor:
    """The statistics ``[6, N]`` the backwards read (loss, lse_s, lse_t, center, lse_lo_s, lse_lo_t), of the counted
    rows put back at their rows (0 elsewhere)."""
    counted = torch.stack((*stats[:4], *lse_lo(stats))).to(dtype)
    return scatter_rows(counted.T, rows, n_rows).T.contiguous()


def _with_hard_labels(stats: DivergenceStats, spec: DivergenceSpec) -> Tensor:
    """The per-row loss: D, or (1 − w) D + w CE with CE = −log p_s(y) = (lse_s − z_y) + lse_lo_s when the op took
    labels (the statistics hold the label's logit)."""
    if stats.label_logit is None:
        return stats.loss
    weight = spec.hard_label_weight
    cross_entropy = (stats.student_lse - stats.label_logit) + lse_lo(stats)[0]
    return (1.0 - weight) * stats.loss + weight * cross_entropy


def _entropy(stats: DivergenceStats, rows: Tensor | None, n_rows: int) -> Tensor:
    """The student's entropy of the counted rows put back at their rows (0 elsewhere), empty when not asked."""
    if stats.student_entropy is None:
        return stats.student_lse.new_empty(0)
    entropy = stats.student_entropy.to(stats.student_lse.dtype)
    return scatter_rows(entropy, rows, n_rows)


@divergence.register_fake
def _(hs, ws, bs, ht, wt, bt, mask, backend, plan, shard, head_s, head_t, kind, beta, temperature,
      teacher_temperature, filter_eps, entry_clip, reduction, need, vocab=None, entropy=False, labels=None,
      hard_label_weight=0.0, entropy_grad=False):  # fmt: skip
    out_dtype = accumulation_dtype(hs, ws, ht, wt)
    student_entropy = hs.new_empty(hs.shape[0] if entropy else 0, dtype=out_dtype)
    if reduction == "none":
        stats = hs.new_empty((STATS_ROWS, hs.shape[0]), dtype=out_dtype)
        return stats[0].clone(), stats, *(empty(hs, out_dtype) for _ in range(3)), student_entropy
    layout = _forward_grad_layout(hs, ws, out_dtype, backend, plan, filter_eps, vocab, need)
    grads = (hs.new_empty(shape, dtype=dtype) for shape, dtype in layout)
    stats = hs.new_empty((STATS_ROWS, hs.shape[0]), dtype=out_dtype) if entropy_grad else empty(hs, out_dtype)
    return hs.new_empty((), dtype=out_dtype), stats, *grads, student_entropy


@custom_op("divergence_backward")
def divergence_backward(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    ht: Tensor,
    wt: Tensor,
    bt: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    grad_out: Tensor,
    backend: str,
    plan: str,
    shard: str,
    head_s: list[float],
    head_t: list[float],
    kind: str,
    beta: float,
    temperature: float,
    teacher_temperature: float,
    filter_eps: float | None,
    entry_clip: float | None,
    need: list[bool],
    vocab: int | None = None,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dH, dW, db) of Σ_n grad_out_n L_n (L = D, or w · CE + (1 − w) · D with ``labels``), in the inputs' dtypes
    and shapes (empty where ``need`` is False; zero past the first ``vocab`` rows of the student's head), from the
    statistics ``[6, N]`` of :func:`divergence` with reduction "none"."""
    wanted = Need(*need)
    rows = counted_rows(mask)
    s, t = _sides(hs, ws, bs, ht, wt, bt, rows, head_s, head_t, vocab)
    if not s.hidden.shape[0]:
        return grad_outputs(zero_grads(wanted, hs, ws, bs), hs, ws, bs)
    ops = backend_ops(backend, plan, shard)
    spec = DivergenceSpec(
        kind, beta, temperature, filter_eps, entry_clip, teacher_temperature, hard_label_weight=hard_label_weight
    )
    counted = select_rows(stats.T, rows).T
    row_weight = select_rows(grad_out, rows).contiguous()
    row_labels = None if labels is None else select_rows(labels, rows)
    grads = ops.divergence_backward(s, t, spec, DivergenceStats(*counted), row_weight, wanted, row_labels)
    if grads.hidden is not None:
        grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, hs.shape[0]))
    return grad_outputs(grads, hs, ws, bs)


@divergence_backward.register_fake
def _(hs, ws, bs, ht, wt, bt, mask, stats, grad_out, backend, plan, shard, head_s, head_t, kind, beta, temperature,
      teacher_temperature, filter_eps, entry_clip, need, vocab=None, labels=None, hard_label_weight=0.0):  # fmt: skip
    return fake_grads(need, hs, ws, bs)


def _divergence_context(ctx, inputs, output) -> None:
    hs, ws, bs, ht, wt, bt, mask, *options, reduction, need, vocab, _, labels, hard_label_weight, entropy_grad = inputs
    # options: backend, plan, shard, head_s, head_t, kind, beta, temperature, teacher_temperature, filter_eps,
    # entry_clip; _: entropy, an output only
    ctx.options, ctx.reduction, ctx.need, ctx.vocab = options, reduction, need, vocab
    ctx.hard_label_weight, ctx.entropy_grad = hard_label_weight, entropy_grad
    ctx.in_dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
    ctx.in_rows = (hs.shape[0], ws.shape[0], None if bs is None else bs.shape[0])
    # The statistics and gradient outputs are never differentiated: no zero-filled [V, H] "gradient" for dW.
    ctx.set_materialize_grads(False)
    # One layout for every path, None where it does not run: the gradients the forward made ("mean"/"sum"); the
    # student's side, the rows' statistics and entropy for a backward sweep over its logits ("none", and the
    # entropy's); the teacher's side and the labels, which only the sweep of "none" reads.
    sweeps_loss = reduction == "none"
    made = (None, None, None) if sweeps_loss else output[2:5]
    student = (hs, ws, bs, mask, output[1], output[5]) if sweeps_loss or entropy_grad else (None,) * 6
    teacher = (ht, wt, bt, labels) if sweeps_loss else (None,) * 4
    ctx.save_for_backward(*made, *student, *teacher)
    ctx.spent = False


def _divergence_backward(ctx, grad_loss, grad_stats, grad_dh, grad_dw, grad_db, grad_entropy):
    not_inputs = [None] * 22  # ht, wt, bt, mask, labels and the plain values
    grad_entropy = grad_entropy if ctx.entropy_grad else None
    if grad_loss is not None and ctx.reduction != "none":
        if ctx.spent:  # before reading the saved tensors, which the first backward scaled in place
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.spent = True
    # Read once: the forward's gradients are then scaled in place.
    dh, dw, db, hs, ws, bs, mask, stats, entropy, ht, wt, bt, labels = ctx.saved_tensors
    grads = None
    if grad_loss is not None and ctx.reduction == "none":
        grads = divergence_backward(
            hs, ws, bs, ht, wt, bt, mask, stats, grad_loss.contiguous(), *ctx.options, ctx.need, ctx.vocab, labels,
            ctx.hard_label_weight,
        )  # fmt: skip
    elif grad_loss is not None:
        grads = _scaled((dh, dw, db), ctx.need, grad_loss, ctx.in_dtypes, ctx.in_rows)
    if grad_entropy is not None:
        backend, plan, shard, head_s, _, _, _, temperature, _, filter_eps, _ = ctx.options
        more = entropy_backward(
            hs, ws, bs, mask, stats, entropy, grad_entropy.contiguous(), backend, plan, shard, head_s, temperature,
            filter_eps, ctx.need, ctx.vocab,
        )  # fmt: skip
        grads = more if grads is None else tuple(_add(a, b) for a, b in zip(grads, more))
    if grads is None:  # only outputs other than the loss and a differentiable entropy reached the graph's ends
        return None, None, None, *not_inputs
    return *input_grads(grads, ctx.need), *not_inputs


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None or b.numel() == 0 else a + b


def _scaled(grads, need: list[bool], scale: Tensor, dtypes, rows) -> tuple:
    """The forward's gradients times the incoming scalar, in the inputs' dtypes and row counts (a weight and
    bias cut to ``vocab`` rows get zeros past them), in ONE elementwise pass each: in place where the dtype and
    shape already fit (a weight gradient can be GBs; the buffers are spent, hence no second backward), else
    scaled and cast by the same kernel into the new tensor (on CUDA; on the CPU, torch's TensorIterator writes
    through an fp32 temporary). Traced graphs stay functional (an in-place update of a forward output inside the
    backward graph is not one AOTAutograd can partition)."""
    # One element, not 0-d: a 0-d CUDA tensor would be cast to a bf16 gradient's dtype before multiplying (0.7 to
    # 0.69921875); one element of fp32 makes fp32 the op's compute dtype, rounding once, on the store.
    factor = scale.reshape(1)
    out = []
    for grad, wanted, dtype, n in zip(grads, need, dtypes, rows):
        if not wanted:
            out.append(None)
            continue
        pad = n - grad.shape[0]
        if _tracing(grad):
            grad = (grad * factor).to(dtype)
            out.append(torch.cat([grad, grad.new_zeros((pad, *grad.shape[1:]))]) if pad else grad)
        elif not pad and grad.dtype == dtype:
            out.append(grad.mul_(factor))
        else:
            full = grad.new_empty((n, *grad.shape[1:]), dtype=dtype)
            full[grad.shape[0] :].zero_()
            out.append(full)
            torch.mul(grad, factor, out=full[: grad.shape[0]])
    return tuple(out)


def _tracing(t: Tensor) -> bool:
    """Whether a tracer (torch.compile, AOTAutograd) runs this on fake tensors rather than eager on real ones."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode((t,)) is not None


@custom_op("entropy_backward")
def entropy_backward(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    mask: Tensor | None,
    stats: Tensor,
    entropy: Tensor,
    grad_entropy: Tensor,
    backend: str,
    plan: str,
    shard: str,
    head_s: list[float],
    temperature: float,
    filter_eps: float | None,
    need: list[bool],
    vocab: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dH, dW, db) of Σ_n grad_entropy_n H_n, H the student's entropy ``[N]`` of :func:`divergence` (0 at rows
    left out), from its statistics ``[6, N]`` (the rows' lse and residual); in the inputs' dtypes and shapes, empty
    where ``need`` is False."""
    wanted = Need(*need)
    rows = counted_rows(mask)
    cut_w, cut_b = (ws, bs) if vocab is None else (ws[:vocab], None if bs is None else bs[:vocab])
    side = Side(select_rows(hs, rows), cut_w, cut_b, head_transform(head_s))
    if not side.hidden.shape[0]:
        return grad_outputs(zero_grads(wanted, hs, ws, bs), hs, ws, bs)
    ops = backend_ops(backend, plan, shard)
    lse, lo = select_rows(stats[1], rows), select_rows(stats[4], rows)
    row_weight = select_rows(grad_entropy, rows).contiguous()
    grads = ops.entropy_backward(side, lse, lo, select_rows(entropy, rows), row_weight, temperature, wanted, filter_eps)
    if grads.hidden is not None:
        grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, hs.shape[0]))
    return grad_outputs(grads, hs, ws, bs)


@entropy_backward.register_fake
def _(hs, ws, bs, mask, stats, entropy, grad_entropy, backend, plan, shard, head_s, temperature, filter_eps, need,
      vocab=None):  # fmt: skip
    return fake_grads(need, hs, ws, bs)


divergence.register_autograd(_divergence_backward, setup_context=_divergence_context)


def linear_divergence(
    pair: CheckedPair, spec: DivergenceSpec, reduction: str, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The divergence of a checked pair on its route, reduced (a scalar, or ``[N]`` for ``reduction="none"``), and
    the student's entropy ``[N]`` where ``spec.entropy`` asks for it (else empty). With ``labels`` (int64 ``[N]``,
    every counted token's in the vocabulary), the loss is w · CE + (1 − w) · D for w = ``spec.hard_label_weight``.
    Differentiable w.r.t. the student's hidden states, weight and bias."""
    out = divergence(
        pair.hs, pair.ws, pair.bs, pair.ht, pair.wt, pair.bt, pair.mask, *pair.route.args,
        head_args(pair.heads[0]), head_args(pair.heads[1]),
        spec.kind, spec.beta, spec.temperature, spec.teacher_temperature, spec.filter_eps, spec.entry_clip,
        reduction, wants_grad(pair.hs, pair.ws, pair.bs), pair.cut, spec.entropy, labels, spec.hard_label_weight,
        spec.entropy_grad,
    )  # fmt: skip
    return out[0], out[5]
