"""opd_fast's torch backend against Liger-Kernel's chunked JSD loss on the CPU, side by side.

Reverse KL forward+backward (Liger's β = 1) from hidden states and lm_head weights, both models' hidden size H,
fp32, on a fixed number of threads. Each contender runs in its own fresh process (so peak RSS is its own),
the processes alternate (ours, Liger, Liger, ours, ...) so that a noisy shared machine slows all alike, and
each process times several calls after a warm-up call (which pays for Liger's torch.compile). Printed: every
process's call times and peak RSS, then per contender the median call time (and CPU time), the RSS range and
the time ratio to Liger's.

    python benchmarks/bench_cpu_vs_liger.py                        # N=4096, H=64, V=32768, 2 threads
    python benchmarks/bench_cpu_vs_liger.py --rounds 5 --calls 3 --json out.json
    python benchmarks/bench_cpu_vs_liger.py --also old=/tmp/old    # and opd_fast from another checkout

Peak RSS is the process's high-water mark (``ru_maxrss``): the Python interpreter, torch and the inputs
included, which the "base" column (RSS after the inputs are made, before the first call) shows.

It is also a pytest-benchmark suite (both in one process, peak memory beyond the inputs in ``extra_info``):

    pytest benchmarks/bench_cpu_vs_liger.py --benchmark-enable -m "slow or not slow"

With benchmarking disabled (this project's default) only the small opd_fast case runs, once, as a test of the
suite; Liger's compiled chunks take tens of seconds to compile and run in the benchmark runs only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest

CONTENDERS = ("opd_fast", "liger")  # what a worker process runs
THREADS = 2  # the comparison is stated for 2 threads (the CI machine's cores)
CPU_SHAPE = dict(tokens=4096, hidden=64, vocab=32768)


def _inputs(tokens: int, hidden: int, vocab: int, seed: int):
    """hidden ~ N(0, 1) [N, H] and weights ~ N(0, 16/H) [V, H] for both models (every logit ~ N(0, 16)), as
    opd_fast.bench.inputs' ``random`` preset; the student's require gradients."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    scale = (16.0 / hidden) ** 0.5
    hs = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=gen) * scale).requires_grad_()
    ht = torch.randn(tokens, hidden, generator=gen)
    wt = torch.randn(vocab, hidden, generator=gen) * scale
    return hs, ws, ht, wt


def _loss_function(name: str, chunk_size: int):
    if name == "opd_fast":
        from opd_fast import linear_divergence

        return lambda hs, ws, ht, wt: linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", backend="torch")
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # β = 1 is the reverse KL(p_s ‖ p_t) in Liger's convention (opd_fast.bench.baselines.BETA); soft loss only.
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, chunk_size=chunk_size)

    def call(hs, ws, ht, wt):
        labels = torch.zeros(hs.shape[0], dtype=torch.long)  # unused: the hard loss has weight 0
        return loss(hs, ws, ht, wt, labels)

    return call


def _kib_to_mb(kib: int) -> float:
    return kib * 1024 / 1e6


def worker(args: argparse.Namespace) -> None:
    """One contender in this process: a warm-up call, then ``calls`` timed forward+backward calls."""
    import torch

    torch.set_num_threads(args.threads)
    hs, ws, ht, wt = _inputs(args.tokens, args.hidden, args.vocab, args.seed)
    loss_fn = _loss_function(args.worker, args.chunk_size)
    base_mb = _kib_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    seconds, cpu_seconds, loss = [], [], None
    for i in range(args.calls + 1):
        hs.grad = ws.grad = None
        started, cpu_started = time.perf_counter(), time.process_time()
        out = loss_fn(hs, ws, ht, wt)
        out.backward()
        if i:  # the first call is the warm-up
            seconds.append(time.perf_counter() - started)
            cpu_seconds.append(time.process_time() - cpu_started)
        loss = out.item()
    peak_mb = _kib_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result = {"name": args.worker, "seconds": seconds, "cpu_seconds": cpu_seconds, "loss": loss}
    print(json.dumps({**result, "base_mb": base_mb, "peak_mb": peak_mb}))


