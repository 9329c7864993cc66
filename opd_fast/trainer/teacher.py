"""The teacher as the trainer sees it: final hidden states, an output head and samples, whatever model it is.

Three kinds of teacher: a separate frozen model (teacher.path), a frozen copy of the initial student
(teacher.self_distill), or, for self-distillation with LoRA, the student itself with its adapters disabled,
which holds the initial weights without a second copy. The last one is the student only inside
``disable_adapter()``; :class:`Teacher` enters that context around everything it computes, so no caller has to.

A teacher that returns only its top-k log-probs per position (a vLLM server, teacher.server, or an in-process vLLM
engine, teacher.engine=vllm) is a :class:`TopKTeacher`: it scores each batch's prompt + completion and hands the
top-k target loss ids and log-probs aligned with the completion tokens (:func:`align_topk`, which also aligns the
stored top-k of offline sequences, teacher.topk_dir).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from opd_fast.heads import LMHead
from opd_fast.integrations.transformers import final_hidden_states
from opd_fast.trainer.rollout import Batch, gather_positions, generate


class Teacher:
    """``model``: the teacher's causal LM (frozen), or with ``adapters_disabled`` the LoRA (peft) student whose
    base weights are the teacher."""

    def __init__(self, model, *, adapters_disabled: bool = False) -> None:
        self.model = model
        self.adapters_disabled = adapters_disabled

    def _active(self):
        return self.model.disable_adapter() if self.adapters_disabled else nullcontext()

    @torch.no_grad()
    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Final hidden states ``[B, L, H]`` at the positions that predict the completion tokens, on the
        teacher's own inputs (its prompts may differ from the student's)."""
        with self._active():
            hidden = final_hidden_states(self.model, batch.teacher_input_ids, batch.teacher_attention_mask)
        return gather_positions(hidden, batch.teacher_positions)

    def head(self) -> LMHead:
        """The output head, detached: the teacher never receives gradients."""
        with self._active():
            return LMHead.from_model(self.model).detach()

    def generate(self, tokenizer, prompt_ids: list[list[int]], **options) -> list[list[int]]:
        """Completions sampled (or greedy) from the teacher; ``options`` as in :func:`rollout.generate`."""
        with self._active():
            return generate(self.model, tokenizer, prompt_ids, **options)


class TopKTeacher:
    """A teacher known only by its top-k log-probs: ``scorer`` is a :class:`~opd_fast.trainer.teacher_server.
    TeacherServer` or a :class:`~opd_fast.trainer.vllm_engine.VllmScorer`."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer

    @torch.no_grad()
    def topk(self, batch: Batch, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids ``[B, L, K]`` int64, log-probs ``[B, L, K]`` fp32) of the teacher at each completion token, on the
        teacher's own inputs, aligned with ``batch.targets`` (rows outside ``batch.completion_mask`` hold
        placeholders).

        K is the scorer's k, less the most ids at or past ``vocab_size`` (padded lm_head rows, which no token of
        the tokenizer has) that any completion token's top-k holds: those entries are dropped, the next ones move
        up, and every token keeps the same number of entries, its K most likely real tokens. The mass of the
        dropped ones stays in the teacher's tail (1 − Σ top-k), where the tail bucket counts it.
        """
        mask = batch.completion_mask
        lengths = batch.teacher_attention_mask.sum(dim=1).tolist()
        rows = [r for r, n in enumerate(mask.sum(dim=1).tolist()) if n > 0]
        sequences = [batch.teacher_input_ids[r, : lengths[r]].tolist() for r in rows]
        # Completion token j of row r sits at teacher_positions[r, j] + 1 (the position before it predicts it).
        starts = [int(batch.teacher_positions[r, 0]) + 1 for r in rows]
        scores = dict(zip(rows, self.scorer.score(sequences, starts)))
        return align_topk([scores.get(r) for r in range(mask.shape[0])], mask, self.scorer.k, vocab_size)

    def close(self) -> None:
        self.scorer.close()


def align_topk(scores, mask: torch.Tensor, k: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row :class:`~opd_fast.trainer.teacher_server.TopKScores` (None for a row without completion tokens) →
    (ids ``[B, L, K]`` int64, log-probs ``[B, L, K]`` fp32) aligned with a batch's completion tokens (``mask``
    ``[B, L]``), on the mask's device; the ids at or past ``vocab_size`` dropped as :meth:`TopKTeacher.topk` says."""
    counts = mask.sum(dim=1).tolist()
    ids = torch.zeros((*mask.shape, k), dtype=torch.int64)
    logprobs = torch.zeros((*mask.shape, k), dtype=torch.float32)
    for r, s in enumerate(scores):
        if s is None:
            continue
        if s.ids.shape[0] != counts[r]:
            raise RuntimeError(f"the teacher scored {s.ids.shape[0]} completion tokens of row {r}, not {counts[r]}")
        ids[r, : counts[r]], logprobs[r, : counts[r]] = s.ids, s.logprobs
    real = ids < vocab_size
    padded = int((~real & mask.cpu().unsqueeze(-1)).sum(dim=-1).max()) if mask.any() else 0
    if padded == k:
        raise RuntimeError(
            f"the teacher's top-{k} holds only padded lm_head rows (ids ≥ {vocab_size}) at some completion "
            "token; its head or tokenizer does not match the student's"
        )
    if padded:
        # Real ids first, in their order (stable), then the first k − padded of them.
        order = torch.sort((~real).to(torch.int8), dim=-1, stable=True).indices[..., : k - padded]
        ids, logprobs = ids.gather(-1, order), logprobs.gather(-1, order)
    return ids.to(mask.device), logprobs.to(mask.device)


def build_topk_teacher(config, tokenizer) -> TopKTeacher:
    """The :class:`TopKTeacher` of ``config`` (a :class:`~opd_fast.trainer.config.TeacherConfig` with ``topk_only``):
    a served teacher, checked against the student's ``tokenizer``, or an in-process vLLM engine."""
    if config.server is not None:
        from opd_fast.trainer.teacher_server import TeacherServer

        scorer = TeacherServer(
            config.server_urls,
            config.top_k,
            tokenizer=tokenizer,
            model=config.path,
            timeout_s=config.timeout_s,
            retries=config.retries,
        )
    else:
        from opd_fast.trainer.vllm_engine import VllmScorer

        scorer = VllmScorer(config.path, config.top_k, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    return TopKTeacher(scorer)
