"""The CUDA C++ backend (backend="cuda", opd_fast._C), in three tiers.

1. Everywhere: without the extension (or without a GPU) backend="cuda" is refused with the reason, and
   importing opd_fast never needs the extension. With nvcc present, csrc/compile_check.sh compiles every
   .cu file for sm_80 and sm_90a.
2. Everywhere with a C++ compiler: the *host build* — csrc/bindings.cpp and csrc/host/launchers_host.cpp
   compiled for CPU tensors with the same csrc/epilogue.h — stands in for opd_fast._C. The whole path
   of backend="cuda" then runs on the CPU: public API → autograd → cuda_backend's chunked GEMMs →
   torch.library custom ops → bindings (argument checks) → the epilogue math (online softmax merges,
   divergence terms, logit gradients, streaming top-k with its tie order), each row run by 2 threads
   that synchronize like a thread block. Only the CUDA primitives (BlockGroup in csrc/block.cuh), the
   launches and cuBLAS are left to the GPU tier.
3. GPU with the extension built: the real kernels against the float64 reference, the torch backend and
   the Triton backend, on the cases of test_triton.py plus realistic shapes (N=4096, H=4096, V=151936,
   bf16, within 2× the error of plain PyTorch).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, grads, rel_err

from opd_fast import (
    BackendUnavailableError,
    TopKOverlap,
    chunk_budget,
    linear_divergence,
    linear_reverse_kl,
    linear_token_logprobs,
    linear_topk_divergence,
    linear_topk_overlap,
)
from opd_fast import backends as backends_module
from opd_fast._validation import DivergenceSpec
from opd_fast.backends import cuda_backend, unavailable_reason
from opd_fast.backends.cuda_backend import CudaOps
from opd_fast.backends.torch_backend import TorchOps
from opd_fast.reference import materialized_divergence, materialized_token_logprobs, materialized_topk_overlap
from opd_fast.types import Need, Side

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
HAS_EXTENSION = cuda_backend.extension_error() is None
GPU_READY = torch.cuda.is_available() and HAS_EXTENSION
DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]


def _pair(lead, hs_dim, ht_dim, vocab, dtype, scale=3.0, device=DEVICE):
    g = torch.Generator().manual_seed(hash((lead, hs_dim, ht_dim, vocab)) % 2**31)
    hs = torch.randn(*lead, hs_dim, generator=g)
    ws = torch.randn(vocab, hs_dim, generator=g) * scale / hs_dim**0.5
    ht = torch.randn(*lead, ht_dim, generator=g)
    wt = torch.randn(vocab, ht_dim, generator=g) * scale / ht_dim**0.5
    hs, ws, ht, wt = (t.to(device=device, dtype=dtype) for t in (hs, ws, ht, wt))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def _exact(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _check_divergence(hs, ws, ht, wt, tol, **kw):
    ours = linear_divergence(hs, ws, ht, wt, backend="cuda", **kw)
    exact = _exact(hs, ws, ht, wt)
    ref = materialized_divergence(*exact, **kw)
    grad_output = torch.randn_like(ref) if ref.dim() else torch.tensor(0.7, dtype=ref.dtype, device=ref.device)
    assert rel_err(ours, ref) < tol
    for a, b in zip(grads(ours, (hs, ws), grad_output.to(ours.dtype)), grads(ref, exact[:2], grad_output)):
        assert rel_err(a, b) < tol


def _integer_pair(n_rows: int, vocab: int, hidden: int = 6):
    """Inputs in {-2, …, 2}: every logit is a small integer, exact in fp32/bf16 whatever the summation order
    (so backends must agree bit for bit), and most logits are tied with many others."""
    g = torch.Generator().manual_seed(n_rows * vocab)
    return [torch.randint(-2, 3, shape, generator=g).float() for shape in ((n_rows, hidden), (vocab, hidden)) * 2]


def _assert_topk_equal(ours: TopKOverlap, ref: TopKOverlap, tol=1e-5):
    for name, a, b in zip(TopKOverlap._fields, ours, ref):
        assert a.shape == b.shape, name
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol, msg=name)


# ---- 1. no extension, import, compile check ----------------------------------------------------------------


@pytest.mark.skipif(HAS_EXTENSION, reason="opd_fast._C is built here")
def test_missing_extension_is_reported_with_the_fix():
    reason = unavailable_reason("cuda", torch.device("cuda"))
    assert "opd_fast._C is not built" in reason and "--no-build-isolation" in reason
    hs, ws, ht, wt = _pair((3,), 8, 8, 11, torch.float32, device="cpu")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is not available on cpu") as info:
        linear_reverse_kl(hs, ws, ht, wt, backend="cuda")
    assert "opd_fast._C is not built" in str(info.value) and "use backend='torch'" in str(info.value)


def test_cpu_tensors_are_refused_with_the_reason():
    assert "need CUDA tensors, these are on cpu" in unavailable_reason("cuda", torch.device("cpu"))


def test_importing_opd_fast_never_loads_the_extension(tmp_path):
    code = (
        "import sys, opd_fast, opd_fast.backends.cuda_backend; "
        "assert 'opd_fast._C' not in sys.modules, 'importing opd_fast loaded opd_fast._C'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_cuda_sources_use_no_torch_cuda_headers():
    """CPU wheels of torch lack c10/cuda and ATen/cuda; the .cu files include no torch header at all."""
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            text = path.read_text()
            assert "c10/cuda" not in text and "ATen/cuda" not in text, path
            if path.suffix in (".cu", ".cuh") or path.name in ("epilogue.h", "launchers.h"):
                assert "#include <torch" not in text and "#include <ATen" not in text, path


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_compile_check_builds_every_kernel_for_sm80_and_sm90a():
    """About 8–13 s on the 2-core CI machine, so it stays in the default (not slow) tier."""
    out = subprocess.run([str(CSRC / "compile_check.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for source in CSRC.glob("*.cu"):
        assert f"ok     {source.name}" in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_compile_check_fails_on_a_broken_kernel(tmp_path):
    shutil.copy(CSRC / "compile_check.sh", tmp_path)
    (tmp_path / "broken.cu").write_text("__global__ void broken() { undeclared_name(); }\n")
    out = subprocess.run([str(tmp_path / "compile_check.sh")], capture_output=True, text=True)
    assert out.returncode != 0
    assert "FAILED broken.cu" in out.stderr


# ---- 2. the host build: backend="cuda" end to end on CPU tensors --------------------------------------------


@pytest.fixture(scope="module")
def host_kernels():
    """csrc/bindings.cpp + csrc/host/launchers_host.cpp built for CPU tensors (~25 s once, then cached)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) to build the host kernels")
    from torch.utils.cpp_extension import load

    return load(
        name="opd_fast_host_kernels",
        sources=[str(CSRC / "bindings.cpp"), str(CSRC / "host" / "launchers_host.cpp")],
        extra_cflags=["-O2", "-std=c++20", "-pthread", "-DOPD_FAST_HOST_BUILD"],  # C++20: std::barrier
        extra_ldflags=["-pthread"],
    )


