"""The peers' own implementations, called as their users call them, as oracles for tests/api/test_peers.py.

Every function takes opd_fast's arguments (hidden states ``[N, H]``, lm_head weights ``[V, H]``, a divergence
name and β, a bool ``mask`` ``[N]``, a temperature τ) and translates them to the peer's conventions here,
explicitly, so that a convention mismatch shows up as a failing comparison instead of being papered over:

* **Divergence ↔ β.** TRL's ``generalized_jsd_loss`` and ``ChunkedDivergenceFunction`` and Liger-Kernel's JSD
  losses all define m = β p_t + (1 − β) p_s and D = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m), with β = 0 special-cased
  to the forward KL(p_t ‖ p_s) and β = 1 to the reverse KL(p_s ‖ p_t). That is opd_fast's convention (docs/design.md
  §2): ``"forward_kl"`` ↔ β = 0, ``"reverse_kl"`` ↔ β = 1, ``"jsd"`` ↔ the same β.
* **Temperature.** All of them divide both models' logits by τ before the softmax and none multiplies the loss
  by τ² (as Hinton-style KD does); neither does opd_fast.
* **Masks and reductions.** opd_fast's ``"mean"`` is Σ over counted tokens / their number (0 when none count).
  TRL's ``generalized_jsd_loss`` drops tokens whose label is -100; its ``"batchmean"`` divides by the number of
  counted tokens *when labels are given*, but by ``logits.size(0)`` without labels, which for ``[B, T, V]``
  logits is the number of sequences, not tokens; its ``"mean"`` is torch's mean over all N·V elements (a
  factor 1/V below opd_fast's); its ``"none"`` returns the ``[..., V]`` elementwise terms, not per-token
  values. TRL's ``_chunked_divergence_loss`` and both Liger losses average over counted tokens with the
  count clamped to ≥ 1, like opd_fast. Liger's chunked loss adds ``weight_hard_loss`` × cross-entropy on the
  labels and scales the divergence by ``weight_soft_loss``: pure distillation needs 0 and 1.
* **Teacher.** Never differentiated: its logits are computed under ``torch.no_grad()`` here, as the peers do.

The top-k overlap oracle implements the OPD paper's definitions (arXiv:2604.13016, §"overlap"; see
/work/shared/research/opd-papers.md, paper (b)) from materialized probabilities, without any opd_fast code.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

with warnings.catch_warnings():  # importing trl.experimental warns that its APIs are unstable
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer.distillation_trainer import _chunked_divergence_loss
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

IGNORE_INDEX = -100  # the label both TRL and Liger-Kernel skip
# Liger-Kernel's Triton losses run on CPU tensors only in Triton's interpreter (tests/conftest.py sets it
# when there is no GPU, before anything imports Triton).
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def peer_beta(divergence: str, beta: float) -> float:
    """opd_fast's divergence name and β → the β of TRL's and Liger-Kernel's generalized JSD."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h Wᵀ in the inputs' dtype, as a plain training loop computes them."""
    return hidden @ weight.T


def _labels(mask: torch.Tensor) -> torch.Tensor:
    """Labels that make a peer count exactly the masked-in tokens (their value is irrelevant otherwise)."""
    return torch.where(mask, 0, IGNORE_INDEX)


def trl_generalized_jsd(hs, ws, ht, wt, *, divergence, beta, mask, temperature, reduction):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` on materialized logits, reduced as opd_fast reduces."""
    student_logits = _logits(hs, ws)
    with torch.no_grad():
        teacher_logits = _logits(ht, wt)
    kw = dict(beta=peer_beta(divergence, beta), temperature=temperature)
    if reduction == "none":  # TRL's "none" is elementwise [N, V]: the per-token value is its sum over V
        per_token = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, reduction="none", **kw).sum(-1)
        return torch.where(mask, per_token, 0.0)
    trl_reduction = {"mean": "batchmean", "sum": "sum"}[reduction]
    return GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, labels=_labels(mask), reduction=trl_reduction, **kw
    )


def trl_chunked_divergence(hs, ws, ht, wt, *, divergence, beta, mask, temperature, reduction):
    """TRL's chunked divergence (pure torch on the CPU): ``ChunkedDivergenceFunction`` per token, and
    ``_chunked_divergence_loss``, the distillation trainer's masked mean over it."""
    b = peer_beta(divergence, beta)
    if reduction == "mean":
        loss, _, _ = _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask[None], b, temperature=temperature)
        return loss
    per_token, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, b, temperature)
    per_token = torch.where(mask, per_token, 0.0)
    return per_token if reduction == "none" else per_token.sum()


