"""opd_fast's own plans, kernel by kernel, as :mod:`opd_fast.backends.sweep` runs them (docs/design.md §5).

The chunk rows come from :func:`opd_fast.chunking.plan_tiles` for a CUDA device, so the model follows the plan the
library would run. Per token chunk of r rows (whole vocabulary rows, the chunked plan): two logits GEMMs into fp32
workspaces of row stride ld (``chunking.padded_stride(V)``), the statistics pass and (JSD) the mixture pass reading
both tiles, the gradient pass reading both and writing G in the weight's dtype, then dH = G·Ws and dW += Gᵀ·H (the
first chunk β = 0 into an uninitialized fp32 accumulator, later chunks β = 1), and in the backward one pass that
scales dW by grad_output and casts it to the weight's dtype. ``dw_gemm="single"`` keeps G for all N rows and makes
dW with one GEMM at the end, written in the weight's dtype. Vocabulary-tiled plans (streaming, or budgets below 16
whole rows) recompute both models' tiles in the gradient sweep. The side-stream overlap is predicted as serial.
"""

from __future__ import annotations

from opd_fast import chunking
from opd_fast.perf_model._core import ACC_BYTES, TERMS_DIVERGENCES, Ledger, Workload

# Fraction of the copy bandwidth our fused epilogue passes reach, per backend. Assumed, not measured: a one-read
# streaming pass with 16-byte loads runs close to a copy; the 10% left covers the row reductions' tails (one block
# per row) and the exponentials. The GPU window's per-kernel profile replaces these numbers. Equal values make
# the model unable to rank cuda against triton: preferred_gpu_backend then keeps the documented order (cuda).
EPILOGUE_EFFICIENCY = {"cuda": 0.9, "triton": 0.9}
# The Triton streaming kernels' tl.dot GEMMs (with the softmax or gradient fused in) as a fraction of cuBLAS's rate:
# assumed; Triton's own Hopper matmuls trail cuBLAS and these carry an epilogue in registers.
TRITON_DOT_EFFICIENCY = 0.7
# Rows whose stride is not a multiple of 16 bytes (ld · 4 and ld · 2 for the fp32 workspace and the bf16 G): cuBLAS
# leaves its TMA kernels and the epilogues lose vector loads. Assumed penalty for both, to be measured by the
# window's V = 151665 row with padding off.
UNALIGNED_EFFICIENCY = 0.7
# torch's CUDA (log_)softmax reads a row three times when it does not fit in shared memory (max, Σexp, output:
# cunn_SoftMaxForward in aten/src/ATen/native/cuda/SoftMax.cu); its backward reads the gradient twice and the output
# once. Shared with the naive baseline.
SOFTMAX_ROW_READS = 3
SOFTMAX_BACKWARD_READS = 3
# The torch backend's TorchEpilogue.full_rows (reverse KL) on fp32 tiles, per (row, column): (reads, writes) in bytes
# of each torch kernel it launches, counted from the code: 64 read and 32 written per logit pair.
TORCH_FULL_ROWS = (
    ("max, z − m in place, e^{z − m}, Σ e; both models", 2 * (4 + 8 + 4 + 4), 2 * (4 + 4)),
    ("e_s · (z_s − z_t), in place", 8 + 8, 4 + 4),
    ("Σ e_s · d", 4, 0),
    ("G = e_s · d − (Σ p_s d) e_s", 8, 4),
    ("G · row weight / s_s", 4, 4),
)
# The Triton streaming backward's gradient workspace, in chunk budgets: opd_fast.backends.triton_backend's
# WORKSPACE_FACTOR (that module needs Triton, the model does not; a test keeps the two equal).
TRITON_WORKSPACE_FACTOR = 8
DW_GEMM_MODES = ("per_chunk", "single", "auto")


def padded_stride(vocab: int) -> int:
    """The workspace and G row stride on CUDA (``chunking.padded_stride``)."""
    return chunking.padded_stride(vocab)


