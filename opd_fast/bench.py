"""`opd-fast bench`: time and memory of the OPD losses per backend, side by side in one run.

Each case draws its inputs on the benchmark device (:mod:`opd_fast.bench_inputs`): the ``random`` preset
(logits ~ N(0, 16), unrelated student and teacher) or the ``peaked`` one (a chosen mean entropy, 1.5 nats
by default, and a chosen student mass on the shared top-16, 0.9), and every row reports what the inputs
were: both models' mean entropy, the shared top-16 mass and overlap ratio. Then it times the chosen mode:

* ``fwd``: the loss alone (under grad mode, as in training; our backends then compute the gradients in
  the forward, so this is the whole cost);
* ``bwd``: ``loss.backward()`` alone, after an untimed forward;
* ``fwd+bwd``: both.

Losses: ``reverse_kl`` (the default), ``forward_kl``, ``jsd`` (β = 0.5) and ``topk_overlap`` (the k = 16
statistics, ``fwd`` only: a diagnostic without gradients).

Backends: ``naive`` (materialized logits and autograd, the baseline), ``compile`` (torch.compile of a
chunked plain-PyTorch loss), ``liger`` (Liger-Kernel's fused linear JSD), ``liger_chunked`` (its chunked
JSD loss) and ``trl`` (TRL's chunked divergence, the loss inside ``trl.DistillationTrainer``) when
installed — see :mod:`opd_fast.baselines` — and ours, each named with its plan: ``torch``, ``triton``,
``cuda`` (the default plan, chunked) and ``triton-streaming``, ``cuda-streaming`` (``plan="streaming"``).
A backend that cannot run here becomes a row whose ``error`` says ``skipped:`` and why; the printed table
(:func:`format_table`) gives each such reason once, under the rows that ran, and names our backends
``opd_fast/torch`` etc. (:func:`display_name`), as the plot does. ``filter_eps``
turns on our backends' gradient filtering (exact by default); the row then reports the share of logits
tiles it skipped (``opd_fast.last_filter_stats()``).

Timing: CUDA events around each call on GPU, wall clock on CPU, after warm-up (which includes any
compilation); median and the 20th/80th percentiles. Memory: the peak beyond the inputs
(:func:`opd_fast.memory.peak_extra_bytes`: the CUDA allocator's peak delta, or on CPU the peak of live
tensor storages created by the operation), outputs and gradients included. A case that fails (out of
memory, or any exception a baseline raises) becomes a row with an ``error`` field.

Rate: ``floor_gflop`` is the matmul work any exact method must do — 2·N·V·(Hs + Ht) for the forward
(both models' logits) and 4·N·V·Hs for the backward (dH and dW) — and ``effective_tflops`` that floor
over the median time. Given the device's measured bf16 matmul rate (``matmul_tflops_bf16`` in the
environment), each bf16 row also gets ``floor_ms`` (the floor at that rate), ``ratio_to_floor`` and
``fraction_of_matmul_rate``.

Prediction: given device ceilings (:class:`opd_fast.perf_model.DeviceCeilings`: measured on a GPU by
:func:`opd_fast.perf_model.measure_ceilings`, or named), each row the performance model covers also gets
``predicted_ms`` (:func:`opd_fast.perf_model.predict_bench_row`), and the table a "pred. ms" column beside the
measured median, so that a GPU run says which of the model's assumptions was wrong.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opd_fast import backends, baselines, bench_inputs
from opd_fast._plotting import require_matplotlib, save_figure
from opd_fast.functional import linear_divergence
from opd_fast.memory import peak_extra_bytes
from opd_fast.reference import materialized_divergence, materialized_topk_overlap
from opd_fast.topk import linear_topk_overlap

if TYPE_CHECKING:
    from opd_fast.perf_model import DeviceCeilings

OURS = ("torch", "triton", "cuda")
PLANS = ("chunked", "streaming")  # the library's default plan first
BACKENDS = (
    "naive",
    "torch",
    "triton",
    "triton-streaming",
    "cuda",
    "cuda-streaming",
    "compile",
    "liger",
    "liger_chunked",
    "trl",
)
LOSSES = ("reverse_kl", "forward_kl", "jsd", "topk_overlap")
MODES = ("fwd", "bwd", "fwd+bwd")
SKIPPED = "skipped: "  # how the error of a case that did not run begins
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
JSD_BETA = 0.5
TOPK_K = 16

# Shapes swept: tokens, hidden sizes, shared vocabulary. cpu-quick takes about a minute on a 2-core CPU with every
# installed baseline; cpu-small, its 8 times larger sweep, about ten minutes and 6 GB (TRL's loss); then real
# student/teacher pairs, for GPUs.
PRESETS: dict[str, dict] = {
    "cpu-quick": dict(tokens=[128, 256, 512], hidden=64, teacher_hidden=64, vocab=32768),
    "cpu-small": dict(tokens=[1024, 2048, 4096], hidden=64, teacher_hidden=64, vocab=32768),
    "qwen2.5-1.5b-7b": dict(tokens=[4096, 8192, 16384], hidden=1536, teacher_hidden=3584, vocab=151936),
    "qwen3-8b-14b": dict(tokens=[4096, 8192, 16384], hidden=4096, teacher_hidden=5120, vocab=151936),
    "llama3.1-8b-70b": dict(tokens=[4096, 8192, 16384], hidden=4096, teacher_hidden=8192, vocab=128256),
}
# The preset run with no shape options, per device type. On a GPU, cpu-small's largest call is ~70 GFLOP of matmuls
# (milliseconds at GPU rates; compilation dominates the run) where cpu-quick's would time little but kernel launches.
DEFAULT_PRESETS = {"cpu": "cpu-quick", "cuda": "cpu-small"}
NAIVE_LOGITS_COPIES = 5  # fp32 [N, V] tensors the naive baseline holds at its peak (fwd+bwd; tested)
LONG_RUN_SECONDS = 300.0  # a run estimated to take longer is announced (the estimate is within ~2x)
LARGE_MEMORY_FRACTION = 0.25  # ... and so is one whose naive baseline needs this share of the free memory
# Floor FLOPs of the naive call that estimate_seconds times: ~0.1 s on a 2-core CPU, milliseconds on a GPU.
CALIBRATION_FLOPS = 2**30


@dataclass(frozen=True)
class Case:
    backend: str
    tokens: int
    hidden: int
    teacher_hidden: int
    vocab: int
    dtype: str
    mode: str
    loss: str = "reverse_kl"
    inputs: str = "random"
    filter_eps: float | None = None
    target_entropy: float = bench_inputs.PEAKED_ENTROPY
    target_shared_mass: float = bench_inputs.PEAKED_SHARED_MASS
    topk_k: int = TOPK_K  # the k of the topk_overlap loss

    def row(self) -> dict:
        """The case as the leading fields of a result row (the peaked targets only for peaked inputs, k only for
        the top-k overlap)."""
        row = asdict(self)
        if self.inputs != "peaked":
            del row["target_entropy"], row["target_shared_mass"]
        if self.loss != "topk_overlap":
            del row["topk_k"]
        return {**row, "plan": plan_of(self.backend)}


def split_backend(name: str) -> tuple[str, str | None]:
    """("triton", "streaming") for "triton-streaming", ("cuda", "chunked") for "cuda", (name, None) for baselines."""
    base, _, plan = name.partition("-")
    if base in OURS:
        return base, plan or PLANS[0]
    return name, None


def plan_of(name: str) -> str | None:
    return split_backend(name)[1]


def display_name(name: str) -> str:
    """The backend as human-facing output names it: ours as "opd_fast/torch", "opd_fast/triton-streaming" (plain
    "torch" reads as plain PyTorch), baselines as they are."""
    return f"opd_fast/{name}" if split_backend(name)[0] in OURS else name


def speed_text(speedup: float) -> str:
    """A baseline's time over a row's as words: "2.10× faster" at 2.1, "1.35× slower" at 1 / 1.35."""
    if speedup >= 1:
        return f"{speedup:.2f}× faster"
    return f"{1 / speedup:.2f}× slower"


def unavailable_reason(backend: str, device: torch.device, *, interpreter: bool = False) -> str | None:
    """Why ``backend`` cannot be benchmarked on ``device`` (None when it can).

    The Triton backends need CUDA here unless ``interpreter`` (a rehearsal under ``TRITON_INTERPRET=1``,
    whose timings say nothing about speed).
    """
    device = torch.device(device)
    base, _ = split_backend(backend)
    if base == "naive":
        return None
    if base == "triton" and device.type != "cuda" and not interpreter:
        return "the Triton kernels need a CUDA GPU (Triton's CPU interpreter checks correctness, not speed)"
    if base in OURS:
        return backends.unavailable_reason(base, device)
    return baselines.unavailable_reason(base, device)


def skip_reason(case: Case, device: torch.device, *, interpreter: bool = False) -> str | None:
    """Why ``case`` cannot run on ``device`` (None when it can): its backend is unavailable here, or it has no such
    loss or mode."""
    reason = unavailable_reason(case.backend, device, interpreter=interpreter)
    if reason is None and case.loss == "topk_overlap" and case.mode != "fwd":
        reason = "the top-k overlap statistics are a diagnostic without gradients: mode fwd only"
    if reason is None and case.loss == "topk_overlap" and split_backend(case.backend)[0] not in ("naive", *OURS):
        reason = f"{case.backend} has no top-k overlap statistics"
    return reason


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """The case's inputs on ``device``: student_hidden [N, Hs] and student_weight [V, Hs] (requiring gradients),
    teacher_hidden [N, Ht] and teacher_weight [V, Ht], in the case's dtype."""
    return bench_inputs.make_inputs(
        case.inputs,
        case.tokens,
        case.hidden,
        case.teacher_hidden,
        case.vocab,
        DTYPES[case.dtype],
        torch.device(device),
        seed,
        entropy=case.target_entropy,
        shared_mass=case.target_shared_mass,
    )


