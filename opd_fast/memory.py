"""Measuring the memory an operation needs beyond its inputs, on any device.

On CUDA the caching allocator's peak counter answers this directly. The CPU allocator keeps no such
counter, so :class:`TensorMemoryTracker` watches every op dispatched while it is active (forward and
backward alike: CPU autograd runs the backward on the calling thread): each output whose storage is new
adds its bytes, and the storage's release subtracts them. Views and in-place results reuse an input's
storage and count nothing. The peak of live bytes is then exactly the tensor memory the operation
needed beyond its inputs, outputs and gradients included; allocator overhead and fragmentation are not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Live/peak bytes of tensor storages created under the mode, and the largest single tensor.

    Example::

        with TensorMemoryTracker() as tracker:
            loss = linear_reverse_kl(hs, ws, ht, wt)
            loss.backward()
        tracker.peak_bytes, tracker.largest_numel, tracker.largest_shape
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_numel = 0
        self.largest_shape: tuple[int, ...] = ()
        self._live: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            if t.numel() > self.largest_numel:
                self.largest_numel, self.largest_shape = t.numel(), tuple(t.shape)
            self._live[key] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._release, key)
        return out


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn()`` needs beyond what was allocated before it, in bytes.

    CUDA: the allocator's peak minus the memory in use at the start. Elsewhere: the peak of
    :class:`TensorMemoryTracker`. The result of ``fn`` is dropped before returning.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak_bytes
