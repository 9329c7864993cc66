"""The peers, kernel by kernel, from what their code does (the versions the repository's extras pin).

* **naive** (:func:`opd_fast.reference.materialized_divergence`): each model's logits [N, V] in the input dtype,
  cast to fp32, scaled, divided by τ, log_softmax; the KL from exp, sub, mul, sum; autograd's backward walks the
  same ops back (listed below, as ``torch.utils._python_dispatch`` shows them) to G in the input dtype, then dH and
  dW GEMMs.
* **liger_chunked** (Liger-Kernel 0.8.5, ``LigerFusedLinearJSDLoss``, what ``opd-fast bench`` runs): ``torch.chunk``
  into max(1, N // 1024) chunks; per chunk a ``torch.compile``'d ``grad_and_value`` of logits (input dtype) →
  log_softmax → KL, and ``grad_weight.add_`` of the chunk's dW. Inductor's code for that function (torch 2.13,
  printed with ``torch._inductor.utils.run_and_get_code`` on the CPU) lowers it to: each model's lse in one pass
  (max and Σexp merged by Inductor's online softmax on CUDA), one fused pass reading both tiles and writing a
  partial G plus one fp32 [C, V] intermediate, one pass finishing G, the dW update as ``addmm`` (β = 1) into a new
  [V, Hs] buffer in the weight's dtype followed by a ``copy_`` back into ``grad_weight``.
* **compile** (:func:`opd_fast.bench.baselines.compiled_chunked_divergence`): the same idea on our side, chunks of
  ``COMPILE_CHUNK`` tokens; Inductor's code: each model's lse in one pass, one fused pass writing two fp32 [C, V]
  intermediates (p_s and log p_s − log p_t), the gradient pass reading them, the loss reduction reading them again;
  per chunk a fresh dW in the weight's dtype, then an eager ``dw += grad_w`` into an fp32 [V, Hs] accumulator.
* **trl_chunked** (TRL 1.16, ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``): [4096 × 32768] fp32
  tiles (``TOKEN_CHUNK_SIZE``, ``VOCAB_CHUNK_SIZE``); forward: logits GEMMs and a Triton statistics kernel per tile;
  backward: the logits recomputed, a Triton kernel writing G in place (fp32), a cast to the input dtype, ``addmm``
  β = 1 into fp32 dH and dW accumulators, final casts.

Forward KL is assumed to take the same passes as reverse KL in Liger's and the compiled graphs (same graph shape);
JSD is modeled for TRL only.
"""

from __future__ import annotations

from opd_fast.perf_model._core import ACC_BYTES, Ledger, Workload
from opd_fast.perf_model._ours import SOFTMAX_BACKWARD_READS, SOFTMAX_ROW_READS, UNALIGNED_EFFICIENCY

# Fraction of the copy bandwidth that Inductor's generated reduction kernels and TRL's Triton kernels reach.
# Assumed equal to our epilogues' (a streaming row pass with vector loads): no measurement tells them apart yet.
INDUCTOR_EFFICIENCY = 0.9
TRL_EFFICIENCY = 0.9
LIGER_CHUNK = 1024  # LigerFusedLinearJSDLoss(chunk_size=1024), the default the bench uses
COMPILE_CHUNK = 1024  # opd_fast.bench.baselines.CHUNK_TOKENS, mirrored (the model never imports the bench; tested)
# The fp32 [N, V] tensors the naive baseline holds at its peak (fwd+bwd; tested against the measured peak); the
# benchmark's memory estimate uses it too.
NAIVE_LOGITS_COPIES = 5
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl/kernels/chunked_divergence.py (TRL 1.16)


def _gemm(ledger: Ledger, name: str, m: int, n: int, k: int, e: int, out: float, eff: float, acc: float = 0.0, **kw):
    """An [m, k]·[k, n] GEMM with inputs of ``e`` bytes, ``out`` bytes written and ``acc`` bytes of accumulator read."""
    ledger.add(
        name,
        "gemm",
        flops=2.0 * m * n * k,
        read=(m * k + k * n) * e + acc,
        written=out,
        epilogue=out + acc,
        efficiency=eff,
        **kw,
    )


def _not_modeled(method: str, w: Workload) -> None:
    if w.divergence not in ("reverse_kl", "forward_kl"):
        raise ValueError(f"{method} is modeled for reverse and forward KL, not {w.divergence}")


