"""The Triton backend's accuracy at the edges it alone got wrong, against the float64 reference: within 2× plain
fp32 PyTorch's own error (materialized logits, autograd) plus 2 ulps of the result, the bound of
tests/api/test_numerics.py; and its refusal of a torch too old for the chunked plan's GEMMs.

Runs on the GPU when there is one, else in Triton's CPU interpreter (tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from test_numerics import _as_accurate_as_plain, _error

from opd_fast import BackendUnavailableError, linear_divergence
from opd_fast._validation import DivergenceSpec
from opd_fast.backends import triton_backend
from opd_fast.reference import materialized_divergence, materialized_token_logprobs
from opd_fast.types import Need, Side

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(triton_backend is None, reason="no triton"),
    # the interpreter (NumPy) warns where a kernel computes NaN in a branch that tl.where then discards
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
PLANS = ["chunked", "streaming"]


def _grads(out: torch.Tensor, inputs) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out.sum(), inputs)


def _detached(tensors, dtype) -> list[torch.Tensor]:
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("plan", PLANS)
def test_reverse_kl_gradient_vanishes_where_the_models_are_sure_of_different_tokens(plan):
    """Student and teacher each put all but e^-60 of their mass on a different token. The gradient p_s ((log p_s −
    log p_t) − D) then subtracts two numbers of size |D| ≈ 60 at the student's token and is ~1e-19 in truth; plain
    fp32 gets it to ~1e-24 because its D comes from the very log-probabilities it subtracts D from. The statistics
    pass must form D the same way, not from accumulators moved across its lanes (or splits) with a rounding per
    move (it returned ~2 ulp(60) = 8e-6). Logits set exactly through an identity head; 600 columns span several of
    the kernels' blocks and vocabulary splits."""
    vocab, rows = 600, 16
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    zs[torch.arange(rows), torch.arange(rows) * 37 % vocab] += 60
    zt[torch.arange(rows), (torch.arange(rows) * 37 + 290) % vocab] += 60
    eye = torch.eye(vocab, dtype=torch.float64)
    pair = [zs.requires_grad_(), eye.requires_grad_(), zt, eye]
    kw = dict(divergence="reverse_kl", reduction="none")
    inputs = _detached(pair, torch.float32)
    ours = linear_divergence(*(t.to(DEVICE) for t in inputs), backend="triton", plan=plan, filter_eps=0.0, **kw)
    ours_grads = _grads(ours, inputs[:2])
    exact, plain = _detached(pair, torch.float64), _detached(pair, torch.float32)
    exact_grads = _grads(materialized_divergence(*exact, **kw), exact[:2])
    plain_grads = _grads(materialized_divergence(*plain, **kw), plain[:2])
    for name, a, p, e in zip(("hidden", "weight"), ours_grads, plain_grads, exact_grads):
        assert _as_accurate_as_plain(a.cpu(), p, e), (name, _error(a.cpu(), e), _error(p, e))