def loss_function(case: Case) -> Callable[..., object]:
    """fn(student_hidden, student_weight, teacher_hidden, teacher_weight) computing the case's loss."""
    base, plan = split_backend(case.backend)
    if case.loss == "topk_overlap":
        if base == "naive":
            return lambda *t: materialized_topk_overlap(*t, k=case.topk_k)
        if base in OURS:
            return lambda *t: linear_topk_overlap(*t, k=case.topk_k, backend=base, **plan_option(plan))
        raise ValueError(f"{case.backend} has no top-k overlap statistics")
    if base == "naive":
        return lambda *t: materialized_divergence(*t, divergence=case.loss, beta=JSD_BETA)
    if base in OURS:
        options = plan_option(plan)
        if case.filter_eps is not None:
            options["filter_eps"] = case.filter_eps
        return lambda *t: linear_divergence(*t, divergence=case.loss, beta=JSD_BETA, backend=base, **options)
    return baselines.divergence_loss(base, case.loss)


def plan_option(plan: str | None) -> dict:
    """The keyword that selects ``plan``: none for the library's default plan."""
    return {} if plan in (None, PLANS[0]) else {"plan": plan}


def floor_flops(case: Case) -> float:
    """Matmul FLOPs any exact method needs: 2·N·V·(Hs+Ht) forward, 4·N·V·Hs backward."""
    forward = 2.0 * case.tokens * case.vocab * (case.hidden + case.teacher_hidden)
    backward = 4.0 * case.tokens * case.vocab * case.hidden
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
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
    _elapsed_ms(lambda: a @ b, device, 3)  # warm-up: cuBLAS handle and kernel selection
    ms = _elapsed_ms(lambda: a @ b, device, repeats)
    return 2.0 * size**3 * repeats / (ms * 1e-3) / 1e12