def naive_kernels(w: Workload):
    """Materialized logits and autograd: the aten ops of ``materialized_divergence`` forward and backward."""
    _not_modeled("naive", w)
    n, v, hs, ht, e = w.tokens, w.vocab, w.hidden, w.teacher_hidden, w.elem
    nv, f = n * v, ACC_BYTES
    eff = 1.0 if (v * e) % 16 == 0 else UNALIGNED_EFFICIENCY
    ledger = Ledger()
    for model, h in (("student", hs), ("teacher", ht)):
        _gemm(ledger, f"logits GEMM ({model})", n, v, h, e, nv * e, eff, precision=w.dtype)
        if e != f:
            ledger.add(f"to fp32 ({model})", "elementwise", read=nv * e, written=nv * f)
        ledger.add(f"× scale, ÷ τ ({model})", "elementwise", read=2 * nv * f, written=2 * nv * f)
        ledger.add(f"log_softmax ({model})", "elementwise", read=SOFTMAX_ROW_READS * nv * f, written=nv * f)
    ledger.add("KL: exp, sub, mul, sum", "elementwise", read=(1 + 2 + 2 + 1) * nv * f, written=3 * nv * f)
    bwd = dict(phase="bwd")
    if w.divergence == "reverse_kl":  # mul's two grads, exp's grad, their sum into log p_s
        ledger.add(
            "KL backward: 2 mul, mul, add", "elementwise", read=(1 + 1 + 2 + 2) * nv * f, written=4 * nv * f, **bwd
        )
    else:  # mul's grad of (log p_t − log p_s), sub's neg
        ledger.add("KL backward: mul, neg", "elementwise", read=2 * nv * f, written=2 * nv * f, **bwd)
    ledger.add("log_softmax backward", "elementwise", read=SOFTMAX_BACKWARD_READS * nv * f, written=nv * f, **bwd)
    ledger.add("÷ τ, × scale backward", "elementwise", read=2 * nv * f, written=2 * nv * f, **bwd)
    if e != f:
        ledger.add("to input dtype (G)", "elementwise", read=nv * f, written=nv * e, **bwd)
    _gemm(ledger, "dH GEMM", n, hs, v, e, n * hs * e, eff, precision=w.dtype, **bwd)
    _gemm(ledger, "dW GEMM", v, hs, n, e, v * hs * e, eff, precision=w.dtype, **bwd)
    return ledger.kernels(), NAIVE_LOGITS_COPIES * nv * f + (n + v) * hs * e


def _token_chunks(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - start) for start in range(0, n, chunk)]


