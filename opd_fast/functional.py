"""Public functional API (docs/design.md §3): OPD quantities straight from hidden states and lm_head weights.

Every function here validates its inputs, flattens the leading dimensions, picks a backend (:mod:`opd_fast._dispatch`)
and calls the typed entry point of its custom op in :mod:`opd_fast.library`; none of them ever builds the
[tokens × vocabulary] logits.
"""

from __future__ import annotations

import dataclasses

import torch

from opd_fast import _validation as check
from opd_fast._dispatch import CheckedPair, Placement
from opd_fast.heads import LMHead
from opd_fast.library import divergence as divergence_ops
from opd_fast.library import logits as logits_ops
from opd_fast.types import LossWithEntropy, Side


def linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | LMHead,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_size: int | None = None,
    check_finite: bool = False,
    filter_eps: float | None = None,
    entry_clip: float | None = None,
    plan: str = "chunked",
    teacher_temperature: float | None = None,
    return_entropy: bool = False,
    skew: float = check.DEFAULT_SKEW,
    labels: torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    entropy_grad: bool = False,
) -> torch.Tensor | LossWithEntropy:
    r"""Divergence between the student's and the teacher's next-token distributions, per token then reduced.

    With z_s = h_s W_sᵀ / τ and z_t = h_t W_tᵀ / τ_t (docs/design.md §2; with an :class:`opd_fast.LMHead`,
    z = softcap(scale · (h Wᵀ + b)) / τ, the order transformers applies; τ_t = τ unless ``teacher_temperature``):

    * ``"reverse_kl"``: Σ_v p_s (log p_s − log p_t), the usual OPD loss;
    * ``"forward_kl"``: Σ_v p_t (log p_t − log p_s);
    * ``"jsd"``: β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m) with m = β p_t + (1 − β) p_s (TRL's convention:
      β = 0 is forward KL and β = 1 reverse KL);
    * ``"skew_forward_kl"``: KL(p_t ‖ α p_t + (1 − α) p_s) and ``"skew_reverse_kl"``: KL(p_s ‖ α p_s + (1 − α) p_t)
      with α = ``skew`` (DistiLLM's skew KLs; α = 0 is the plain KL, and both stay finite where the other model
      puts no mass);
    * ``"tvd"``: the total variation distance ½ Σ_v |p_s − p_t| (in [0, 1]; its gradient is a subgradient,
      ½ p_s (sign(p_s − p_t) − Σ_v p_s sign(p_s − p_t)), 0 where the two are equal).

    Args:
        student_hidden: ``[..., Hs]`` final hidden states of the student (fp32/bf16/fp16/fp64).
        student_weight: ``[V, Hs]`` the student's lm_head weight, or its :class:`opd_fast.LMHead` (weight,
            bias, logit scale, softcap; ``LMHead.from_model(model)``).
        teacher_hidden: ``[..., Ht]`` the teacher's final hidden states at the same positions.
        teacher_weight: ``[V, Ht]`` the teacher's lm_head weight or :class:`opd_fast.LMHead`. The teacher never
            receives gradients.
        divergence: ``"reverse_kl"`` | ``"forward_kl"`` | ``"jsd"`` | ``"skew_forward_kl"`` |
            ``"skew_reverse_kl"`` | ``"tvd"``.
        beta: JSD interpolation in [0, 1] (ignored by the others).
        mask: bool ``[...]``, True where the token counts (e.g. completion tokens); None = all count.
        temperature: τ > 0 dividing the student's logits, and the teacher's unless ``teacher_temperature``.
        reduction: ``"mean"`` over counted tokens (0 when none count), ``"sum"``, or ``"none"`` (``[...]``,
            0 at tokens the mask leaves out).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"``; env ``OPD_FAST_BACKEND`` overrides auto.
        process_group: a torch.distributed group over which the weights are vocabulary shards: each rank passes
            the same hidden states and its contiguous rows of both lm_heads (uneven shards allowed; see
            :mod:`opd_fast.distributed`). Results and the hidden-state gradient are global and identical on
            every rank; each weight gradient is the rank's own slice.
        vocab_size: use only the first ``vocab_size`` rows of both weights (padded lm_heads; a global size
            under ``process_group``).
        check_finite: raise ValueError on NaN/Inf in any input instead of letting NaN propagate.
        filter_eps: gradient filtering, opt-in (None or 0 = exact gradients, the default): vocabulary columns
            whose per-token logit gradient is below it in magnitude in every row of a token chunk are left out
            of the gradient GEMMs (the streaming Triton kernels skip tiles whose probabilities are all below
            it). :func:`opd_fast.last_filter_stats` reports the share skipped.
        entry_clip: per-entry clipping (on-policy self-distillation): each vocabulary entry's term ℓ_v of
            the divergence (e.g. p_s(v) log(p_s(v)/p_t(v)) for reverse KL) becomes min(ℓ_v, entry_clip)
            before the sum, with no gradient where clipped. Computed by the torch backend only (``"auto"``
            picks it; another explicit backend is refused); needs a whole vocabulary row per chunk.
        plan: ``"chunked"`` (default: token chunks over the whole vocabulary, gradients made in the forward
            sweep, exactly the floor's GEMM FLOPs, a workspace of about 2 GiB on CUDA) or ``"streaming"``
            (low memory: online softmax over vocabulary tiles, the backward recomputes the logits); see
            :mod:`opd_fast.chunking`.
        teacher_temperature: τ_t > 0 dividing the teacher's logits (after its head's scale and softcap, as TRL
            orders it); None (default) = ``temperature``.
        return_entropy: also return the student's per-token entropy −Σ_v p_s log p_s (at τ, nats), from the
            same sweep over the vocabulary (no extra GEMM): a :class:`opd_fast.LossWithEntropy`.
        skew: the skew KLs' α in [0, 1) (default 0.1, DistiLLM's; ignored by the other divergences).
        labels: integer ``[...]`` target ids in [0, V), or -100 where a token has none (transformers'
            convention; such tokens do not count, as if the mask left them out), for ``hard_label_weight``.
        hard_label_weight: w in [0, 1): the per-token loss becomes w · CE(p_s, labels) + (1 − w) · D (Liger-Kernel's
            hard/soft mix, NeMo's ``kd_ratio``), with CE = −log p_s(label) at the student's temperature, from the same
            sweep (no second pass over the vocabulary; the label's logit is one dot per token).
        entropy_grad: with ``return_entropy``, make the entropy differentiable w.r.t. the student's hidden states,
            weight and bias (∂H/∂z = −p (log p + H)), for an entropy bonus or penalty in the loss. Its gradient
            needs the final lse, so a backward that reaches it sweeps the student's logits once more (one student
            GEMM and the gradient GEMMs); the loss's own gradients are unchanged.

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or ``[...]`` for ``reduction="none"``. Differentiable
        w.r.t. ``student_hidden`` and ``student_weight``; the memory used beyond the inputs and gradients is
        bounded by the chunk budget (:mod:`opd_fast.chunking`), never O(tokens × vocabulary). With
        ``return_entropy``, ``(loss, student_entropy)``: the entropy ``[...]`` in the loss's dtype, 0 at tokens
        the mask leaves out, detached (a statistic to log, e.g. to catch a collapsing student) unless
        ``entropy_grad``.
    """
    spec = check.DivergenceSpec.make(divergence, beta, temperature, filter_eps, entry_clip, teacher_temperature, skew)
    if check.check_flag("return_entropy", return_entropy):
        spec = dataclasses.replace(spec, entropy=True)
    if check.check_flag("entropy_grad", entropy_grad):
        if not spec.entropy:
            raise ValueError("entropy_grad=True makes the returned entropy differentiable: pass return_entropy=True")
        spec = dataclasses.replace(spec, entropy_grad=True)
    reduction = check.check_choice("reduction", reduction, check.REDUCTIONS)
    if spec.entry_clip is not None:
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"entry_clip is computed by the torch backend only; pass backend='torch' (got {backend!r})"
            )
        backend = "torch"
    where = Placement.make(backend, plan, process_group)
    hard_label_weight = check.check_hard_label_weight(hard_label_weight)
    check.check_labels_given(hard_label_weight, labels)
    pair = CheckedPair.make(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, where
    )
    flat_labels = None
    if labels is not None:
        spec = dataclasses.replace(spec, hard_label_weight=hard_label_weight)
        flat_labels = check.check_labels(labels, pair.lead).reshape(-1).long()
        check.check_same_device(student_hidden=pair.hs, labels=flat_labels)
        labelled = flat_labels != check.IGNORE_INDEX
        pair = pair._replace(mask=labelled if pair.mask is None else pair.mask & labelled)
    loss, entropy = divergence_ops.linear_divergence(pair, spec, reduction, flat_labels)
    loss = loss.view(pair.lead) if reduction == "none" else loss
    if not spec.entropy:
        return loss
    entropy = entropy.view(pair.lead)
    return LossWithEntropy(loss, entropy if spec.entropy_grad else entropy.detach())