@pytest.fixture
def cuda_on_cpu(monkeypatch, host_kernels):
    """backend="cuda" runs on CPU tensors, with the host build in place of opd_fast._C."""
    monkeypatch.setattr(cuda_backend, "_ops_module", lambda: host_kernels)
    monkeypatch.setitem(backends_module._TABLE, "cuda", ("opd_fast.backends.cuda_backend:CudaOps", lambda device: None))
    return host_kernels


def _cpu_pair(*args, **kw):
    return _pair(*args, device="cpu", **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_host_divergence_matches_reference(cuda_on_cpu, divergence, beta, reduction):
    hs, ws, ht, wt = _cpu_pair((2, 19), 24, 40, 301, torch.float32)
    mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(3)) > 0.25
    mask[1, :7] = False
    kw = dict(divergence=divergence, beta=beta, mask=mask, temperature=1.3, reduction=reduction)
    _check_divergence(hs, ws, ht, wt, 2e-5, **kw)


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
@pytest.mark.parametrize("budget", [2, 40])
def test_host_many_chunks_and_odd_shapes(cuda_on_cpu, divergence, beta, budget):
    """Budget 2 → one vocabulary column per chunk; 40 → chunks of 4 columns with a ragged last one."""
    hs, ws, ht, wt = _cpu_pair((37,), 20, 17, 97, torch.float32)
    with chunk_budget(budget):
        _check_divergence(hs, ws, ht, wt, 2e-5, divergence=divergence, beta=beta, reduction="none")


