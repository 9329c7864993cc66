"""The teacher as the trainer sees it: final hidden states, an output head and samples, whatever model it is.

Three kinds of teacher: a separate frozen model (teacher.path), a frozen copy of the initial student
(teacher.self_distill), or, for self-distillation with LoRA, the student itself with its adapters disabled,
which holds the initial weights without a second copy. The last one is the student only inside
``disable_adapter()``; :class:`Teacher` enters that context around everything it computes, so no caller has to.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from opd_fast.heads import LMHead
from opd_fast.trainer.modeling import final_hidden_states
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
