"""The fused entry points as ``torch.library`` custom ops, so that eager and ``torch.compile`` runs share one path.

Each op takes tensors and plain values (a backend name, the plan, the head as numbers, the divergence spec as
numbers) and runs the ops object of :func:`opd_fast.backends.get_backend` on real tensors; ``torch.compile``
sees one opaque node per op, whose output shapes and dtypes come from the op's fake implementation
(``register_fake``), and its gradient formula from ``register_autograd``:

=============================  ==========================================================================
``opd_fast::divergence``        per-token divergence, reduced; for "mean"/"sum" the student gradients are
                                made in the same sweep and returned as extra outputs, which the backward
                                only scales by the incoming scalar (no recompute, docs/design.md §5);
                                for "none" the per-token statistics, for ``divergence_backward``
``opd_fast::divergence_backward``  the gradients of Σ_n g_n D_n from the statistics (one more sweep)
``opd_fast::token_logprobs``    (log p(y), (lse, lse_lo)) per token
``opd_fast::logsumexp``         lse per token
``opd_fast::logits_backward``   the gradients of Σ_n g_n lse_n or Σ_n g_n log p(y_n)
``opd_fast::topk``              (ids, log-probs, lse, entropy) of the top k per token; not differentiable
``opd_fast::gathered_logits``   h_n · W[ids[n, m]] / τ at a few ids per token (top-k losses), and its
                                backward ``gathered_logits_backward``
=============================  ==========================================================================

Rows a ``mask`` leaves out are selected away inside the ops (their size depends on the mask's values, which a
compiled graph must not), and per-token outputs are put back at their rows. Hidden states are 2-D ``[N, H]``.
A head is passed as ``[scale, softcap]`` (softcap 0 = none); a vocabulary shard by the key under which
:func:`shard_key` registered it ("" = whole weights), since a process group cannot cross the op boundary.

Gradient dtypes: the forward's gradient outputs are in the accumulation dtype (fp32, fp64 for fp64 inputs), but
dW is in the dtype the sweep wrote it in (the weight's when written once); the backward scales each and casts it to
its input's dtype in one elementwise pass. No weight gradient is ever zero-filled: a ``vocab`` that cuts the
student's head short is applied inside the ops, whose backward zero-fills the cut rows alone.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

from opd_fast._rows import counted_rows, scatter_add_rows, scatter_rows, select_rows
from opd_fast._validation import DivergenceSpec, check_label_range, check_token_range
from opd_fast.backends import get_backend
from opd_fast.backends.sweep import lse_lo, weight_grad_dtype
from opd_fast.chunking import get_chunk_budget
from opd_fast.memory import TensorMemoryTracker
from opd_fast.types import DivergenceStats, Grads, HeadTransform, Need, Side

Tensor = torch.Tensor

_SECOND_BACKWARD = (
    "opd_fast computed this loss's gradients in the forward and has already handed them out; a second "
    "backward through the same graph (retain_graph=True) is not supported — recompute the loss instead"
)

# Vocabulary shards by key: a shard holds its process group, which an op's schema cannot carry.
_SHARDS: dict[str, object] = {}


# FlopCounterMode counts the aten ops it sees; a custom op's body runs below the mode, so without this rule the
# GEMMs inside opd_fast's ops would count 0 (tests/test_plans.py measures the plans' GEMM FLOPs this way).
# The same holds for opd_fast.memory.TensorMemoryTracker, which measures the CPU peak memory of the plans.
_COUNTING_MODES = [mode for mode in (getattr(flop_counter, "_FlopCounterMode", None), TensorMemoryTracker) if mode]


def _custom_op(name: str):
    """``torch.library.custom_op("opd_fast::name")`` (no input is mutated), whose body runs with an active
    FLOP counter or memory tracker still counting."""

    def register(fn):
        op = torch.library.custom_op(f"opd_fast::{name}", mutates_args=())(fn)

        def count_inside(mode, func, types, args, kwargs):
            with mode:
                return fn(*args, **kwargs)

        for mode in _COUNTING_MODES:
            op.register_torch_dispatch(mode, count_inside)
        return op

    return register


def shard_key(shard) -> str:
    """The key an op takes for a :class:`opd_fast.distributed.VocabShard` ("" for None), registering it."""
    if shard is None:
        return ""
    key = f"{shard.group.group_name}/{shard.offset}/{shard.rows}/{shard.vocab}"
    _SHARDS.setdefault(key, shard)
    return key


def head_args(head: HeadTransform) -> list[float]:
    return [head.scale, 0.0 if head.softcap is None else head.softcap]


def _head(args: list[float]) -> HeadTransform:
    return HeadTransform(args[0], args[1] or None)


def _ops(backend: str, plan: str, shard: str, device: torch.device):
    return get_backend(backend, device, _SHARDS[shard] if shard else None, plan)


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64: results and accumulators."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """The placeholder for an output that is not wanted (an op's outputs cannot be None)."""
    return like.new_empty(0, dtype=dtype)


def _fill_rows(grad: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``grad`` in ``dtype`` with ``rows`` rows: those it lacks (past a vocabulary cut short by ``vocab_size``) are
    zero, and only they are zero-filled; one pass over ``grad`` at most (none when it already fits)."""
    if grad.shape[0] == rows:
        return grad.to(dtype)
    full = grad.new_empty((rows, *grad.shape[1:]), dtype=dtype)
    full[grad.shape[0] :].zero_()
    full[: grad.shape[0]].copy_(grad)
    return full


def _grad_outputs(grads: Grads, h: Tensor, w: Tensor, b: Tensor | None, dtype=None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients as op outputs, shaped like the inputs: in ``dtype`` (default: each input's own), empty where not
    computed."""
    out = []
    for grad, like in zip(grads, (h, w, b)):
        cast = dtype or (like.dtype if like is not None else h.dtype)
        out.append(_empty(h, cast) if grad is None else _fill_rows(grad, like.shape[0], cast))
    return tuple(out)


def _zero_grads(need: Need, h: Tensor, w: Tensor, b: Tensor | None) -> Grads:
    return Grads(
        torch.zeros_like(h) if need.hidden else None,
        torch.zeros_like(w) if need.weight else None,
        torch.zeros_like(b) if need.bias else None,
    )


def _fake_grads(need: list[bool], h: Tensor, w: Tensor, b: Tensor | None, dtype=None):
    out = []
    for wanted, like in zip(need, (h, w, b)):
        cast = dtype or (like.dtype if like is not None else h.dtype)
        out.append(like.new_empty(like.shape, dtype=cast) if wanted else _empty(h, cast))
    return tuple(out)


# ---- divergence -------------------------------------------------------------------------------------------------

# The statistics rows the backward of reduction="none" needs: DivergenceStats' first six fields.
STATS_ROWS = 6


def _sides(hs, ws, bs, ht, wt, bt, rows, head_s, head_t, vocab: int | None = None) -> tuple[Side, Side]:
    """Both models' sides for the counted ``rows``, the student's head cut to its first ``vocab`` rows (None:
    all) here, inside the op: a slice outside would make autograd zero-fill a full-size weight gradient."""
    if vocab is not None:
        ws, bs = ws[:vocab], None if bs is None else bs[:vocab]
    return Side(select_rows(hs, rows), ws, bs, _head(head_s)), Side(select_rows(ht, rows), wt, bt, _head(head_t))


def _forward_grad_layout(hs, ws, out_dtype, backend, plan, filter_eps, vocab, need) -> list[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of the dH, dW, db outputs of :func:`divergence` for "mean"/"sum": dH and db in ``out_dtype``,
    dW as the backend makes it (:func:`opd_fast.backends.sweep.weight_grad_dtype`: the weight's dtype when written
    once, the fp32 accumulator's otherwise, so that no pass converts it before the backward's one), the weight and
    bias of the vocabulary's rows only; empty where ``need`` is False."""
    rows = ws.shape[0] if vocab is None else vocab
    dw_dtype = weight_grad_dtype(
        backend, plan, hs.shape[0], rows, hs.shape[1], hs.dtype, ws.dtype, hs.device, filter_eps
    )
    shapes = ((hs.shape[0], hs.shape[1]), (rows, ws.shape[1]), (rows,))
    dtypes = (out_dtype, dw_dtype, out_dtype)
    return [(shape if wanted else (0,), dtype) for shape, wanted, dtype in zip(shapes, need, dtypes)]


@_custom_op("divergence")
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
        check_label_range(labels, _SHARDS[shard].vocab if shard else ws.shape[0] if vocab is None else vocab)
    ops = _ops(backend, plan, shard, hs.device)
    spec = DivergenceSpec(
        kind, beta, temperature, filter_eps, entry_clip, teacher_temperature, entropy=entropy,
        hard_label_weight=hard_label_weight,
    )  # fmt: skip
    rows = counted_rows(mask)
    s, t = _sides(hs, ws, bs, ht, wt, bt, rows, head_s, head_t, vocab)
    row_labels = None if labels is None else select_rows(labels, rows)
    n_rows, count = hs.shape[0], s.hidden.shape[0]
    out_dtype = acc_dtype(hs, ws, ht, wt)
    none = _empty(hs, out_dtype)
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
    out_dtype = acc_dtype(hs, ws, ht, wt)
    student_entropy = hs.new_empty(hs.shape[0] if entropy else 0, dtype=out_dtype)
    if reduction == "none":
        stats = hs.new_empty((STATS_ROWS, hs.shape[0]), dtype=out_dtype)
        return stats[0].clone(), stats, *(_empty(hs, out_dtype) for _ in range(3)), student_entropy
    layout = _forward_grad_layout(hs, ws, out_dtype, backend, plan, filter_eps, vocab, need)
    grads = (hs.new_empty(shape, dtype=dtype) for shape, dtype in layout)
    stats = hs.new_empty((STATS_ROWS, hs.shape[0]), dtype=out_dtype) if entropy_grad else _empty(hs, out_dtype)
    return hs.new_empty((), dtype=out_dtype), stats, *grads, student_entropy


@_custom_op("divergence_backward")
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
        return _grad_outputs(_zero_grads(wanted, hs, ws, bs), hs, ws, bs)
    ops = _ops(backend, plan, shard, hs.device)
    spec = DivergenceSpec(
        kind, beta, temperature, filter_eps, entry_clip, teacher_temperature, hard_label_weight=hard_label_weight
    )
    counted = select_rows(stats.T, rows).T
    row_weight = select_rows(grad_out, rows).contiguous()
    row_labels = None if labels is None else select_rows(labels, rows)
    grads = ops.divergence_backward(s, t, spec, DivergenceStats(*counted), row_weight, wanted, row_labels)
    if grads.hidden is not None:
        grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, hs.shape[0]))
    return _grad_outputs(grads, hs, ws, bs)


@divergence_backward.register_fake
def _(hs, ws, bs, ht, wt, bt, mask, stats, grad_out, backend, plan, shard, head_s, head_t, kind, beta, temperature,
      teacher_temperature, filter_eps, entry_clip, need, vocab=None, labels=None, hard_label_weight=0.0):  # fmt: skip
    return _fake_grads(need, hs, ws, bs)


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
    if reduction == "none":
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, mask, output[1], labels, output[5])
    elif entropy_grad:
        ctx.save_for_backward(*output[2:5], hs, ws, bs, mask, output[1], output[5])  # the forward's dH, dW, db
    else:
        ctx.save_for_backward(*output[2:5])  # dH, dW, db made in the forward
    ctx.spent = False


