"""Backend selection: one dispatch table from backend name to the module that implements every op.

A backend module provides, on 2-D inputs (rows already selected by the mask):

* ``divergence_forward(hs, ws, ht, wt, spec) -> DivergenceStats``
* ``divergence_backward(hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw) -> (dh | None, dw | None)``
* ``divergence_forward_backward(hs, ws, ht, wt, grad, spec, need_dh, need_dw) -> (stats, dh, dw)``
* ``jsd_terms(hs, ws, ht, wt, lse_s, lse_t, spec) -> (KL(p_s‖m), KL(p_t‖m))`` with given log-sum-exps
* ``token_logprobs_forward(h, w, ids, temperature) -> (logprobs, lse)``
* ``token_logprobs_backward(h, w, ids, lse, grad, temperature, need_dh, need_dw, filter_eps) -> (dh, dw)``
* ``logsumexp_forward(h, w, temperature) -> lse``
* ``logsumexp_backward(h, w, lse, grad, temperature, need_dh, need_dw, filter_eps) -> (dh, dw)``
* ``topk(h, w, k, temperature) -> (ids, logprobs, lse, entropy)``: top-k sorted by descending log-prob,
  ties by the smaller id, with the row's log-sum-exp and entropy

``grad`` is the per-token weight of the loss gradient ([N] fp32); gradients come back w.r.t. the student
hidden states and weight, in any floating dtype (the autograd layer casts them).

``"auto"`` picks cuda, then triton, then torch for the tensors' device; the environment variable
``OPD_FAST_BACKEND`` overrides ``"auto"`` (an explicit backend argument wins over it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import torch

from opd_fast._validation import check_choice

BACKENDS = ("auto", "torch", "triton", "cuda")
BACKEND_ENV = "OPD_FAST_BACKEND"


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
    # Imported here: the backend module registers its custom ops, and importing opd_fast must never
    # depend on the compiled extension (cuda_backend imports opd_fast._C only when asked).
    from opd_fast.backends.cuda_backend import extension_error

    reasons = []
    if device.type != "cuda":
        gpu = "" if torch.cuda.is_available() else " (and torch sees no CUDA GPU here)"
        reasons.append(f"the CUDA kernels need CUDA tensors, these are on {device.type}{gpu}")
    error = extension_error()
    if error is not None:
        reasons.append(error)
    return "; ".join(reasons) + "; use backend='torch'" if reasons else None


# name -> (module implementing the ops, function giving the reason it cannot run on a device or None)
_TABLE: dict[str, tuple[str, Callable[[torch.device], str | None]]] = {
    "torch": ("opd_fast.backends.torch_backend", _torch_unavailable),
    "triton": ("opd_fast.backends.triton_backend", _triton_unavailable),
    "cuda": ("opd_fast.backends.cuda_backend", _cuda_unavailable),
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


def get_backend(backend: str, device: torch.device) -> ModuleType:
    """The module implementing the ops for ``backend`` on ``device`` (see the module docstring)."""
    return importlib.import_module(_TABLE[resolve_backend(backend, device)][0])
