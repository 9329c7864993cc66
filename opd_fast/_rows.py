"""Selecting the tokens a mask counts, and putting per-token results back at their rows."""

from __future__ import annotations

import torch


def counted_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the counted tokens of the flattened mask, or None when every token counts."""
    if mask is None:
        return None
    flat = mask.reshape(-1)
    return None if bool(flat.all()) else flat.nonzero().view(-1)


def select_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, n_rows: int, fill: float = 0.0) -> torch.Tensor:
    """``values`` for the counted rows placed into a [n_rows, ...] tensor filled with ``fill`` elsewhere."""
    if rows is None:
        return values
    full = values.new_full((n_rows, *values.shape[1:]), fill)
    return full.index_copy_(0, rows, values)


def scatter_add_rows(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """target[index[i]] += values[i], deterministically on every device.

    On CUDA index_add_ uses atomics when indices repeat; summing each index's values first (sort +
    segment_reduce) leaves index_add_ with unique indices, so one writer per row.
    """
    if target.device.type == "cpu":
        target.index_add_(0, index, values)
        return
    index, order = index.sort(stable=True)
    unique, counts = torch.unique_consecutive(index, return_counts=True)
    target.index_add_(0, unique, torch.segment_reduce(values[order], "sum", lengths=counts, axis=0))
