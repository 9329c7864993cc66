"""`opd-fast bench`: time and memory of the reverse-KL loss per backend, side by side in one run.

Each case builds random inputs of a realistic logit scale (hidden states ~ N(0, 1), weights
~ N(0, 1/H) · 4, so logits have a standard deviation of about 4 and the softmax is peaked as in a
trained model), then times the chosen mode:

* ``fwd``: the loss alone (under grad mode, as in training; our backends then compute the gradients in
  the forward, so this is the whole cost);
* ``bwd``: ``loss.backward()`` alone, after an untimed forward;
* ``fwd+bwd``: both.

Backends: ``naive`` (materialized logits and autograd, the baseline), ``compile`` (torch.compile of a
chunked plain-PyTorch loss), ``liger`` (Liger-Kernel's fused linear JSD, β = 1) and ``liger_chunked``
(its chunked JSD loss, β = 1) when Liger-Kernel is installed — see :mod:`opd_fast.baselines` — and
ours: ``torch``, ``triton``, ``cuda``. A backend that cannot run here becomes a row whose ``error`` says
``skipped:`` and why.

Timing: CUDA events around each call on GPU, wall clock on CPU, after warm-up (which includes any
compilation); median and the 20th/80th percentiles. Memory: the peak beyond the inputs
(:func:`opd_fast.memory.peak_extra_bytes`: the CUDA allocator's peak delta, or on CPU the peak of live
tensor storages created by the operation), outputs and gradients included. A case that fails (e.g. out
of memory) becomes a row with an ``error`` field.

Rate: ``floor_gflop`` is the matmul work any exact method must do — 2·N·V·(Hs + Ht) for the forward
(both models' logits) and 4·N·V·Hs for the backward (dH and dW) — and ``effective_tflops`` that floor
over the median time. On GPU the device's measured bf16 matmul rate is in the environment
(``matmul_tflops_bf16``) and each bf16 row gets ``fraction_of_matmul_rate``. The Triton backend's rows
report ``filter_skipped_fraction``, the share of logits tiles gradient filtering skipped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd_fast import backends, baselines
from opd_fast.functional import linear_reverse_kl
from opd_fast.memory import peak_extra_bytes
from opd_fast.reference import materialized_divergence

BACKENDS = ("naive", "torch", "triton", "cuda", "liger", "liger_chunked", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Real student/teacher pairs: tokens swept, hidden sizes, shared vocabulary.
PRESETS: dict[str, dict] = {
    "cpu-small": dict(tokens=[1024, 2048, 4096], hidden=64, teacher_hidden=64, vocab=32768),
    "qwen2.5-1.5b-7b": dict(tokens=[4096, 8192, 16384], hidden=1536, teacher_hidden=3584, vocab=151936),
    "qwen3-8b-14b": dict(tokens=[4096, 8192, 16384], hidden=4096, teacher_hidden=5120, vocab=151936),
    "llama3.1-8b-70b": dict(tokens=[4096, 8192, 16384], hidden=4096, teacher_hidden=8192, vocab=128256),
}


@dataclass(frozen=True)
class Case:
    backend: str
    tokens: int
    hidden: int
    teacher_hidden: int
    vocab: int
    dtype: str
    mode: str


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be benchmarked on ``device`` (None when it can)."""
    if backend == "naive":
        return None
    if backend == "triton" and torch.device(device).type != "cuda":
        return "the Triton kernels need a CUDA GPU (Triton's CPU interpreter checks correctness, not speed)"
    if backend in ("torch", "triton", "cuda"):
        return backends.unavailable_reason(backend, device)
    return baselines.unavailable_reason(backend, torch.device(device))


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return dict(
        student_hidden=randn(case.tokens, case.hidden).requires_grad_(),
        student_weight=randn(case.vocab, case.hidden, scale=4 / case.hidden**0.5).requires_grad_(),
        teacher_hidden=randn(case.tokens, case.teacher_hidden),
        teacher_weight=randn(case.vocab, case.teacher_hidden, scale=4 / case.teacher_hidden**0.5),
    )


def loss_function(backend: str) -> Callable[..., torch.Tensor]:
    if backend == "naive":
        return materialized_divergence
    if backend in baselines.LOSSES:
        return baselines.LOSSES[backend]
    return lambda *args: linear_reverse_kl(*args, backend=backend)


def floor_flops(case: Case) -> float:
    """Matmul FLOPs any exact method needs: 2·N·V·(Hs+Ht) forward, 4·N·V·Hs backward."""
    forward = 2.0 * case.tokens * case.vocab * (case.hidden + case.teacher_hidden)
    backward = 4.0 * case.tokens * case.vocab * case.hidden
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float | None:
    """The device's bf16 matmul rate (TFLOP/s) from timing a [size]³ product; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2.0 * size**3 * repeats / (begin.elapsed_time(end) * 1e-3) / 1e12


def timed_call(case: Case, inputs: dict[str, torch.Tensor]) -> tuple[Callable[[], object], Callable[[], object] | None]:
    """(timed call, untimed setup run before each timed call or None) for the case's mode."""
    loss_fn = loss_function(case.backend)
    args = list(inputs.values())
    state: dict[str, torch.Tensor] = {}

    def clear_grads() -> None:
        for t in args:
            t.grad = None

    def forward() -> torch.Tensor:
        return loss_fn(*args)

    def forward_backward() -> None:
        clear_grads()
        forward().backward()

    def setup_backward() -> None:
        clear_grads()
        state["loss"] = forward()

    def backward() -> None:
        state.pop("loss").backward()

    if case.mode == "fwd":
        return forward, None
    if case.mode == "bwd":
        return backward, setup_backward
    return forward_backward, None


