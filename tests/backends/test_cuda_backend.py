"""What is specific to the CUDA C++ backend (backend="cuda", opd_fast._C), in three tiers. The contract every
backend meets (values and gradients against the float64 reference, plans, dtypes, shapes, top-k) is
tests/backends/test_backend_contract.py, which runs backend="cuda" on the GPU or through the host build.

1. Everywhere: without the extension (or without a GPU) backend="cuda" is refused with the reason, and
   importing opd_fast never needs the extension. With nvcc present, csrc/compile_check.sh compiles every
   .cu file for sm_80 and sm_90a.
2. Everywhere with a C++ compiler: the *host build* (conftest's ``host_kernels``, ``cuda_on_cpu``) —
   csrc/bindings.cpp and csrc/host/launchers_host.cpp compiled for CPU tensors with the same
   csrc/epilogue.h — stands in for opd_fast._C: the public API → autograd → cuda_backend's chunked GEMMs →
   the raw kernels → bindings (argument checks) → the epilogue math, each row run by 2 threads that
   synchronize like a thread block. Here: the terms pass and the gradient of jsd, the skew KLs and TVD against
   float64 sums of their definitions and autograd, the ops the public API does not reach alone (a shard's
   divergence terms), the top-k kernel's candidate buffer and tie keys and the bindings' argument errors (the
   public API under torch.compile: tests/api/test_compile.py). Only the CUDA primitives (BlockGroup in
   csrc/block.cuh), the launches and cuBLAS are left to the GPU tier.
3. GPU with the extension built: agreement with the Triton backend, and realistic shapes (N=4096, H=4096,
   V=151936, bf16, within 2× the error of plain PyTorch).
"""

from __future__ import annotations

import importlib.util
import itertools
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
from opd_fast.backends.epilogue import MODES, TileHead
from opd_fast.backends.online_softmax import finalize_entropy, new_entropy_state
from opd_fast.backends.torch_backend import TorchOps
from opd_fast.reference import materialized_divergence, materialized_token_logprobs
from opd_fast.types import DivergenceStats, Need, Side

HAS_EXTENSION = cuda_backend.extension_error() is None
GPU_READY = torch.cuda.is_available() and HAS_EXTENSION
DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]
TERMS_CODES = {kind: MODES[kind] for kind in ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")}  # a terms pass
STATS_CODES = {kind: code for kind, code in MODES.items() if kind != "entropy"}  # a statistics pass


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


@pytest.mark.parametrize(
    ("kind", "beta"), [("jsd", 0.3), ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.9), ("tvd", 0.5)]
)
def test_host_divergence_terms_on_a_shard_with_global_lse(cuda_on_cpu, kind, beta):
    """The op vocabulary parallelism uses: a shard's terms given the full vocabulary's log-sum-exps."""
    hs, ws, ht, wt = (t.detach() for t in _pair((9,), 12, 20, 90, torch.float32))
    spec = DivergenceSpec.make(kind, beta, 1.2)
    full = TorchOps().divergence(Side(hs, ws), Side(ht, wt), spec, None, Need())[0]
    shard = (Side(hs, ws[40:]), Side(ht, wt[40:]), spec, full.student_lse, full.teacher_lse)
    ours = CudaOps().divergence_terms(*shard)
    ref = TorchOps().divergence_terms(*shard)
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


