"""Measurements beside the benchmark rows: the device's ceilings, the addmm β=0 / β=1 micro-benchmark at the dW chunk
shape, and a torch.profiler per-kernel breakdown of one forward+backward, set against the model's kernels."""

from __future__ import annotations

import re
import statistics

# A kernel's kind from its name, as the performance model counts kinds: cuBLAS/CUTLASS GEMMs, fills, torch's own
# elementwise kernels and copies; anything else on a GPU is one of ours (the Triton and CUDA epilogues). On the CPU
# the profiler sees ATen ops instead of kernels: only those count, the autograd wrappers around them do not.
KINDS = ("gemm", "epilogue", "elementwise", "memset")
GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|^aten::(mm|addmm|bmm|baddbmm)$", re.IGNORECASE)
MEMSET = re.compile(r"fill|memset|zero", re.IGNORECASE)
ELEMENTWISE = re.compile(r"at::native|memcpy|elementwise|^aten::", re.IGNORECASE)
# ATen ops that launch nothing on a GPU: allocations and views (CPU profiles only).
NO_KERNEL = re.compile(
    r"^aten::((new_)?empty\w*|set_|slice|select|view\w*|as_strided|alias|t|transpose|permute|expand\w*|unsqueeze|squeeze"
    r"|reshape|_reshape_alias|narrow|detach|resolve_\w+|lift_fresh|_unsafe_view|split\w*|unbind|chunk)$"
)
TOP_KERNELS = 12


