"""The top-k as a custom op (``opd_fast::topk``; not differentiable) and :func:`linear_topk`, which the public
API calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd_fast.library._common import backend_ops, custom_op, head_args, head_transform
from opd_fast.types import Side, accumulation_dtype

if TYPE_CHECKING:
    from opd_fast._dispatch import Route

Tensor = torch.Tensor


@custom_op("topk")
def topk(
    h: Tensor, w: Tensor, b: Tensor | None, k: int, backend: str, plan: str, shard: str, head: list[float],
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(ids int64 ``[N, k]``, log-probs ``[N, k]`` descending with ties by the smaller id, lse ``[N]``, entropy
    ``[N]``), the floats in the accumulation dtype. Not differentiable."""
    ops = backend_ops(backend, plan, shard)
    ids, logprobs, lse, entropy = ops.topk(Side(h, w, b, head_transform(head)), k, temperature)
    dtype = accumulation_dtype(h, w)
    return ids, logprobs.to(dtype), lse.to(dtype), entropy.to(dtype)


@topk.register_fake
def _(h, w, b, k, backend, plan, shard, head, temperature):
    n_rows, dtype = h.shape[0], accumulation_dtype(h, w)
    return (
        h.new_empty((n_rows, k), dtype=torch.int64),
        h.new_empty((n_rows, k), dtype=dtype),
        h.new_empty(n_rows, dtype=dtype),
        h.new_empty(n_rows, dtype=dtype),
    )


def linear_topk(route: Route, side: Side, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids int64 [N, k], log-probs [N, k], lse [N], entropy [N]) of ``side``'s top k per token."""
    return topk(side.hidden, side.weight, side.bias, k, *route.args, head_args(side.head), temperature)