def liger_chunked_jsd(hs, ws, ht, wt, *, divergence, beta, mask, temperature, reduction):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (pure torch, runs on the CPU): a masked mean only."""
    assert reduction == "mean", "Liger-Kernel's fused-linear JSD returns the masked mean only"
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=peer_beta(divergence, beta),
        temperature=temperature,
        compiled=False,  # torch.compile of each chunk costs seconds on the CPU and changes no number
    )
    return loss(hs, ws, ht, wt, _labels(mask))


def liger_triton_jsd(hs, ws, ht, wt, *, divergence, beta, mask, temperature, reduction):
    """Liger-Kernel's Triton ``liger_fused_linear_jsd`` (fp32 JSD kernel on materialized chunk logits): a
    masked mean only; on CPU tensors it needs Triton's interpreter."""
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    assert reduction == "mean", "Liger-Kernel's fused-linear JSD returns the masked mean only"
    return liger_fused_linear_jsd(hs, ws, ht, wt, _labels(mask), peer_beta(divergence, beta), IGNORE_INDEX, temperature)


def liger_chunked_hard_soft(hs, ws, ht, wt, *, labels, divergence, beta, weight_hard, weight_soft):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` with both of its terms: ``weight_hard`` × the cross-entropy on
    ``labels`` (−100 skipped) of the raw logits (τ = 1: Liger divides only the distillation logits by its
    temperature, so the two conventions meet at τ = 1) + ``weight_soft`` × the JSD, each a mean over the labelled
    tokens."""
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=weight_hard,
        weight_soft_loss=weight_soft,
        beta=peer_beta(divergence, beta),
        temperature=1.0,
        compiled=False,
    )
    return loss(hs, ws, ht, wt, labels)


def trl_hard_soft(hs, ws, ht, wt, *, labels, divergence, beta, weight_hard, weight_soft):
    """The same mix from TRL's ``generalized_jsd_loss`` (batchmean over the labelled tokens) and torch's
    cross-entropy on materialized logits: the float64 reference of the comparison with Liger's."""
    labelled = labels != IGNORE_INDEX
    soft = trl_generalized_jsd(
        hs, ws, ht, wt, divergence=divergence, beta=beta, mask=labelled, temperature=1.0, reduction="mean"
    )
    hard = torch.nn.functional.cross_entropy(_logits(hs, ws), labels, ignore_index=IGNORE_INDEX)
    return weight_hard * hard + weight_soft * soft


def liger_triton_ce_tvd(hs, ws, ht, wt, *, labels, temperature, hard_label_weight):
    """Liger-Kernel's Triton ``LigerFusedCETVDLoss``, per token (cross-entropy on ``labels``, ½ Σ |p_s − p_t|) from
    logits, 0 at −100, mixed as w · CE + (1 − w) · TVD and averaged over the labelled tokens. It takes no
    temperature, so both models' logits are divided by τ first (autograd carries the 1/τ). On CPU tensors it needs
    Triton's interpreter. (Its plain ``LigerTVDLoss`` on probabilities does not run in the interpreter: its kernel
    calls ``.to`` on a Python float.)"""
    from liger_kernel.transformers.fused_ce_tvd import LigerFusedCETVDLoss

    student_logits = _logits(hs, ws).float() / temperature
    with torch.no_grad():
        teacher_logits = _logits(ht, wt).float() / temperature
    cross_entropy, tvd = LigerFusedCETVDLoss()(student_logits, teacher_logits, labels)
    per_token = hard_label_weight * cross_entropy + (1 - hard_label_weight) * tvd
    return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp_min(1)


def ce_tvd_reference(hs, ws, ht, wt, *, labels, temperature, hard_label_weight):
    """The same from torch's softmax and cross-entropy of materialized logits."""
    logits = _logits(hs, ws) / temperature
    p = torch.softmax(logits, dim=-1)
    with torch.no_grad():
        q = torch.softmax(_logits(ht, wt) / temperature, dim=-1)
    labelled = labels != IGNORE_INDEX
    tvd = 0.5 * (p - q).abs().sum(dim=-1)
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_token = torch.where(labelled, hard_label_weight * cross_entropy + (1 - hard_label_weight) * tvd, 0.0)
    return per_token.sum() / labelled.sum().clamp_min(1)


DIVERGENCE_PEERS = {
    "trl_generalized_jsd": trl_generalized_jsd,
    "trl_chunked": trl_chunked_divergence,
    "liger_chunked": liger_chunked_jsd,
    "liger_triton": liger_triton_jsd,
}


def trl_selective_logprobs(hidden, weight, token_ids, *, temperature):
    """TRL's ``selective_log_softmax`` on materialized logits; ``token_ids`` ``[N]`` or ``[N, K]``."""
    return selective_log_softmax(_logits(hidden, weight), token_ids, temperature=temperature)


def trl_chunked_logprobs(hidden, weight, token_ids, *, temperature):
    """TRL's ``ChunkedLogProbFunction`` (pure torch on the CPU); vocabulary tiles of 4096 columns."""
    logprobs, _, _, _, _ = ChunkedLogProbFunction.apply(
        hidden, weight, None, token_ids, temperature, 4096, None, 1.0, ()
    )
    return logprobs


def liger_triton_logprobs(hidden, weight, token_ids, *, temperature):
    """−(Liger-Kernel's fused linear cross-entropy, reduction "none"): the token log-probs. It has no
    temperature argument, so the hidden states are divided by τ (the same logits, and autograd carries the
    1/τ into the gradients). On CPU tensors it needs Triton's interpreter."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden / temperature, weight, token_ids, reduction="none")


LOGPROB_PEERS = {
    "trl_selective_log_softmax": trl_selective_logprobs,
    "trl_chunked": trl_chunked_logprobs,
    "liger_triton": liger_triton_logprobs,
}


def trl_entropy(hidden, weight, *, temperature):
    """TRL's ``entropy_from_logits`` on materialized logits, in nats."""
    with torch.no_grad():
        return entropy_from_logits(_logits(hidden, weight) / temperature)


def trl_chunked_entropy(hidden, weight, *, temperature):
    """The entropy output of TRL's ``ChunkedLogProbFunction`` (pure torch on the CPU)."""
    with torch.no_grad():
        ids = torch.zeros(hidden.shape[0], dtype=torch.long)
        _, entropy, _, _, _ = ChunkedLogProbFunction.apply(
            hidden, weight, None, ids, temperature, 4096, None, 1.0, ("entropy",)
        )
    return entropy


ENTROPY_PEERS = {"trl_entropy_from_logits": trl_entropy, "trl_chunked": trl_chunked_entropy}


class PaperOverlap(NamedTuple):
    """The OPD paper's top-k statistics per token: ids ``[N, k]``, the rest ``[N]``."""

    student_topk_ids: torch.Tensor
    teacher_topk_ids: torch.Tensor
    overlap_ratio: torch.Tensor
    overlap_mass_student: torch.Tensor
    overlap_mass_teacher: torch.Tensor
    order_gap: torch.Tensor  # smallest difference between neighbours among either model's k + 1 largest logits


def paper_topk_overlap(hs, ws, ht, wt, *, k, temperature) -> PaperOverlap:
    """S_s, S_t = the k most probable tokens of p_s, p_t (ties to the smaller id), I = S_s ∩ S_t;
    overlap ratio |I| / k; overlap mass Σ_{v∈I} p_s(v) and Σ_{v∈I} p_t(v) with full-vocabulary
    probabilities (paper (b): M_overlap, and the mass its code logs as ``*_p_sum_intersection``).
    Computed in the inputs' dtype: float64 inputs make the oracle, fp32 inputs plain PyTorch's fp32 version."""
    with torch.no_grad():
        probs, ids, in_topk, gaps = [], [], [], []
        for hidden, weight in ((hs, ws), (ht, wt)):
            z = _logits(hidden, weight) / temperature
            order = z.argsort(dim=-1, descending=True, stable=True)  # stable: equal logits keep id order
            top = order[:, :k]
            ids.append(top)
            in_topk.append(torch.zeros_like(z, dtype=torch.bool).scatter_(-1, top, True))
            probs.append(torch.softmax(z, dim=-1))
            leading = z.gather(-1, order[:, : k + 1])  # a near-tie among these may reorder or swap the top k
            steps = leading[:, :-1] - leading[:, 1:]
            gaps.append(steps.amin(-1) if steps.shape[1] else torch.full_like(leading[:, 0], torch.inf))
        shared = in_topk[0] & in_topk[1]
        return PaperOverlap(
            student_topk_ids=ids[0],
            teacher_topk_ids=ids[1],
            overlap_ratio=shared.sum(-1).to(probs[0].dtype) / k,
            overlap_mass_student=torch.where(shared, probs[0], 0.0).sum(-1),
            overlap_mass_teacher=torch.where(shared, probs[1], 0.0).sum(-1),
            order_gap=torch.minimum(gaps[0], gaps[1]),
        )


def overlap_averages(mass: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The two averages of a per-token overlap mass over the counted tokens: over all of them (an empty
    intersection counts 0; the trainer's "overlap/mass_*"), and over the tokens whose
    top-k sets intersect, as the verl code that logs the paper's ``val-topk/student_p_sum_intersection``
    averages it (``student_p_sum[inter_positions].mean()``, inter_positions = a non-empty I_t)."""
    counted = mask & (ratio > 0)
    mass = mass.double()
    return {
        "mean_over_all_tokens": mass[mask].mean().item() if mask.any() else 0.0,
        "mean_over_nonempty_intersections": mass[counted].mean().item() if counted.any() else 0.0,
    }