def _divergence_backward(ctx, grad_loss, grad_stats, grad_dh, grad_dw, grad_db, grad_entropy):
    not_inputs = [None] * 22  # ht, wt, bt, mask, labels and the plain values
    grad_entropy = grad_entropy if ctx.entropy_grad else None
    if grad_loss is not None and ctx.reduction != "none":
        if ctx.spent:  # before reading the saved tensors, which the first backward scaled in place
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.spent = True
    saved = ctx.saved_tensors  # once: the forward's gradients are then scaled in place
    grads = None
    if grad_loss is not None and ctx.reduction == "none":
        hs, ws, bs, ht, wt, bt, mask, stats, labels, _ = saved
        grad_loss = grad_loss.contiguous()
        grads = divergence_backward(
            hs, ws, bs, ht, wt, bt, mask, stats, grad_loss, *ctx.options, ctx.need, ctx.vocab, labels,
            ctx.hard_label_weight,
        )  # fmt: skip
    elif grad_loss is not None:
        grads = _scaled(saved[:3], ctx.need, grad_loss, ctx.in_dtypes, ctx.in_rows)
    if grad_entropy is not None:
        if ctx.reduction == "none":
            hs, ws, bs, _, _, _, mask, stats, _, entropy = saved
        else:
            hs, ws, bs, mask, stats, entropy = saved[3:]
        backend, plan, shard, head_s, _, _, _, temperature, _, filter_eps, _ = ctx.options
        more = entropy_backward(
            hs, ws, bs, mask, stats, entropy, grad_entropy.contiguous(), backend, plan, shard, head_s, temperature,
            filter_eps, ctx.need, ctx.vocab,
        )  # fmt: skip
        grads = more if grads is None else tuple(_add(a, b) for a, b in zip(grads, more))
    if grads is None:  # only outputs other than the loss and a differentiable entropy reached the graph's ends
        return None, None, None, *not_inputs
    return *_input_grads(grads, ctx.need), *not_inputs


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