def _fp16_within(ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> bool:
    """An fp16 result within 2× plain fp32's error plus 2 fp16 ulps of the largest exact value (the spacing of fp16's
    subnormals, 2^-24, below its normal range)."""
    ulp = max(torch.finfo(torch.float16).eps * exact.abs().max().item(), 2.0**-24)
    return _error(ours, exact) <= 2 * _error(plain, exact) + 2 * ulp


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_fp16_gradients_at_a_high_temperature(plan, divergence):
    """At τ = 100 and a mean over 24 tokens the logit gradient G ~ p/(τ·N) ~ 2e-6 lies below fp16's normal range
    (6.1e-5): rounded to fp16 for the gradient GEMMs it kept a few bits (5e-2 relative error on dH, the torch backend
    1e-3). G stays fp32 for fp16 inputs, and the gradients are rounded to fp16 once, as plain PyTorch's are."""
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(24, 32, generator=g), torch.randn(24, 48, generator=g)
    ws, wt = torch.randn(200, 32, generator=g) * 0.7, torch.randn(200, 48, generator=g) * 0.6
    pair = [t.half() for t in (hs.requires_grad_(), ws.requires_grad_(), ht, wt)]
    kw = dict(divergence=divergence, beta=0.5, temperature=100.0)
    inputs = [t.to(DEVICE).detach().requires_grad_(t.requires_grad) for t in pair]
    ours = linear_divergence(*inputs, backend="triton", plan=plan, filter_eps=0.0, **kw)
    ours_grads = _grads(ours, inputs[:2])
    exact, plain = _detached(pair, torch.float64), _detached(pair, torch.float32)
    exact_grads = _grads(materialized_divergence(*exact, **kw), exact[:2])
    plain_grads = _grads(materialized_divergence(*plain, **kw), plain[:2])
    for name, a, p, e in zip(("hidden", "weight"), ours_grads, plain_grads, exact_grads):
        assert a.dtype == torch.float16
        assert _fp16_within(a.cpu(), p, e), (name, _error(a.cpu(), e), _error(p, e))


def test_streaming_token_logprob_gradients_take_the_lse_residual():
    """At τ = 0.05 the logits reach ~300 and lse's fp32 rounding, ~ulp(300) = 3e-5, shifts every p = e^{z − lse} of
    the row by that factor (2-25× plain fp32's error on dH) unless the backward subtracts lse's residual, as the
    forward does. The streaming ops take it (the public path passes it once the library saves it:
    tests/api/test_numerics.py::test_token_logprob_gradients_at_a_low_temperature)."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(8, 16, generator=g).requires_grad_(), torch.randn(300, 16, generator=g).requires_grad_()
    ids = torch.randint(0, 300, (8,), generator=g)
    ops, side = triton_backend.TritonStreamingOps(), Side(h.detach().to(DEVICE), w.detach().to(DEVICE))
    _, lse, lse_lo = ops.token_logits(side, ids.to(DEVICE), 0.05)
    need = Need(hidden=True, weight=True, bias=False)
    ones = torch.ones(8, device=DEVICE)
    ours = ops.logits_backward(side, ids.to(DEVICE), lse, ones, 0.05, need, 0.0, lse_lo=lse_lo)
    exact, plain = _detached([h, w], torch.float64), [h.clone(), w.clone()]
    exact_grads = _grads(materialized_token_logprobs(*exact, ids, temperature=0.05), exact)
    plain_grads = _grads(materialized_token_logprobs(*plain, ids, temperature=0.05), plain)
    for name, a, p, e in zip(("hidden", "weight"), ours[:2], plain_grads, exact_grads):
        assert _as_accurate_as_plain(a.cpu(), p, e), (name, _error(a.cpu(), e), _error(p, e))


@pytest.fixture
def torch_before_2_8(monkeypatch):
    """torch < 2.8 as the backend sees it: ``torch.mm`` without ``out_dtype`` (the TypeError those releases raise)."""
    mm = torch.mm

    def old_mm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError("mm() received an invalid combination of arguments - got (Tensor, Tensor, out_dtype=...)")
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", old_mm)
    triton_backend.mm_out_dtype_error.cache_clear()
    yield
    triton_backend.mm_out_dtype_error.cache_clear()


def test_the_chunked_plan_refuses_bf16_on_cuda_with_torch_before_2_8(torch_before_2_8):
    """Its bf16 GEMMs write fp32 through torch.mm(..., out_dtype=), which torch 2.8 added: on older releases the
    call names the version and the ways out instead of failing with a TypeError inside the sweep. CUDA tensors
    without a GPU: fake ones (FakeTensorMode), which reach the refusal before any kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = DivergenceSpec.make("reverse_kl", 0.5, 1.0, None, None)
    with FakeTensorMode():
        hs, ws = torch.empty(4, 16, device="cuda", dtype=torch.bfloat16), torch.empty(64, 16, device="cuda")
        side = Side(hs, ws.to(torch.bfloat16))
        with pytest.raises(
            BackendUnavailableError, match=r"lacks torch\.mm\(\.\.\., out_dtype=\) \(added in torch 2\.8\)"
        ):
            triton_backend.TritonOps("chunked").divergence(side, side, spec, None, Need())