NAN_DIVERGENCES = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    *(("jsd", {"beta": beta}) for beta in (0.1, 0.5, 0.9)),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.7}),  # β = 0.3: q from p_t · p_s / m
    ("tvd", {}),
]


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize(("divergence", "kw"), NAN_DIVERGENCES)
def test_host_nan_teacher_row_makes_its_loss_and_both_gradients_nan(cuda_on_cpu, divergence, kw, plan):
    """A NaN teacher hidden state makes that row's teacher logits NaN: its loss, its dH row and (through the row's
    G) every dW entry must be NaN, the other rows untouched. The JSD gradient clipped d = lp_t − lp_s with fminf,
    which returns 30 for a NaN d, and came back finite."""
    hs, ws, ht, wt = _pair((5,), 8, 12, 37, torch.float32)
    ht = ht.clone()
    ht[2, 3] = float("nan")
    with chunk_budget(40):  # several chunks, and vocabulary tiles in the chunked plan
        loss = linear_divergence(
            hs, ws, ht, wt, divergence=divergence, reduction="none", backend="cuda", plan=plan, **kw
        )
    d_hidden, d_weight = torch.autograd.grad(loss, (hs, ws), torch.ones_like(loss))
    clean = torch.arange(5) != 2
    assert torch.isnan(loss[2]) and torch.isfinite(loss[clean]).all(), loss
    assert torch.isnan(d_hidden[2]).all() and torch.isfinite(d_hidden[clean]).all(), d_hidden
    assert torch.isnan(d_weight).all(), d_weight


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("mode", TERMS_CODES.values())
def test_host_terms_gradient_of_a_nan_teacher_logit_is_nan(host_kernels, mode, beta):
    """One NaN teacher logit under finite statistics: its column's gradient is NaN, the others stay finite (TVD: its
    sign(p_s − p_t) keeps the NaN)."""
    zs, zt = torch.randn(3, 9), torch.randn(3, 9)
    zt[1, 4] = float("nan")
    lse_s, lse_t = (torch.stack([torch.logsumexp(z.nan_to_num(), dim=1), torch.zeros(3)]) for z in (zs, zt))
    center, weight, g = torch.zeros(3), torch.ones(3), torch.empty(3, 9)
    head = cuda_backend.NO_HEAD
    host_kernels.logit_grad(
        zs, zt, None, lse_s, lse_t, None, center, weight, g, 0, beta, mode, None, head, None, head, 0
    )
    poisoned = torch.zeros(3, 9, dtype=torch.bool)
    poisoned[1, 4] = True
    assert torch.isnan(g[poisoned]).all() and torch.isfinite(g[~poisoned]).all(), g