def liger_kernels(w: Workload):
    """Liger-Kernel's chunked JSD loss (β = 1 reverse KL, β = 0 forward KL) as Inductor compiles each chunk."""
    _not_modeled("liger_chunked", w)
    n, v, hs, ht, e = w.tokens, w.vocab, w.hidden, w.teacher_hidden, w.elem
    pieces = max(1, n // LIGER_CHUNK)  # torch.chunk(x, pieces): pieces of ceil(n / pieces) rows
    rows = _token_chunks(n, -(-n // pieces))
    eff = 1.0 if (v * e) % 16 == 0 else UNALIGNED_EFFICIENCY
    ind = dict(efficiency=INDUCTOR_EFFICIENCY)
    ledger = Ledger()
    ledger.add("grad_weight zero-fill", "memset", written=v * hs * e)
    for r in rows:
        rv = r * v
        for model, h in (("student", hs), ("teacher", ht)):
            _gemm(ledger, f"logits GEMM ({model})", r, v, h, e, rv * e, eff, precision=w.dtype)
            ledger.add(f"lse ({model}, online softmax)", "epilogue", read=rv * e, **ind)
        ledger.add("loss and partial G (fused)", "epilogue", read=2 * rv * e, written=rv * e + rv * ACC_BYTES, **ind)
        ledger.add("G (fused)", "epilogue", read=rv * ACC_BYTES + rv * e, written=rv * e, **ind)
        _gemm(ledger, "dH GEMM", r, hs, v, e, r * hs * e, eff, precision=w.dtype)
        _gemm(ledger, "dW addmm (β=1, weight dtype)", v, hs, r, e, v * hs * e, eff, acc=v * hs * e, precision=w.dtype)
        ledger.add("copy_ into grad_weight", "elementwise", read=v * hs * e, written=v * hs * e)
    ledger.add("torch.cat of dH chunks", "elementwise", read=n * hs * e, written=n * hs * e)
    peak = max(rows) * v * (2 * e + ACC_BYTES) + 2 * v * hs * e + 2 * n * hs * e
    return ledger.kernels(), peak


def compile_kernels(w: Workload):
    """The bench's ``compile`` baseline: a torch.compile'd grad_and_value per chunk, dW summed eagerly in fp32."""
    _not_modeled("compile", w)
    n, v, hs, ht, e = w.tokens, w.vocab, w.hidden, w.teacher_hidden, w.elem
    rows = _token_chunks(n, COMPILE_CHUNK)
    eff = 1.0 if (v * e) % 16 == 0 else UNALIGNED_EFFICIENCY
    ind = dict(efficiency=INDUCTOR_EFFICIENCY)
    f = ACC_BYTES
    ledger = Ledger()
    ledger.add("dw zero-fill (fp32)", "memset", written=v * hs * f)
    for r in rows:
        rv = r * v
        for model, h in (("student", hs), ("teacher", ht)):
            _gemm(ledger, f"logits GEMM ({model})", r, v, h, e, rv * e, eff, precision=w.dtype)
            ledger.add(f"lse ({model}, online softmax)", "epilogue", read=rv * e, **ind)
        ledger.add("p_s and log p_s − log p_t (fused)", "epilogue", read=2 * rv * e, written=2 * rv * f, **ind)
        ledger.add("G (fused)", "epilogue", read=2 * rv * f + rv * e, written=rv * e, **ind)
        ledger.add("loss (row dot)", "epilogue", read=2 * rv * f, **ind)
        _gemm(ledger, "dH GEMM", r, hs, v, e, r * hs * e, eff, precision=w.dtype)
        _gemm(ledger, "dW GEMM (fresh, weight dtype)", v, hs, r, e, v * hs * e, eff, precision=w.dtype)
        ledger.add("dh[rows] = grad_h", "elementwise", read=r * hs * e, written=r * hs * e)
        ledger.add("dw += grad_w (fp32)", "elementwise", read=v * hs * (f + e), written=v * hs * f)
    bwd = dict(phase="bwd")
    ledger.add("dh × scale (backward)", "elementwise", read=n * hs * e, written=n * hs * e, **bwd)
    ledger.add("dw × scale, then cast (backward)", "elementwise", read=2 * v * hs * f, written=v * hs * (f + e), **bwd)
    peak = max(rows) * v * (2 * e + 2 * f) + v * hs * (2 * f + e) + n * hs * e
    return ledger.kernels(), peak


def trl_kernels(w: Workload):
    """TRL's chunked divergence: statistics in the forward, the logits recomputed for the gradients in the backward."""
    n, v, hs, ht, e = w.tokens, w.vocab, w.hidden, w.teacher_hidden, w.elem
    f = ACC_BYTES
    tri = dict(efficiency=TRL_EFFICIENCY)
    bwd = dict(phase="bwd")
    tri_bwd = {**tri, **bwd}
    ledger = Ledger()

    def logits(r: int, c: int, label: str, **kw) -> None:
        for model, h in (("student", hs), ("teacher", ht)):
            _gemm(ledger, f"logits GEMM ({model}{label})", r, c, h, e, r * c * f, 1.0, precision=w.dtype, **kw)

    if w.divergence not in ("reverse_kl", "forward_kl", "jsd"):
        raise ValueError(f"TRL's chunked divergence computes the KLs and JSD, not {w.divergence}")
    tiles = [(r, c) for r in _token_chunks(n, TRL_TOKEN_CHUNK) for c in _token_chunks(v, TRL_VOCAB_CHUNK)]
    for r, c in tiles:
        logits(r, c, "")
        ledger.add("_stats_kernel", "epilogue", read=2 * r * c * f, **tri)
    if w.divergence == "jsd":
        for r, c in tiles:
            logits(r, c, ", recomputed for JSD")
            ledger.add("_jsd_kernel", "epilogue", read=2 * r * c * f, **tri)
    ledger.add("grad_hidden, grad_weight zero-fill (fp32)", "memset", written=(n + v) * hs * f, **bwd)
    for r, c in tiles:
        logits(r, c, ", recomputed", **bwd)
        ledger.add("_backward_kernel (G in place, fp32)", "epilogue", read=2 * r * c * f, written=r * c * f, **tri_bwd)
        if e != f:
            ledger.add("G to input dtype", "elementwise", read=r * c * f, written=r * c * e, **bwd)
        _gemm(ledger, "dH addmm (β=1, fp32)", r, hs, c, e, r * hs * f, 1.0, acc=r * hs * f, precision=w.dtype, **bwd)
        _gemm(ledger, "dW addmm (β=1, fp32)", c, hs, r, e, c * hs * f, 1.0, acc=c * hs * f, precision=w.dtype, **bwd)
    if e != f:
        ledger.add("dH, dW to input dtype", "elementwise", read=(n + v) * hs * f, written=(n + v) * hs * e, **bwd)
    workspace = 2 * min(n, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * f
    peak = workspace + min(n, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * e + (n + v) * hs * (f + e)
    return ledger.kernels(), peak
