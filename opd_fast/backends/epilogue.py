"""The contract between the tile sweep (:mod:`opd_fast.backends.sweep`) and a backend's per-tile math: the op codes
(``MODES``, the one table in Python: kernels/_common.py takes its codes from here, csrc/epilogue.h's enum Mode must
equal it), one model's operands as the GEMMs and an epilogue take them (:class:`Operand`, :class:`TileHead`, and how
a backend makes them of a :class:`opd_fast.types.Side`), and the :class:`Epilogue` protocol a backend implements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from opd_fast.types import DivergenceStats, HeadTransform, Side

Tensor = torch.Tensor

# Op codes shared with the kernels (kernels/_common.py, csrc/epilogue.h). Those below token_logprob's are
# two-model; JSD, the skew KLs and TVD (TERMS_MODES) sum their loss in a second pass over each tile once both rows'
# log-sum-exps are final (:meth:`Epilogue.terms_update`).
MODES = {
    "reverse_kl": 0,
    "forward_kl": 1,
    "jsd": 2,
    "skew_forward_kl": 3,
    "skew_reverse_kl": 4,
    "tvd": 5,
    "token_logprob": 6,
    "logsumexp": 7,
    "entropy": 8,
}
TWO_MODEL_MODES = ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TERMS_MODES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


# ---- one model's operands, as the GEMMs and the epilogue take them -------------------------------------------


@dataclass(frozen=True)
class Operand:
    """A model's operands: GEMM inputs, the bias and the rest of the head transform.

    The logits are z = post · softcap_c(pre · (hidden · weightᵀ + bias)) with softcap_c(x) = c·tanh(x / c)
    (identity when ``softcap`` is None) and ``post`` = 1/τ. A backend may fold linear factors into
    ``hidden`` and ``bias`` (they are copies anyway); ``grad_scale`` is the factor so folded, which the
    hidden-state and bias gradients must be multiplied by (the weight gradient, Gᵀ·hidden, carries it).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    pre: float
    softcap: float | None
    post: float
    grad_scale: float = 1.0

    def tile(self, cols: slice) -> TileHead:
        return TileHead(None if self.bias is None else self.bias[cols], self.pre, self.softcap, self.post)


class TileHead(tuple):
    """(bias of the tile's columns | None, pre-scale, softcap | None, post-scale) for an epilogue call."""

    __slots__ = ()

    def __new__(cls, bias: Tensor | None, pre: float, softcap: float | None, post: float):
        return super().__new__(cls, (bias, pre, softcap, post))

    bias = property(lambda self: self[0])
    pre = property(lambda self: self[1])
    softcap = property(lambda self: self[2])
    post = property(lambda self: self[3])


