"""Backend dispatch: the table, "auto", the OPD_FAST_BACKEND override and the unavailable-backend errors."""

import pytest
import torch
from conftest import make_pair

from opd_fast import BackendUnavailableError, linear_reverse_kl
from opd_fast.backends import get_backend, resolve_backend, torch_backend, unavailable_reason


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("OPD_FAST_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert isinstance(get_backend(resolve_backend("auto", torch.device("cpu"))), torch_backend.TorchOps)


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("OPD_FAST_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("OPD_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        resolve_backend("auto", torch.device("cpu"))
    assert resolve_backend("torch", torch.device("cpu")) == "torch"  # an explicit argument wins


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv("OPD_FAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="OPD_FAST_BACKEND='tpu'"):
        resolve_backend("auto", torch.device("cpu"))


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_unavailable_backend_says_why(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without it, Triton needs CUDA tensors
    hs, ws, ht, wt = make_pair(lead=(3,))
    reason = unavailable_reason(name, torch.device("cpu"))
    assert reason
    with pytest.raises(BackendUnavailableError, match=f"backend='{name}' is not available on cpu") as info:
        linear_reverse_kl(hs, ws, ht, wt, backend=name)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("jax", torch.device("cpu"))


def test_triton_runs_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason("triton", torch.device("cpu")) is None
    assert "TRITON_INTERPRET=1" in unavailable_reason("triton", torch.device("meta"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "need CUDA tensors" in unavailable_reason("triton", torch.device("cpu"))
