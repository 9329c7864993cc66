"""predict() and what is built on it: bench rows, the auto backend, the predicted table."""

from __future__ import annotations

from opd_fast import chunking
from opd_fast.perf_model._core import DEVICES, DeviceCeilings, Prediction, Workload, floor_ms, make_prediction
from opd_fast.perf_model._ours import sweep_kernels, triton_streaming_kernels
from opd_fast.perf_model._peers import compile_kernels, liger_kernels, naive_kernels, trl_kernels

METHODS = ("chunked", "streaming", "naive", "liger_chunked", "compile", "trl_chunked")
OUR_BACKENDS = ("cuda", "triton", "torch")
PEERS = {"naive": naive_kernels, "liger_chunked": liger_kernels, "compile": compile_kernels, "trl_chunked": trl_kernels}
# `opd-fast bench` backend names → (method, our backend or None). "liger" (Liger's fused linear JSD) is not modeled.
BENCH_BACKEND_METHODS = {
    "naive": ("naive", None),
    "torch": ("chunked", "torch"),
    "triton": ("chunked", "triton"),
    "cuda": ("chunked", "cuda"),
    "triton-streaming": ("streaming", "triton"),
    "cuda-streaming": ("streaming", "cuda"),
    "liger_chunked": ("liger_chunked", None),
    "trl": ("trl_chunked", None),
    "compile": ("compile", None),
}


def _device(device: DeviceCeilings | str) -> DeviceCeilings:
    return DEVICES[device.lower()] if isinstance(device, str) else device


def predict(
    method: str,
    workload: Workload,
    device: DeviceCeilings | str,
    *,
    backend: str = "cuda",
    budget: int | None = None,
    dw_gemm: str = "auto",
    overlap: bool = True,
    padded_stride: bool = True,
    mode: str = "fwd+bwd",
) -> Prediction:
    """The predicted step of ``method`` ("chunked", "streaming": ours on ``backend``; the peers ignore it).

    ``budget`` (logits elements per model and tile; None: the current CUDA budget of :mod:`opd_fast.chunking`) and
    ``dw_gemm`` ("per_chunk", "single", "auto") shape our chunked plan; ``overlap`` changes only the memory (two G
    buffers: the model predicts the side-stream overlap as serial); ``padded_stride=False`` models rows V elements
    apart. ``mode`` "fwd" or "bwd" keeps the kernels of that phase. Raises ValueError for what is not modeled.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    device = _device(device)
    if method in PEERS:
        kernels, peak = PEERS[method](workload)
        return make_prediction(method, None, workload, device, kernels, peak, mode)
    if backend not in OUR_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(OUR_BACKENDS)}, got {backend!r}")
    if method == "streaming" and backend == "triton":
        kernels, peak = triton_streaming_kernels(workload, budget)
    elif method == "streaming" and backend == "torch":
        raise ValueError("the torch backend's streaming plan is not modeled")
    else:
        kernels, peak = sweep_kernels(workload, backend, method, budget, dw_gemm, overlap, padded_stride)
    return make_prediction(method, backend, workload, device, kernels, peak, mode)


def _current_dw_gemm() -> str:
    return chunking.get_dw_gemm()


def predict_bench_row(row: dict, device: DeviceCeilings | str) -> Prediction | None:
    """The prediction for an ``opd-fast bench`` result row (its backend, shape, dtype, loss and mode; optional
    "plan", "budget", "dw_gemm", "overlap", else the process's current settings), or None where the model does not
    apply: an unmodeled backend or loss, gradient filtering, fp32 without an fp32 matmul rate."""
    device = _device(device)
    method, backend = BENCH_BACKEND_METHODS.get(row.get("backend"), (None, None))
    loss = row.get("loss", "reverse_kl")
    if method is None or row.get("filter_eps") or loss == "topk_overlap":
        return None
    if row["dtype"] == "fp32" and device.fp32_matmul_tflops is None:
        return None
    if backend is not None and row.get("plan"):
        method = row["plan"]
    workload = Workload(row["tokens"], row["hidden"], row["teacher_hidden"], row["vocab"], row["dtype"], loss)
    options = dict(
        budget=row.get("budget"), dw_gemm=row.get("dw_gemm") or _current_dw_gemm(), overlap=row.get("overlap", True)
    )
    try:
        return predict(method, workload, device, backend=backend or "cuda", mode=row.get("mode", "fwd+bwd"), **options)
    except ValueError:
        return None


def preferred_gpu_backend(workload: Workload, device: DeviceCeilings | str) -> str:
    """The backend, "cuda" or "triton", that the model predicts faster for the chunked plan; cuda (the documented
    auto order) when the model cannot tell them apart."""
    times = {name: predict("chunked", workload, device, backend=name).ms for name in ("cuda", "triton")}
    return "triton" if times["triton"] < times["cuda"] else "cuda"


# The predicted table's columns: (header, method, keyword arguments of predict).
TABLE_COLUMNS = (
    ("opd_fast chunked (default)", "chunked", {}),
    ("chunked, per-chunk dW", "chunked", {"dw_gemm": "per_chunk"}),
    ("chunked, one dW GEMM", "chunked", {"dw_gemm": "single"}),
    ("opd_fast streaming (cuda)", "streaming", {}),
    ("opd_fast streaming (triton)", "streaming", {"backend": "triton"}),
    ("naive", "naive", {}),
    ("Liger chunked", "liger_chunked", {}),
    ("torch.compile", "compile", {}),
    ("TRL chunked", "trl_chunked", {}),
)
TABLE_COMMAND = "python -m opd_fast.perf_model --device h100 h200 --tokens 4096 8192 16384"


def predicted_table(
    devices=("h100", "h200"), tokens=(4096, 8192, 16384), hidden=4096, teacher_hidden=5120, vocab=151936
) -> str:
    """Markdown: per device and N, every method's predicted ms and its ratio to the floor, bf16 reverse KL
    forward + backward, marked as predicted."""
    header = ["device", "N", "floor ms", *(name for name, _, _ in TABLE_COLUMNS)]
    lines = [
        f"Predicted (model, not measured): reverse KL forward+backward, bf16, Hs={hidden}, Ht={teacher_hidden}, "
        f"V={vocab}; ms (× floor). Made by `{TABLE_COMMAND}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name in devices:
        device = _device(name)
        for n in tokens:
            workload = Workload(n, hidden, teacher_hidden, vocab)
            cells = [device.name, str(n), f"{floor_ms(workload, device):.1f}"]
            for _, method, options in TABLE_COLUMNS:
                p = predict(method, workload, device, **options)
                cells.append(f"{p.ms:.1f} ({p.ratio_to_floor:.2f}×)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
