"""The trainer's loss modes, all computed from final hidden states and lm_head weights by opd_fast's ops.

Position t of a sequence predicts token t + 1; only positions predicting completion tokens count, and
every loss is a mean over those tokens in the micro-batch.

* ``reverse_kl`` / ``forward_kl`` / ``jsd``: the full-vocabulary divergence per token (linear_divergence).
* ``topk``: the divergence on a top-k support per token (linear_topk_divergence).
* ``sampled_token``: OPD as reinforcement learning with the teacher as the reward. The per-token
  estimate of the reverse KL at the sampled token y is r = log p_old(y) − log p_t(y), with p_old the
  policy that sampled the rollout; the advantage is A = −r (detached), optionally discounted over the
  rest of the completion, A_t = Σ_{t'≥t} γ^{t'−t}(−r_{t'}). The loss is −ρ·A with the importance ratio
  ρ = p_θ(y)/p_old(y): 1 (with the REINFORCE gradient A ∇log p_θ) on fresh rollouts, and the
  correction when rollouts are reused (``rollout.reuse`` > 1). ``ratio_clip`` caps ρ (no gradient
  above the cap).
* ``sft``: cross-entropy on the completions (teacher samples or reference answers).
"""

from __future__ import annotations

import torch

from opd_fast import linear_divergence, linear_token_logprobs, linear_topk_divergence, linear_topk_overlap
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


def compute_loss(
    cfg: LossConfig,
    batch,
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    vocab_size: int,
    behaviour_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) for one micro-batch; hidden states are [B, T, H] for the full sequences."""
    hs = student_hidden[:, :-1]
    ht = None if teacher_hidden is None else teacher_hidden[:, :-1]
    mask = batch.completion_mask
    common = dict(mask=mask, temperature=cfg.temperature, backend=cfg.backend)
    metrics: dict[str, float] = {}
    if cfg.mode in ("reverse_kl", "forward_kl", "jsd"):
        loss = linear_divergence(
            hs, student_head, ht, teacher_head, divergence=cfg.mode, beta=cfg.beta, vocab_size=vocab_size, **common
        )
    elif cfg.mode == "topk":
        loss = linear_topk_divergence(
            hs,
            student_head,
            ht,
            teacher_head,
            k=cfg.top_k,
            support=cfg.support,
            divergence=cfg.topk_divergence,
            renormalize=cfg.renormalize,
            vocab_size=vocab_size,
            **common,
        )
    else:
        kw = dict(temperature=cfg.temperature, backend=cfg.backend)
        logprobs = linear_token_logprobs(hs, student_head[:vocab_size], batch.targets, **kw)
        if cfg.mode == "sft":
            loss = -_masked_mean(logprobs, mask)
        else:
            with torch.no_grad():
                teacher_logprobs = linear_token_logprobs(ht, teacher_head[:vocab_size], batch.targets, **kw)
            old = logprobs.detach() if behaviour_logprobs is None else behaviour_logprobs
            estimate = old - teacher_logprobs  # one-sample reverse KL at the sampled token
            advantage = discounted_advantage(-estimate, mask, cfg.discount)
            ratio = torch.exp(logprobs - old)
            if cfg.ratio_clip is not None:
                ratio = ratio.clamp(max=cfg.ratio_clip)
            loss = -_masked_mean(ratio * advantage, mask)
            metrics["sampled/reverse_kl"] = _masked_mean(estimate, mask).item()
            metrics["sampled/ratio_mean"] = _masked_mean(ratio.detach(), mask).item()
    metrics["loss"] = loss.item()
    return loss, metrics


@torch.no_grad()
def overlap_metrics(
    student_hidden, student_head, teacher_hidden, teacher_head, mask, *, k, temperature, backend, vocab_size
) -> dict[str, float]:
    """Mean top-k agreement and entropies over the completion tokens (DESIGN.md §2)."""
    stats = linear_topk_overlap(
        student_hidden[:, :-1],
        student_head,
        teacher_hidden[:, :-1],
        teacher_head,
        k=min(k, vocab_size),
        mask=mask,
        temperature=temperature,
        backend=backend,
        vocab_size=vocab_size,
    )
    mean = lambda t: _masked_mean(t, mask).item()  # noqa: E731
    return {
        "overlap/ratio": mean(stats.overlap_ratio),
        "overlap/mass_student": mean(stats.overlap_mass_student),
        "overlap/mass_teacher": mean(stats.overlap_mass_teacher),
        "entropy/student": mean(stats.student_entropy),
        "entropy/teacher": mean(stats.teacher_entropy),
        "entropy/gap": mean((stats.teacher_entropy - stats.student_entropy).abs()),
    }
