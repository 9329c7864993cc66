"""The chunked plan (issue 17): exactly the floor's GEMM FLOPs, memory independent of N, and the same numbers
as the streaming plan, on every backend this machine runs; its weight-gradient modes and padded row stride."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE, grads, make_pair, rel_err, use_cuda_backend
from torch.utils.flop_counter import FlopCounterMode

from opd_fast import chunk_budget, chunking, linear_divergence, linear_token_logprobs
from opd_fast.backends import get_backend, triton_backend
from opd_fast.chunking import CUDA_CHUNK_ELEMENTS, CUDA_ROW_ALIGN, dw_gemm, padded_stride, plan_tiles
from opd_fast.memory import TensorMemoryTracker

DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else [])


@pytest.fixture(params=["torch", "triton", "cuda"])
def sweep_backend(request) -> str:
    """Each backend whose chunked plan is the shared sweep, as this machine runs it (cuda: the host build on
    the CPU, tests/conftest.py)."""
    if request.param == "triton" and triton_backend is None:
        pytest.skip("Triton is not installed")
    if request.param == "cuda":
        use_cuda_backend(request)
    return request.param


def _gemm_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["per_chunk", "single"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_forward_backward_costs_exactly_the_floor(sweep_backend, divergence, beta, mode):
    """2·N·V·(Hs + Ht) for both models' logits + 4·N·V·Hs for dH and dW: no GEMM is recomputed, with
    several token chunks (budget 16·V: 16-row chunks of 40 tokens), whether dW is made chunk by chunk or by one
    GEMM over all rows."""
    n, hs_dim, ht_dim, vocab = 40, 16, 24, 101
    hs, ws, ht, wt = (t.float().to(DEVICE) for t in make_pair(lead=(n,), hs_dim=hs_dim, ht_dim=ht_dim, vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    assert plan_tiles(n, vocab, 16 * vocab).rows == 14  # 3 balanced chunks: 14, 14, 12

    def step(**options):
        loss = linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, backend=sweep_backend, **options)
        (loss.loss if isinstance(loss, tuple) else loss).backward()

    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    with chunk_budget(16 * vocab), dw_gemm(mode):
        flops = _gemm_flops(step)
        with_entropy = _gemm_flops(lambda: step(return_entropy=True))  # the entropy comes from the same sweep
        with_labels = _gemm_flops(lambda: step(labels=labels, hard_label_weight=0.3))  # so does the cross-entropy
    assert flops == with_entropy == with_labels == 2 * n * vocab * (hs_dim + ht_dim) + 4 * n * vocab * hs_dim


def test_streaming_plan_recomputes_the_logits():
    """The low-memory plan's price, measured the same way: its backward recomputes both models' logits (torch
    backend: the Triton streaming kernels do their GEMMs inside tl.dot, invisible to the FLOP counter)."""
    n, h, vocab = 24, 16, 101
    hs, ws, ht, wt = (t.float() for t in make_pair(lead=(n,), hs_dim=h, ht_dim=h, vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    floor = 2 * n * vocab * 2 * h + 4 * n * vocab * h
    with chunk_budget(n * 32):
        flops = _gemm_flops(lambda: linear_divergence(hs, ws, ht, wt, backend="torch", plan="streaming").backward())
    assert flops == floor + 2 * n * vocab * 2 * h


def test_token_logprobs_backward_recomputes_only_the_student():
    n, h, vocab = 30, 8, 77
    w = torch.randn(vocab, h, requires_grad=True)
    x = torch.randn(n, h, requires_grad=True)
    ids = torch.randint(0, vocab, (n,))
    flops = _gemm_flops(lambda: linear_token_logprobs(x, w, ids, backend="torch").sum().backward())
    assert flops == 2 * n * vocab * h + (2 + 4) * n * vocab * h


@pytest.mark.parametrize("n_tokens", [256, 1024, 4096])
def test_peak_memory_is_the_workspace_plus_outputs_whatever_n(n_tokens):
    """Beyond the inputs: fp32 upcasts / gradients O((N + V)·H) plus a workspace fixed by the budget — the
    O(N·V) part does not grow with N (the budget holds 64 rows of the 2048-token vocabulary)."""
    vocab, h = 2048, 16
    budget = 64 * vocab
    hs, ws, ht, wt = (t.float() for t in make_pair(lead=(n_tokens,), hs_dim=h, ht_dim=h, vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    with chunk_budget(budget), TensorMemoryTracker() as tracker:
        linear_divergence(hs, ws, ht, wt, backend="torch").backward()
    linear_part = 4 * (n_tokens + vocab) * h * 4  # hidden/weight gradients and fp32 copies, generously
    workspace = 8 * budget * 4  # both models' logits tiles and the epilogue's temporaries
    assert tracker.peak_bytes <= workspace + linear_part, tracker.peak_bytes
    assert tracker.largest_numel <= budget


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_chunked_and_streaming_plans_agree(backend, divergence, beta):
    hs, ws, ht, wt = (t.float() for t in make_pair(lead=(2, 13), vocab=157))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    kw = dict(divergence=divergence, beta=beta, temperature=0.8, backend=backend)
    chunked = linear_divergence(hs, ws, ht, wt, plan="chunked", **kw)
    streaming = linear_divergence(hs, ws, ht, wt, plan="streaming", **kw)
    assert rel_err(chunked, streaming) < 1e-5
    for a, b in zip(grads(chunked, (hs, ws)), grads(streaming, (hs, ws))):
        assert rel_err(a, b) < 1e-5


def test_cuda_default_budget_holds_both_models_logits_in_two_gib():
    plan = plan_tiles(8192, 151936, device="cuda")
    assert plan.cols == 151936 and plan.rows % CUDA_ROW_ALIGN == 0
    assert 2 * plan.rows * plan.cols * 4 <= 2 * CUDA_CHUNK_ELEMENTS * 4 == 2 << 30
    assert plan_tiles(8192, 151936, device="cpu").rows < plan.rows


def test_unknown_plan_is_refused():
    hs, ws, ht, wt = make_pair()
    with pytest.raises(ValueError, match="plan must be one of 'chunked', 'streaming'"):
        linear_divergence(hs, ws, ht, wt, plan="tiled")


# ---- the single dW GEMM (chunking.dw_gemm) ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_single_dw_gemm_gives_the_per_chunk_results(sweep_backend, divergence, beta, dtype):
    """One dW = Gᵀ·H over every row's G gives what the per-chunk fp32 accumulator gives, within the accumulation's
    rounding (bf16: G rounded the same way in both; the sums in fp32, in another order); every row's G is kept:
    the tracker sees one [N, V] buffer, which per_chunk never allocates."""
    n, vocab = 40, 101
    hs, ws, ht, wt = (t.to(DEVICE, dtype) for t in make_pair(lead=(n,), vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    results, largest = {}, {}
    for mode in ("per_chunk", "single"):
        with chunk_budget(16 * vocab), dw_gemm(mode), TensorMemoryTracker() as tracker:
            loss = linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, backend=sweep_backend)
            results[mode] = (loss, *torch.autograd.grad(loss * 0.7, (hs, ws)))
        largest[mode] = tracker.largest_numel
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(results["single"], results["per_chunk"]):
        assert a.dtype == b.dtype and rel_err(a, b) < tol
    assert largest["single"] >= n * vocab > largest["per_chunk"]


def test_auto_dw_gemm_is_per_chunk_on_the_cpu():
    n, vocab = 40, 101
    hs, ws, ht, wt = (t.float() for t in make_pair(lead=(n,), vocab=vocab))
    out = {}
    for mode in ("per_chunk", "auto"):
        with chunk_budget(16 * vocab), dw_gemm(mode), TensorMemoryTracker() as tracker:
            out[mode] = grads(linear_divergence(hs, ws, ht, wt, backend="torch"), (hs, ws)), tracker.largest_numel
    assert out["auto"][1] == out["per_chunk"][1] < n * vocab
    assert all(torch.equal(a, b) for a, b in zip(out["auto"][0], out["per_chunk"][0]))


# ---- the padded row stride -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [333, 50257, 151665])
def test_padded_row_stride_gives_the_packed_results(sweep_backend, vocab, monkeypatch):
    """Rows of the workspace and of G padded to a multiple of 64 elements (CUDA's layout, here on the CPU too)
    give the packed layout's loss and gradients: awkward vocabularies, two whole-row chunks, bf16 G. Epilogues
    that take a row stride see the padded one (the workspace is rows × 384 / 50304 / 151680); the others get
    packed tiles."""
    if sweep_backend == "triton" and DEVICE.type == "cpu" and vocab > 333:
        pytest.skip("Triton's interpreter pays per 256-column block: its padded stride is checked at V = 333")
    n, h = 17, 4
    hs, ws, ht, wt = (t.to(DEVICE, torch.bfloat16) for t in make_pair(lead=(n,), hs_dim=h, ht_dim=h, vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    results, largest = [], []
    for padded_devices in ((), (DEVICE.type,)):
        monkeypatch.setattr(chunking, "PADDED_DEVICES", padded_devices)
        with chunk_budget(16 * vocab), TensorMemoryTracker() as tracker:
            loss = linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=0.3, backend=sweep_backend)
            results.append((loss, *torch.autograd.grad(loss, (hs, ws))))
        largest.append(tracker.largest_numel)
    # The same numbers up to the order of the epilogue's sums, which may follow the rows' alignment (csrc's vector
    # loads): a last-bit difference of the fp32 loss, of a few bf16 gradient entries.
    for a, b, tol in zip(*results, (2e-6, 2e-3, 2e-3)):
        assert a.dtype == b.dtype and rel_err(a, b) < tol
    strided = get_backend(sweep_backend).strided
    rows = plan_tiles(n, vocab, 16 * vocab).rows
    assert largest == [rows * vocab, rows * (padded_stride(vocab) if strided else vocab)]