def _time_ms(fn, setup, device: torch.device, warmup: int, repeats: int, min_seconds: float) -> list[float]:
    """Per-call times in ms: ``warmup`` untimed calls, then at least ``repeats`` timed ones (and ≥ min_seconds)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - started < min_seconds and len(times) < 100):
        if setup:
            setup()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def run_case(
    case: Case,
    device: torch.device | str,
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_seconds: float = 0.0,
    matmul_tflops: float | None = None,
) -> dict:
    """Benchmark one case; returns a result row (with an ``error`` field if it could not run)."""
    device = torch.device(device)
    row = asdict(case)
    reason = unavailable_reason(case.backend, device)
    if reason is not None:
        return {**row, "error": f"skipped: {reason}"}
    try:
        inputs = make_inputs(case, device)
        fn, setup = timed_call(case, inputs)
        times = _time_ms(fn, setup, device, warmup, repeats, min_seconds)
        if setup:
            setup()
        peak = peak_extra_bytes(fn, device)
    except RuntimeError as exc:  # torch.OutOfMemoryError on CUDA; the CPU allocator raises a RuntimeError
        first_line = str(exc).splitlines()[0]
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in first_line:
            return {**row, "error": f"out of memory: {first_line}"}
        return {**row, "error": f"{type(exc).__name__}: {first_line}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    median = statistics.median(times)
    extra = {"floor_gflop": floor_flops(case) / 1e9, "effective_tflops": floor_flops(case) / (median * 1e-3) / 1e12}
    if matmul_tflops and case.dtype == "bf16":
        extra["fraction_of_matmul_rate"] = extra["effective_tflops"] / matmul_tflops
    if case.backend == "triton":
        from opd_fast.backends import triton_backend

        extra["filter_skipped_fraction"] = triton_backend.last_filter_stats()["skipped_fraction"]
    return {
        **row,
        "median_ms": median,
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "repeats": len(times),
        "peak_mem_mb": peak / 2**20,
        **extra,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device, matmul_tflops: float | None = None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = driver = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            driver = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            driver = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "gpu": gpu,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "commit": _git_commit(),
        "opd_fast": __import__("opd_fast").__version__,
        "device": str(device),
        "matmul_tflops_bf16": matmul_tflops,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'backend':>13} {'tokens':>7} {'Hs/Ht':>11} {'vocab':>7} {'dtype':>5} {'mode':>7} "
    header += f"{'median ms':>10} {'p20-p80 ms':>17} {'peak MB':>9} {'TFLOP/s':>8}  vs naive"
    lines = [header, "-" * len(header)]
    naive = {
        (r["tokens"], r["hidden"], r["teacher_hidden"], r["vocab"], r["dtype"], r["mode"]): r
        for r in rows
        if r["backend"] == "naive" and "error" not in r
    }
    for r in rows:
        shape = f"{r['hidden']}/{r['teacher_hidden']}"
        prefix = f"{r['backend']:>13} {r['tokens']:>7} {shape:>11} {r['vocab']:>7} {r['dtype']:>5} {r['mode']:>7} "
        if "error" in r:
            lines.append(prefix + r["error"])
            continue
        base = naive.get((r["tokens"], r["hidden"], r["teacher_hidden"], r["vocab"], r["dtype"], r["mode"]))
        ratio = ""
        if base is not None and r["backend"] != "naive":
            speed = base["median_ms"] / r["median_ms"]
            memory = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] else float("nan")
            ratio = f"{speed:.2f}x faster, {100 * memory:.1f}% memory"
        spread = f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}"
        rate = f"{r['effective_tflops']:>8.3f}"
        lines.append(prefix + f"{r['median_ms']:>10.1f} {spread:>17} {r['peak_mem_mb']:>9.1f} {rate}  {ratio}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, env: dict, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")


def write_csv(path: str | os.PathLike, env: dict, rows: list[dict]) -> None:
    """One line per result; the environment is repeated in ``env_*`` columns so each line stands alone."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    env_columns = {f"env_{k}": v for k, v in env.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns + list(env_columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env_columns})


def require_matplotlib():
    """pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'opd_fast[plot]'") from None
    return plt


def plot(path: str | os.PathLike, rows: list[dict], title: str) -> None:
    """Time and peak memory vs tokens per backend, log scales, one PNG."""
    plt = require_matplotlib()
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in rows if "error" not in r]
    varying = [key for key in ("mode", "dtype") if len({r[key] for r in ok}) > 1]
    for series in dict.fromkeys((r["backend"], *(r[k] for k in varying)) for r in ok):
        mine = sorted((r for r in ok if (r["backend"], *(r[k] for k in varying)) == series), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in mine]
        label = " ".join(series)
        ax_time.plot(tokens, [r["median_ms"] for r in mine], marker="o", label=label)
        ax_mem.plot(tokens, [r["peak_mem_mb"] for r in mine], marker="o", label=label)
    for ax, label in ((ax_time, "median time (ms)"), (ax_mem, "peak memory beyond inputs (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
