"""What the custom ops of :mod:`opd_fast.library` share: their registration, the ops object they run, the head
and gradients as op values."""

from __future__ import annotations

import torch
from torch.utils import flop_counter

from opd_fast import distributed as vp
from opd_fast.backends import Ops, get_backend
from opd_fast.memory import TensorMemoryTracker
from opd_fast.types import Grads, HeadTransform, Need

Tensor = torch.Tensor

# FlopCounterMode counts the aten ops it sees; a custom op's body runs below the mode, so without this rule the
# GEMMs inside opd_fast's ops would count 0 (tests/api/test_plans.py measures the plans' GEMM FLOPs this way).
# The same holds for opd_fast.memory.TensorMemoryTracker, which measures the CPU peak memory of the plans.
_COUNTING_MODES = [mode for mode in (getattr(flop_counter, "_FlopCounterMode", None), TensorMemoryTracker) if mode]


def custom_op(name: str):
    """``torch.library.custom_op("opd_fast::name")`` (no input is mutated), whose body runs with an active
    FLOP counter or memory tracker still counting."""

    def register(fn):
        op = torch.library.custom_op(f"opd_fast::{name}", mutates_args=())(fn)

        def count_inside(mode, func, types, args, kwargs):
            with mode:
                return fn(*args, **kwargs)

        for mode in _COUNTING_MODES:
            op.register_torch_dispatch(mode, count_inside)
        return op

    return register


def backend_ops(backend: str, plan: str, shard: str) -> Ops:
    """The ops of the concrete ``backend`` for ``plan``, vocabulary-parallel over the shard registered under the key
    ``shard`` ("" = whole weights)."""
    return vp.parallel(get_backend(backend, plan), vp.registered_shard(shard))


def global_vocab(shard: str, local_rows: int) -> int:
    """The global vocabulary of weights with ``local_rows`` rows on the shard of key ``shard``."""
    return vp.global_vocab(vp.registered_shard(shard), local_rows)


def head_args(head: HeadTransform) -> list[float]:
    """A head transform as an op takes it: ``[scale, softcap]`` (softcap 0 = none)."""
    return [head.scale, 0.0 if head.softcap is None else head.softcap]


def head_transform(args: list[float]) -> HeadTransform:
    """The head transform of :func:`head_args`."""
    return HeadTransform(args[0], args[1] or None)


def wants_grad(*tensors: Tensor | None) -> list[bool]:
    """Which of the student's tensors the graph will ask gradients of."""
    grad_on = torch.is_grad_enabled()
    return [grad_on and t is not None and t.requires_grad for t in tensors]


def empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """The placeholder for an output that is not wanted (an op's outputs cannot be None)."""
    return like.new_empty(0, dtype=dtype)


def _fill_rows(grad: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``grad`` in ``dtype`` with ``rows`` rows: those it lacks (past a vocabulary cut short by ``vocab_size``) are
    zero, and only they are zero-filled; one pass over ``grad`` at most (none when it already fits)."""
    if grad.shape[0] == rows:
        return grad.to(dtype)
    full = grad.new_empty((rows, *grad.shape[1:]), dtype=dtype)
    full[grad.shape[0] :].zero_()
    full[: grad.shape[0]].copy_(grad)
    return full


def grad_outputs(grads: Grads, h: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients as op outputs, shaped like the inputs and in their dtypes, empty where not computed."""
    out = []
    for grad, like in zip(grads, (h, w, b)):
        cast = like.dtype if like is not None else h.dtype
        out.append(empty(h, cast) if grad is None else _fill_rows(grad, like.shape[0], cast))
    return tuple(out)


def zero_grads(need: Need, h: Tensor, w: Tensor, b: Tensor | None) -> Grads:
    return Grads(
        torch.zeros_like(h) if need.hidden else None,
        torch.zeros_like(w) if need.weight else None,
        torch.zeros_like(b) if need.bias else None,
    )


def fake_grads(need: list[bool], h: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The fake implementation's :func:`grad_outputs`: ``need``'s gradients shaped like the inputs."""
    out = []
    for wanted, like in zip(need, (h, w, b)):
        cast = like.dtype if like is not None else h.dtype
        out.append(like.new_empty(like.shape, dtype=cast) if wanted else empty(h, cast))
    return tuple(out)


def input_grads(grads, need: list[bool]) -> tuple:
    """An autograd formula's gradients: ``grads`` where ``need`` asks, None elsewhere."""
    return tuple(grad if wanted else None for grad, wanted in zip(grads, need))