def test_host_jsd_terms_on_a_shard_with_global_lse(cuda_on_cpu):
    """The op vocabulary parallelism uses: a shard's JSD terms given the full vocabulary's log-sum-exps."""
    hs, ws, ht, wt = (t.detach() for t in _cpu_pair((9,), 12, 20, 90, torch.float32))
    spec = DivergenceSpec.make("jsd", 0.3, 1.2)
    full = TorchOps().divergence(Side(hs, ws), Side(ht, wt), spec, None, Need())[0]
    shard = (Side(hs, ws[40:]), Side(ht, wt[40:]), spec, full.student_lse, full.teacher_lse)
    ours = CudaOps().jsd_terms(*shard)
    ref = TorchOps().jsd_terms(*shard)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_host_single_token_and_temperature(cuda_on_cpu):
    hs, ws, ht, wt = _cpu_pair((1,), 16, 16, 130, torch.float32)
    _check_divergence(hs, ws, ht, wt, 2e-5, temperature=0.45)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_host_low_precision_within_twice_plain_pytorch(cuda_on_cpu, dtype, divergence, beta):
    hs, ws, ht, wt = _cpu_pair((48,), 32, 48, 200, dtype)
    kw = dict(divergence=divergence, beta=beta)
    exact = _exact(hs, ws, ht, wt)
    ref = materialized_divergence(*exact, **kw)
    ref_g = grads(ref, exact[:2])
    plain = materialized_divergence(hs, ws, ht, wt, **kw)  # logits and softmax in the low-precision dtype
    ours = linear_divergence(hs, ws, ht, wt, backend="cuda", **kw)
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6
    ours_g = grads(ours, (hs, ws))
    assert all(g.dtype == dtype for g in ours_g)
    resolution = torch.finfo(dtype).eps
    for a, r in zip(ours_g, ref_g):  # gradients: rounded once to the dtype, from fp32 logit gradients
        assert rel_err(a, r) < resolution


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_host_backward_is_bitwise_deterministic(cuda_on_cpu, divergence, beta):
    hs, ws, ht, wt = _cpu_pair((40,), 16, 24, 150, torch.float32)
    with chunk_budget(64):
        first = grads(linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, backend="cuda"), (hs, ws))
        again = grads(linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, backend="cuda"), (hs, ws))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("temperature", [0.8, 1.0])
@pytest.mark.parametrize("lead", [(23,), (2, 3, 4)])
def test_host_token_logprobs(cuda_on_cpu, lead, temperature):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(*lead, 20, generator=g).requires_grad_()
    w = (torch.randn(133, 20, generator=g) * 0.7).requires_grad_()
    ids = torch.randint(0, 133, lead, generator=g)
    with chunk_budget(2):
        ours = linear_token_logprobs(h, w, ids, temperature=temperature, backend="cuda")
        grad_output = torch.randn_like(ours)
        ours_g = grads(ours, (h, w), grad_output)
    exact = _exact(h, w)
    ref = materialized_token_logprobs(*exact, ids, temperature=temperature)
    assert ours.shape == torch.Size(lead) and rel_err(ours, ref) < 2e-5
    for a, b in zip(ours_g, grads(ref, exact, grad_output.double())):
        assert rel_err(a, b) < 2e-5