class Epilogue(Protocol):
    """The per-tile math of a backend, on fp32 [r, c] logits tiles ``z = h·Wᵀ`` of columns [v_lo, v_lo + c).

    ``mode`` is a key of ``MODES``; one-model modes get ``zt = None``. Per-row vectors are fp32 [r].

    An epilogue with ``takes_row_stride = True`` gets its tiles and G buffers as views whose rows lie the plan's
    row stride apart (:func:`opd_fast.chunking.row_stride`: padded to 64 elements on CUDA; ``zs`` and ``zt``
    share it, G's may differ); without it (the default) every tile it sees is packed, rows c elements apart.
    """

    takes_row_stride: bool

    def prepare(self, side: Side, temperature: float, fold: bool = True) -> Operand:
        """The GEMM inputs of a model (dtype, strides, folding) and its head transform; ``fold=False`` keeps every
        factor of the head out of the GEMM inputs (the ranking ops: a factor folded into the hidden states rounds
        logits that tie in h·Wᵀ apart, and they would rank by that rounding instead of by id)."""

    def grad_dtype(self, operand: Operand) -> torch.dtype:
        """dtype of the logit gradient G handed to the gradient GEMMs."""

    # Optional: ``full_rows(zs, zt, ids, hs, ht, mode, beta, row_weight, out, entropy, center_shift) ->
    # (DivergenceStats, G | None)``, the statistics (with ``entropy``, the student's entropy too) and (with
    # ``row_weight``) the logit gradient of tiles that span the whole vocabulary, in one pass, its center lowered by
    # ``center_shift`` (:class:`hard_labels.HardLabels`); the sweep uses it instead of stats_update + terms_update +
    # grad when a chunk is one tile.

    def stats_update(
        self,
        state: Tensor,
        zs: Tensor,
        zt: Tensor | None,
        ids: Tensor | None,
        hs: TileHead,
        ht: TileHead | None,
        v_lo: int,
        mode: str,
        entropy: Tensor | None = None,
    ) -> None:
        """Merge the tile into ``state`` [5, r] = (m_s, s_s, m_t, s_t, acc) (see :func:`online_softmax.finalize`)
        and, when given, the student's tile into the ``entropy`` state [3, r] (see
        :func:`online_softmax.finalize_entropy`), in the same read."""

    def terms_update(
        self,
        terms: Tensor,
        zs: Tensor,
        zt: Tensor,
        stats: DivergenceStats,
        hs: TileHead,
        ht: TileHead,
        mode: str,
        beta: float,
    ) -> None:
        """terms [3, r] += (Σ fs, Σ ft, Σ pg) over the tile for a mode of ``TERMS_MODES`` (see
        :func:`online_softmax.terms_loss`; the per-element fs, ft, pg of opd_fast.backends.torch_math.terms_parts),
        with log p = (z − lse) − lse_lo from the rows' final ``stats`` (:func:`online_softmax.lse_lo`)."""

    def grad(
        self,
        zs: Tensor,
        zt: Tensor | None,
        ids: Tensor | None,
        stats: DivergenceStats,
        row_weight: Tensor,
        hs: TileHead,
        ht: TileHead | None,
        v_lo: int,
        mode: str,
        beta: float,
        out: Tensor | None,
    ) -> Tensor:
        """G [r, c] = row_weight · ∂D/∂(h·Wᵀ) for the tile (the head's chain rule included), into ``out`` when
        given, else in a tile the epilogue may take from ``zs``; ``stats`` holds the rows' final (loss, lse_s,
        lse_t, center) and the lse residuals (:func:`online_softmax.lse_lo`). Per element, before the chain rule and
        the weight: reverse KL p_s (log p_s − log p_t − loss), forward KL p_s − p_t − p_s · center, the
        ``TERMS_MODES`` pg − p_s · center (their center is Σ pg; forward KL's is 0 from the statistics, and the sweep
        shifts both for a hard-label term, :class:`hard_labels.HardLabels`), entropy p_s (log p_s − center) with
        center = −H (so that with the row weight −w it is w ∂H/∂z)."""

    def topk_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The empty entropy state of :meth:`topk` for ``rows`` rows."""

    def topk(self, z: Tensor, head: TileHead, k: int, v_lo: int, best, entropy_state: Tensor):
        """Merge a tile into the running top-k ``best`` (None at first) and entropy state [3, r]; returns the
        new ``best``, finalized by :meth:`topk_finalize`."""

    def topk_finalize(self, best, entropy_state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids int64 [r, k], log-probs [r, k], lse [r], entropy [r])."""


# ---- a model's operands from its Side ------------------------------------------------------------------------


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_dtype(side: Side, backend: str) -> torch.dtype:
    """The GEMM dtype of a model on a kernel backend (fp32, bf16, fp16; the two tensors' promotion)."""
    for name, t in (("hidden states", side.hidden), ("weight", side.weight)):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"backend={backend!r} takes float32, bfloat16 or float16 {name}, got {t.dtype}; "
                f"use backend='torch' for {t.dtype}"
            )
    return torch.promote_types(side.hidden.dtype, side.weight.dtype)


def unit_stride(t: Tensor) -> Tensor:
    """Unit stride along H, as the GEMMs and tl.dot tiles want."""
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_operand(side: Side, temperature: float, backend: str) -> Operand:
    """A model's :class:`Operand` for the kernel epilogues: the GEMM inputs in their common dtype and the head
    applied in the epilogue (bias in fp32, pre = scale, softcap, post = 1/τ)."""
    dtype = kernel_dtype(side, backend)
    bias = None if side.bias is None else side.bias.float().contiguous()
    head = side.head
    hidden, weight = unit_stride(side.hidden.to(dtype)), unit_stride(side.weight.to(dtype))
    return Operand(hidden, weight, bias, head.scale, head.softcap, 1.0 / temperature)


def fold_linear(side: Side, temperature: float, dtype: torch.dtype, contiguous: Callable[[Tensor], Tensor]) -> Operand:
    """An :class:`Operand` in ``dtype`` with the head's linear factors folded into the hidden states and bias
    (scale · 1/τ when there is no softcap, the scale alone before a softcap): for backends that copy the
    hidden states anyway, the epilogue then sees final logits and skips the transform."""
    head: HeadTransform = side.head
    factor = head.scale / temperature if head.softcap is None else head.scale
    hidden = side.hidden.to(dtype)
    bias = None if side.bias is None else side.bias.to(dtype)
    if factor != 1.0:
        hidden = hidden * factor
        bias = None if bias is None else bias * factor
    post = 1.0 if head.softcap is None else 1.0 / temperature
    return Operand(contiguous(hidden), contiguous(side.weight.to(dtype)), bias, 1.0, head.softcap, post, factor)
