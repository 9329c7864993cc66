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
models' chunk logits take ≤ 2 GiB; at V = 151936 that is 1536-row chunks). Set it with
:func:`set_chunk_budget`, temporarily with :func:`chunk_budget`, or with ``OPD_FAST_CHUNK_ELEMENTS``.
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
# On CUDA, chunk rows are a multiple of this when the budget allows, so the GEMMs' M dimension fills
# whole tensor-core tiles (cuBLAS uses 128- and 256-row tiles at these shapes).
CUDA_ROW_ALIGN = 256

_budget_override: int | None = None


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


def check_plan(plan: object) -> str:
    return check_choice("plan", plan, PLANS)


@dataclass(frozen=True)
class TilePlan:
    """Token rows per chunk and vocabulary columns per tile; ``rows · cols ≤ budget`` (or cols = 1)."""

    rows: int
    cols: int
    vocab: int

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
    """``rows`` evened out over the chunks it implies (same chunk count, ≤ rows), a multiple of ``align``
    when that keeps it ≤ rows: 8192 tokens at ≤ 1766 rows become 6 chunks of 1536 (aligned to 256)."""
    chunks = -(-n_tokens // rows)
    even = -(-n_tokens // chunks)
    if even >= align:
        aligned = -(-even // align) * align
        even = aligned if aligned <= rows else rows // align * align
    return max(1, min(even, rows))


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
        return TilePlan(rows=n_tokens, cols=cols, vocab=vocab)
    min_rows = min(n_tokens, MIN_ROWS)
    cols = vocab if vocab * min_rows <= budget else max(1, budget // min_rows)
    rows = max(1, min(n_tokens, budget // cols))
    on_cuda = device is not None and torch.device(device).type == "cuda"
    rows = _balanced_rows(n_tokens, rows, CUDA_ROW_ALIGN if on_cuda else 1)
    return TilePlan(rows=rows, cols=cols, vocab=vocab)
