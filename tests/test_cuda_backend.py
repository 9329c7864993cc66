"""What is specific to the CUDA C++ backend (backend="cuda", opd_fast._C), in three tiers. The contract every
backend meets (values and gradients against the float64 reference, plans, dtypes, shapes, top-k) is
tests/test_backend_contract.py, which runs backend="cuda" on the GPU or through the host build.

1. Everywhere: without the extension (or without a GPU) backend="cuda" is refused with the reason, and
   importing opd_fast never needs the extension. With nvcc present, csrc/compile_check.sh compiles every
   .cu file for sm_80 and sm_90a.
2. Everywhere with a C++ compiler: the *host build* (conftest's ``host_kernels``, ``cuda_on_cpu``) —
   csrc/bindings.cpp and csrc/host/launchers_host.cpp compiled for CPU tensors with the same
   csrc/epilogue.h — stands in for opd_fast._C: the public API → autograd → cuda_backend's chunked GEMMs →
   torch.library custom ops → bindings (argument checks) → the epilogue math, each row run by 2 threads that
   synchronize like a thread block. Here: the ops the public API does not reach alone (a shard's JSD terms),
   the top-k kernel's candidate buffer and tie keys, the bindings' argument errors, the custom ops'
   registration (opcheck) and the driver under torch.compile. Only the CUDA primitives (BlockGroup in
   csrc/block.cuh), the launches and cuBLAS are left to the GPU tier.
3. GPU with the extension built: agreement with the Triton backend, and realistic shapes (N=4096, H=4096,
   V=151936, bf16, within 2× the error of plain PyTorch).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CSRC, grads, rel_err

from opd_fast import (
    BackendUnavailableError,
    chunk_budget,
    linear_divergence,
    linear_reverse_kl,
    linear_token_logprobs,
    linear_topk_overlap,
)
from opd_fast._validation import DivergenceSpec
from opd_fast.backends import cuda_backend, unavailable_reason
from opd_fast.backends.cuda_backend import CudaOps
from opd_fast.backends.torch_backend import TorchOps
from opd_fast.reference import materialized_divergence, materialized_token_logprobs
from opd_fast.types import DivergenceStats, Need, Side

HAS_EXTENSION = cuda_backend.extension_error() is None
GPU_READY = torch.cuda.is_available() and HAS_EXTENSION
DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]


def _pair(lead, hs_dim, ht_dim, vocab, dtype, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(hash((lead, hs_dim, ht_dim, vocab)) % 2**31)
    hs = torch.randn(*lead, hs_dim, generator=g)
    ws = torch.randn(vocab, hs_dim, generator=g) * scale / hs_dim**0.5
    ht = torch.randn(*lead, ht_dim, generator=g)
    wt = torch.randn(vocab, ht_dim, generator=g) * scale / ht_dim**0.5
    hs, ws, ht, wt = (t.to(device=device, dtype=dtype) for t in (hs, ws, ht, wt))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


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


@pytest.mark.slow  # 60-150 s; .ci/run runs csrc/compile_check.sh as its own step
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_compile_check_builds_every_kernel_for_sm80_and_sm90a():
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


def test_host_jsd_terms_on_a_shard_with_global_lse(cuda_on_cpu):
    """The op vocabulary parallelism uses: a shard's JSD terms given the full vocabulary's log-sum-exps."""
    hs, ws, ht, wt = (t.detach() for t in _pair((9,), 12, 20, 90, torch.float32))
    spec = DivergenceSpec.make("jsd", 0.3, 1.2)
    full = TorchOps().divergence(Side(hs, ws), Side(ht, wt), spec, None, Need())[0]
    shard = (Side(hs, ws[40:]), Side(ht, wt[40:]), spec, full.student_lse, full.teacher_lse)
    ours = CudaOps().jsd_terms(*shard)
    ref = TorchOps().jsd_terms(*shard)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
    h, w, _, _ = _pair((4,), 8, 8, 1500, torch.float32)
    h, w = h.detach(), w.detach()
    ours = CudaOps().topk(Side(h, w), cuda_backend.MAX_K + 1, 1.0)
    ref = TorchOps().topk(Side(h, w), cuda_backend.MAX_K + 1, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


NAN_DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize(("divergence", "beta"), NAN_DIVERGENCES)
def test_host_nan_teacher_row_makes_its_loss_and_both_gradients_nan(cuda_on_cpu, divergence, beta, plan):
    """A NaN teacher hidden state makes that row's teacher logits NaN: its loss, its dH row and (through the row's
    G) every dW entry must be NaN, the other rows untouched. The JSD gradient clipped d = lp_t − lp_s with fminf,
    which returns 30 for a NaN d, and came back finite."""
    hs, ws, ht, wt = _pair((5,), 8, 12, 37, torch.float32)
    ht = ht.clone()
    ht[2, 3] = float("nan")
    with chunk_budget(40):  # several chunks, and vocabulary tiles in the chunked plan
        loss = linear_divergence(
            hs, ws, ht, wt, divergence=divergence, beta=beta, reduction="none", backend="cuda", plan=plan
        )
    d_hidden, d_weight = torch.autograd.grad(loss, (hs, ws), torch.ones_like(loss))
    clean = torch.arange(5) != 2
    assert torch.isnan(loss[2]) and torch.isfinite(loss[clean]).all(), loss
    assert torch.isnan(d_hidden[2]).all() and torch.isfinite(d_hidden[clean]).all(), d_hidden
    assert torch.isnan(d_weight).all(), d_weight


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_host_jsd_gradient_of_a_nan_teacher_logit_is_nan(host_kernels, beta):
    """One NaN teacher logit under finite statistics: its column's gradient is NaN, the others stay finite."""
    zs, zt = torch.randn(3, 9), torch.randn(3, 9)
    zt[1, 4] = float("nan")
    lse_s, lse_t = (torch.stack([torch.logsumexp(z.nan_to_num(), dim=1), torch.zeros(3)]) for z in (zs, zt))
    center, weight, g = torch.zeros(3), torch.ones(3), torch.empty(3, 9)
    head = cuda_backend.NO_HEAD
    host_kernels.logit_grad(zs, zt, None, lse_s, lse_t, None, center, weight, g, 0, beta, 2, None, head, None, head, 0)
    poisoned = torch.zeros(3, 9, dtype=torch.bool)
    poisoned[1, 4] = True
    assert torch.isnan(g[poisoned]).all() and torch.isfinite(g[~poisoned]).all(), g


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
    with pytest.raises(RuntimeError, match=r"zs must be row-major with unit column stride and a row stride >= its"):
        call(torch.zeros(4, 3).T, state)
    with pytest.raises(RuntimeError, match=r"got strides \[2, 1\]; pass zs.contiguous\(\)"):
        call(torch.zeros(3, 8)[:, ::2].contiguous()[:, :4].as_strided((3, 4), (2, 1)), state)
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


