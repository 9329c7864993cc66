"""nn.Module front ends of the functional API."""

from __future__ import annotations

import torch

from opd_fast import _validation as check
from opd_fast.backends import BACKENDS
from opd_fast.chunking import check_plan
from opd_fast.functional import linear_divergence
from opd_fast.heads import LMHead


class OPDLoss(torch.nn.Module):
    """On-policy distillation loss from hidden states and lm_head weights (see :func:`linear_divergence`).

    Example::

        loss_fn = OPDLoss(divergence="reverse_kl", temperature=1.0)
        loss = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, mask)

    With ``hard_label_weight`` w > 0, ``forward`` takes ``labels`` too and the loss is w · CE + (1 − w) · D.
    """

    def __init__(
        self,
        divergence: str = "reverse_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        filter_eps: float | None = None,
        plan: str = "chunked",
        teacher_temperature: float | None = None,
        skew: float = check.DEFAULT_SKEW,
        hard_label_weight: float = 0.0,
    ) -> None:
        super().__init__()
        spec = check.DivergenceSpec.make(divergence, beta, temperature, filter_eps, None, teacher_temperature, skew)
        self.divergence, self.beta, self.temperature = divergence, float(beta), float(temperature)
        self.skew = float(skew)
        self.hard_label_weight = check.check_hard_label_weight(hard_label_weight)
        self.teacher_temperature = None if teacher_temperature is None else spec.teacher_temperature
        self.filter_eps = filter_eps
        self.plan = check_plan(plan)
        self.reduction = check.check_choice("reduction", reduction, check.REDUCTIONS)
        self.backend = check.check_choice("backend", backend, BACKENDS)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor | LMHead,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor | LMHead,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check.check_labels_given(self.hard_label_weight, labels)
        hard = dict(labels=labels, hard_label_weight=self.hard_label_weight) if labels is not None else {}
        return linear_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            divergence=self.divergence,
            beta=self.beta,
            mask=mask,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
            filter_eps=self.filter_eps,
            plan=self.plan,
            teacher_temperature=self.teacher_temperature,
            skew=self.skew,
            **hard,
        )

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        beta += f", skew={self.skew}" if self.divergence.startswith("skew") else ""
        beta += f", hard_label_weight={self.hard_label_weight}" if self.hard_label_weight else ""
        teacher = "" if self.teacher_temperature is None else f", teacher_temperature={self.teacher_temperature}"
        return (
            f"divergence={self.divergence!r}{beta}, temperature={self.temperature}{teacher}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, plan={self.plan!r}"
        )
