"""The trainer's loss modes, all computed from final hidden states and output heads by opd_fast's ops.

Hidden states arrive already gathered at the positions that predict completion tokens (``[B, L, H]``,
aligned with ``batch.targets``), so the student and the teacher may have seen different prompts. Every
loss is a mean over the completion tokens of the micro-batch.

* ``reverse_kl`` / ``forward_kl`` / ``jsd`` / ``skew_forward_kl`` / ``skew_reverse_kl`` / ``tvd``: the
  full-vocabulary divergence per token (linear_divergence), optionally with per-entry clipping (``entry_clip``)
  and mixed with the cross-entropy on the completion tokens (``hard_label_weight``: w · CE + (1 − w) · D, from
  the same sweep).
* ``topk``: the divergence on a top-k support per token (linear_topk_divergence); with a teacher known only by
  its top-k log-probs (a vLLM server or engine), the divergence on the teacher's top-k with a tail bucket
  (linear_topk_target_divergence).
* ``sampled_token``: OPD as reinforcement learning with the teacher as the reward. The per-token
  estimate of the reverse KL at the sampled token y is r = log p_old(y) − log p_t(y), with p_old the
  policy that sampled the rollout; the advantage is A = −r (detached), optionally discounted over the
  rest of the completion, A_t = Σ_{t'≥t} γ^{t'−t}(−r_{t'}), and optionally mixed with a verifiable reward
  R of the completion: A ← α·A + (1 − α)·R. The loss is −ρ·A with the importance ratio
  ρ = p_θ(y)/p_old(y): 1 (with the REINFORCE gradient A ∇log p_θ) on fresh rollouts, and the correction
  when rollouts are reused (``rollout.reuse`` > 1). ``ratio_clip`` caps ρ (no gradient above the cap).
* ``sft``: cross-entropy on the completions (teacher samples or reference answers).

Token sparsification (``token_keep`` = ρ < 1) keeps that fraction of each micro-batch's completion
tokens — those with the largest per-token divergence (|r| for sampled_token) or a random draw — and
averages the loss over them, i.e. rescales the kept terms by T / Σmask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from opd_fast import (
    LMHead,
    linear_divergence,
    linear_token_logprobs,
    linear_topk_divergence,
    linear_topk_target_divergence,
    overlap_averages,
)
from opd_fast.trainer.config import LossConfig


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    return torch.where(mask, values, 0.0).sum() / count.clamp_min(1)


def discounted_advantage(advantage: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = Σ_{t' ≥ t} γ^{t'−t} a_{t'} along each row, summing only masked positions (the completion)."""
    if discount == 0.0:
        return advantage
    out = torch.zeros_like(advantage)
    running = torch.zeros_like(advantage[:, 0])
    for t in range(advantage.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], advantage[:, t] + discount * running, 0.0)
        out[:, t] = running
    return out


def sparsify(mask: torch.Tensor, scores: torch.Tensor, keep: float, select: str, generator=None) -> torch.Tensor:
    """A sub-mask keeping ⌈keep · Σmask⌉ tokens: the highest ``scores`` or a random draw (``select``)."""
    count = int(mask.sum())
    kept = max(1, math.ceil(keep * count)) if count else 0
    if keep >= 1.0 or kept >= count:
        return mask
    if select == "random":
        scores = torch.rand(mask.shape, generator=generator, device=mask.device)
    ranked = torch.where(mask, scores.detach().float(), -torch.inf).flatten()
    chosen = torch.zeros_like(mask).flatten()
    chosen[ranked.topk(kept).indices] = True
    return chosen.view_as(mask)


@dataclass
class LossInputs:
    """One micro-batch's inputs to a loss: hidden states ``[B, L, H]`` at the completion positions, the heads as
    ``LMHead.from_model`` reads them (the teacher's detached; None when the mode needs no teacher), padded rows
    included (``vocab_size`` cuts them), for sampled_token the behaviour log-probs and rewards, and for a teacher
    known only by its top-k log-probs (teacher_hidden and teacher_head None) its (ids, log-probs) ``[B, L, K]``."""

    batch: Any
    student_hidden: torch.Tensor
    student_head: LMHead
    teacher_hidden: torch.Tensor | None
    teacher_head: LMHead | None
    vocab_size: int
    behaviour_logprobs: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.completion_mask


