"""FSDP2 students: opd_fast's fused losses on a transformers causal LM wrapped with
``torch.distributed.fsdp.fully_shard``.

Layout (:func:`fully_shard_causal_lm`): every decoder layer is its own FSDP unit; an untied lm_head is another
one, which the hidden-state forward never runs, so it stays sharded (a DTensor, Shard(0) over the vocabulary
rows) until the loss; the model itself is the root (embeddings, the final norm, and with tied embeddings the
head, the same parameter). :func:`final_hidden_states` runs the decoder through the root's forward, so FSDP
all-gathers the root's parameters and reduce-scatters their gradients as it does for any forward (the root
keeps them gathered until the backward: a tied head is then already whole at the loss, for free).

The head, two ways (``head=`` of :func:`fsdp_linear_divergence`):

* ``"gathered"`` (:func:`gathered_head`): the full weight, all-gathered once per loss call; its backward
  reduce-scatters the [V, H] weight gradient and averages it over the ranks, as FSDP does for every other
  parameter. Works with every opd_fast loss (an :class:`opd_fast.LMHead` like any other).
* ``"vocab_parallel"``: nothing of the head is gathered. The ranks all-gather their counted tokens' hidden
  states instead (student and teacher, [R·N, H]), every rank computes its own vocabulary rows for all R·N
  tokens through opd_fast's vocabulary parallelism (``process_group=`` over the FSDP mesh), and the weight
  gradient lands on the local shard directly. Each rank still gets its own batch's loss, and every gradient is
  the one data parallelism gives (the average over ranks of each rank's loss gradient).

Costs: the gathered head moves 2·V·H numbers per step (gather, then reduce-scatter) and holds the full weight
and its gradient; the vocabulary-parallel head moves about R·N·(Hs + Ht) + R·N·Hs (the token gather, then the
hidden-state gradient's all-reduce) and holds the gathered tokens, but it recomputes both models' logits in
the backward (vocabulary parallelism has the global statistics only after the forward sweep), where the
gathered head makes the gradient in the forward sweep: 1.5× the GEMM FLOPs. Measured
(``benchmarks/fsdp_head.py``, README "FSDP2"): the gathered head is the faster on the CPU, the
vocabulary-parallel one needs less memory; hence ``head="gathered"`` by default.

Gradients assume FSDP's default averaging over the mesh (no ``set_gradient_divide_factor``), and every rank
must backpropagate the loss it got times the same factor (e.g. 1 / gradient accumulation steps).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from opd_fast.distributed import vocab_shard
from opd_fast.functional import linear_divergence
from opd_fast.heads import LMHead
from opd_fast.integrations import transformers as hf

HEAD_MODES = ("gathered", "vocab_parallel")


def _dtensor():
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor, Partial, Replicate


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks transformers never splits across devices (``_no_split_modules``, e.g.
    LlamaDecoderLayer): the natural FSDP units."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.get_decoder().modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer classes in _no_split_modules ({sorted(names)}) that its "
            "decoder contains; apply fully_shard to its blocks yourself, then to the model"
        )
    return layers


def fully_shard_causal_lm(model, mesh=None, *, mp_policy=None, reshard_after_forward: bool = True):
    """Shard a transformers causal LM with FSDP2 for opd_fast's losses; returns ``model`` (sharded in place).

    Every decoder layer becomes an FSDP unit (``reshard_after_forward`` as given), an untied output head
    another (always resharded after a forward: only generation runs it), and the model the root. Tied input
    and output embeddings stay one parameter, in the root. ``mesh`` is a 1-D DeviceMesh (default: all ranks
    of the default group on the model's device type); ``mp_policy`` a
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` for every unit. peft-wrapped models are refused.

    Generation (``model.generate``) and ``model(...)`` work as usual; compute the final hidden states for the
    losses with :func:`final_hidden_states` (through the root's forward, so its parameters are gathered).
    """
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "get_base_model"):
        raise ValueError(
            "fully_shard_causal_lm takes a plain transformers causal LM, got a peft model; shard the base model "
            "before wrapping it with peft, or merge the adapters"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("fully_shard_causal_lm needs torch.distributed: call dist.init_process_group(...) first")
    options = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for layer in _decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        fully_shard(head, reshard_after_forward=True, **options)
    fully_shard(model, **options)
    return model


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, H] final hidden states (after the final norm; the lm_head is not applied) of a model sharded by
    :func:`fully_shard_causal_lm`, computed inside the root's forward so FSDP gathers the embeddings and
    reduce-scatters their gradients. Differentiable."""
    return hf.final_hidden_states(model, input_ids, attention_mask, require_fsdp=True)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _dtensor()[0])


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor from its row shards, differentiably. Each rank's loss gradient differs (its own
    batch), so the backward marks the gathered gradient Partial("avg"): reduce-scattered to the rows and
    averaged over the ranks, as FSDP reduces every other gradient. (``DTensor.full_tensor()`` would treat it
    as Replicate, the same on every rank: right for tensor parallelism, wrong for data parallelism.)"""
    if not _is_dtensor(tensor):
        return tensor  # FSDP holds it gathered already (a tied head after the root's forward)
    _, partial, replicate = _dtensor()
    full = tensor.redistribute(placements=[replicate()] * tensor.device_mesh.ndim)
    return full.to_local(grad_placements=[partial("avg")] * tensor.device_mesh.ndim)


def gathered_head(model) -> LMHead:
    """The output head of an FSDP2-sharded causal LM (as :meth:`opd_fast.LMHead.from_model` reads it) with the
    full weight and bias: all-gathered once (call it on every rank, once per loss), gradients reduce-scattered
    and averaged over the ranks like FSDP's. Use it with any opd_fast loss in place of ``LMHead.from_model``,
    whose gather treats the gradient as replicated (tensor parallelism) and would not sum the ranks'."""
    return hf.read_head(LMHead, model, _gather_rows)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _GatherTokens(torch.autograd.Function):
    """[n, H] per rank → [R·n, H], rank order. The backward takes this rank's rows of the incoming gradient
    without summing over ranks: the vocabulary-parallel loss all-reduces the hidden-state gradient, so every
    rank already holds the whole, identical gradient."""

    @staticmethod
    def forward(ctx, x, group, rank: int):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def _gather_padded(x: torch.Tensor, rows: int, group, rank: int) -> torch.Tensor:
    """All-gather ``x`` [n, ...] padded with zeros to ``rows`` rows per rank: [R·rows, ...]."""
    if x.shape[0] < rows:
        x = torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
    return _GatherTokens.apply(x, group, rank)


def _shard_head(model) -> LMHead:
    """The head on this rank's rows of the FSDP shard, gradient straight to the shard (scaled by 1/R: see
    :func:`fsdp_linear_divergence`)."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        world = tensor.device_mesh.size()
        return _ScaleGrad.apply(tensor.to_local(), 1.0 / world)

    return hf.read_head(LMHead, model, local)


def _vocab_parallel_divergence(
    student_hidden, head, group, teacher_hidden, teacher_head, mask, reduction, vocab_size=None, **kw
):
    """Each rank's ``reduction`` of its own tokens' divergence, computed vocabulary-parallel over all ranks'
    tokens (module docstring). Every rank evaluates S = Σ_r loss_r identically, and returns its own loss_r
    carrying S's gradient: the hidden-state gradient of rank r's tokens is then ∂loss_r/∂h_r (its decoder's
    gradients, averaged by FSDP, are data parallelism's), and the weight shard's ∂S/∂W_shard, scaled by 1/R
    in :func:`_shard_head`, is the average over ranks of their loss gradients."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    hidden_size = student_hidden.shape[-1]
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but student_hidden has "
            f"{tuple(student_hidden.shape[:-1])}; pass both models' hidden states of the same tokens"
        )
    if mask is None:
        mask = torch.ones(student_hidden.shape[:-1], dtype=torch.bool, device=student_hidden.device)
    if mask.dtype != torch.bool or mask.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(student_hidden.shape[:-1])} (the hidden states' leading "
            f"shape), got {mask.dtype} {tuple(mask.shape)}"
        )
    teacher = teacher_head if isinstance(teacher_head, LMHead) else LMHead(teacher_head)
    counted = mask.reshape(-1).nonzero().squeeze(1)
    student_tokens = student_hidden.reshape(-1, hidden_size).index_select(0, counted)
    teacher_tokens = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, counted)
    counts = _gather_padded(counted.new_tensor([counted.numel()]), 1, group, rank)  # [R]
    slots = max(1, int(counts.max()))  # token rows per rank in the gathered batch
    all_student = _gather_padded(student_tokens, slots, group, rank)
    all_teacher = _gather_padded(teacher_tokens.detach(), slots, group, rank)
    all_mask = (torch.arange(slots, device=counts.device)[None, :] < counts[:, None]).reshape(-1)
    # This rank's rows of the shared vocabulary [0, vocab): the student's shard (FSDP's split) cut at vocab, and
    # the teacher's same rows.
    shard = vocab_shard(group, head.vocab_size, all_student.device)
    vocab = shard.vocab if vocab_size is None else vocab_size
    if not 1 <= vocab <= min(shard.vocab, teacher.vocab_size) or (vocab_size is None and teacher.vocab_size != vocab):
        raise ValueError(
            f"the student's head has {shard.vocab} rows and the teacher's {teacher.vocab_size}; vocab_size "
            f"({vocab_size}) must be given, in [1, {min(shard.vocab, teacher.vocab_size)}], when they differ"
        )
    rows = max(0, min(shard.rows, vocab - shard.offset))
    per_token = linear_divergence(
        all_student,
        head.vocab_slice(0, rows),
        all_teacher,
        teacher.vocab_slice(shard.offset, shard.offset + rows),
        mask=all_mask,
        reduction="none",
        process_group=group,
        **kw,
    )
    per_rank = per_token.view(world, slots).sum(dim=1)
    if reduction == "mean":
        per_rank = per_rank / counts.clamp_min(1).to(per_rank.dtype)
    total = per_rank.sum()
    return per_rank[rank].detach() + (total - total.detach())


def fsdp_linear_divergence(
    student_hidden: torch.Tensor,
    student_model: torch.nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor | LMHead,
    *,
    head: Literal["gathered", "vocab_parallel"] = "gathered",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    **loss_options: object,
) -> torch.Tensor:
    """:func:`opd_fast.linear_divergence` of this rank's batch for a student sharded by
    :func:`fully_shard_causal_lm`; call it on every rank (it communicates).

    Args:
        student_hidden: [..., Hs] this rank's final hidden states (:func:`final_hidden_states`).
        student_model: the sharded student; its head is read as :meth:`opd_fast.LMHead.from_model` reads it.
        teacher_hidden: [..., Ht] the teacher's final hidden states of the same tokens (no gradient).
        teacher_head: the teacher's whole head (an :class:`opd_fast.LMHead` or a [V, Ht] weight), on every rank.
        head: ``"gathered"`` (the default: faster in the measurement of README "FSDP2") or
            ``"vocab_parallel"`` (less memory; module docstring). A head FSDP already holds gathered (tied
            embeddings, after the root's forward) is used whole either way.
        mask: bool [...], True where a token counts.
        reduction: ``"mean"`` over this rank's counted tokens (0 when none count) or ``"sum"``.
        loss_options: ``divergence``, ``beta``, ``temperature``, ``backend``, ``vocab_size``, ``plan``, ... as
            for :func:`opd_fast.linear_divergence` (not ``process_group``: the FSDP mesh is used).

    Returns the fp32 scalar loss of this rank's batch; its gradients, averaged over the ranks by FSDP's
    reduce-scatter (and, for the head, by this function), equal data parallelism's.
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (a loss per rank), got {reduction!r}")
    if "process_group" in loss_options:
        raise ValueError("process_group is not an option here: the student's FSDP mesh is the group")
    weight = student_model.get_output_embeddings().weight
    if head == "gathered" or not _is_dtensor(weight):
        student_head = gathered_head(student_model)
        return linear_divergence(
            student_hidden, student_head, teacher_hidden, teacher_head, mask=mask, reduction=reduction, **loss_options
        )
    if weight.device_mesh.ndim != 1:
        raise ValueError(f"head='vocab_parallel' needs a 1-D FSDP mesh, got {weight.device_mesh.ndim} dimensions")
    return _vocab_parallel_divergence(
        student_hidden,
        _shard_head(student_model),
        weight.device_mesh.get_group(),
        teacher_hidden,
        teacher_head,
        mask,
        reduction,
        **loss_options,
    )
