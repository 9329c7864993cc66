"""The chunk budget: how the torch backend tiles [N tokens × V vocab] logits so no N×V tensor ever exists.

The torch backend walks the tokens in chunks of ``rows`` and each chunk's vocabulary in tiles of ``cols``
columns, with ``rows · cols ≤ budget`` elements per logits tile. A tile is fp32 (fp64 for fp64 inputs), and
the backend keeps at most about five tile-sized tensors alive at once, so its transient memory is about
``5 · 4 · budget`` bytes on top of O((N + V) · H) for fp32 copies of low-precision inputs and the gradients.
The default budget of 2**22 elements is therefore about 80 MB, whatever N and V are.

When a whole vocabulary row fits (``V · min(N, MIN_ROWS) ≤ budget``, true for every real vocabulary at
the default) each token chunk's logits are computed once and reused for everything; otherwise the
vocabulary is tiled too, and a first sweep over the tiles finds each row's log-sum-exp before later sweeps
recompute the tiles.

The Triton backend's gradient workspace (logit gradients of one vocabulary chunk, in the weights' dtype)
holds up to 8 × budget elements, about 64 MB in bf16 at the default.

Set the budget with :func:`set_chunk_budget`, temporarily with :func:`chunk_budget`, or with the
environment variable ``OPD_FAST_CHUNK_ELEMENTS``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

DEFAULT_CHUNK_ELEMENTS = 1 << 22
CHUNK_ELEMENTS_ENV = "OPD_FAST_CHUNK_ELEMENTS"
# Fewest token rows per chunk before the vocabulary gets tiled instead: fewer rows would re-read the
# weights once per handful of tokens.
MIN_ROWS = 16

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
            f"{DEFAULT_CHUNK_ELEMENTS} = 2**22, about 80 MB of fp32 tiles), got {value!r}"
        )
    return number


def get_chunk_budget() -> int:
    """The current budget: elements per logits tile of the torch backend (see the module docstring)."""
    if _budget_override is not None:
        return _budget_override
    env = os.environ.get(CHUNK_ELEMENTS_ENV)
    if env is None or env.strip() == "":
        return DEFAULT_CHUNK_ELEMENTS
    try:
        parsed = int(env)
    except ValueError:
        raise ValueError(
            f"{CHUNK_ELEMENTS_ENV}={env!r} is not an integer; set it to a number of elements such as 4194304"
        ) from None
    return _validated_budget(parsed, CHUNK_ELEMENTS_ENV)


def set_chunk_budget(elements: int | None) -> None:
    """Set the budget (elements per logits tile) for this process; ``None`` restores the env/default."""
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


@dataclass(frozen=True)
class TilePlan:
    """Token rows per chunk and vocabulary columns per tile; ``rows · cols ≤ budget``."""

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


def plan_tiles(n_tokens: int, vocab: int, budget: int | None = None) -> TilePlan:
    """Choose the tile shape for ``n_tokens`` rows over a vocabulary of ``vocab`` within ``budget`` elements."""
    budget = get_chunk_budget() if budget is None else _validated_budget(budget, "budget")
    min_rows = max(1, min(n_tokens, MIN_ROWS))
    cols = vocab if vocab * min_rows <= budget else max(1, budget // min_rows)
    rows = max(1, min(max(n_tokens, 1), budget // cols))
    return TilePlan(rows=rows, cols=cols, vocab=vocab)