def _input_grads(grads, need: list[bool]) -> tuple:
    return tuple(grad if wanted else None for grad, wanted in zip(grads, need))


@_custom_op("entropy_backward")
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
    side = Side(select_rows(hs, rows), cut_w, cut_b, _head(head_s))
    if not side.hidden.shape[0]:
        return _grad_outputs(_zero_grads(wanted, hs, ws, bs), hs, ws, bs)
    ops = _ops(backend, plan, shard, hs.device)
    lse, lo = select_rows(stats[1], rows), select_rows(stats[4], rows)
    row_weight = select_rows(grad_entropy, rows).contiguous()
    grads = ops.entropy_backward(side, lse, lo, select_rows(entropy, rows), row_weight, temperature, wanted, filter_eps)
    if grads.hidden is not None:
        grads = grads._replace(hidden=scatter_rows(grads.hidden, rows, hs.shape[0]))
    return _grad_outputs(grads, hs, ws, bs)


@entropy_backward.register_fake
def _(hs, ws, bs, mask, stats, entropy, grad_entropy, backend, plan, shard, head_s, temperature, filter_eps, need,
      vocab=None):  # fmt: skip
    return _fake_grads(need, hs, ws, bs)


divergence.register_autograd(_divergence_backward, setup_context=_divergence_context)