def kernel_kind(name: str) -> str:
    if GEMM.search(name):
        return "gemm"
    if MEMSET.search(name):
        return "memset"
    if ELEMENTWISE.search(name):
        return "elementwise"
    return "epilogue"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn, device, warmup: int = 3, repeats: int = 10) -> float:
    """Median ms of one call of ``fn``: CUDA events on a GPU, the wall clock elsewhere, after ``warmup`` calls."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            synchronize(device)
            times.append(begin.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure_ceilings(device, sizes) -> dict:
    """The rates the model predicts with: bf16 and fp32 (TF32 off, torch's default) [n]³ products on random data,
    and a device copy counted as bytes read plus bytes written."""
    import torch

    from opd_fast import perf_model

    n = sizes.gemm_size
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    fp32_ms = call_ms(lambda: a @ b, device, warmup=2, repeats=5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "matmul_tflops_bf16": perf_model.measure_matmul_tflops(device, n),
        "matmul_tflops_fp32": 2.0 * n**3 / (fp32_ms * 1e-3) / 1e12,
        "gemm_size": n,
        "copy_gbps": perf_model.measure_copy_gbps(device, sizes.copy_mib),
        "copy_mib": sizes.copy_mib,
    }


def addmm_microbenchmark(device, shape: dict) -> dict:
    """dW's GEMM at the headline's chunk shape: the fp32 accumulator [V, H] and one chunk's bf16 Gᵀ [V, C]·H [C, H],
    written with β = 0 (``mm`` out=, the first chunk) against added with β = 1 (``addmm``, with and without
    ``out_dtype``; or a product then ``add_``, the fallback of torches whose addmm takes no wider accumulator), the
    same in a bf16 accumulator, and the one dW GEMM over all N rows. Each: median ms, TFLOP/s, or the error."""
    from opd_fast import chunking

    tokens, vocab, hidden = shape["tokens"], shape["vocab"], shape["hidden"]
    rows = chunking.plan_tiles(tokens, vocab, device=device).rows
    times = _chunk_gemms(device, rows, vocab, hidden)
    times[f"one dW GEMM over N={tokens} rows, bf16 out"] = _single_gemm(device, tokens, vocab, hidden)
    return {"vocab": vocab, "hidden": hidden, "chunk_rows": rows, "tokens": tokens, "times": times}


def _chunk_gemms(device, rows: int, vocab: int, hidden: int) -> dict:
    import torch

    bf16, fp32 = torch.bfloat16, torch.float32
    g = torch.randn(rows, vocab, device=device, dtype=bf16)  # random data: zeros run faster than real data
    h = torch.randn(rows, hidden, device=device, dtype=bf16)
    acc, acc16 = torch.randn(vocab, hidden, device=device), torch.randn(vocab, hidden, device=device, dtype=bf16)
    variants = {
        "mm out= (β=0), fp32 out": lambda: torch.mm(g.T, h, out_dtype=fp32, out=acc),
        "addmm (β=1), fp32 acc": lambda: torch.addmm(acc, g.T, h, out=acc),
        "addmm (β=1), out_dtype=fp32": lambda: torch.addmm(acc, g.T, h, out_dtype=fp32, out=acc),
        "mm, then acc.add_ (β=1 fallback)": lambda: acc.add_(torch.mm(g.T, h, out_dtype=fp32)),
        "mm out= (β=0), bf16 out": lambda: torch.mm(g.T, h, out=acc16),
        "addmm (β=1), bf16 acc": lambda: torch.addmm(acc16, g.T, h, out=acc16),
    }
    return {name: _timed(fn, device, 2.0 * rows * vocab * hidden) for name, fn in variants.items()}


def _single_gemm(device, tokens: int, vocab: int, hidden: int) -> dict:
    import torch

    g = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16)
    h = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    dw = torch.empty(vocab, hidden, device=device, dtype=torch.bfloat16)
    return _timed(lambda: torch.mm(g.T, h, out=dw), device, 2.0 * tokens * vocab * hidden)


def _timed(fn, device, flops: float) -> dict:
    try:
        ms = call_ms(fn, device)
    except Exception as exc:  # an overload this torch lacks, out of memory: recorded, the others still run
        lines = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]}
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def format_addmm(data: dict) -> str:
    chunks = -(-data["tokens"] // data["chunk_rows"])
    lines = [
        f"dW GEMM at the chunk shape: [V={data['vocab']}, H={data['hidden']}] (+)= Gᵀ[V, C={data['chunk_rows']}]·"
        f"H[C, H] ({chunks} chunks at N={data['tokens']}):"
    ]
    for name, timing in data["times"].items():
        text = timing["error"][:90] if "error" in timing else f"{timing['ms']:.3f} ms, {timing['tflops']:.0f} TFLOP/s"
        lines.append(f"  {name:<42} {text}")
    return "\n".join(lines)


def kernel_profile(fn, device, prediction: dict | None) -> dict:
    """One call of ``fn`` (after a warm one) under torch.profiler: device time per kernel name, the top ones and
    the totals per kind, beside the model's ``prediction`` (``Prediction.as_dict()``) per kind. On the CPU the
    profiler's ATen ops stand in for kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    kernels = []
    for event in prof.key_averages():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (not event.key.startswith("aten::") or NO_KERNEL.match(event.key)):
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            kernels.append({"name": event.key, "kind": kernel_kind(event.key), "count": event.count, "ms": us / 1e3})
    kernels.sort(key=lambda k: -k["ms"])
    kinds = {kind: {"count": 0, "ms": 0.0} for kind in KINDS}
    for kernel in kernels:
        kinds[kernel["kind"]]["count"] += kernel["count"]
        kinds[kernel["kind"]]["ms"] += kernel["ms"]
    result = {"timer": "CUDA kernels" if cuda else "CPU ATen ops", "total_ms": sum(k["ms"] for k in kernels)}
    result.update(kinds=kinds, top=kernels[:TOP_KERNELS], kernels_seen=len(kernels))
    if prediction is not None:
        predicted = {kind: {"count": 0, "ms": 0.0} for kind in KINDS}
        for kernel in prediction["kernels"]:
            predicted[kernel["kind"]]["count"] += kernel["count"]
            predicted[kernel["kind"]]["ms"] += kernel["ms"]
        result["predicted"] = {"total_ms": prediction["ms"], "kinds": predicted, "kernels": prediction["kernels"]}
    return result


def format_profile(label: str, data: dict) -> str:
    """Two lines per kind (measured ms and launches, predicted) and the top kernels."""
    if "error" in data:
        return f"{label}: {data['error']}"
    predicted = data.get("predicted")
    total = f"{data['total_ms']:.1f} ms" + (f" (predicted {predicted['total_ms']:.1f})" if predicted else "")
    lines = [f"{label}: {data['timer']} {total}"]
    for kind in KINDS:
        measured = data["kinds"][kind]
        text = f"  {kind:<11} {measured['ms']:8.2f} ms in {measured['count']:4d} launches"
        if predicted:
            model = predicted["kinds"][kind]
            text += f" | predicted {model['ms']:8.2f} ms in {model['count']:4d}"
        lines.append(text)
    for kernel in data["top"][:5]:
        lines.append(f"    {kernel['ms']:8.2f} ms ×{kernel['count']:<3d} {kernel['kind']:<11} {kernel['name'][:80]}")
    return "\n".join(lines)