# A loss mode maps (config, inputs) to (loss, the tokens it averaged over, extra metrics).
LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, float]]


def divergence_loss(cfg: LossConfig, x: LossInputs) -> LossResult:
    """A divergence over the full vocabulary (with ``hard_label_weight``, mixed with the cross-entropy on the
    completion tokens). Without token sparsification the op returns the mean itself (its gradients then come out of
    the forward sweep); with it, the per-token values to rank. The student's mean entropy over the completion tokens
    comes from the same sweep (metric ``entropy``, as TRL's DistillationTrainer logs it)."""
    sparse = cfg.token_keep < 1.0
    hard = {}
    if cfg.hard_label_weight > 0:
        labels = torch.where(x.mask, x.batch.targets, -100)
        hard = dict(labels=labels, hard_label_weight=cfg.hard_label_weight)
    divergence, entropy = linear_divergence(
        x.student_hidden,
        x.student_head,
        x.teacher_hidden,
        x.teacher_head,
        divergence=cfg.mode,
        beta=cfg.beta,
        vocab_size=x.vocab_size,
        mask=x.mask,
        reduction="none" if sparse else "mean",
        entry_clip=cfg.entry_clip,
        temperature=cfg.temperature,
        teacher_temperature=cfg.teacher_temperature,
        backend=cfg.backend,
        return_entropy=True,
        skew=cfg.skew,
        **hard,
    )
    metrics = {"entropy": _masked_mean(entropy, x.mask).item()}
    if not sparse:
        return divergence, x.mask, metrics
    kept = sparsify(x.mask, divergence, cfg.token_keep, cfg.token_select)
    return _masked_mean(divergence, kept), kept, metrics


def topk_loss(cfg: LossConfig, x: LossInputs) -> LossResult:
    """The divergence on a top-k support per token: linear_topk_divergence, or with a top-k-only teacher
    linear_topk_target_divergence on its ids (plus the tail bucket with ``add_tail``)."""
    if x.teacher_topk is not None:
        ids, logprobs = x.teacher_topk
        per_token = linear_topk_target_divergence(
            x.student_hidden,
            x.student_head.vocab_slice(0, x.vocab_size),
            ids,
            logprobs,
            divergence=cfg.topk_divergence,
            add_tail=cfg.add_tail,
            mask=x.mask,
            reduction="none",
            temperature=cfg.temperature,
            backend=cfg.backend,
        )
        kept = sparsify(x.mask, per_token, cfg.token_keep, cfg.token_select)
        return _masked_mean(per_token, kept), kept, {}
    per_token = linear_topk_divergence(
        x.student_hidden,
        x.student_head,
        x.teacher_hidden,
        x.teacher_head,
        k=cfg.top_k,
        support=cfg.support,
        divergence=cfg.topk_divergence,
        renormalize=cfg.renormalize,
        vocab_size=x.vocab_size,
        mask=x.mask,
        reduction="none",
        temperature=cfg.temperature,
        teacher_temperature=cfg.teacher_temperature,
        backend=cfg.backend,
    )
    kept = sparsify(x.mask, per_token, cfg.token_keep, cfg.token_select)
    return _masked_mean(per_token, kept), kept, {}


def _token_logprobs(
    cfg: LossConfig, hidden: torch.Tensor, head: LMHead, x: LossInputs, temperature: float | None = None
) -> torch.Tensor:
    """log p(y) of the sampled tokens at ``temperature`` (None: the student's, loss.temperature)."""
    head = head.vocab_slice(0, x.vocab_size)
    tau = cfg.temperature if temperature is None else temperature
    return linear_token_logprobs(hidden, head, x.batch.targets, temperature=tau, backend=cfg.backend)


def sft_loss(cfg: LossConfig, x: LossInputs) -> LossResult:
    """Cross-entropy on the completion tokens."""
    logprobs = _token_logprobs(cfg, x.student_hidden, x.student_head, x)
    kept = sparsify(x.mask, -logprobs, cfg.token_keep, cfg.token_select)
    return -_masked_mean(logprobs, kept), kept, {}