# ---- token log-probs, log-sum-exp -------------------------------------------------------------------------------


@_custom_op("token_logprobs")
def token_logprobs(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    ids: Tensor,
    backend: str,
    plan: str,
    shard: str,
    head: list[float],
    temperature: float,
    filter_eps: float | None,
) -> tuple[Tensor, Tensor]:
    """(log p(ids_n) ``[N]``, (lse, lse_lo) ``[2, N]``), both in the accumulation dtype; ``ids`` int64 ``[N]``
    (``filter_eps``: the backward's gradient filtering).

    The ids' range is checked here, on real values: a compiled graph cannot read them."""
    check_token_range(ids, _SHARDS[shard].vocab if shard else w.shape[0])
    ops = _ops(backend, plan, shard, h.device)
    picked, lse, lse_lo = ops.token_logits(Side(h, w, b, _head(head)), ids, temperature)
    dtype = acc_dtype(h, w)
    return ((picked - lse) - lse_lo).to(dtype), torch.stack((lse, lse_lo)).to(dtype)


@token_logprobs.register_fake
def _(h, w, b, ids, backend, plan, shard, head, temperature, filter_eps):
    dtype = acc_dtype(h, w)
    return h.new_empty(h.shape[0], dtype=dtype), h.new_empty((2, h.shape[0]), dtype=dtype)