def test_bindings_name_the_bad_argument(host_kernels):
    zs, state = torch.zeros(3, 4), torch.zeros(5, 3)
    head = [1.0, 0.0, 1.0]

    def call(zs, state, mode=7, head_s=head, bias_s=None, entropy=None):
        host_kernels.softmax_stats_update(zs, None, None, state, 0, mode, bias_s, head_s, None, head, entropy, 0)

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
    with pytest.raises(RuntimeError, match=r"zt is required in two-model modes \(reverse_kl, .*, tvd\)"):
        call(zs, state, mode=5)
    with pytest.raises(RuntimeError, match=r"ids is required in token_logprob mode"):
        call(zs, state, mode=6)
    with pytest.raises(RuntimeError, match=r"mode must be 0 \(reverse_kl\), .* 5 \(tvd\), .* or 8 \(entropy\)"):
        call(zs, state, mode=9)
    with pytest.raises(RuntimeError, match=r"mode 8 \(entropy\) has only a gradient pass"):
        call(zs, state, mode=8)
    with pytest.raises(RuntimeError, match=r"head_s's post-scale \(1 / temperature\) must be finite and > 0"):
        call(zs, state, head_s=[1.0, 0.0, 0.0])
    with pytest.raises(RuntimeError, match=r"head_s's softcap must be finite and > 0, or 0 for none"):
        call(zs, state, head_s=[1.0, -2.0, 1.0])
    with pytest.raises(RuntimeError, match=r"head_s must be \[pre, softcap, post\]"):
        call(zs, state, head_s=[1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\], got \[5\]"):
        call(zs, state, bias_s=torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"softmax_stats_update: entropy must have shape \[3, 3\], got \[5, 3\]"):
        call(zs, state, entropy=torch.zeros(5, 3))
    with pytest.raises(RuntimeError, match=r"softmax_stats_update: entropy must be Float, got Double; cast it"):
        call(zs, state, entropy=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"entropy must be contiguous; pass entropy.contiguous\(\)"):
        call(zs, state, entropy=torch.zeros(3, 3).T)
    with pytest.raises(RuntimeError, match=r"entropy must be a cpu tensor, got one on meta; move it with .to\(cpu\)"):
        call(zs, state, entropy=torch.zeros(3, 3, device="meta"))
    with pytest.raises(RuntimeError, match=r"mode 8 \(entropy\) has only a gradient pass; the student's entropy"):
        call(zs, state, mode=8, entropy=torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match=r"k \(keys.shape\[1\]\) must be in \[1, 1024\]"):
        host_kernels.topk_update(zs, torch.zeros(3, 1025, dtype=torch.int64), torch.zeros(3, 3), 0, None, head, 0)
    with pytest.raises(RuntimeError, match=r"g must be float32, bfloat16 or float16"):
        ones, lse = torch.ones(3), torch.ones(2, 3)
        g = torch.zeros(3, 4, dtype=torch.int32)
        host_kernels.logit_grad(zs, None, None, lse, None, None, None, ones, g, 0, 0.0, 7, None, head, None, head, 0)
    lse, terms, ones = torch.zeros(2, 3), torch.zeros(3, 3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"terms_update: mode must be 2 \(jsd\), 3 \(skew_forward_kl\), 4 "):
        host_kernels.terms_update(zs, zs, lse, lse, terms, 1, 0.5, None, head, None, head, 0)
    with pytest.raises(RuntimeError, match=r"terms_update: beta must be in \(0, 1\) in skew_reverse_kl mode"):
        host_kernels.terms_update(zs, zs, lse, lse, terms, 4, 1.0, None, head, None, head, 0)
    host_kernels.terms_update(zs, zs, lse, lse, terms, 5, 0.0, None, head, None, head, 0)  # TVD ignores β
    with pytest.raises(RuntimeError, match=r"logit_grad: beta must be in \(0, 1\) in skew_forward_kl mode"):
        host_kernels.logit_grad(zs, zs, None, lse, lse, None, ones, ones, None, 0, 0.0, 3, None, head, None, head, 0)
    with pytest.raises(RuntimeError, match=r"logit_grad: center is required in tvd mode, got None"):
        host_kernels.logit_grad(zs, zs, None, lse, lse, None, None, ones, None, 0, 0.5, 5, None, head, None, head, 0)


def _padded(z: torch.Tensor, stride: int, offset: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``z`` copied into the first columns of rows ``stride`` elements apart, from element ``offset`` of a buffer
    whose every other element is NaN: a kernel that reads past a row's width, or assumes the stride is the width,
    returns NaN or garbage."""
    buf = torch.full((z.shape[0] * stride + offset,), float("nan"), dtype=dtype, device=z.device)
    view = buf[offset:].view(z.shape[0], stride)[:, : z.shape[1]]
    view.copy_(z)
    return view


def _run_epilogues(zs, zt, g=None):
    """Every kernel on one pair of [N, V] tiles (any row strides): stats of each mode, the terms of each mode that
    has them, the gradient of each mode (into ``g`` or in place over a copy of zs), top-k. Returns everything as one
    flat list."""
    n, vocab = zs.shape
    ids = torch.tensor([3, vocab - 1, 40000])[:n]
    lse = (
        torch.stack([torch.logsumexp(zs, dim=1), torch.zeros(n)]),
        torch.stack([torch.logsumexp(zt, dim=1), torch.zeros(n)]),
    )
    loss, center, weight = torch.full((n,), 0.1), torch.full((n,), -0.2), torch.full((n,), 0.5)
    plain = cuda_backend.NO_HEAD
    out = []
    for mode in MODES.values():
        if mode != MODES["entropy"]:  # a gradient only
            state = torch.zeros(5, n)
            state[0] = state[2] = -torch.inf
            fused, entropy = state.clone(), new_entropy_state(n, zs.device, torch.float32)
            cuda_backend.softmax_stats_update(zs, zt, ids, state, 0, mode, None, plain, None, plain)
            cuda_backend.softmax_stats_update(zs, zt, ids, fused, 0, mode, None, plain, None, plain, entropy)
            assert torch.equal(fused, state), mode  # the fused entropy changes nothing else
            out += [state, entropy]
        if g is None:
            in_place = torch.empty_strided(zs.shape, zs.stride()).copy_(zs)  # zs's layout
            cuda_backend.logit_grad(
                in_place, zt, ids, *lse, loss, center, weight, None, 0, 0.3, mode, None, plain, None, plain
            )
            out.append(in_place.clone())
        else:
            cuda_backend.logit_grad(zs, zt, ids, *lse, loss, center, weight, g, 0, 0.3, mode, None, plain, None, plain)
            out.append(g.clone())
    for mode in TERMS_CODES.values():
        terms = torch.zeros(3, n)
        cuda_backend.terms_update(zs, zt, *lse, terms, mode, 0.3, None, plain, None, plain)
        out.append(terms)
    keys, top_state = torch.zeros(n, 5, dtype=torch.int64), torch.zeros(3, n)
    top_state[0] = -torch.inf
    cuda_backend.topk_update(zs, keys, top_state, 0, None, plain)
    return [*out, keys, top_state]


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


# ---- the terms pass and the gradients of the divergences that have one, against float64 ------------------------

# β near both ends (the mixture weight of jsd and the skew KLs), and TVD, which ignores it.
TERMS_CASES = [(mode, beta) for mode in list(TERMS_CODES)[:3] for beta in (1e-3, 0.3, 0.5, 0.97, 0.999)]
TERMS_CASES.append(("tvd", 0.5))


def _head_f64(x: torch.Tensor, bias: torch.Tensor | None, head: list[float]) -> torch.Tensor:
    """csrc/epilogue.h's Head::apply in float64: post · c·tanh(pre · (x + b) / c), no tanh when c = 0."""
    pre, softcap, post = head
    u = (x if bias is None else x + bias.double()) * pre
    if softcap:
        u = softcap * torch.tanh(u / softcap)
    return u * post


def _terms_tiles():
    """(name, zs, zt, bias_s, head_s, bias_t, head_t): raw fp32 logit tiles at awkward widths and layouts, peaked
    rows, equal and nearly equal rows, logits near 1e4, bias/softcap/temperature heads."""
    g = torch.Generator().manual_seed(33)

    def randn(*shape, scale=3.0):
        return torch.randn(*shape, generator=g) * scale

    plain, capped, tau = [1.0, 0.0, 1.0], [0.7, 3.0, 1.25], [1.0, 0.0, 0.8]
    zs, zt = randn(6, 37), randn(6, 37)
    zt[1] = zs[1]  # equal rows: every term and the gradient vanish (TVD's sign(0) = 0)
    zt[2] = zs[2] + randn(37, scale=0.1)  # close rows: the series branch of jsd_parts
    zs[3], zt[3] = zs[3] * 12, zt[3] * 12  # peaked: most columns far below the max
    zs[4], zt[4] = zs[4] + 1e4, zt[4] - 1e4  # lse ≈ ±1e4: the residuals carry the log-probs
    zt[5] = zs[5] * 0.5 + randn(37, scale=0.5)
    yield "plain, width 37", zs, zt, None, plain, None, plain
    yield "width 1", randn(3, 1), randn(3, 1), None, plain, None, plain
    wide_s, wide_t = randn(4, 203), randn(4, 203)
    # Rows 211 floats apart, the teacher's one float off the student's alignment: the column-by-column walk.
    yield (
        "width 203, padded and misaligned",
        _padded(wide_s, 211),
        _padded(wide_t, 211, offset=1),
        None,
        plain,
        None,
        tau,
    )
    bias_s, bias_t = randn(130, scale=1.0), randn(130, scale=1.0)
    yield "bias, softcap, temperature", randn(5, 130), randn(5, 130), bias_s, capped, bias_t, tau
    yield "peaked under a softcap", randn(3, 64, scale=30.0), randn(3, 64, scale=30.0), None, capped, bias_t[:64], plain


def _terms_reference(zs, zt, bias_s, head_s, bias_t, head_t, mode, beta):
    """float64 from the definitions: the rows' (lse, residual) pairs as the kernels take them, the three sums of
    csrc/epilogue.h's table (terms_parts) with the size of each (|Σ a|, |Σ b|, Σ |pg|), ∂D/∂x_s by autograd (D as
    online_softmax.terms_loss makes it, x_s the raw student logits) and the size of G's two parts |pg| + p_s |center|
    through the head, the scale of fp32's rounding of G."""
    xs = zs.double().requires_grad_()
    z_s, z_t = _head_f64(xs, bias_s, head_s), _head_f64(zt.double(), bias_t, head_t)
    lp_s, lp_t = z_s.log_softmax(dim=-1), z_t.log_softmax(dim=-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    if mode == "tvd":
        a, b = 0.5 * (p_s - p_t).abs(), torch.zeros_like(p_s)
        pg, loss = 0.5 * p_s * torch.sign(p_s - p_t), a.sum(-1)
    else:
        m = beta * p_t + (1 - beta) * p_s
        a, b, r = p_s * (lp_s - m.log()), p_t * (lp_t - m.log()), p_t / m - 1  # r: p_t / m less its constant
        pg = {"jsd": (1 - beta) * a, "skew_forward_kl": -(1 - beta) * p_s * r, "skew_reverse_kl": a + beta * p_s * r}
        pg = pg[mode]
        loss = {"jsd": beta * b.sum(-1) + (1 - beta) * a.sum(-1), "skew_forward_kl": b.sum(-1)}.get(mode, a.sum(-1))
    (grad,) = torch.autograd.grad(loss.sum(), xs, retain_graph=True)
    terms = torch.stack([a.sum(-1), b.sum(-1), pg.sum(-1)]).detach()
    sizes = torch.stack([terms[0].abs(), terms[1].abs(), pg.abs().sum(-1).detach()])
    (grad_size,) = torch.autograd.grad(z_s, xs, (pg.abs() + p_s * terms[2].abs()[:, None]).detach())

    def lse_pair(z):
        lse = torch.logsumexp(z.detach(), dim=-1)
        return torch.stack([lse.float(), (lse - lse.float().double()).float()])

    return lse_pair(z_s), lse_pair(z_t), terms, sizes, grad, grad_size.abs()


@pytest.mark.parametrize(("mode", "beta"), TERMS_CASES)
def test_host_terms_and_gradient_match_float64_definitions(host_kernels, mode, beta):
    """The terms pass (terms_update) and the gradient (logit_grad, given the center the terms pass summed, as the
    sweep passes it) of jsd, the skew KLs and TVD on raw fp32 tiles, against the float64 sums of their definitions
    and autograd's gradient of D through the head, times the row weight. β is taken at its fp32 value on both sides
    (the kernels' β; near 1 its rounding alone moves 1 − β by up to 1.3e-5 relative)."""
    code, beta = TERMS_CODES[mode], float(torch.tensor(beta, dtype=torch.float32))
    for name, zs, zt, bias_s, head_s, bias_t, head_t in _terms_tiles():
        n, width = zs.shape
        lse_s, lse_t, ref, sizes, ref_grad, grad_size = _terms_reference(
            zs, zt, bias_s, head_s, bias_t, head_t, mode, beta
        )
        terms = torch.zeros(3, n)
        host_kernels.terms_update(zs, zt, lse_s, lse_t, terms, code, beta, bias_s, head_s, bias_t, head_t, 0)
        # Measured: ≤ 8.3e-6 of each sum's size (the KLs and TVD sum terms ≥ 0; Σ pg's have both signs).
        assert ((terms.double() - ref).abs() <= 2e-5 * sizes + 1e-12).all(), (name, terms, ref)

        weight = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
        g = torch.full((n, width), float("nan"))
        host_kernels.logit_grad(
            zs, zt, None, lse_s, lse_t, None, terms[2].clone(), weight.float(), g, 0, beta, code,
            bias_s, head_s, bias_t, head_t, 0,
        )  # fmt: skip
        # Per row, against the largest |pg| + p_s |center| through the head. Measured ≤ 3.3e-5 on the rows a softcap
        # saturates (Head::chain takes 1 − tanh² from the rounded z), ≤ 8.4e-6 elsewhere.
        scale = (grad_size * weight[:, None]).amax(dim=1, keepdim=True) + 1e-12
        err = (g.double() - ref_grad * weight[:, None]).abs()
        assert (err <= 1e-4 * scale).all(), (name, (err / scale).amax(dim=1))


def test_host_forward_kl_gradient_reads_the_center(host_kernels):
    """Forward KL's G = p_s − p_t − p_s · center: 0 from the statistics, shifted by the sweep for a hard-label
    cross-entropy. With any center the kernel gives the float64 formula (through a softcapped head)."""
    g0 = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 29, generator=g0) * 3, torch.randn(4, 29, generator=g0) * 3
    head_s, head_t = [0.7, 3.0, 1.25], [1.0, 0.0, 1.0]
    xs = zs.double().requires_grad_()
    z_s = _head_f64(xs, None, head_s)
    p_s, p_t = z_s.softmax(-1), zt.double().softmax(-1)
    center = torch.tensor([0.0, -0.25, 1.5, -3.0])
    per_element = (p_s - p_t - p_s * center.double()[:, None]).detach()
    (expected,) = torch.autograd.grad(z_s, xs, per_element)  # the head's chain rule
    lse_s, lse_t = (
        torch.stack([torch.logsumexp(z, dim=-1).float(), torch.zeros(4)]) for z in (z_s.detach(), zt.double())
    )
    g = torch.empty(4, 29)
    head = (None, head_s, None, head_t)
    host_kernels.logit_grad(zs, zt, None, lse_s, lse_t, None, center, torch.ones(4), g, 0, 0.0, 1, *head, 0)
    torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"logit_grad: center is required in forward_kl mode, got None"):
        host_kernels.logit_grad(zs, zt, None, lse_s, lse_t, None, None, torch.ones(4), g, 0, 0.0, 1, *head, 0)


def test_host_entropy_gradient_matches_float64(host_kernels):
    """Mode entropy, G = p_s (lp_s − center) with center −H and row weight −w (Sweep.entropy_backward): w ∂H/∂x
    through a softcapped, biased head, against autograd in float64."""
    g0 = torch.Generator().manual_seed(2)
    zs, bias = torch.randn(5, 41, generator=g0) * 4, torch.randn(41, generator=g0)
    head = [0.7, 3.0, 1.25]
    xs = zs.double().requires_grad_()
    z = _head_f64(xs, bias, head)
    log_p = z.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    weight = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)
    (expected,) = torch.autograd.grad((weight * entropy).sum(), xs)
    lse = torch.logsumexp(z.detach(), dim=-1)
    lse_pair = torch.stack([lse.float(), (lse - lse.float().double()).float()])
    center, g = -entropy.detach().float(), torch.empty(5, 41)
    host_kernels.logit_grad(
        zs, None, None, lse_pair, None, None, center, -weight.float(), g, 0, 0.0, MODES["entropy"],
        bias, head, None, cuda_backend.NO_HEAD, 0,
    )  # fmt: skip
    torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-6)


