"""Measured device ceilings: the bf16 matmul rate and the copy bandwidth, timed on the device (the benchmark times
its cases with the same :func:`elapsed_ms`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from opd_fast.perf_model._core import DEVICES, DeviceCeilings


def elapsed_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Time of ``repeats`` calls in ms: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        begin.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) * 1e3


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """The device's bf16 matmul rate (TFLOP/s) from timing [size]³ products of random data after 3 warm-ups."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    elapsed_ms(lambda: a @ b, device, 3)  # warm-up: cuBLAS handle and kernel selection
    ms = elapsed_ms(lambda: a @ b, device, repeats)
    return 2.0 * size**3 * repeats / (ms * 1e-3) / 1e12


def measure_copy_gbps(device: torch.device, mebibytes: int = 2048, repeats: int = 10) -> float:
    """The device's copy bandwidth (GB/s, bytes read plus bytes written) from timing a copy of ``mebibytes``."""
    device = torch.device(device)
    src = torch.randn(mebibytes * 2**18, device=device)  # 4-byte elements
    dst = torch.empty_like(src)
    elapsed_ms(lambda: dst.copy_(src), device, 3)
    ms = elapsed_ms(lambda: dst.copy_(src), device, repeats)
    return 2.0 * src.numel() * src.element_size() * repeats / (ms * 1e-3) / 1e9


def measure_ceilings(device, matmul_tflops: float | None = None) -> DeviceCeilings:
    """The ceilings of a CUDA ``device``, measured: the bf16 matmul rate (``matmul_tflops`` when already measured)
    and the copy bandwidth (a few seconds); the fp32 rate from :data:`DEVICES` when the device's name contains a key
    (H100, H200), else None."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_ceilings times a GPU; got {device}: use DEVICES['h100'] or DEVICES['h200']")
    name = torch.cuda.get_device_name(device)
    known = next((ceilings for key, ceilings in DEVICES.items() if key in name.lower()), None)
    return DeviceCeilings(
        name=name,
        matmul_tflops=matmul_tflops or measure_matmul_tflops(device),
        copy_gbps=measure_copy_gbps(device),
        fp32_matmul_tflops=None if known is None else known.fp32_matmul_tflops,
    )