@_custom_op("logsumexp")
def logsumexp(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    backend: str,
    plan: str,
    shard: str,
    head: list[float],
    temperature: float,
    filter_eps: float | None,
) -> Tensor:
    """lse ``[N]`` of the head's logits / τ, in the accumulation dtype."""
    ops = _ops(backend, plan, shard, h.device)
    return ops.logsumexp(Side(h, w, b, _head(head)), temperature).to(acc_dtype(h, w))


@logsumexp.register_fake
def _(h, w, b, backend, plan, shard, head, temperature, filter_eps):
    return h.new_empty(h.shape[0], dtype=acc_dtype(h, w))


@_custom_op("logits_backward")
def logits_backward(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    ids: Tensor | None,
    lse: Tensor,
    grad_out: Tensor,
    backend: str,
    plan: str,
    shard: str,
    head: list[float],
    temperature: float,
    filter_eps: float | None,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dH, dW, db) of Σ_n grad_out_n lse_n (``ids`` None) or Σ_n grad_out_n log p(ids_n), in the inputs'
    dtypes (empty where ``need`` is False). ``lse``: ``[N]``, or ``[2, N]`` (lse, lse_lo) from the token op."""
    ops = _ops(backend, plan, shard, h.device)
    side = Side(h, w, b, _head(head))
    lse, lse_lo = (lse[0], lse[1]) if lse.dim() == 2 else (lse, None)  # the token op's (lse, lse_lo)
    grads = ops.logits_backward(side, ids, lse, grad_out.contiguous(), temperature, Need(*need), filter_eps, lse_lo)
    return _grad_outputs(grads, h, w, b)


@logits_backward.register_fake
def _(h, w, b, ids, lse, grad_out, backend, plan, shard, head, temperature, filter_eps, need):
    return _fake_grads(need, h, w, b)


def _token_context(ctx, inputs, output) -> None:
    h, w, b, ids, *options = inputs
    ctx.options = options
    ctx.save_for_backward(h, w, b, ids, output[1])


def _logsumexp_context(ctx, inputs, output) -> None:
    h, w, b, *options = inputs
    ctx.options = options
    ctx.save_for_backward(h, w, b, None, output)


def _logits_grads(ctx, grad_out: Tensor) -> tuple:
    """dH, dW, db of the saved (h, w, b) for the incoming per-token gradient (None where not wanted)."""
    h, w, b, ids, lse = ctx.saved_tensors
    wants = ctx.needs_input_grad
    need = [wants[0], wants[1], b is not None and wants[2]]
    grads = logits_backward(h, w, b, ids, lse, grad_out.contiguous(), *ctx.options, need)
    return _input_grads(grads, need)


def _token_backward(ctx, grad_logprobs, grad_lse):
    # lse is an output for the backward's sake; Σ g_n lse_n is not a quantity anyone differentiates.
    return *_logits_grads(ctx, grad_logprobs), *([None] * 7)


def _logsumexp_backward(ctx, grad_lse):
    return *_logits_grads(ctx, grad_lse), *([None] * 6)


token_logprobs.register_autograd(_token_backward, setup_context=_token_context)
logsumexp.register_autograd(_logsumexp_backward, setup_context=_logsumexp_context)


# ---- top-k ------------------------------------------------------------------------------------------------------


@_custom_op("topk")
def topk(
    h: Tensor, w: Tensor, b: Tensor | None, k: int, backend: str, plan: str, shard: str, head: list[float],
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(ids int64 ``[N, k]``, log-probs ``[N, k]`` descending with ties by the smaller id, lse ``[N]``, entropy
    ``[N]``), the floats in the accumulation dtype. Not differentiable."""
    ops = _ops(backend, plan, shard, h.device)
    ids, logprobs, lse, entropy = ops.topk(Side(h, w, b, _head(head)), k, temperature)
    dtype = acc_dtype(h, w)
    return ids, logprobs.to(dtype), lse.to(dtype), entropy.to(dtype)