# ---- the student's entropy, fused into the statistics pass ------------------------------------------------------


def _head_f32(x: torch.Tensor, bias: torch.Tensor | None, head: list[float]) -> torch.Tensor:
    """csrc/epilogue.h's Head::apply in fp32 and its order of operations: the final logits the kernels see."""
    pre, softcap, post = head
    u = (x if bias is None else x + bias) * pre
    if softcap:
        u = softcap * torch.tanh(u / softcap)
    return u * post


def _column_splits(width: int) -> list[list[tuple[int, int]]]:
    """The whole tile, and uneven tiles merged in sequence: a one-column tile, starts off every 16-byte boundary."""
    cuts = sorted({0, width, *(c for c in (1, 6, 19, 20, 87, 20001) if c < width)})
    return [[(0, width)], list(itertools.pairwise(cuts))]


def _stats_sequence(code, zs, zt, bias_s, head_s, bias_t, head_t, tiles, entropy=None):
    """The statistics state [5, N] after the column ranges ``tiles`` of a row block, merged in order as the sweep
    merges them (``softmax_stats_update``, the raw kernel), with ``entropy`` (updated in place) or without."""
    n, width = zs.shape
    ids = torch.arange(n, device=zs.device) * 7 % width if code == MODES["token_logprob"] else None
    two = code < MODES["token_logprob"]
    state = torch.zeros(5, n, device=zs.device)
    state[0] = state[2] = -torch.inf
    for lo, hi in tiles:
        cuda_backend.softmax_stats_update(
            zs[:, lo:hi], zt[:, lo:hi] if two else None, ids, state, lo, code,
            None if bias_s is None else bias_s[lo:hi], head_s, None if bias_t is None else bias_t[lo:hi], head_t,
            entropy,
        )  # fmt: skip
    return state


