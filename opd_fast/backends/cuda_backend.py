"""CUDA C++ backend: the shared tile sweep (:mod:`opd_fast.backends.sweep`) with the fused epilogues of
``opd_fast._C`` (csrc/) as its per-tile math.

Memory plan (the chunked plan, :mod:`opd_fast.chunking`). Token chunks of C rows over the whole vocabulary:

* ``torch.mm`` (cuBLAS) writes both models' chunk logits, fp32 [C, V], into reused workspaces
  (bf16/fp16 inputs accumulate and land in fp32: ``out_dtype=torch.float32``); the kernels take each tile's
  row stride, so [C, V] views of workspaces with padded rows (row stride ≥ V) pass as is;
* ``softmax_stats_update`` (csrc/softmax_stats.cu) reads them once for each row's log-sum-exps and
  divergence (JSD, the skew KLs and TVD: one more read, ``terms_update``), and, when asked, the student's entropy in
  the same read, applying the bias, the head's scale and softcap and 1/τ on the fly;
* ``logit_grad`` (csrc/logit_grad.cu) reads them once more and writes the logit gradient G, with the
  per-token weight and the head's chain rule folded in, in the student weight's dtype;
* dH[chunk] = G · W (written once) and dW += Gᵀ · H (an fp32 accumulator) by cuBLAS.

At the default budget (2**28 elements per model) and V = 151936 that is 1536-row chunks, 2 GiB of fp32
logits workspace for both models plus 0.47 GB for a bf16 G; forward + backward do exactly the floor's GEMM
FLOPs. With the streaming plan the same kernels run on vocabulary tiles of all tokens, and the gradient
sweep recomputes the logits. Top-k streams each tile through a per-row shared-memory buffer of packed
(logit, id) keys with the row's entropy statistics (csrc/topk.cu); a divergence's or log-prob's student entropy comes
from its statistics pass.

Inputs: fp32, bf16 or fp16 (each model's hidden states and weight are brought to a common dtype); fp64
is refused with a pointer to ``backend='torch'``. The raw kernels are plain functions: they only ever run inside
the fused ops of :mod:`opd_fast.library`, which ``torch.compile`` sees as opaque custom ops.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType

import torch

from opd_fast.backends.epilogue import MODES, Operand, TileHead, kernel_operand
from opd_fast.backends.online_softmax import lse_lo
from opd_fast.backends.sweep import Sweep
from opd_fast.backends.torch_epilogue import TorchEpilogue
from opd_fast.types import DivergenceStats, Side

# Longest top-k list the kernel keeps in shared memory (csrc/epilogue.h kMaxTopK); longer ones are
# streamed by the torch backend's epilogue on the same device.
MAX_K = 1024
EXTENSION = "opd_fast._C"

Tensor = torch.Tensor
NO_HEAD = [1.0, 0.0, 1.0]  # (pre, softcap or 0, post) of an unused second model


@functools.cache
def extension_error() -> str | None:
    """Why the compiled kernels cannot be used in this process (None when ``opd_fast._C`` imports)."""
    try:
        importlib.import_module(EXTENSION)
    except ImportError as exc:
        return (
            f"the CUDA extension {EXTENSION} is not built ({exc}); it is built by `pip install -e . "
            f"--no-build-isolation` with a CUDA build of torch and nvcc on the path (see csrc/README.md)"
        )
    if not hasattr(torch.ops.aten.mm, "dtype_out"):
        return f"torch {torch.__version__} lacks torch.mm(..., out_dtype=) (added in torch 2.8); upgrade torch"
    return None


def _ops_module() -> ModuleType:
    """The module with the raw kernels: opd_fast._C (tests substitute its host build on CPU tensors)."""
    return importlib.import_module(EXTENSION)


def _launch(name: str, like: torch.Tensor, *args):
    """Call the raw kernel ``name`` on ``like``'s device and its current CUDA stream (passed as an integer,
    so the C++ side needs no torch-CUDA headers). CPU tensors only come from the host build in tests."""
    fn = getattr(_ops_module(), name)
    if not like.is_cuda:
        return fn(*args, 0)
    with torch.cuda.device(like.device):
        return fn(*args, torch.cuda.current_stream().cuda_stream)


# ---- the raw kernels ---------------------------------------------------------------------------------------


def softmax_stats_update(
    zs: Tensor,
    zt: Tensor | None,
    ids: Tensor | None,
    state: Tensor,
    v_lo: int,
    kind: int,
    bias_s: Tensor | None,
    head_s: list[float],
    bias_t: Tensor | None,
    head_t: list[float],
    entropy: Tensor | None = None,
) -> None:
    """Merge a chunk's online-softmax statistics into ``state`` (fp32 [5, N]: m_s, s_s, m_t, s_t, acc) and, when
    ``entropy`` (fp32 [3, N], contiguous: the student's m, s, a = Σ e^{z − m}(z − m); fresh: −inf, 0, 0) is given,
    the student's final logits into it in the same read (csrc/epilogue.h: EntropyAcc; ``state`` is bitwise the same).

    ``zs``/``zt``: fp32 [N, width] raw logits of vocabulary columns [v_lo, v_lo + width) (``zt`` in two-model
    modes), unit column stride and any row stride ≥ width; ``ids``: int64 [N] in token mode; ``kind``: the op
    code (``MODES``, any but entropy); each model's head as its bias for these columns (fp32 [width] or None) and
    (pre, softcap or 0, post = 1/τ). See csrc/epilogue.h.
    """
    _launch("softmax_stats_update", zs, zs, zt, ids, state, v_lo, kind, bias_s, head_s, bias_t, head_t, entropy)


def terms_update(
    zs: Tensor,
    zt: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    terms: Tensor,
    kind: int,
    beta: float,
    bias_s: Tensor | None,
    head_s: list[float],
    bias_t: Tensor | None,
    head_t: list[float],
) -> None:
    """Add a chunk's terms (Σ fs, Σ ft, Σ pg; online_softmax.terms_loss) of the divergence with op code ``kind``
    (``MODES`` of jsd, skew_forward_kl, skew_reverse_kl, tvd) to ``terms`` (fp32 [3, N]) given the final lse and its
    residual (fp32 [2, N] each: :func:`_row_lse`). See csrc/epilogue.h: terms_parts."""
    _launch("terms_update", zs, zs, zt, lse_s, lse_t, terms, kind, beta, bias_s, head_s, bias_t, head_t)


def logit_grad(
    zs: Tensor,
    zt: Tensor | None,
    ids: Tensor | None,
    lse_s: Tensor,
    lse_t: Tensor | None,
    loss: Tensor | None,
    center: Tensor | None,
    row_weight: Tensor,
    g: Tensor | None,
    v_lo: int,
    beta: float,
    kind: int,
    bias_s: Tensor | None,
    head_s: list[float],
    bias_t: Tensor | None,
    head_t: list[float],
) -> None:
    """Write the chunk's gradient w.r.t. the raw logits for op code ``kind`` (``MODES``), times ``row_weight``
    ([N] fp32), given each model's (lse, residual) (fp32 [2, N]: :func:`_row_lse`), into ``g`` ([N, width], the
    student weight's dtype), or over ``zs`` itself when ``g`` is None."""
    _launch(
        "logit_grad", zs, zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, v_lo, beta, kind,
        bias_s, head_s, bias_t, head_t,
    )  # fmt: skip


def topk_update(z: Tensor, keys: Tensor, state: Tensor, v_lo: int, bias: Tensor | None, head: list[float]) -> None:
    """Merge a chunk (fp32 [N, width] raw logits of columns [v_lo, v_lo + width)) into the running top-k
    ``keys`` (int64 [N, k] holding packed unsigned keys, descending) and entropy ``state`` (fp32 [3, N])."""
    _launch("topk_update", z, z, keys, state, v_lo, bias, head)


def topk_finalize(keys: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids int64 [N, k], log-probs fp32 [N, k], lse fp32 [N], entropy fp32 [N]) from the running keys/state."""
    n_rows, k = keys.shape
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=keys.device)
    logprobs = torch.empty((n_rows, k), dtype=torch.float32, device=keys.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=keys.device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=keys.device)
    _launch("topk_finalize", keys, keys, state, ids, logprobs, lse, entropy)
    return ids, logprobs, lse, entropy


# ---- the epilogue of the shared sweep ------------------------------------------------------------------------


def _head(head: TileHead | None) -> tuple[Tensor | None, list[float]]:
    """(bias of the tile's columns | None, [pre, softcap or 0, post]) as the kernels take them."""
    if head is None:
        return None, NO_HEAD
    return head.bias, [head.pre, head.softcap or 0.0, head.post]


def _row_lse(stats: DivergenceStats) -> tuple[Tensor, Tensor]:
    """Student's and teacher's [2, N] fp32 (lse, residual) as the kernels take them (csrc/epilogue.h: RowLse)."""
    lo_s, lo_t = lse_lo(stats)
    return (
        torch.stack([stats.student_lse, lo_s]).float().contiguous(),
        torch.stack([stats.teacher_lse, lo_t]).float().contiguous(),
    )


def _rows(t: Tensor | None) -> Tensor | None:
    """A logits tile as the kernels read it: [rows, width] with unit column stride and a row stride ≥ width (a view
    of a padded workspace passes as is; the kernels take ``t.stride(0)``); any other layout is copied first."""
    if t is None:
        return None
    rows, width = t.shape
    unit_columns, rows_apart = width <= 1 or t.stride(1) == 1, rows <= 1 or t.stride(0) >= width
    return t if unit_columns and rows_apart else t.contiguous()  # the bindings' check_rows


class CudaEpilogue:
    """The per-tile math as the csrc kernels (one block per token row)."""

    # The kernels take each tile's row stride: the sweep may hand [rows, V] views of workspaces and G buffers whose
    # rows are padded (unit column stride, row stride ≥ V), and the kernels never touch the padding.
    takes_row_stride = True

    def prepare(self, side: Side, temperature: float, fold: bool = True) -> Operand:
        return kernel_operand(side, temperature, "cuda")  # never folds: the epilogue applies the head

    def grad_dtype(self, operand: Operand) -> torch.dtype:
        return operand.weight.dtype

    def stats_update(self, state, zs, zt, ids, hs, ht, v_lo, mode, entropy=None) -> None:
        """With ``entropy`` (the student's [3, r] state (m, s, a) of online_softmax.new_entropy_state), the statistics
        kernel also merges the student's tile into it, in the same read (csrc/epilogue.h: row_softmax_stats; the
        bindings check that it is fp32, contiguous and on the tiles' device)."""
        softmax_stats_update(_rows(zs), _rows(zt), ids, state, v_lo, MODES[mode], *_head(hs), *_head(ht), entropy)

    def terms_update(self, terms, zs, zt, stats, hs, ht, mode, beta) -> None:
        lse_s, lse_t = _row_lse(stats)
        terms_update(_rows(zs), _rows(zt), lse_s, lse_t, terms, MODES[mode], beta, *_head(hs), *_head(ht))

    def grad(self, zs, zt, ids, stats: DivergenceStats, row_weight, hs, ht, v_lo, mode, beta, out) -> Tensor:
        """G into ``out`` (a [rows, width] view whose row stride the kernel takes; the bindings refuse any other
        layout), or over ``zs`` when ``out`` is None (over a unit-stride copy of it, returned, if its layout is
        another)."""
        zs, zt = _rows(zs), _rows(zt)
        loss, center = stats.loss.float().contiguous(), stats.center.float().contiguous()
        lse_s, lse_t = _row_lse(stats)
        row_weight = row_weight.float().contiguous()
        two = zt is not None
        logit_grad(
            zs, zt, ids, lse_s, lse_t if two else None, loss, center, row_weight, out, v_lo, beta, MODES[mode],
            *_head(hs), *_head(ht),
        )  # fmt: skip
        return zs if out is None else out

    def topk_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(m, s, t) of csrc/epilogue.h's EntropyAcc, empty."""
        state = torch.zeros((3, rows), device=device, dtype=torch.float32)
        state[0] = -math.inf
        return state

    def topk(self, z, head, k, v_lo, best, state):
        keys = torch.zeros((z.shape[0], k), dtype=torch.int64, device=z.device) if best is None else best
        topk_update(_rows(z), keys, state, v_lo, *_head(head))  # key 0 = the empty-slot sentinel
        return keys

    def topk_finalize(self, best, state):
        return topk_finalize(best, state)


class CudaOps(Sweep):
    def __init__(self, plan: str = "chunked"):
        super().__init__("cuda", CudaEpilogue(), plan)

    def topk(self, side: Side, k: int, temperature: float):
        """Top-k lists longer than the kernel's shared-memory buffer (k > MAX_K) are streamed by the torch
        backend's epilogue on the same device."""
        if k > MAX_K:
            return Sweep("torch", TorchEpilogue(), self.plan).topk(side, k, temperature)
        return super().topk(side, k, temperature)