def test_host_logsumexp_matches_torch_backend(cuda_on_cpu):
    h, w, _, _ = _cpu_pair((29,), 12, 12, 77, torch.float32)
    h, w = h.detach(), w.detach()
    grad = torch.randn(29)
    need = Need(hidden=True, weight=True)
    with chunk_budget(30):
        lse = CudaOps().logsumexp(Side(h, w), 0.7)
        dh, dw, _ = CudaOps().logits_backward(Side(h, w), None, lse, grad, 0.7, need)
    ref_lse = TorchOps().logsumexp(Side(h, w), 0.7)
    ref_dh, ref_dw, _ = TorchOps().logits_backward(Side(h, w), None, ref_lse, grad, 0.7, need)
    assert rel_err(lse, ref_lse) < 1e-6 and rel_err(dh, ref_dh) < 1e-5 and rel_err(dw, ref_dw) < 1e-5


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize(("lead", "vocab"), [((9,), 97), ((2, 4), 64), ((), 23), ((3,), 70001)])
def test_host_topk_overlap_matches_reference(cuda_on_cpu, lead, vocab, k, chunked):
    # chunked: a few columns per chunk for the small vocabularies, two chunks for V = 70001
    budget = (30 if vocab < 1000 else 30000) if chunked else 1 << 22
    hs, ws, ht, wt = (t.detach().double() for t in _cpu_pair(lead, 16, 24, vocab, torch.float32))
    hs, ws, ht, wt = (t.float() for t in (hs, ws, ht, wt))
    with chunk_budget(budget):
        ours = linear_topk_overlap(hs, ws, ht, wt, k=k, temperature=0.9, backend="cuda")
        same_backend_math = linear_topk_overlap(hs, ws, ht, wt, k=k, temperature=0.9, backend="torch")
    _assert_topk_equal(ours, same_backend_math, tol=1e-4)  # fp32 sums over up to 70001 columns, other order
    ref = materialized_topk_overlap(*(t.double() for t in (hs, ws, ht, wt)), k=k, temperature=0.9)
    assert all(torch.equal(getattr(ours, f), getattr(ref, f)) for f in ("student_topk_ids", "teacher_topk_ids"))


@pytest.mark.parametrize("budget", [1 << 22, 12])
def test_host_topk_ties_are_broken_by_smaller_id(cuda_on_cpu, budget):
    """Zero weight rows give exactly tied logits; the order among them is by token id, here with k = V so
    that every tie is visible."""
    hs, ws, ht, wt = (t.detach() for t in _cpu_pair((5,), 16, 16, 20, torch.float32))
    ws[[2, 7, 11, 19]] = 0.0
    wt[[0, 3, 7, 8, 15]] = 0.0
    with chunk_budget(budget):
        ours = linear_topk_overlap(hs, ws, ht, wt, k=20, backend="cuda")
    _assert_topk_equal(ours, materialized_topk_overlap(hs, ws, ht, wt, k=20))
    tied = ours.student_topk_ids[0][torch.isin(ours.student_topk_ids[0], torch.tensor([2, 7, 11, 19]))]
    assert tied.tolist() == [2, 7, 11, 19]


@pytest.mark.parametrize("budget", [1 << 22, 300, 7])
@pytest.mark.parametrize("k", [1, 16, 100])
def test_host_topk_exact_ties_everywhere(cuda_on_cpu, k, budget):
    """Integer logits: hundreds of exact ties per row, across chunk boundaries; order by the smaller id."""
    hs, ws, ht, wt = _integer_pair(9, 1003)
    with chunk_budget(budget):
        ours = linear_topk_overlap(hs, ws, ht, wt, k=k, temperature=0.7, backend="cuda")
    _assert_topk_equal(ours, materialized_topk_overlap(*(t.double() for t in (hs, ws, ht, wt)), k=k, temperature=0.7))


