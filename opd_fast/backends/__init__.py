"""Backend selection: one table from backend name to the class implementing every op, and the ops contract.

An ops object (:class:`Ops`) works on 2-D inputs, the rows already restricted to the counted tokens; each
model comes as a :class:`opd_fast.types.Side` (hidden states, weight, bias, head transform). Per-token
gradient weights (``row_weight``, fp32 [N]) say what to differentiate: Σ_n w_n · quantity_n. Gradients come
back w.r.t. the first model's hidden states, weight and bias (:class:`opd_fast.types.Grads`), in any
floating dtype (the custom ops of :mod:`opd_fast.library` cast them).

:func:`resolve_backend` turns a backend argument (possibly ``"auto"``) into the concrete name that runs on a
device, once per call of a public function; ``get_backend(name, plan="chunked")`` returns the ops of that concrete
backend for the plan (:mod:`opd_fast.chunking`). :class:`opd_fast.distributed.VocabParallelOps` implements the same
contract over a vocabulary shard, with global results.

``"auto"`` picks cuda, then triton, then torch for the tensors' device; the environment variable
``OPD_FAST_BACKEND`` overrides ``"auto"`` (an explicit backend argument wins over it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Protocol

import torch

from opd_fast._validation import DivergenceSpec, check_choice
from opd_fast.chunking import check_plan
from opd_fast.types import DivergenceStats, Grads, Need, Side

BACKENDS = ("auto", "torch", "triton", "cuda")
BACKEND_ENV = "OPD_FAST_BACKEND"

Tensor = torch.Tensor


class Ops(Protocol):
    """What every backend (and the vocabulary-parallel wrapper) implements."""

    name: str
    plan: str

    def divergence(
        self,
        s: Side,
        t: Side,
        spec: DivergenceSpec,
        row_weight: Tensor | None,
        need: Need,
        labels: Tensor | None = None,
    ) -> tuple[DivergenceStats, Grads]:
        """Per-token statistics (fp32 [N] each) and, with ``row_weight``, the gradients of Σ w_n L_n made in the
        same sweep: L = D, or with ``labels`` (int64 [N], global ids) w · CE + (1 − w) · D for w =
        ``spec.hard_label_weight`` (the statistics then hold the label's logit; their loss stays D)."""

    def divergence_backward(
        self,
        s: Side,
        t: Side,
        spec: DivergenceSpec,
        stats: DivergenceStats,
        row_weight: Tensor,
        need: Need,
        labels: Tensor | None = None,
    ) -> Grads:
        """Gradients of Σ w_n L_n from the statistics of an earlier forward."""

    def token_logits(self, side: Side, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """(z_y [N], lse [N], lse_lo [N]); log p(y) = (z_y − lse) − lse_lo, the residual keeping log p(y) accurate
        to ~ulp(log p) rather than ~ulp(lse) (docs/design.md §7)."""

    def logsumexp(self, side: Side, temperature: float) -> Tensor:
        """lse [N] of the final logits."""

    def logits_backward(
        self,
        side: Side,
        ids: Tensor | None,
        lse: Tensor,
        row_weight: Tensor,
        temperature: float,
        need: Need,
        filter_eps: float | None = None,
        lse_lo: Tensor | None = None,
    ) -> Grads:
        """Gradients of Σ w_n lse_n (``ids`` None) or Σ w_n log p(ids_n); ``lse_lo`` the lse residuals of
        :meth:`token_logits` (None: 0)."""

    def entropy_backward(
        self,
        side: Side,
        lse: Tensor,
        lse_lo: Tensor,
        entropy: Tensor,
        row_weight: Tensor,
        temperature: float,
        need: Need,
        filter_eps: float | None = None,
    ) -> Grads:
        """Gradients of Σ w_n H_n, the entropy H [N] of the rows with the given (lse, lse_lo)."""

    def topk(self, side: Side, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids int64 [N, k], log-probs [N, k] descending, ties by the smaller id; lse [N]; entropy [N])."""


class BackendUnavailableError(ValueError):
    """The requested backend cannot run here; the message says why and what to use instead."""


def _torch_unavailable(device: torch.device) -> str | None:
    return None


def _triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'opd_fast[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (
        f"the Triton kernels need CUDA tensors, these are on {device.type} (set TRITON_INTERPRET=1 before "
        f"importing opd_fast to run them in Triton's CPU interpreter, slowly); use backend='torch'"
    )


def _cuda_unavailable(device: torch.device) -> str | None:
    # Imported here, when the cuda backend is asked about: importing opd_fast must never depend on the compiled
    # extension (cuda_backend imports opd_fast._C only when asked), nor load the sweep it builds on.
    from opd_fast.backends.cuda_backend import extension_error

    reasons = []
    if device.type != "cuda":
        gpu = "" if torch.cuda.is_available() else " (and torch sees no CUDA GPU here)"
        reasons.append(f"the CUDA kernels need CUDA tensors, these are on {device.type}{gpu}")
    error = extension_error()
    if error is not None:
        reasons.append(error)
    return "; ".join(reasons) + "; use backend='torch'" if reasons else None


# name -> ("module:class" implementing the ops, function giving the reason it cannot run on a device or None)
_TABLE: dict[str, tuple[str, Callable[[torch.device], str | None]]] = {
    "torch": ("opd_fast.backends.torch_backend:TorchOps", _torch_unavailable),
    "triton": ("opd_fast.backends.triton_backend:TritonOps", _triton_unavailable),
    "cuda": ("opd_fast.backends.cuda_backend:CudaOps", _cuda_unavailable),
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    return _TABLE[check_choice("backend", name, BACKENDS[1:])][1](torch.device(device))


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` (possibly "auto") on ``device``; raises if unavailable."""
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            if env not in BACKENDS:
                options = ", ".join(repr(b) for b in BACKENDS)
                raise ValueError(f"environment variable {BACKEND_ENV}={env!r} must be one of {options}")
            backend = env
    if backend == "auto":
        candidates = ("cuda", "triton", "torch") if device.type == "cuda" else ("torch",)
        return next(name for name in candidates if _TABLE[name][1](device) is None)
    reason = _TABLE[backend][1](device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is not available on {device}: {reason}")
    return backend


def get_backend(backend: str, plan: str = "chunked") -> Ops:
    """The ops of the concrete ``backend`` (a name :func:`resolve_backend` gave) for ``plan``."""
    check_plan(plan)
    module, cls = _TABLE[check_choice("backend", backend, BACKENDS[1:])][0].split(":")
    return getattr(importlib.import_module(module), cls)(plan)