def sampled_token_loss(cfg: LossConfig, x: LossInputs) -> LossResult:
    """OPD as reinforcement learning with the teacher as the reward (see the module docstring)."""
    mask, metrics = x.mask, {}
    logprobs = _token_logprobs(cfg, x.student_hidden, x.student_head, x)
    with torch.no_grad():
        teacher_logprobs = _token_logprobs(
            cfg, x.teacher_hidden, x.teacher_head, x, temperature=cfg.resolved_teacher_temperature
        )
    old = logprobs.detach() if x.behaviour_logprobs is None else x.behaviour_logprobs
    estimate = old - teacher_logprobs  # one-sample reverse KL at the sampled token
    advantage = discounted_advantage(-estimate, mask, cfg.discount)
    if cfg.reward_mix < 1.0:
        advantage = cfg.reward_mix * advantage + (1.0 - cfg.reward_mix) * x.rewards[:, None].to(advantage)
        metrics["reward/mean"] = x.rewards.float().mean().item()
    ratio = torch.exp(logprobs - old)
    if cfg.ratio_clip is not None:
        ratio = ratio.clamp(max=cfg.ratio_clip)
    kept = sparsify(mask, estimate.abs(), cfg.token_keep, cfg.token_select)
    metrics["sampled/reverse_kl"] = _masked_mean(estimate, mask).item()
    metrics["sampled/ratio_mean"] = _masked_mean(ratio.detach(), mask).item()
    return -_masked_mean(ratio * advantage, kept), kept, metrics


LOSS_FUNCTIONS: dict[str, Callable[[LossConfig, LossInputs], LossResult]] = {
    "reverse_kl": divergence_loss,
    "forward_kl": divergence_loss,
    "jsd": divergence_loss,
    "skew_forward_kl": divergence_loss,
    "skew_reverse_kl": divergence_loss,
    "tvd": divergence_loss,
    "topk": topk_loss,
    "sft": sft_loss,
    "sampled_token": sampled_token_loss,
}


def compute_loss(
    cfg: LossConfig,
    batch,
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor | None,
    teacher_head: LMHead | None,
    vocab_size: int,
    behaviour_logprobs: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) for one micro-batch with the loss of ``cfg.mode``; arguments as in :class:`LossInputs`."""
    inputs = LossInputs(
        batch,
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        vocab_size,
        behaviour_logprobs,
        rewards,
        teacher_topk,
    )
    loss, kept, metrics = LOSS_FUNCTIONS[cfg.mode](cfg, inputs)
    if cfg.token_keep < 1.0:
        metrics["tokens/kept_fraction"] = (kept.sum() / inputs.mask.sum().clamp_min(1)).item()
    metrics["loss"] = loss.item()
    return loss, metrics


def overlap_metrics(stats, mask) -> dict[str, float]:
    """Top-k agreement and entropies over the completion tokens (docs/design.md §2).

    ``overlap/ratio`` and ``overlap/mass_*`` average over all completion tokens (a token whose top-k sets are
    disjoint counts 0); ``overlap/mass_*_nonempty`` over the tokens whose top-k sets intersect, the average
    the OPD papers' 97–99% refers to; ``overlap/nonempty_fraction`` is the share of such tokens.
    """
    averages = overlap_averages(stats, mask)
    mean = lambda t: _masked_mean(t, mask).item()  # noqa: E731
    return {
        "overlap/ratio": averages.ratio_all_tokens.item(),
        "overlap/mass_student": averages.mass_student_all_tokens.item(),
        "overlap/mass_teacher": averages.mass_teacher_all_tokens.item(),
        "overlap/mass_student_nonempty": averages.mass_student_nonempty.item(),
        "overlap/mass_teacher_nonempty": averages.mass_teacher_nonempty.item(),
        "overlap/nonempty_fraction": averages.nonempty_fraction.item(),
        "entropy/student": mean(stats.student_entropy),
        "entropy/teacher": mean(stats.teacher_entropy),
        "entropy/gap": mean((stats.teacher_entropy - stats.student_entropy).abs()),
    }