def _entropy_f64(z: torch.Tensor) -> torch.Tensor:
    log_p = z.double().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@pytest.mark.parametrize("kind", STATS_CODES)
def test_host_stats_fused_entropy_matches_float64(cuda_on_cpu, kind):
    """softmax_stats_update with an entropy state (m, s, a): merged over uneven tiles in sequence, H = log s − a / s
    (online_softmax.finalize_entropy) is the float64 entropy of the same final logits within fp32 rounding, in every
    mode that has statistics, on odd widths, padded and misaligned rows, peaked rows, logits near ±1e4 and
    bias/softcap/temperature heads. Its (m, s) are the statistics state's student (m, s), bit for bit."""
    code = STATS_CODES[kind]
    for name, zs, zt, bias_s, head_s, bias_t, head_t in _terms_tiles():
        z = _head_f32(zs, bias_s, head_s).double()
        ref, ref_lse = _entropy_f64(z), torch.logsumexp(z, dim=-1)
        for tiles in _column_splits(zs.shape[1]):
            entropy = new_entropy_state(zs.shape[0], zs.device, torch.float32)
            state = _stats_sequence(code, zs, zt, bias_s, head_s, bias_t, head_t, tiles, entropy)
            assert torch.equal(entropy[:2], state[:2]), (name, tiles)
            m, s, _ = entropy.double()
            # Measured ≤ 1.1e-7 · (1 + H) (H = log s + E_p[m − z], both parts ≥ 0), the lse ≤ 4.3e-8 · (1 + |lse|).
            err = (finalize_entropy(entropy).double() - ref).abs()
            assert (err <= 2e-6 * (1 + ref)).all(), (name, tiles, err / (1 + ref))
            assert ((m + s.log() - ref_lse).abs() <= 1e-6 * (1 + ref_lse.abs())).all(), (name, tiles)