@topk.register_fake
def _(h, w, b, k, backend, plan, shard, head, temperature):
    n_rows, dtype = h.shape[0], acc_dtype(h, w)
    return (
        h.new_empty((n_rows, k), dtype=torch.int64),
        h.new_empty((n_rows, k), dtype=dtype),
        h.new_empty(n_rows, dtype=dtype),
        h.new_empty(n_rows, dtype=dtype),
    )


# ---- logits at a few ids per token ------------------------------------------------------------------------------
# Token chunks keep the gathered weight rows [rows, M, H] within the chunk budget, and the backward gathers them
# again instead of saving them, so memory stays O(N · M) beyond the budget.


def _row_chunks(n_rows: int, elements_per_row: int):
    step = max(1, get_chunk_budget() // max(1, elements_per_row))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


@_custom_op("gathered_logits")
def gathered_logits(h: Tensor, w: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """z[n, m] = h_n · W[ids[n, m]] / τ, ``[N, M]`` in the accumulation dtype; ids < 0 are padding (z = 0)."""
    dtype = acc_dtype(h, w)
    valid = ids >= 0
    safe_ids = ids.clamp(min=0)
    z = h.new_zeros(ids.shape, dtype=dtype)
    for rows in _row_chunks(ids.shape[0] if w.shape[0] else 0, ids.shape[1] * h.shape[1]):
        gathered = w[safe_ids[rows]].to(dtype)  # [rows, M, H]
        z[rows] = torch.bmm(gathered, h[rows].to(dtype).unsqueeze(2)).squeeze(2) / temperature
    return torch.where(valid, z, 0.0)


@gathered_logits.register_fake
def _(h, w, ids, temperature):
    return h.new_empty(ids.shape, dtype=acc_dtype(h, w))


@_custom_op("gathered_logits_backward")
def gathered_logits_backward(
    h: Tensor, w: Tensor, ids: Tensor, grad_out: Tensor, temperature: float, need: list[bool]
) -> tuple[Tensor, Tensor]:
    """(dH, dW) of Σ grad_out ⊙ :func:`gathered_logits`, in the inputs' dtypes (empty where ``need`` is False)."""
    dtype = acc_dtype(h, w)
    valid = ids >= 0
    grad = torch.where(valid, grad_out.to(dtype), 0.0) / temperature
    safe_ids = ids.clamp(min=0)
    dh = torch.zeros(h.shape, device=h.device, dtype=dtype) if need[0] else None
    dw = torch.zeros(w.shape, device=w.device, dtype=dtype) if need[1] else None
    for rows in _row_chunks(ids.shape[0] if w.shape[0] else 0, ids.shape[1] * h.shape[1]):
        if dh is not None:
            gathered = w[safe_ids[rows]].to(dtype)
            dh[rows] = torch.bmm(grad[rows].unsqueeze(1), gathered).squeeze(1)
        if dw is not None:
            keep = valid[rows].reshape(-1)
            values = (grad[rows].unsqueeze(2) * h[rows].to(dtype).unsqueeze(1)).reshape(-1, h.shape[1])
            scatter_add_rows(dw, safe_ids[rows].reshape(-1)[keep], values[keep])
    return _grad_outputs(Grads(dh, dw), h, w, None)[:2]


@gathered_logits_backward.register_fake
def _(h, w, ids, grad_out, temperature, need):
    return _fake_grads(need, h, w, None)


def _gathered_context(ctx, inputs, output) -> None:
    h, w, ids, ctx.temperature = inputs
    ctx.save_for_backward(h, w, ids)


def _gathered_backward(ctx, grad_out):
    h, w, ids = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:2])
    grads = gathered_logits_backward(h, w, ids, grad_out.contiguous(), ctx.temperature, need)
    return *_input_grads(grads, need), None, None


gathered_logits.register_autograd(_gathered_backward, setup_context=_gathered_context)
