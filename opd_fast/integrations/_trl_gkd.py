"""``FusedGKDTrainer``: TRL's experimental GKD trainer with opd_fast's fused loss.

Import it from :mod:`opd_fast.integrations.trl`; it lives here so that importing the other trainer does not
import ``trl.experimental`` (which warns that its APIs are unstable).
"""

from __future__ import annotations

import torch
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import _ForwardRedirection

from opd_fast.heads import LMHead
from opd_fast.integrations._trl_loss import trl_divergence_loss
from opd_fast.integrations.transformers import final_hidden_states

IGNORE_INDEX = -100  # the label value GKDTrainer's loss skips


class FusedGKDTrainer(GKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` whose loss is :func:`opd_fast.linear_divergence`.

    Same arguments and config. λ (``args.lmbda``: the share of steps trained on the student's own samples) and
    ``args.seq_kd`` act in the parent's ``training_step``, unchanged. The loss, like the parent's, is the
    generalized JSD(β) at temperature 1 (``args.temperature`` is the sampling temperature) over the positions
    whose next label is not -100, the sum divided by ``num_items_in_batch`` when the Trainer passes it, else the
    mean over those positions.

    ``compute_loss(..., return_outputs=True)`` returns an empty dict as outputs: there are no logits to return,
    so evaluation reports the loss only. Override :meth:`lm_head` for a model class
    :meth:`opd_fast.LMHead.from_model` does not know.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The loss runs the student's decoder directly; routing it through the wrapper's forward keeps DDP/FSDP
        # informed (gradient sync, unsharded parameters).
        self._forward_redirection = _ForwardRedirection()

    def lm_head(self, model) -> LMHead:
        """The output head of ``model`` (a transformers causal LM, peft-wrapped too), as its forward applies it."""
        return LMHead.from_model(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        loss = self._forward_redirection(model, student, self._fused_loss, student, inputs, num_items_in_batch)
        return (loss, {}) if return_outputs else loss

    def _fused_loss(self, student, inputs, num_items_in_batch) -> torch.Tensor:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # Position i predicts token i + 1: drop the last position, and count those whose next label is kept.
        # The parent's model(...) calls run under accelerate's mixed-precision autocast; the backbones here do
        # too, while the head and the divergence run outside it, in the heads' dtype with fp32 accumulation.
        with self.accelerator.autocast():
            student_hidden = final_hidden_states(student, input_ids, attention_mask)[:, :-1]
            self.teacher_model.eval()
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                teacher_hidden = final_hidden_states(teacher, input_ids, attention_mask)[:, :-1]
        return trl_divergence_loss(
            student_hidden,
            self.lm_head(student),
            teacher_hidden,
            self.lm_head(teacher).detach(),
            mask=inputs["labels"][:, 1:] != IGNORE_INDEX,
            beta=self.beta,
            temperature=1.0,
            num_items_in_batch=num_items_in_batch,
        )
