"""TRL's distillation trainers with opd_fast's fused loss.

:class:`FusedDistillationTrainer` subclasses ``trl.DistillationTrainer`` and ``FusedGKDTrainer`` (imported from
here, defined in :mod:`opd_fast.integrations._trl_gkd` so that ``trl.experimental`` is imported only when it is
asked for) subclasses ``trl.experimental.gkd.GKDTrainer``. Everything but the loss is the parent's: data,
generation, λ on-policy mixing (GKD), sequence-level KD, logging, saving, distributed wrappers. The loss is
:func:`opd_fast.linear_divergence` from each model's final hidden states and its whole output head
(:meth:`opd_fast.LMHead.from_model`: weight, bias, logit scale, softcap), so no ``[tokens × vocabulary]`` logits
tensor of either model exists: :func:`trl_divergence_loss` (exported here, defined with
:func:`divergence_for_trl_beta` in :mod:`opd_fast.integrations._trl_loss`, which both trainers import).

How TRL's conventions map (checked against the parents' own losses in tests/integrations/test_trl.py):

* β: TRL's generalized JSD is opd_fast's ``"jsd"`` with the same β (m = β p_t + (1 − β) p_s), with β = 0
  meaning the forward KL(p_t ‖ p_s) and β = 1 the reverse KL(p_s ‖ p_t), as in TRL.
* Temperature: ``DistillationTrainer`` divides both models' logits by ``args.temperature`` after the scale and
  softcap, as opd_fast does. ``GKDTrainer`` uses ``args.temperature`` for sampling only and computes its loss at
  temperature 1; so does ``FusedGKDTrainer``.
* Mask: ``DistillationTrainer`` counts completion tokens (times the tool mask in multi-turn runs);
  ``GKDTrainer`` counts the positions whose next label is not -100.
* Reduction: with ``num_items_in_batch`` (TRL's gradient-accumulation-correct count) the loss is the sum over
  counted tokens divided by it; without, the mean over counted tokens (0 when none count), as both parents do.

Requires ``pip install 'opd_fast[trl]'`` (written against trl 1.16).
"""

from __future__ import annotations

import torch

from opd_fast.heads import LMHead
from opd_fast.integrations._trl_loss import divergence_for_trl_beta, trl_divergence_loss

try:
    from trl import DistillationTrainer
except ImportError as exc:
    raise ImportError(
        f"opd_fast.integrations.trl needs TRL ({exc}); install it with `pip install 'opd_fast[trl]'` "
        "(tested with trl 1.16)"
    ) from exc

# FusedGKDTrainer is importable from here too, through the module __getattr__ at the end.
__all__ = ["FusedDistillationTrainer", "divergence_for_trl_beta", "trl_divergence_loss"]

# The multimodal fields DistillationTrainer keeps per micro-batch and passes to the backbone with the token ids.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

# DistillationTrainer hooks the subclass relies on (private in TRL: checked here so that a TRL release that renames
# them fails at import with a clear message instead of mid-training).
for _hook in ("_get_last_hidden_state", "compute_loss"):
    if not hasattr(DistillationTrainer, _hook):
        raise ImportError(
            f"trl.DistillationTrainer has no {_hook}; opd_fast.integrations.trl was written against trl 1.16: "
            "install a compatible release (pip install 'trl>=1.16,<2')"
        )


class FusedDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is :func:`opd_fast.linear_divergence` (same arguments and config).

    The parent's backbone calls, on-policy generation, masks and ``num_items_in_batch`` are kept; only the
    projection through both lm_heads and the divergence are replaced. The student's mean entropy over the counted
    tokens is logged as the parent logs it (``entropy``), from the same sweep as the loss.

    Override :meth:`lm_head` for a model class :meth:`opd_fast.LMHead.from_model` does not know.
    """

    def lm_head(self, model) -> LMHead:
        """The output head of ``model`` (a transformers causal LM, peft-wrapped too), as its forward applies it."""
        return LMHead.from_model(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # In training the count comes from the generated completions (the dataloader's labels predate them), per
        # process, so that DDP's gradient averaging gives the global mean: TRL's convention.
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        student = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP/FSDP see a forward (gradient sync, unsharded parameters).
        loss, entropy_sum, counted = self._forward_redirection(
            model, student, self._fused_loss, student, inputs, num_items_in_batch
        )
        # The parent's entropy metric: gathered outside the wrapped forward (a collective inside it may hang).
        mode = "train" if self.model.training else "eval"
        counted = self.accelerator.gather_for_metrics(counted).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / counted).item() if counted > 0 else 0.0)
        return (loss, None) if return_outputs else loss

    def _fused_loss(self, student, inputs, num_items_in_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, the student's entropy summed over the counted tokens, their count)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn: tool outputs are not the student's tokens
            mask = mask * inputs["tool_mask"]
        completion_length = inputs["completion_ids"].size(1)
        multimodal = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}

        hidden_inputs = (input_ids, attention_mask, completion_length)
        student_hidden = self._get_last_hidden_state(student, *hidden_inputs, **multimodal)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model,
                teacher,
                self._get_last_hidden_state,
                teacher,
                *hidden_inputs,
                **multimodal,
            )
        loss, entropy = trl_divergence_loss(
            student_hidden,
            self.lm_head(student),
            teacher_hidden,
            self.lm_head(teacher).detach(),
            mask=mask,
            beta=self.beta,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
            return_entropy=True,
        )
        counted = (mask != 0).sum().to(entropy.device)
        return loss, entropy.sum(), counted


def __getattr__(name: str):
    # trl.experimental warns on import that its APIs are unstable: import it only for the GKD trainer.
    if name == "FusedGKDTrainer":
        from opd_fast.integrations._trl_gkd import FusedGKDTrainer

        return FusedGKDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