def measure_copy_gbps(device: torch.device, mebibytes: int = 2048, repeats: int = 10) -> float:
    """The device's copy bandwidth (GB/s, bytes read plus bytes written) from timing a copy of ``mebibytes``."""
    device = torch.device(device)
    src = torch.randn(mebibytes * 2**18, device=device)  # 4-byte elements
    dst = torch.empty_like(src)
    _elapsed_ms(lambda: dst.copy_(src), device, 3)
    ms = _elapsed_ms(lambda: dst.copy_(src), device, repeats)
    return 2.0 * src.numel() * src.element_size() * repeats / (ms * 1e-3) / 1e9


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


def _time_ms(
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
        times.append(_elapsed_ms(fn, device, 1))
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
        inputs = make_inputs(case, device, seed)
        row.update(bench_inputs.input_statistics(*inputs.values()))
        fn, setup = timed_call(case, inputs)
        if call_limit_ms is not None:
            for _ in range(2):
                if setup:
                    setup()
                call_ms = _elapsed_ms(fn, device, 1)
            if call_ms > call_limit_ms:
                return {
                    **row,
                    "error": f"{SKIPPED}a warm call took {call_ms:.0f} ms, over the limit of {call_limit_ms:.0f}",
                }
            warmup = max(warmup - 2, 0)
        times = _time_ms(fn, setup, device, warmup, repeats, min_seconds, max_seconds)
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
        from opd_fast.perf_model import predict_bench_row  # only runs that predict need the model

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
    fn, setup = timed_call(probe, make_inputs(probe, device))
    fastest_ms = min(_time_ms(fn, setup, device, warmup=1, repeats=2, min_seconds=0.0, max_seconds=None))
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


def _comparable(row: dict) -> tuple:
    """The fields two rows must share to be compared (the same work on the same inputs)."""
    keys = ("tokens", "hidden", "teacher_hidden", "vocab", "dtype", "mode", "loss", "inputs")
    return tuple(row.get(key) for key in keys)


def skipped_lines(rows: list[dict]) -> list[str]:
    """One line per reason the skipped rows give, naming their backends: "skipped opd_fast/cuda, ...: reason"."""
    backends_of: dict[str, list[str]] = {}
    for r in rows:
        if r.get("error", "").startswith(SKIPPED):
            names = backends_of.setdefault(r["error"].removeprefix(SKIPPED), [])
            if display_name(r["backend"]) not in names:
                names.append(display_name(r["backend"]))
    return [f"skipped {', '.join(names)}: {reason}" for reason, names in backends_of.items()]


def format_table(rows: list[dict]) -> str:
    """The rows that ran or failed, with speed and memory against naive, then each reason for skipping once."""
    shown = [r for r in rows if not r.get("error", "").startswith(SKIPPED)]
    labels = [display_name(r["backend"]) + (f" ε={r['filter_eps']:.3g}" if r.get("filter_eps") else "") for r in shown]
    width = max(map(len, ["backend", *labels]))
    predicted = any("predicted_ms" in r for r in shown)  # the model's column, beside the measured median
    header = f"{'backend':>{width}} {'loss':>12} {'tokens':>7} {'Hs/Ht':>11} {'vocab':>7} {'dtype':>5} {'mode':>7} "
    header += f"{'median ms':>10} " + (f"{'pred. ms':>9} " if predicted else "")
    header += f"{'p20-p80 ms':>17} {'peak MB':>9} {'TFLOP/s':>8} {'H(p_s)':>6} {'shared':>6}  vs naive"
    lines = [header, "-" * len(header)]
    naive = {_comparable(r): r for r in rows if r["backend"] == "naive" and "error" not in r}
    for r, label in zip(shown, labels):
        shape = f"{r['hidden']}/{r['teacher_hidden']}"
        prefix = f"{label:>{width}} {r['loss']:>12} {r['tokens']:>7} {shape:>11} {r['vocab']:>7} {r['dtype']:>5} "
        prefix += f"{r['mode']:>7} "
        if "error" in r:
            lines.append(prefix + r["error"])
            continue
        base = naive.get(_comparable(r))
        ratio = ""
        if base is not None and r["backend"] != "naive":
            memory = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] else float("nan")
            ratio = f"{speed_text(base['median_ms'] / r['median_ms'])}, {100 * memory:.1f}% memory"
        if "filter_skipped_fraction" in r:
            ratio += f" (filter skipped {100 * r['filter_skipped_fraction']:.1f}% of tiles)"
        spread = f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}"
        rate = f"{r['effective_tflops']:>8.3f}"
        inputs = f"{r['entropy_student']:>6.2f} {r['shared_mass']:>6.3f}"
        model = (f"{r['predicted_ms']:>9.1f} " if "predicted_ms" in r else f"{'-':>9} ") if predicted else ""
        lines.append(
            prefix + f"{r['median_ms']:>10.1f} {model}{spread:>17} {r['peak_mem_mb']:>9.1f} {rate} {inputs}  {ratio}"
        )
    return "\n".join(lines + skipped_lines(rows))


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


def plot(path: str | os.PathLike, rows: list[dict], title: str) -> None:
    """Time and peak memory vs tokens per backend (and loss, mode, dtype where they vary), log scales, one PNG."""
    plt = require_matplotlib()
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in rows if "error" not in r]
    varying = [key for key in ("loss", "mode", "dtype", "filter_eps") if len({r.get(key) for r in ok}) > 1]

    def series_of(r: dict) -> tuple:
        return (r["backend"], *(r.get(k) for k in varying))

    for series in dict.fromkeys(series_of(r) for r in ok):
        mine = sorted((r for r in ok if series_of(r) == series), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in mine]
        label = " ".join(str(part) for part in (display_name(series[0]), *series[1:]) if part is not None)
        ax_time.plot(tokens, [r["median_ms"] for r in mine], marker="o", label=label)
        ax_mem.plot(tokens, [r["peak_mem_mb"] for r in mine], marker="o", label=label)
    for ax, label in ((ax_time, "median time (ms)"), (ax_mem, "peak memory beyond inputs (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path, dpi=120)
