"""Running one case: its timed call per mode, the timing loop, the memory run and the result row; the environment
the rows were measured in.

Timing: CUDA events around each call on GPU, wall clock on CPU (:func:`opd_fast.perf_model.elapsed_ms`), after
warm-up (which includes any compilation); median and the 20th/80th percentiles. Memory: the peak beyond the inputs
(:func:`opd_fast.memory.peak_extra_bytes`: the CUDA allocator's peak delta, or on CPU the peak of live tensor
storages created by the operation), outputs and gradients included. A case that fails (out of memory, or any
exception a baseline raises) becomes a row with an ``error`` field.

Rate: ``floor_gflop`` is the matmul work any exact method must do (:func:`opd_fast.bench.cases.floor_flops`) and
``effective_tflops`` that floor over the median time. Given the device's measured bf16 matmul rate
(``matmul_tflops_bf16`` in the environment), each bf16 row also gets ``floor_ms`` (the floor at that rate),
``ratio_to_floor`` and ``fraction_of_matmul_rate``. Given device ceilings, each row the performance model covers
also gets ``predicted_ms`` (:func:`opd_fast.perf_model.predict_bench_row`).
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opd_fast.bench.cases import SKIPPED, Case, case_inputs, floor_flops, loss_function, skip_reason
from opd_fast.bench.inputs import input_statistics
from opd_fast.memory import peak_extra_bytes
from opd_fast.perf_model import DeviceCeilings, elapsed_ms, predict_bench_row


def timed_call(case: Case, inputs: dict[str, torch.Tensor]) -> tuple[Callable[[], object], Callable[[], object] | None]:
    """(timed call, untimed setup run before each timed call or None) for the case's mode."""
    loss_fn = loss_function(case)
    args = list(inputs.values())
    state: dict[str, torch.Tensor] = {}

    def clear_grads() -> None:
        for t in args:
            t.grad = None

    def forward() -> object:
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


def time_calls(
    fn, setup, device: torch.device, warmup: int, repeats: int, min_seconds: float, max_seconds: float | None
) -> list[float]:
    """Per-call times in ms: ``warmup`` untimed calls, then ``repeats`` timed ones (more until ``min_seconds``,
    at most 100; fewer, at least one, once ``max_seconds`` have passed)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - started < min_seconds and len(times) < 100):
        if times and max_seconds is not None and time.perf_counter() - started >= max_seconds:
            break
        if setup:
            setup()
        times.append(elapsed_ms(fn, device, 1))
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first_line = lines[0] if lines else ""
    if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in first_line:
        return f"out of memory: {first_line}"
    return f"{type(exc).__name__}: {first_line}"


def filter_stats() -> dict | None:
    """Tiles seen and skipped by gradient filtering in the last backward of any backend, when the library
    reports them (``opd_fast.last_filter_stats``); None otherwise."""
    report = getattr(importlib.import_module("opd_fast"), "last_filter_stats", None)
    return report() if report is not None else None


def run_case(
    case: Case,
    device: torch.device | str,
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    call_limit_ms: float | None = None,
    matmul_tflops: float | None = None,
    ceilings: DeviceCeilings | None = None,
    interpreter: bool = False,
    seed: int = 0,
) -> dict:
    """Benchmark one case; returns a result row (with an ``error`` field if it could not run).

    ``max_seconds`` bounds the timed calls (at least one runs); ``call_limit_ms`` skips the case when its second
    warm-up call takes longer (e.g. a backend far slower than the baseline, in a time-boxed run). The first call
    is not judged: it pays for compilation (``torch.compile``, Triton kernels new to this process) and cuBLAS
    heuristics. ``peak_mem_mb`` is measured with the inputs' gradients freed first, so it includes the
    gradients the call makes, as the CPU tracker does. With ``ceilings`` the row gets the model's ``predicted_ms``
    where the model covers it.
    """
    device = torch.device(device)
    row = case.row()
    reason = skip_reason(case, device, interpreter=interpreter)
    if reason is not None:
        return {**row, "error": f"{SKIPPED}{reason}"}
    try:
        inputs = case_inputs(case, device, seed)
        row.update(input_statistics(*inputs.values()))
        fn, setup = timed_call(case, inputs)
        if call_limit_ms is not None:
            for _ in range(2):
                if setup:
                    setup()
                call_ms = elapsed_ms(fn, device, 1)
            if call_ms > call_limit_ms:
                return {
                    **row,
                    "error": f"{SKIPPED}a warm call took {call_ms:.0f} ms, over the limit of {call_limit_ms:.0f}",
                }
            warmup = max(warmup - 2, 0)
        times = time_calls(fn, setup, device, warmup, repeats, min_seconds, max_seconds)
        stats = filter_stats() if case.filter_eps else None
        for tensor in inputs.values():
            tensor.grad = None
        if setup:
            setup()
        peak = peak_extra_bytes(fn, device)
    except Exception as exc:  # a failing case is a row: out of memory, a baseline's TypeError, a missing kwarg
        return {**row, "error": _error_text(exc)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    median = statistics.median(times)
    flops = floor_flops(case)
    extra = {"floor_gflop": flops / 1e9, "effective_tflops": flops / (median * 1e-3) / 1e12}
    if matmul_tflops and case.dtype == "bf16":
        floor_ms = flops / (matmul_tflops * 1e12) * 1e3
        extra.update(floor_ms=floor_ms, ratio_to_floor=median / floor_ms, fraction_of_matmul_rate=floor_ms / median)
    if stats is not None:
        extra["filter_skipped_fraction"] = stats["skipped_fraction"]
    if ceilings is not None:
        prediction = predict_bench_row(row, ceilings)
        if prediction is not None:
            extra["predicted_ms"] = prediction.ms
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