def linear_reverse_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | LMHead,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    vocab_size: int | None = None,
    check_finite: bool = False,
    filter_eps: float | None = None,
    plan: str = "chunked",
    teacher_temperature: float | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | LossWithEntropy:
    """Reverse KL(p_s ‖ p_t), the standard OPD loss; :func:`linear_divergence` with ``divergence="reverse_kl"``."""
    return linear_divergence(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        divergence="reverse_kl",
        mask=mask,
        temperature=temperature,
        reduction=reduction,
        backend=backend,
        process_group=process_group,
        vocab_size=vocab_size,
        check_finite=check_finite,
        filter_eps=filter_eps,
        plan=plan,
        teacher_temperature=teacher_temperature,
        return_entropy=return_entropy,
    )


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor | LMHead,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    check_finite: bool = False,
    filter_eps: float | None = None,
    plan: str = "chunked",
) -> torch.Tensor:
    """log softmax(h Wᵀ / τ)[y] for each token: the sampled-token log-probs of OPD and RL.

    Args:
        hidden: ``[..., H]`` final hidden states.
        weight: ``[V, H]`` lm_head weight, or an :class:`opd_fast.LMHead` (logits softcap(scale·(h Wᵀ + b)) / τ).
        token_ids: integer ``[...]`` in [0, V), the token whose log-prob is wanted at each position.
        temperature: τ > 0.
        backend: as in :func:`linear_divergence`.
        process_group: as in :func:`linear_divergence`; ``weight`` is then this rank's vocabulary shard and
            ``token_ids`` are global ids.
        check_finite: as in :func:`linear_divergence`.
        filter_eps: as in :func:`linear_divergence`.
        plan: as in :func:`linear_divergence`.

    Returns:
        fp32 ``[...]`` (fp64 for fp64 inputs), differentiable w.r.t. ``hidden``, the weight and the bias.
    """
    temperature = check.check_temperature(temperature)
    filter_eps = check.check_filter_eps(filter_eps)
    check_finite = check.check_flag("check_finite", check_finite)
    where = Placement.make(backend, plan, process_group)
    w, b, head = check.check_head("weight", weight, shard=process_group is not None)
    h = check.check_hidden("hidden", hidden, w, "weight")
    if isinstance(token_ids, torch.Tensor):  # the ids are on the same device before any op reads them
        check.check_same_device(hidden=h, weight=w, bias=b, token_ids=token_ids)
    else:
        check.check_same_device(hidden=h, weight=w, bias=b)
    shard = where.shard(w.shape[0], h.device)
    ids = check.check_token_ids(token_ids, h.shape[:-1])
    if check_finite:
        check.check_finite(hidden=h, weight=w, **({} if b is None else {"bias": b}))
    route = where.route(h.device, shard)
    side = Side(check.flatten(h), w, b, head)
    out = logits_ops.linear_token_logprobs(route, side, ids.reshape(-1).long(), temperature, filter_eps)
    return out.view(h.shape[:-1])
