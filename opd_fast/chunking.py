"""The chunk budget and the tile plans: how [N tokens × V vocab] logits are cut so no N×V tensor exists.

Every backend walks the tokens in chunks of ``rows`` and each chunk's vocabulary in tiles of ``cols``
columns, with ``rows · cols ≤ budget`` logits per model and tile. Two plans (see docs/design.md):

* **chunked** (the default): whole vocabulary rows, ``cols = V``, as many token rows as the budget holds.
  Each chunk's logits are computed once (cuBLAS on a GPU) and one fused pass over them gives the
  log-sum-exps, the divergence and the logit gradient, so forward + backward do exactly the GEMM FLOPs
  of the floor. When not even ``MIN_ROWS`` whole rows fit the budget (tiny budgets in tests, vocabularies
  beyond the budget) the vocabulary is tiled too, and the gradient needs a second sweep.
* **streaming** (low memory): all tokens at once over vocabulary tiles of ``budget / N`` columns with
  online softmax statistics; the gradient sweep recomputes the tiles (≈1.5× the floor's FLOPs). The
  Triton backend streams with its own fused GEMM kernels instead (no logits workspace at all).

The budget is in logits elements per model and tile. Its default knows the device: 2**22 on the CPU
(16 MB fp32 tiles, what measures best there) and 2**28 on CUDA (1 GiB of fp32 logits per model, so both
models' chunk logits take ≤ 2 GiB; at V = 151936 that is at most 1766 rows, and N = 8192 tokens make 5 chunks
of 1664 rows, the last 1536). Set it with :func:`set_chunk_budget`, temporarily with :func:`chunk_budget`, or
with ``OPD_FAST_CHUNK_ELEMENTS``.

On CUDA a tile's rows are laid out with a row stride of :func:`padded_stride` elements (V rounded up to a
multiple of 64), whatever V: a vocabulary cut to ``len(tokenizer)`` (151665, 50257) would otherwise leave every
row but the first off 16-byte alignment, and cuBLAS its fastest kernels and the epilogues their vector loads.

The weight gradient of a chunked sweep (:func:`set_dw_gemm`, :func:`dw_gemm`, ``OPD_FAST_DW_GEMM``):
``"per_chunk"`` adds each chunk's Gᵀ·H into an fp32 [V, H] accumulator; ``"single"`` keeps G, in the GEMM
operands' dtype, for all N rows ([N, stride], 2 bytes per logit in bf16) and makes dW with one GEMM over all N,
written once in the operands' dtype, with no accumulator; ``"auto"`` (the default) picks single on CUDA when that G
is no larger than the fp32 accumulator it replaces or :data:`SINGLE_DW_GEMM_BYTES`, whichever is larger, and
per_chunk otherwise (and always on the CPU). Either way the memory stays bounded independently of N; at N = 8192,
H = 4096, V = 151936 single's G (2.49 GB) replaces an accumulator of the same size, and saves the four β = 1
passes over it (docs/design.md §5, the performance model).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from opd_fast._validation import check_choice

DEFAULT_CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 28
CHUNK_ELEMENTS_ENV = "OPD_FAST_CHUNK_ELEMENTS"
PLANS = ("chunked", "streaming")
# Fewest token rows per chunk before the vocabulary gets tiled instead: fewer rows would re-read the
# weights once per handful of tokens.
MIN_ROWS = 16
# On CUDA, chunk rows are a multiple of this when that does not add a chunk, so the GEMMs' M dimension fills
# whole tensor-core tiles (cuBLAS's Hopper kernels use 128-row tiles at these shapes). 256 made N = 8192 at
# V = 151936 six chunks (5 × 1536 + 512): every extra chunk re-reads and re-writes the fp32 dW accumulator.
CUDA_ROW_ALIGN = 128
# Row stride of the sweep's logits workspace and G buffer, in elements: a multiple of this on the devices below.
# 64 elements are 256 B of fp32 and 128 B of bf16: every row starts 16-byte aligned whatever V. On the CPU rows
# stay packed (torch's softmax copies a strided block to a contiguous one first).
ROW_STRIDE_ALIGN = 64
PADDED_DEVICES = ("cuda",)

DW_GEMM_MODES = ("per_chunk", "single", "auto")
DW_GEMM_ENV = "OPD_FAST_DW_GEMM"
# "auto" makes one dW GEMM over all N when G of all rows (N · stride elements in the G dtype) fits this, on CUDA.
SINGLE_DW_GEMM_BYTES = 2 << 30

_budget_override: int | None = None
_dw_gemm_override: str | None = None


def _validated_budget(value: object, source: str) -> int:
    """A positive int (NumPy integers too). Wrong types are ValueErrors as well, as they always were here."""
    number = None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
    if number is None or number < 1:
        raise ValueError(
            f"{source} must be a positive integer number of logits elements per tile (the default is "
            f"{DEFAULT_CHUNK_ELEMENTS} = 2**22 on the CPU and {CUDA_CHUNK_ELEMENTS} = 2**28 on CUDA), got {value!r}"
        )
    return number


def get_chunk_budget(device: torch.device | str | None = None) -> int:
    """The current budget: logits elements per model and tile (see the module docstring).

    An explicit setting (:func:`set_chunk_budget`, :func:`chunk_budget`, then ``OPD_FAST_CHUNK_ELEMENTS``)
    wins; otherwise the default for ``device`` (the CPU's when None).
    """
    if _budget_override is not None:
        return _budget_override
    env = os.environ.get(CHUNK_ELEMENTS_ENV)
    if env is None or env.strip() == "":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return CUDA_CHUNK_ELEMENTS if on_cuda else DEFAULT_CHUNK_ELEMENTS
    try:
        parsed = int(env)
    except ValueError:
        raise ValueError(
            f"{CHUNK_ELEMENTS_ENV}={env!r} is not an integer; set it to a number of elements such as 4194304"
        ) from None
    return _validated_budget(parsed, CHUNK_ELEMENTS_ENV)


def set_chunk_budget(elements: int | None) -> None:
    """Set the budget (logits elements per tile) for this process; ``None`` restores the env/default."""
    global _budget_override
    _budget_override = None if elements is None else _validated_budget(elements, "elements")


@contextmanager
def chunk_budget(elements: int) -> Iterator[None]:
    """Temporarily use ``elements`` as the budget, e.g. ``with chunk_budget(1 << 20): loss = ...``."""
    global _budget_override
    previous = _budget_override
    set_chunk_budget(elements)
    try:
        yield
    finally:
        _budget_override = previous


def get_dw_gemm() -> str:
    """The weight-gradient mode of the chunked sweep: :func:`set_dw_gemm` / :func:`dw_gemm`, then
    ``OPD_FAST_DW_GEMM``, then ``"auto"`` (see the module docstring)."""
    if _dw_gemm_override is not None:
        return _dw_gemm_override
    env = os.environ.get(DW_GEMM_ENV)
    if env is None or env.strip() == "":
        return "auto"
    return check_choice(DW_GEMM_ENV, env.strip(), DW_GEMM_MODES)


def set_dw_gemm(mode: str | None) -> None:
    """Set the weight-gradient mode (``"per_chunk"``, ``"single"``, ``"auto"``) for this process; ``None``
    restores the env/default."""
    global _dw_gemm_override
    _dw_gemm_override = None if mode is None else check_choice("mode", mode, DW_GEMM_MODES)


@contextmanager
def dw_gemm(mode: str) -> Iterator[None]:
    """Temporarily use weight-gradient ``mode``, e.g. ``with dw_gemm("single"): loss.backward()``."""
    global _dw_gemm_override
    previous = _dw_gemm_override
    set_dw_gemm(mode)
    try:
        yield
    finally:
        _dw_gemm_override = previous


def single_dw_gemm(
    n_tokens: int, stride: int, itemsize: int, device: torch.device | str | None, accumulator_bytes: int = 0
) -> bool:
    """Whether a chunked sweep over ``n_tokens`` rows keeps G of all rows ([N, stride] elements of ``itemsize``
    bytes) for one dW GEMM: always in ``"single"`` mode, never in ``"per_chunk"``, and in ``"auto"`` on CUDA when
    it is no larger than the per_chunk accumulator it replaces (``accumulator_bytes``) or
    :data:`SINGLE_DW_GEMM_BYTES`."""
    mode = get_dw_gemm()
    if mode != "auto":
        return mode == "single"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return on_cuda and n_tokens * stride * itemsize <= max(SINGLE_DW_GEMM_BYTES, accumulator_bytes)


def check_plan(plan: object) -> str:
    return check_choice("plan", plan, PLANS)


def padded_stride(width: int, align: int = ROW_STRIDE_ALIGN) -> int:
    """``width`` rounded up to a multiple of ``align`` elements: the row stride of a tile on CUDA."""
    return -(-width // align) * align


def row_stride(width: int, device: torch.device | str | None) -> int:
    """The row stride of tiles ``width`` wide on ``device``: padded on the devices of ``PADDED_DEVICES``."""
    padded = device is not None and torch.device(device).type in PADDED_DEVICES
    return padded_stride(width) if padded else width


@dataclass(frozen=True)
class TilePlan:
    """Token rows per chunk and vocabulary columns per tile; ``rows · cols ≤ budget`` (or cols = 1). A tile's
    rows lie ``stride`` ≥ cols elements apart in the workspace (:func:`row_stride`)."""

    rows: int
    cols: int
    vocab: int
    stride: int

    @property
    def vocab_tiles(self) -> int:
        return -(-self.vocab // self.cols)

    def row_chunks(self, n_tokens: int) -> Iterator[slice]:
        for start in range(0, n_tokens, self.rows):
            yield slice(start, min(start + self.rows, n_tokens))

    def col_tiles(self) -> Iterator[slice]:
        for start in range(0, self.vocab, self.cols):
            yield slice(start, min(start + self.cols, self.vocab))


def _balanced_rows(n_tokens: int, rows: int, align: int) -> int:
    """The fewest chunks of ≤ ``rows`` rows, evened out, each a multiple of ``align`` when that keeps the chunk
    count: 8192 tokens at ≤ 1766 rows (V = 151936, the CUDA budget) become 5 chunks of 1664 rows (the last 1536);
    when no multiple of ``align`` does, the chunks stay unaligned rather than more. One chunk holds all tokens."""
    chunks = -(-n_tokens // rows)
    if chunks == 1:
        return n_tokens
    even = -(-n_tokens // chunks)
    aligned = -(-even // align) * align
    return aligned if aligned <= rows else even


def plan_tiles(
    n_tokens: int,
    vocab: int,
    budget: int | None = None,
    *,
    plan: str = "chunked",
    device: torch.device | str | None = None,
) -> TilePlan:
    """The tile shape for ``n_tokens`` rows over a vocabulary of ``vocab`` within ``budget`` elements."""
    budget = get_chunk_budget(device) if budget is None else _validated_budget(budget, "budget")
    n_tokens = max(n_tokens, 1)
    if check_plan(plan) == "streaming":
        cols = min(vocab, max(1, budget // n_tokens))
        if cols >= 128:
            cols = cols // 128 * 128
        return TilePlan(rows=n_tokens, cols=cols, vocab=vocab, stride=row_stride(cols, device))
    min_rows = min(n_tokens, MIN_ROWS)
    cols = vocab if vocab * min_rows <= budget else max(1, budget // min_rows)
    if cols < vocab and row_stride(cols, device) != cols and cols >= ROW_STRIDE_ALIGN:
        cols = cols // ROW_STRIDE_ALIGN * ROW_STRIDE_ALIGN  # vocabulary tiles then need no padding
    rows = max(1, min(n_tokens, budget // cols))
    on_cuda = device is not None and torch.device(device).type == "cuda"
    rows = _balanced_rows(n_tokens, rows, CUDA_ROW_ALIGN if on_cuda else 1)
    return TilePlan(rows=rows, cols=cols, vocab=vocab, stride=row_stride(cols, device))