def resolve_dw_gemm(mode: str, workload: Workload, ld: int, itemsize: int) -> str:
    """The dW mode that runs, "per_chunk" or "single": "auto" is single when G of all N rows (``itemsize`` bytes a
    logit, rows ``ld`` apart) is no larger than the fp32 accumulator it replaces or ``chunking.SINGLE_DW_GEMM_BYTES``,
    as ``chunking.single_dw_gemm`` decides on CUDA."""
    if mode not in DW_GEMM_MODES:
        raise ValueError(f"dw_gemm must be one of {', '.join(DW_GEMM_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    limit = max(chunking.SINGLE_DW_GEMM_BYTES, workload.vocab * workload.hidden * 4)  # or the accumulator it replaces
    return "single" if workload.tokens * ld * itemsize <= limit else "per_chunk"


def sweep_kernels(w: Workload, backend: str, plan_name: str, budget, dw_gemm: str, overlap: bool, padded: bool):
    """(kernels, peak extra bytes) of the shared sweep on ``backend`` ("cuda", "triton" or "torch")."""
    plan = chunking.plan_tiles(w.tokens, w.vocab, budget, plan=plan_name, device="cuda")
    rows = [s.stop - s.start for s in plan.row_chunks(w.tokens)]
    torch_epilogue = backend == "torch"
    # The torch backend upcasts both models' operands to fp32 (fp32 GEMMs, fp32 G in place of the student's tile).
    e = ACC_BYTES if torch_epilogue else w.elem
    g = ACC_BYTES if torch_epilogue else w.elem
    precision = "fp32" if torch_epilogue else w.dtype
    v, hs, ht, n = w.vocab, w.hidden, w.teacher_hidden, w.tokens
    whole_rows = plan.vocab_tiles == 1
    ld = padded_stride(v) if whole_rows and padded else v
    aligned = ld % 8 == 0 or not whole_rows
    gemm_eff = 1.0 if aligned else UNALIGNED_EFFICIENCY
    epi_eff = (1.0 if torch_epilogue else EPILOGUE_EFFICIENCY[backend]) * (1.0 if aligned else UNALIGNED_EFFICIENCY)
    several = len(rows) > 1
    single = whole_rows and several and resolve_dw_gemm(dw_gemm, w, padded_stride(v), g) == "single"
    dw_acc = ACC_BYTES if several and not single else e  # the dW GEMMs' output element
    ledger = Ledger()
    gemm = dict(precision=precision, efficiency=gemm_eff)

    if torch_epilogue and (not whole_rows or w.divergence in TERMS_DIVERGENCES):
        raise ValueError("the torch backend is modeled for whole-row chunks of reverse or forward KL only")
    if torch_epilogue and w.dtype != "fp32":
        operands = (n + v) * (hs + ht)
        ledger.add("upcast operands to fp32", "elementwise", read=operands * w.elem, written=operands * ACC_BYTES)

    def logits(r: int, c: int, label: str = "") -> None:
        for model, h in (("student", hs), ("teacher", ht)):
            out = r * c * ACC_BYTES
            name = f"logits GEMM ({model}{label})"
            ledger.add(name, "gemm", flops=2.0 * r * c * h, read=(r + c) * h * e, written=out, epilogue=out, **gemm)

    def epilogue(name: str, r: int, c: int, written: float = 0.0) -> None:
        ledger.add(name, "epilogue", read=2 * r * c * ACC_BYTES, written=written, efficiency=epi_eff)

    for i, r in enumerate(rows):
        for j, c in enumerate([s.stop - s.start for s in plan.col_tiles()]):
            logits(r, c)
            if torch_epilogue:
                for name, read, written in TORCH_FULL_ROWS:
                    ledger.add(f"torch epilogue: {name}", "elementwise", read=r * c * read, written=r * c * written)
            else:
                epilogue("stats epilogue", r, c)
            if w.divergence in TERMS_DIVERGENCES:
                if not whole_rows:
                    logits(r, c, ", recomputed for the terms")
                epilogue("terms epilogue", r, c)
            if not whole_rows:
                logits(r, c, ", recomputed")
            if not torch_epilogue:
                epilogue("gradient epilogue", r, c, written=r * c * g)
            dh_acc = r * hs * ACC_BYTES if j > 0 else 0  # a chunk's first tile writes its dH rows, the others add
            dh_out = r * hs * ACC_BYTES
            ledger.add(
                "dH GEMM (β=1)" if j > 0 else "dH GEMM",
                "gemm",
                flops=2.0 * r * c * hs,
                read=r * c * g + c * hs * e + dh_acc,
                written=dh_out,
                epilogue=dh_acc + dh_out,
                **gemm,
            )
            if single:
                continue
            beta = several and i > 0
            dw_in, dw_out = (c * hs * dw_acc if beta else 0), c * hs * dw_acc
            ledger.add(
                "dW GEMM (β=1)" if beta else ("dW GEMM (β=0, first chunk)" if several else "dW GEMM"),
                "gemm",
                flops=2.0 * r * c * hs,
                read=r * c * g + r * hs * e + dw_in,
                written=dw_out,
                epilogue=dw_in + dw_out,
                **gemm,
            )
    if single:
        out = v * hs * w.elem
        ledger.add(
            "dW GEMM (all N, one)",
            "gemm",
            flops=2.0 * n * v * hs,
            read=n * v * g + n * hs * e,
            written=out,
            epilogue=out,
            **gemm,
        )
    bwd = dict(phase="bwd")
    ledger.add("dW scale+cast (backward)", "elementwise", read=v * hs * dw_acc, written=v * hs * w.elem, **bwd)
    ledger.add("dH scale+cast (backward)", "elementwise", read=n * hs * ACC_BYTES, written=n * hs * w.elem, **bwd)

    r_max, c_max = max(rows), ld if whole_rows else plan.cols
    workspace = 2 * r_max * c_max * ACC_BYTES
    if torch_epilogue:
        workspace += 3 * r_max * c_max * ACC_BYTES + (n + v) * (hs + ht) * ACC_BYTES  # temporaries, upcasts
        g_buffers = 0
    elif single:
        g_buffers = n * ld * g
    else:
        g_buffers = r_max * c_max * g * (2 if overlap and whole_rows and g != ACC_BYTES else 1)
    accumulator = v * hs * dw_acc
    outputs = (n + v) * hs * w.elem
    forward = workspace + g_buffers + accumulator + n * hs * ACC_BYTES
    backward = accumulator + n * hs * ACC_BYTES + outputs
    return ledger.kernels(), max(forward, backward)


def triton_streaming_kernels(w: Workload, budget):
    """(kernels, peak extra bytes) of the Triton streaming plan (kernels/linear_softmax.py, linear_grad.py): fused
    tl.dot kernels, no logits workspace; the gradient pass recomputes both models' logits and stores G by vocabulary
    chunks of the ``WORKSPACE_FACTOR`` × budget workspace, then dH += G·W and dW = Gᵀ·H read it."""
    n, v, hs, ht, e = w.tokens, w.vocab, w.hidden, w.teacher_hidden, w.elem
    budget = chunking.get_chunk_budget("cuda") if budget is None else budget
    chunk = min(v, max(1, TRITON_WORKSPACE_FACTOR * budget // n))
    chunks = -(-v // chunk)
    ledger = Ledger()
    fused = dict(precision=w.dtype, efficiency=TRITON_DOT_EFFICIENCY)
    weights = v * (hs + ht) * e
    ledger.add("softmax_stats (fused logits)", "gemm", flops=2.0 * n * v * (hs + ht), read=weights, **fused)
    if w.divergence in TERMS_DIVERGENCES:
        ledger.add("divergence_terms (fused logits)", "gemm", flops=2.0 * n * v * (hs + ht), read=weights, **fused)
    ledger.add("dH zero-fill", "memset", written=n * hs * ACC_BYTES)
    for i in range(chunks):
        c = min(chunk, v - i * chunk)
        g_out = n * c * e
        flops = 2.0 * n * c * (hs + ht)
        ledger.add("logit_grad (fused logits, recomputed)", "gemm", flops=flops, written=g_out, epilogue=g_out, **fused)
        dh = 2 * n * hs * ACC_BYTES
        ledger.add(
            "grad_hidden",
            "gemm",
            flops=2.0 * n * c * hs,
            read=g_out + n * hs * ACC_BYTES,
            written=dh / 2,
            epilogue=dh,
            **fused,
        )
        ledger.add(
            "grad_weight", "gemm", flops=2.0 * n * c * hs, read=g_out, written=c * hs * e, epilogue=c * hs * e, **fused
        )
    bwd = dict(phase="bwd")
    ledger.add("dW scale (backward)", "elementwise", read=v * hs * e, written=v * hs * e, **bwd)
    ledger.add("dH scale+cast (backward)", "elementwise", read=n * hs * ACC_BYTES, written=n * hs * e, **bwd)
    peak = n * chunk * e + n * hs * ACC_BYTES + (n + v) * hs * e
    return ledger.kernels(), peak
