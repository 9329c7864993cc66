"""pytest-benchmark suite: reverse-KL forward+backward, naive (materialized logits) vs our backends.

The cases are the same as `opd-fast bench` (opd_fast.bench builds the inputs and the timed call). Run:

    pytest benchmarks/ --benchmark-enable -m "slow or not slow" --benchmark-columns=median,iqr,rounds

CPU-sized cases run by default, GPU-sized ones when a GPU is present. Each benchmark also records the
peak memory beyond its inputs in ``extra_info``. With benchmarking disabled (the default in this
project's pytest config) only the small smoke case runs, once, as a test of the suite itself.
"""

import pytest
import torch

from opd_fast.bench import cases, runner
from opd_fast.memory import peak_extra_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_THREADS = 2  # the shape of the CI machine; the comparison is stated for 2 threads

SHAPES = [
    pytest.param(dict(tokens=256, hidden=32, teacher_hidden=32, vocab=4096, dtype="fp32"), id="smoke"),
    pytest.param(
        dict(tokens=4096, hidden=64, teacher_hidden=64, vocab=32768, dtype="fp32"),
        id="N4096-H64-V32768-fp32",
        marks=pytest.mark.slow,
    ),
]
if DEVICE.type == "cuda":
    SHAPES += [
        pytest.param(dict(tokens=n, hidden=4096, teacher_hidden=5120, vocab=151936, dtype="bf16"), id=f"N{n}-qwen3")
        for n in (4096, 8192)
    ]


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("backend", cases.BENCH_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_kl_fwd_bwd(benchmark, backend, shape):
    reason = cases.backend_skip_reason(backend, DEVICE)
    if reason:
        pytest.skip(reason)
    if backend in ("compile", "liger_chunked") and shape["tokens"] < 1024 and not benchmark.enabled:
        pytest.skip("compiling the baselines takes a minute: they run in the real (non-smoke) cases")
    case = cases.Case(backend=backend, mode="fwd+bwd", **shape)
    inputs = cases.case_inputs(case, DEVICE)
    fn, _ = runner.timed_call(case, inputs)
    benchmark.extra_info["peak_mem_mb"] = peak_extra_bytes(fn, DEVICE) / 2**20
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