@pytest.mark.parametrize("kind", STATS_CODES)
def test_host_stats_state_is_bitwise_the_same_with_and_without_entropy(cuda_on_cpu, kind):
    """The entropy rides along: the statistics state (both models' (m, s) and the accumulator) has the same bits
    whether or not the entropy state is given, over the same awkward tiles in sequence."""
    code = STATS_CODES[kind]
    for name, zs, zt, bias_s, head_s, bias_t, head_t in _terms_tiles():
        for tiles in _column_splits(zs.shape[1]):
            plain = _stats_sequence(code, zs, zt, bias_s, head_s, bias_t, head_t, tiles)
            entropy = new_entropy_state(zs.shape[0], zs.device, torch.float32)
            fused = _stats_sequence(code, zs, zt, bias_s, head_s, bias_t, head_t, tiles, entropy)
            assert torch.equal(plain.view(torch.int32), fused.view(torch.int32)), (name, tiles)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "logsumexp"])
def test_host_stats_fused_entropy_of_a_nan_row_is_nan(cuda_on_cpu, kind):
    """A NaN student logit makes that row's entropy NaN (as its statistics); the other rows keep theirs."""
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(3, 45, generator=g) * 3, torch.randn(3, 45, generator=g) * 3
    zs[1, 17] = float("nan")
    plain = cuda_backend.NO_HEAD
    entropy = new_entropy_state(3, zs.device, torch.float32)
    _stats_sequence(STATS_CODES[kind], zs, zt, None, plain, None, plain, [(0, 10), (10, 45)], entropy)
    h = finalize_entropy(entropy)
    assert torch.isnan(h[1]), h
    torch.testing.assert_close(h[[0, 2]].double(), _entropy_f64(zs[[0, 2]]), rtol=1e-6, atol=1e-6)