def _run(name: str, source: str | None, args: argparse.Namespace) -> dict:
    """One worker process running ``name`` (a CONTENDERS entry), with opd_fast imported from ``source`` if given."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", name]
    for option in ("tokens", "hidden", "vocab", "threads", "calls", "chunk_size", "seed"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=CPU_SHAPE["tokens"])
    parser.add_argument("--hidden", type=int, default=CPU_SHAPE["hidden"], help="both models' hidden size")
    parser.add_argument("--vocab", type=int, default=CPU_SHAPE["vocab"])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per process, after one warm-up call")
    parser.add_argument("--rounds", type=int, default=3, help="processes per contender, alternated")
    parser.add_argument("--chunk-size", type=int, default=128, help="Liger's token chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run opd_fast from the source tree DIR (e.g. a worktree of an older commit) as opd_fast@LABEL",
    )
    parser.add_argument("--json", help="also write every process's result here")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    print(
        f"reverse KL fwd+bwd, N={args.tokens}, H={args.hidden}, V={args.vocab}, fp32, {args.threads} threads; "
        f"Liger chunk {args.chunk_size}; {args.rounds} processes each, {args.calls} timed calls per process"
    )
    # label -> (worker, source tree or None for the installed opd_fast)
    contenders = {"opd_fast": ("opd_fast", None)}
    for also in args.also:
        label, _, source = also.partition("=")
        contenders[f"opd_fast@{label}"] = ("opd_fast", os.path.abspath(source))
    contenders["liger"] = ("liger", None)
    labels = list(contenders)
    width = max(map(len, labels))
    results: dict[str, list[dict]] = {label: [] for label in labels}
    for round_index in range(args.rounds):
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            result = _run(*contenders[label], args)
            results[label].append(result)
            calls = " ".join(f"{s:.3f}" for s in result["seconds"])
            print(
                f"  {label:{width}s} calls {calls} s   peak RSS {result['peak_mb']:.0f} MB "
                f"(base {result['base_mb']:.0f} MB)   loss {result['loss']:.6f}",
                flush=True,
            )
    medians = {}
    for label, runs in results.items():
        seconds = [s for run in runs for s in run["seconds"]]
        cpu = [s for run in runs for s in run["cpu_seconds"]]
        peaks = [run["peak_mb"] for run in runs]
        medians[label] = statistics.median(seconds)
        print(
            f"{label:{width}s} median {medians[label]:.3f} s over {len(seconds)} calls "
            f"(CPU time {statistics.median(cpu):.3f} s), peak RSS {min(peaks):.0f}-{max(peaks):.0f} MB"
        )
    ratios = {label: medians[label] / medians["liger"] for label in labels[:-1]}
    for label, ratio in ratios.items():
        print(f"{label} / liger time: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=1)


# ---- the pytest-benchmark suite --------------------------------------------------------------------------------

SHAPES = [
    pytest.param(dict(tokens=256, hidden=32, vocab=4096), id="smoke"),
    pytest.param(CPU_SHAPE, id="N4096-H64-V32768-fp32", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_kl_fwd_bwd_cpu(benchmark, contender, shape):
    import torch

    from opd_fast.memory import peak_extra_bytes

    if contender == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger_kernel is not installed (pip install liger-kernel)")
    if contender == "liger" and not benchmark.enabled:
        pytest.skip("Liger's chunks compile for tens of seconds: they run when benchmarking is enabled")
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        hs, ws, ht, wt = _inputs(shape["tokens"], shape["hidden"], shape["vocab"], seed=0)
        loss_fn = _loss_function(contender, chunk_size=128)

        def step() -> None:
            hs.grad = ws.grad = None
            loss_fn(hs, ws, ht, wt).backward()

        step()  # Liger's compile, outside the timing
        benchmark.extra_info["peak_mem_mb"] = peak_extra_bytes(step, torch.device("cpu")) / 2**20
        benchmark.pedantic(step, rounds=5, warmup_rounds=0)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
