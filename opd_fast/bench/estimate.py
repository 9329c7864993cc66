"""Before a run: its rough duration and the naive baseline's memory, announced in one line when either is large."""

from __future__ import annotations

from dataclasses import replace

import torch

from opd_fast.bench.cases import Case, case_inputs, floor_flops, skip_reason
from opd_fast.bench.runner import time_calls, timed_call
from opd_fast.perf_model import NAIVE_LOGITS_COPIES

LONG_RUN_SECONDS = 300.0  # a run estimated to take longer is announced (the estimate is within ~2x)
LARGE_MEMORY_FRACTION = 0.25  # ... and so is one whose naive baseline needs this share of the free memory
# Floor FLOPs of the naive call that estimate_seconds times: ~0.1 s on a 2-core CPU, milliseconds on a GPU.
CALIBRATION_FLOPS = 2**30


def naive_peak_bytes(case: Case) -> int:
    """The memory the naive baseline needs beyond its inputs for ``case``: its materialized fp32 logits."""
    return NAIVE_LOGITS_COPIES * case.tokens * case.vocab * 4


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the GPU's, or the system's MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return None
    available = fields.get("MemAvailable")
    return int(available.split()[0]) * 1024 if available else None


def _naive_seconds_per_logit(case: Case, device: torch.device) -> float:
    """Seconds of one naive fwd+bwd call per [token, vocabulary] element at the case's hidden sizes and dtype, timed
    on a slice of the case that costs about ``CALIBRATION_FLOPS`` (random inputs: the time does not depend on them).
    The slice's vocabulary is capped too, so that drawing its weights is cheap next to the call."""
    vocab = min(case.vocab, 8192)
    per_token = floor_flops(replace(case, tokens=1, vocab=vocab, mode="fwd+bwd"))
    tokens = max(1, min(case.tokens, int(CALIBRATION_FLOPS // per_token)))
    probe = Case("naive", tokens, case.hidden, case.teacher_hidden, vocab, case.dtype, "fwd+bwd")
    fn, setup = timed_call(probe, case_inputs(probe, device))
    fastest_ms = min(time_calls(fn, setup, device, warmup=1, repeats=2, min_seconds=0.0, max_seconds=None))
    return fastest_ms * 1e-3 / (tokens * vocab)


def estimate_seconds(cases: list[Case], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Rough time of benchmarking ``cases`` (all runnable): each costs ``warmup + repeats + 1`` (the memory run) calls
    of the naive loss at its shape, timed here once per hidden sizes and dtype and scaled by tokens × vocabulary.
    The naive baseline is a middle: our backends, torch.compile and Liger-Kernel are faster, TRL's loss slower;
    compilation is not counted."""
    per_logit: dict[tuple, float] = {}
    total = 0.0
    for case in cases:
        key = (case.hidden, case.teacher_hidden, case.dtype)
        if key not in per_logit:
            per_logit[key] = _naive_seconds_per_logit(case, device)
        total += (warmup + repeats + 1) * case.tokens * case.vocab * per_logit[key]
    return total


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_warning(cases: list[Case], device: torch.device, *, warmup: int, repeats: int) -> str | None:
    """One line announcing a long run (over ``LONG_RUN_SECONDS`` by :func:`estimate_seconds`) or one whose naive
    baseline needs over ``LARGE_MEMORY_FRACTION`` of the free memory; None for any other run."""
    device = torch.device(device)
    runnable = [case for case in cases if skip_reason(case, device) is None]
    if not runnable:
        return None
    seconds = estimate_seconds(runnable, device, warmup=warmup, repeats=repeats)
    naive = max((naive_peak_bytes(case) for case in runnable if case.backend == "naive"), default=0)
    available = available_memory_bytes(device)
    if seconds < LONG_RUN_SECONDS and not (available and naive > LARGE_MEMORY_FRACTION * available):
        return None
    memory = f", the naive baseline needing {naive / 2**30:.1f} GiB beyond its inputs" if naive else ""
    if naive and available:
        memory += f" ({available / 2**30:.1f} GiB free)"
    return (
        f"warning: {len(runnable)} cases, expected to take roughly {_duration(seconds)}{memory}; "
        "fewer or smaller --tokens, or fewer --backends, make it shorter"
    )
