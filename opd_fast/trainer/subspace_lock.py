"""Subspace-locked training (Shen et al., arXiv:2606.07082, §4): the paper's rank-16 projected training,
g ← g·V·Vᵀ with V the top right singular vectors of the cumulative update at a chosen step."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from opd_fast.diagnostics.metrics import numerical_rank, svd

DEFAULT_LOCK_RANK = 16


class SubspaceLock:
    """Rank-r projected training (paper §4, "functional sufficiency"): g ← g·V·Vᵀ for each locked matrix.

    Usage::

        lock = SubspaceLock(model, rank=16, include=r"self_attn\\.")  # copies the initial weights (CPU)
        ...train ~20% of the steps...
        lock.capture(model)   # V [n, r] = top-r right singular vectors of W(t) − W(0), float64 SVD on the CPU
        lock.attach(model)    # from now on every gradient of a locked matrix is projected onto span(V)
        ...train...
        lock.detach()

    or, instead of hooks, ``lock.project_(model)`` after each ``backward()``. Locked are the 2-D floating
    parameters (weights [m, n] = [out, in]) whose name matches ``include`` (a regex searched in the name,
    or a predicate; None = all). ``initial``: the model at step 0, or a dict name → tensor with the
    model's parameter names. V is stored in the parameter's dtype and device and has
    min(r, numerical rank of ΔW) columns: a matrix that has not moved gets V = [n, 0] and stays frozen.

    The projection keeps each gradient in the captured row space, so SGD (with momentum, without weight
    decay) only changes W within it: ΔW·(I − VVᵀ) = 0, provided the optimizer state starts at the capture
    (momentum gathered before it holds unprojected gradients). Adam's elementwise scaling and decoupled
    weight decay act after the projection and move weights off the subspace; the paper projects the
    gradients (with Adam), and so does this class.
    """

    def __init__(
        self,
        initial: nn.Module | Mapping[str, torch.Tensor],
        *,
        rank: int = DEFAULT_LOCK_RANK,
        include: str | Callable[[str], bool] | None = None,
    ) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"rank must be a positive integer (the paper uses 16), got {rank}")
        self.rank = int(rank)
        if isinstance(include, str):
            pattern = re.compile(include)
            self._selected: Callable[[str], bool] = lambda name: pattern.search(name) is not None
        else:
            self._selected = include or (lambda name: True)
        items = initial.named_parameters() if isinstance(initial, nn.Module) else initial.items()
        # The CPU copy costs no accelerator memory until capture(); float64 is formed there per matrix.
        self.initial = {
            name: t.detach().to("cpu", copy=True)
            for name, t in items
            if t.ndim == 2 and t.is_floating_point() and self._selected(name)
        }
        if not self.initial:
            raise ValueError(f"no 2-D floating-point weight in initial matches include={include!r}")
        self.bases: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def locked_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [name for name in self.initial if name not in params]
        if missing:
            raise ValueError(
                f"model has no parameter {missing[0]!r} (of {len(missing)} locked ones); pass the model whose "
                "initial weights built this SubspaceLock"
            )
        return {name: params[name] for name in self.initial}

    def capture(self, model: nn.Module) -> dict[str, int]:
        """Compute V for every locked matrix from the cumulative update W(now) − W(0); returns name → rank."""
        for name, p in self.locked_parameters(model).items():
            w0 = self.initial[name]
            if p.shape != w0.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} but was {tuple(w0.shape)} initially")
            delta = p.detach().to("cpu", torch.float64) - w0.to(torch.float64)
            _, s, v = svd(delta)
            r = min(self.rank, numerical_rank(s, delta.shape))
            self.bases[name] = v[:, :r].to(dtype=p.dtype, device=p.device)
        return {name: v.shape[1] for name, v in self.bases.items()}

    def _require_bases(self) -> None:
        if not self.bases:
            raise RuntimeError("SubspaceLock has no subspace yet: call capture(model) first")

    def project(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """g·V·Vᵀ for the gradient g [m, n] of the locked matrix ``name`` (V [n, r])."""
        v = self.bases[name]
        return (grad @ v) @ v.mT

    def project_(self, model: nn.Module) -> None:
        """Project the ``.grad`` of every locked parameter in place (call after ``backward()``)."""
        self._require_bases()
        for name, p in self.locked_parameters(model).items():
            if p.grad is not None:
                p.grad.copy_(self.project(name, p.grad))

    def attach(self, model: nn.Module) -> SubspaceLock:
        """Register gradient hooks that project each locked matrix's gradient before it is accumulated.

        Hooks read the current bases, so a later :meth:`capture` takes effect without re-attaching.
        Returns self; :meth:`detach` removes the hooks.
        """
        self._require_bases()
        self.detach()
        for name, p in self.locked_parameters(model).items():
            if p.requires_grad:
                self._handles.append(p.register_hook(lambda grad, name=name: self.project(name, grad)))
        return self

    def detach(self) -> None:
        """Remove the hooks registered by :meth:`attach` (no-op when none are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