def test_host_topk_negative_zero_ties_with_positive_zero(cuda_on_cpu):
    """−0.0 and +0.0 are the same logit: ordered by id like any tie, whatever their sign bits."""
    z = torch.tensor([[-0.0, 0.0, -0.0, 1.0, 0.0]])
    keys, state = torch.zeros(1, 5, dtype=torch.int64), torch.zeros(3, 1)
    state[0] = -torch.inf
    cuda_backend.topk_update(z, keys, state, 0, None, cuda_backend.NO_HEAD)
    ids, logprobs, lse, entropy = cuda_backend.topk_finalize(keys, state)
    assert ids.tolist() == [[3, 0, 1, 2, 4]]
    log_p = torch.log_softmax(z, dim=-1)
    torch.testing.assert_close(logprobs, log_p[:, [3, 0, 1, 2, 4]])
    torch.testing.assert_close(lse, torch.logsumexp(z, dim=-1))
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(dim=-1))


def test_host_topk_streams_candidates_through_many_sorts(cuda_on_cpu):
    """Ascending logits make every column a new candidate, so the buffer is sorted and cut again and again."""
    vocab, k = 300, 7
    w = torch.linspace(-3, 3, vocab)[:, None].repeat(1, 4)
    h = torch.ones(3, 4)
    with chunk_budget(40):
        ids, logprobs, lse, entropy = CudaOps().topk(Side(h, w), k, 1.0)
    ref = TorchOps().topk(Side(h, w), k, 1.0)
    assert torch.equal(ids, ref[0]) and ids[0].tolist() == list(range(vocab - 1, vocab - 1 - k, -1))
    for a, b in zip((logprobs, lse, entropy), ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_host_topk_longer_than_the_kernel_buffer_uses_the_torch_stream(cuda_on_cpu):
    h, w, _, _ = _cpu_pair((4,), 8, 8, 1500, torch.float32)
    h, w = h.detach(), w.detach()
    ours = CudaOps().topk(Side(h, w), cuda_backend.MAX_K + 1, 1.0)
    ref = TorchOps().topk(Side(h, w), cuda_backend.MAX_K + 1, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("renormalize", [True, False])
def test_host_topk_divergence_matches_torch_backend(cuda_on_cpu, renormalize):
    """renormalize=False also runs the differentiable log-sum-exp (logsumexp_forward/backward)."""
    hs, ws, ht, wt = _cpu_pair((2, 9), 16, 24, 120, torch.float32)
    kw = dict(k=8, support="union", renormalize=renormalize, temperature=1.1)
    with chunk_budget(50):
        ours = linear_topk_divergence(hs, ws, ht, wt, backend="cuda", **kw)
        ours_g = grads(ours, (hs, ws))
    ref = linear_topk_divergence(hs, ws, ht, wt, backend="torch", **kw)
    assert rel_err(ours, ref) < 1e-5
    for a, b in zip(ours_g, grads(ref, (hs, ws))):
        assert rel_err(a, b) < 1e-5


def test_host_fp64_is_refused_with_a_pointer_to_torch(cuda_on_cpu):
    hs, ws, ht, wt = (t.detach().double() for t in _cpu_pair((3,), 16, 16, 40, torch.float32))
    with pytest.raises(TypeError, match=r"backend='torch' for torch\.float64"):
        linear_divergence(hs, ws, ht, wt, backend="cuda")


def test_bindings_name_the_bad_argument(host_kernels):
    zs, state = torch.zeros(3, 4), torch.zeros(5, 3)
    head = [1.0, 0.0, 1.0]

    def call(zs, state, mode=4, head_s=head, bias_s=None):
        host_kernels.softmax_stats_update(zs, None, None, state, 0, mode, bias_s, head_s, None, head, 0)

    with pytest.raises(RuntimeError, match=r"softmax_stats_update: zs must be a cpu tensor, got one on meta"):
        call(zs.to("meta"), state)
    with pytest.raises(RuntimeError, match=r"state must be a cpu tensor, got one on meta; move it with .to\(cpu\)"):
        call(zs, state.to("meta"))
    with pytest.raises(RuntimeError, match=r"softmax_stats_update: zs must be Float, got Double"):
        call(zs.double(), state)
    with pytest.raises(RuntimeError, match=r"state must have shape \[5, 3\], got \[5, 4\]"):
        call(zs, torch.zeros(5, 4))
    with pytest.raises(RuntimeError, match=r"zs must be contiguous; pass zs.contiguous\(\)"):
        call(torch.zeros(4, 3).T, state)
    with pytest.raises(RuntimeError, match=r"zt is required in two-model modes"):
        call(zs, state, mode=0)
    with pytest.raises(RuntimeError, match=r"ids is required in token_logprob mode"):
        call(zs, state, mode=3)
    with pytest.raises(RuntimeError, match=r"mode must be 0 \(reverse_kl\)"):
        call(zs, state, mode=9)
    with pytest.raises(RuntimeError, match=r"head_s's post-scale \(1 / temperature\) must be finite and > 0"):
        call(zs, state, head_s=[1.0, 0.0, 0.0])
    with pytest.raises(RuntimeError, match=r"head_s's softcap must be finite and > 0, or 0 for none"):
        call(zs, state, head_s=[1.0, -2.0, 1.0])
    with pytest.raises(RuntimeError, match=r"head_s must be \[pre, softcap, post\]"):
        call(zs, state, head_s=[1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\], got \[5\]"):
        call(zs, state, bias_s=torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"k \(keys.shape\[1\]\) must be in \[1, 1024\]"):
        host_kernels.topk_update(zs, torch.zeros(3, 1025, dtype=torch.int64), torch.zeros(3, 3), 0, None, head, 0)
    with pytest.raises(RuntimeError, match=r"g must be float32, bfloat16 or float16"):
        ones, lse = torch.ones(3), torch.ones(2, 3)
        g = torch.zeros(3, 4, dtype=torch.int32)
        host_kernels.logit_grad(zs, None, None, lse, None, None, None, ones, g, 0, 0.0, 4, None, head, None, head, 0)


def _op_cases():
    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    state = torch.zeros(5, 5)
    state[0] = state[2] = -torch.inf
    ids, loss, weight = torch.randint(0, 7, (5,)), torch.randn(5), torch.rand(5)
    lse = torch.randn(2, 5)  # (lse, residual) per row
    keys, top_state = torch.zeros(5, 3, dtype=torch.int64), torch.zeros(3, 5)
    top_state[0] = -torch.inf
    g_bf16 = torch.empty(5, 7, dtype=torch.bfloat16)
    bias = torch.randn(7)
    plain, capped, tau = [1.0, 0.0, 1.0], [0.7, 3.0, 1.25], [1.0, 0.0, 2.0]
    return [
        (cuda_backend.softmax_stats_update, (zs, zt, None, state, 0, 0, bias, capped, None, plain)),
        (cuda_backend.softmax_stats_update, (zs, None, ids, state.clone(), 2, 3, None, tau, None, plain)),
        (cuda_backend.jsd_terms_update, (zs, zt, lse, lse, torch.zeros(3, 5), 0.3, None, plain, bias, capped)),
        (
            cuda_backend.logit_grad,
            (zs.clone(), zt, None, lse, lse, loss, None, weight, None, 0, 0.5, 0, bias, capped, None, plain),
        ),
        (
            cuda_backend.logit_grad,
            (zs.clone(), None, ids, lse, None, None, None, weight, g_bf16, 0, 0.0, 3, None, tau, None, plain),
        ),
        (cuda_backend.topk_update, (zs, keys, top_state, 0, bias, capped)),
    ]


def test_host_custom_ops_pass_opcheck(cuda_on_cpu):
    """Schemas, fake (meta) implementations, mutation annotations and AOT dispatch of every custom op."""
    for op, args in _op_cases():
        torch.library.opcheck(op, args)
    keys, state = torch.zeros(5, 3, dtype=torch.int64), torch.zeros(3, 5)
    state[0] = -torch.inf
    cuda_backend.topk_update(torch.randn(5, 7), keys, state, 0, None, cuda_backend.NO_HEAD)
    torch.library.opcheck(cuda_backend.topk_finalize, (keys, state))


def test_host_driver_traces_under_torch_compile(cuda_on_cpu):
    hs, ws, ht, wt = (t.detach() for t in _cpu_pair((6,), 8, 8, 50, torch.float32))
    spec = DivergenceSpec.make("jsd", 0.4, 1.2)
    weight = torch.full((6,), 1 / 6)

    def step(hs, ws, ht, wt):
        stats, (dh, dw, _) = CudaOps().divergence(Side(hs, ws), Side(ht, wt), spec, weight, Need(True, True))
        return stats.loss, dh, dw, CudaOps().topk(Side(hs, ws), 4, 1.0)[0]

    with chunk_budget(64):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(hs, ws, ht, wt)
        eager = step(hs, ws, ht, wt)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


# ---- 3. GPU tier: the real kernels ---------------------------------------------------------------------------

gpu = pytest.mark.skipif(not GPU_READY, reason="needs a CUDA GPU and the built extension opd_fast._C")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_gpu_matches_reference_fp32(divergence, beta, reduction):
    hs, ws, ht, wt = _pair((2, 19), 24, 40, 301, torch.float32, device="cuda")
    mask = (torch.rand(2, 19, generator=torch.Generator().manual_seed(3)) > 0.25).cuda()
    mask[1, :7] = False
    kw = dict(divergence=divergence, beta=beta, mask=mask, temperature=1.3, reduction=reduction)
    _check_divergence(hs, ws, ht, wt, 2e-5, **kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_gpu_many_chunks_and_odd_shapes(divergence, beta):
    hs, ws, ht, wt = _pair((37,), 20, 17, 97, torch.float32, device="cuda")
    with chunk_budget(2):
        _check_divergence(hs, ws, ht, wt, 2e-5, divergence=divergence, beta=beta, reduction="none")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(23,), (2, 3, 4)])
def test_gpu_token_logprobs(lead):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(*lead, 20, generator=g).cuda().requires_grad_()
    w = (torch.randn(133, 20, generator=g) * 0.7).cuda().requires_grad_()
    ids = torch.randint(0, 133, lead, generator=g).cuda()
    with chunk_budget(2):
        ours = linear_token_logprobs(h, w, ids, temperature=0.8, backend="cuda")
        grad_output = torch.randn_like(ours)
        ours_g = grads(ours, (h, w), grad_output)
    exact = _exact(h, w)
    ref = materialized_token_logprobs(*exact, ids, temperature=0.8)
    assert rel_err(ours, ref) < 2e-5
    for a, b in zip(ours_g, grads(ref, exact, grad_output.double())):
        assert rel_err(a, b) < 2e-5


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 16, 100])
@pytest.mark.parametrize("budget", [1 << 22, 300])
def test_gpu_topk_exact_ties_match_reference(dtype, k, budget):
    hs, ws, ht, wt = (t.to(device="cuda", dtype=dtype) for t in _integer_pair(70, 5003))
    with chunk_budget(budget):
        ours = linear_topk_overlap(hs, ws, ht, wt, k=k, temperature=0.7, backend="cuda")
    ref = materialized_topk_overlap(*(t.double() for t in (hs, ws, ht, wt)), k=k, temperature=0.7)
    _assert_topk_equal(ours, ref, tol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_gpu_agrees_with_triton_backend(divergence, beta):
    hs, ws, ht, wt = _pair((300,), 256, 384, 10007, torch.bfloat16, device="cuda")
    kw = dict(divergence=divergence, beta=beta, filter_eps=0.0)
    ours = linear_divergence(hs, ws, ht, wt, backend="cuda", **kw)
    ours_g = grads(ours, (hs, ws))
    theirs = linear_divergence(hs, ws, ht, wt, backend="triton", **kw)
    theirs_g = grads(theirs, (hs, ws))
    assert rel_err(ours, theirs) < 1e-4
    for a, b in zip(ours_g, theirs_g):
        assert rel_err(a, b) < 1e-2


N, HS, HT, V = 4096, 4096, 4096, 151936


def _realistic_pair(n=N, hs_dim=HS, ht_dim=HT, vocab=V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return (
        randn(n, hs_dim).requires_grad_(),
        randn(vocab, hs_dim, scale=4 / hs_dim**0.5).requires_grad_(),
        randn(n, ht_dim),
        randn(vocab, ht_dim, scale=4 / ht_dim**0.5),
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("divergence", "beta"), [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5)])
def test_gpu_realistic_bf16_within_twice_plain_pytorch(divergence, beta):
    inputs = _realistic_pair(n=1024)  # the float64 reference needs ~9 GB per [N, V] tensor at N = 1024
    kw = dict(divergence=divergence, beta=beta)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = materialized_divergence(*exact, **kw)
    ref_g = grads(ref, exact[:2])
    del exact
    ours = linear_divergence(*inputs, backend="cuda", **kw)
    ours_g = grads(ours, inputs[:2])
    plain = materialized_divergence(*inputs, **kw)
    plain_g = grads(plain, inputs[:2])
    errs = [(rel_err(ours, ref), rel_err(plain, ref))]
    errs += [(rel_err(a, r), rel_err(p, r)) for a, p, r in zip(ours_g, plain_g, ref_g)]
    for mine, theirs in errs:
        assert mine <= 2 * theirs + 1e-6, errs


@gpu
@pytest.mark.gpu
def test_gpu_realistic_token_logprobs_within_twice_plain_pytorch():
    hs, ws, _, _ = _realistic_pair(n=1024)
    ids = torch.randint(0, V, (1024,), device="cuda")
    exact = [t.detach().double().requires_grad_() for t in (hs, ws)]
    ref = materialized_token_logprobs(*exact, ids)
    ref_g = grads(ref, exact)
    ours = linear_token_logprobs(hs, ws, ids, backend="cuda")
    plain = materialized_token_logprobs(hs, ws, ids)
    errs = [(rel_err(ours, ref), rel_err(plain, ref))]
    errs += [(rel_err(a, r), rel_err(p, r)) for a, p, r in zip(grads(ours, (hs, ws)), grads(plain, (hs, ws)), ref_g)]
    for mine, theirs in errs:
        assert mine <= 2 * theirs + 1e-6, errs


@gpu
@pytest.mark.gpu
def test_gpu_realistic_shape_is_deterministic_bounded_and_matches_other_backends():
    hs, ws, ht, wt = _realistic_pair()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    first = grads(linear_divergence(hs, ws, ht, wt, backend="cuda"), (hs, ws))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    fp32_logits = N * V * 4  # one materialized fp32 logits tensor: 2.5 GB
    assert peak < fp32_logits, f"peak {peak / 2**20:.0f} MB beyond the inputs"
    second = grads(linear_divergence(hs, ws, ht, wt, backend="cuda"), (hs, ws))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for other in ["torch"] + (["triton"] if importlib.util.find_spec("triton") else []):
        for a, b in zip(first, grads(linear_divergence(hs, ws, ht, wt, backend=other), (hs, ws))):
            assert rel_err(a, b) < 2e-2, other


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 16, 64])
def test_gpu_realistic_topk_overlap_matches_torch_backend(k):
    hs, ws, ht, wt = _realistic_pair(n=2048, ht_dim=5120)
    with torch.no_grad():
        ours = linear_topk_overlap(hs, ws, ht, wt, k=k, backend="cuda")
        ref = linear_topk_overlap(hs, ws, ht, wt, k=k, backend="torch")
    # Both accumulate bf16 products in fp32, in different orders: near-tied logits may swap.
    assert (ours.student_topk_ids == ref.student_topk_ids).float().mean() > 0.99
    for name in ("overlap_ratio", "overlap_mass_student", "overlap_mass_teacher", "student_entropy", "teacher_entropy"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-3, atol=2e-3, msg=name)
