"""Hard labels: the cross-entropy part of a loss w · CE(p_s, y) + (1 − w) · D folded into the sweep of D."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.backends.epilogue import Operand
from opd_fast.types import DivergenceStats, accumulation_dtype

Tensor = torch.Tensor


@dataclass(frozen=True)
class HardLabels:
    """The cross-entropy part of a loss w · CE(p_s, y) + (1 − w) · D (``hard_label_weight`` w < 1), folded into the
    sweep of D so that it costs no pass over the vocabulary.

    CE = lse_s − z_y, and its logit gradient is p_s − e_y. Every epilogue forms D's gradient as p_s (g − center)
    (reverse KL with its loss as the center; forward KL as p_s − p_t − p_s · center, its center 0): with the row
    weights scaled by (1 − w) and the center lowered by ``shift`` = w / (1 − w) (:func:`shifted_center`),
    (1 − w) p_s (g − center + shift) = (1 − w) G_D + w p_s, CE's p_s part. Its one-hot part, −w e_y per row, is
    subtracted from each G tile at the label's column (:func:`add_one_hot`) before the gradient GEMMs, times the
    head's chain factor at the label's logit: dH, dW and db then carry it like every other column.

    ``ids`` [N]: each row's label as a column of these vocabulary rows (−1: another shard holds it); ``chain`` [N]:
    dz/dx at the label's logit (:func:`label_logits`; 0 at −1)."""

    ids: Tensor
    chain: Tensor
    shift: float


def label_logits(op: Operand, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(z_y, dz_y/dx_y) per row: the final logit post · softcap(pre · (h · W[y] + b[y])) at each row's label, from a
    row-by-row dot of the hidden state with the label's weight row (O(N·H), no vocabulary pass), and the head's
    chain factor there; both 0 where ``ids`` is −1."""
    dtype = accumulation_dtype(op.hidden.dtype)
    owned = ids >= 0
    rows = op.weight.index_select(0, ids.clamp_min(0)).to(dtype)
    x = (op.hidden.to(dtype) * rows).sum(dim=-1)
    if op.bias is not None:
        x = x + op.bias.index_select(0, ids.clamp_min(0)).to(dtype)
    x = x * op.pre
    chain = torch.full_like(x, op.pre * op.post)
    if op.softcap is not None:
        tanh = torch.tanh(x / op.softcap)
        x = tanh * op.softcap
        chain = chain * (1.0 - tanh * tanh)
    z = x * op.post
    return torch.where(owned, z, 0.0), torch.where(owned, chain, 0.0)


def shifted_center(stats: DivergenceStats, mode: str, shift: float) -> DivergenceStats:
    """The statistics a gradient pass reads, their center lowered by ``shift`` (:class:`HardLabels`); reverse KL's
    gradient passes read the loss as the center."""
    if shift == 0.0:
        return stats
    center = stats.center - shift
    if mode == "reverse_kl":
        return stats._replace(loss=stats.loss - shift, center=center)
    return stats._replace(center=center)


def add_one_hot(g: Tensor, ids: Tensor, v_lo: int, coef: Tensor) -> None:
    """g[n, ids_n − v_lo] −= coef_n in place, for the rows whose label lies among the tile's columns."""
    col = ids - v_lo
    rows = ((col >= 0) & (col < g.shape[1])).nonzero().view(-1)
    if rows.numel():
        cols = col.index_select(0, rows)
        g[rows, cols] -= coef.index_select(0, rows).to(g.dtype)


def hard_labels_of(
    op: Operand, spec: DivergenceSpec, labels: Tensor | None, row_weight: Tensor | None
) -> tuple[HardLabels | None, Tensor | None, Tensor | None]:
    """(the sweep's :class:`HardLabels`, D's row weights, the labels' logits) for ``labels`` (None: none of them)."""
    if labels is None:
        return None, row_weight, None
    weight = spec.hard_label_weight
    z_y, chain = label_logits(op, labels)
    if row_weight is not None:
        row_weight = row_weight * (1.0 - weight)
    return HardLabels(labels, chain, weight / (1.0 - weight)), row_weight, z_y