def _padded(z: torch.Tensor, stride: int, offset: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``z`` copied into the first columns of rows ``stride`` elements apart, from element ``offset`` of a buffer
    whose every other element is NaN: a kernel that reads past a row's width, or assumes the stride is the width,
    returns NaN or garbage."""
    buf = torch.full((z.shape[0] * stride + offset,), float("nan"), dtype=dtype)
    view = buf[offset:].view(z.shape[0], stride)[:, : z.shape[1]]
    view.copy_(z)
    return view


def _run_epilogues(zs, zt, g=None):
    """Every kernel on one pair of [N, V] tiles (any row strides): stats of each mode, JSD terms, the gradient of
    each mode (into ``g`` or in place over a copy of zs), top-k. Returns everything as one flat list."""
    n, vocab = zs.shape
    ids = torch.tensor([3, vocab - 1, 40000])[:n]
    lse = (
        torch.stack([torch.logsumexp(zs, dim=1), torch.zeros(n)]),
        torch.stack([torch.logsumexp(zt, dim=1), torch.zeros(n)]),
    )
    loss, center, weight = torch.full((n,), 0.1), torch.full((n,), -0.2), torch.full((n,), 0.5)
    plain = cuda_backend.NO_HEAD
    out = []
    for mode in range(5):
        state = torch.zeros(5, n)
        state[0] = state[2] = -torch.inf
        cuda_backend.softmax_stats_update(zs, zt, ids, state, 0, mode, None, plain, None, plain)
        out.append(state)
        if g is None:
            in_place = torch.empty_strided(zs.shape, zs.stride()).copy_(zs)  # zs's layout
            cuda_backend.logit_grad(
                in_place, zt, ids, *lse, loss, center, weight, None, 0, 0.3, mode, None, plain, None, plain
            )
            out.append(in_place.clone())
        else:
            cuda_backend.logit_grad(zs, zt, ids, *lse, loss, center, weight, g, 0, 0.3, mode, None, plain, None, plain)
            out.append(g.clone())
    terms = torch.zeros(3, n)
    cuda_backend.jsd_terms_update(zs, zt, *lse, terms, 0.3, None, plain, None, plain)
    keys, top_state = torch.zeros(n, 5, dtype=torch.int64), torch.zeros(3, n)
    top_state[0] = -torch.inf
    cuda_backend.topk_update(zs, keys, top_state, 0, None, plain)
    return [*out, terms, keys, top_state]


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_host_kernels_take_padded_row_strides(cuda_on_cpu, grad_dtype):
    """V = 50257 (GPT-2) in rows 50304 apart (a multiple of 64, as the sweep's padded workspaces): every kernel
    gives the contiguous tiles' results, without reading the NaN padding. Also rows at different offsets from a
    16-byte boundary (the column-by-column fallback) and a G whose rows are not aligned like the logits' (scalar
    stores). Contiguous rows of 50257 floats start at every offset from a 16-byte boundary in turn, so the
    reference itself runs the vector loads after unaligned heads."""
    g = torch.Generator().manual_seed(5)
    hs, ws = torch.randn(3, 8, generator=g), torch.randn(50257, 8, generator=g)
    ht, wt = torch.randn(3, 8, generator=g), torch.randn(50257, 8, generator=g)
    zs, zt = hs @ ws.T * 2, ht @ wt.T * 2
    plain_g = None if grad_dtype == torch.float32 else torch.empty(zs.shape, dtype=grad_dtype)
    reference = _run_epilogues(zs, zt, plain_g)
    padded_g = None if plain_g is None else _padded(plain_g, 50304, dtype=grad_dtype)
    layouts = {
        "padded": (_padded(zs, 50304), _padded(zt, 50304), padded_g),
        "misaligned pair": (_padded(zs, 50304), _padded(zt, 50304, offset=1), padded_g),
        "misaligned G": (
            _padded(zs, 50304),
            _padded(zt, 50304),
            None if plain_g is None else _padded(plain_g, 50304, 1, grad_dtype),
        ),
    }
    for name, (a, b, out) in layouts.items():
        assert a.stride(0) == 50304 and a.storage_offset() == 0
        for i, (ours, ref) in enumerate(zip(_run_epilogues(a, b, out), reference)):
            if ours.dtype == torch.int64:
                assert torch.equal(ours, ref), (name, i)
            else:
                torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=f"{name}: output {i}")
        if out is not None:
            assert torch.isnan(out.as_strided((3, 50304 - 50257), (50304, 1), out.storage_offset() + 50257)).all()


def test_host_epilogue_takes_strided_views_and_copies_other_layouts(cuda_on_cpu):
    """The epilogue passes row-strided views through unchanged (G lands in place in the padded buffer) and copies
    column-strided tiles to unit stride; the bindings refuse a column-strided G."""
    zs, zt = torch.randn(4, 37), torch.randn(4, 37)
    stats = DivergenceStats(*(torch.randn(4) for _ in range(len(DivergenceStats._fields))))
    weight = torch.ones(4)
    epilogue = cuda_backend.CudaEpilogue()
    assert epilogue.takes_row_stride
    expected = epilogue.grad(zs.clone(), zt, None, stats, weight, None, None, 0, "reverse_kl", 0.5, None)
    padded = _padded(zs, 64)
    assert epilogue.grad(padded, zt, None, stats, weight, None, None, 0, "reverse_kl", 0.5, None) is padded
    torch.testing.assert_close(padded, expected, rtol=0, atol=0)
    transposed = zs.T.contiguous().T  # column stride 4
    copied = epilogue.grad(transposed, zt.T.contiguous().T, None, stats, weight, None, None, 0, "reverse_kl", 0.5, None)
    assert copied.stride() == (37, 1) and torch.equal(transposed, zs)
    torch.testing.assert_close(copied, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"logit_grad: g must be row-major with unit column stride"):
        epilogue.grad(zs, zt, None, stats, weight, None, None, 0, "reverse_kl", 0.5, torch.empty(37, 4).T)


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
    zs_rows, zt_rows, g_rows = _padded(zs, 8), _padded(zt, 12), _padded(g_bf16, 16, dtype=torch.bfloat16)
    heads = (None, plain, None, plain)
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
        # Row-strided views of padded buffers, G among them (written in place into its buffer).
        (cuda_backend.softmax_stats_update, (zs_rows, zt_rows, None, state.clone(), 0, 1, None, plain, None, plain)),
        (cuda_backend.logit_grad, (zs_rows, zt_rows, None, lse, lse, None, loss, weight, g_rows, 0, 0.4, 2, *heads)),
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
    hs, ws, ht, wt = (t.detach() for t in _pair((6,), 8, 8, 50, torch.float32))
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