def test_host_epilogue_fuses_the_entropy_into_stats_update(cuda_on_cpu):
    """CudaEpilogue.stats_update(..., entropy): the protocol's entropy argument reaches the statistics kernel, which
    reads each tile once for both (entropy_update, a second read by the top-k kernel, is gone)."""
    epilogue = cuda_backend.CudaEpilogue()
    assert not hasattr(epilogue, "entropy_update")
    g = torch.Generator().manual_seed(6)
    zs, zt, bias = (torch.randn(*shape, generator=g) * 3 for shape in ((4, 37), (4, 37), (37,)))
    head_s = [0.7, 3.0, 1.25]
    entropy = new_entropy_state(4, zs.device, torch.float32)
    state, plain = (torch.zeros(5, 4) for _ in range(2))
    state[0] = state[2] = plain[0] = plain[2] = -torch.inf
    for lo, hi in [(0, 13), (13, 37)]:
        hs, ht = TileHead(bias[lo:hi], *head_s), TileHead(None, 1.0, None, 0.8)
        epilogue.stats_update(state, zs[:, lo:hi], zt[:, lo:hi], None, hs, ht, lo, "jsd", entropy)
        epilogue.stats_update(plain, zs[:, lo:hi], zt[:, lo:hi], None, hs, ht, lo, "jsd")
    assert torch.equal(state, plain)
    ref = _entropy_f64(_head_f32(zs, bias, head_s))
    torch.testing.assert_close(finalize_entropy(entropy).double(), ref, rtol=2e-6, atol=2e-6)


def test_host_extension_mode_codes_are_the_sweeps(host_kernels):
    """csrc/epilogue.h's Mode (exported as _C.MODES) and opd_fast.backends.epilogue.MODES are one table."""
    assert host_kernels.MODES == MODES


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


@gpu
@pytest.mark.gpu
def test_gpu_stats_fused_entropy_keeps_the_stats_bitwise_and_matches_float64():
    """The real statistics kernels (256-thread blocks, the GPU's FMA contraction): with the entropy state the
    statistics have the bits they have without it, and the entropy is float64's, on padded rows of an odd vocabulary
    (V = 50257 in rows 50304 apart) with a peaked row and a row near 1e4, whole and in two tiles (the second
    starting off a 16-byte boundary), in every mode."""
    g = torch.Generator(device="cuda").manual_seed(3)
    n, vocab = 64, 50257
    zs, zt = (_padded(torch.randn(n, vocab, generator=g, device="cuda") * 4, 50304) for _ in range(2))
    zs[0] *= 10
    zs[1] += 1e4
    ref, heads = _entropy_f64(zs), (None, cuda_backend.NO_HEAD, None, cuda_backend.NO_HEAD)
    for kind, code in STATS_CODES.items():
        for tiles in ([(0, vocab)], [(0, 20001), (20001, vocab)]):
            plain = _stats_sequence(code, zs, zt, *heads, tiles)
            entropy = new_entropy_state(n, zs.device, torch.float32)
            fused = _stats_sequence(code, zs, zt, *heads, tiles, entropy)
            assert torch.equal(plain.view(torch.int32), fused.view(torch.int32)), (kind, tiles)
            err = (finalize_entropy(entropy).double() - ref).abs()
            assert (err <= 1e-5 * (1 + ref)).all(), (kind, tiles, (err / (1 + ref)).max())


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
