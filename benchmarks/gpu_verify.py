"""GPU verification in one short window: the most valuable numbers first, each stage saved the moment it ends.

GPU time for this project is rare and short (an H200 for ~15 minutes, its start included; one command of at
most 10 minutes; only the output's tail and ≤ 8 files come back). This script spends such a window in order
of value. Each stage runs in its own process under a time box, streams its output, and rewrites
``<out>/<stem>.<n>-<name>.json`` after every row, so a stage killed at its box keeps the rows it finished; a
stage that fails, crashes (a lost CUDA context restarts it after the failing row) or runs out of time is
recorded and the next one starts. Nothing is fatal: the exit status is 0.

  build  (``--build``) ``pip install --no-build-isolation --no-deps -e .``: the CUDA extension for this GPU
         (``OPD_FAST_CUDA_ARCHS``, default from nvidia-smi: ``90a`` on an H200); if pip fails, the extension is
         built in place and the stages import the package from the repository.
  0 env  versions, the GPU, which backends and baselines can run and why not, and the device's measured
         ceilings: bf16 GEMM TFLOP/s (8192³, random data) and device copy GB/s.
  1 correctness  every backend × plan (torch, triton, cuda × chunked, streaming) against a float64
         reference and the torch backend on peaked bf16 inputs (N=1024, Hs=4096, Ht=5120, V=151936): value
         and both gradients of each divergence (and with gradient filtering on, and over 4 row chunks with
         the side-stream overlap on and off), token log-probs, top-k (k=16, 64). A check passes within 2× the
         error of plain PyTorch in the same dtype.
  2 headline  reverse KL forward+backward, N=8192, Hs=4096, Ht=5120, V=151936, bf16, peaked inputs: naive,
         cuda, triton, liger, trl, our chunked plans with gradient filtering (ε = 2⁻¹²), compile,
         liger_chunked, the streaming plans, then torch if one call is within 3× naive. CUDA-event medians, peak
         memory, the floor 2·N·V·(Hs+Ht) + 4·N·V·Hs at the measured GEMM rate and each row's ratio to it, the
         issue-16 prediction, the inputs' entropy and shared top-16 mass, the share of tiles filtering skipped.
  3 sweep  the same at N=4096 and 16384, then forward KL, JSD and the top-k overlap statistics at N=8192.
  4 tests  the GPU test tier and the NaN-semantics tests, ``pytest -m "gpu or device_semantics"`` on the
         files that hold such tests (top-k k ≤ 64).
  5 ncu  one profiled forward+backward step per backend (N=4096) with Nsight Compute, if time is left.

Files (8, the most a device call returns): ``<stem>.log`` (everything streamed), ``<stem>.0-env.json`` …
``<stem>.5-ncu.json`` and ``<stem>.png`` (headline bars against the floor and the prediction; time vs N).
``<stem>`` is ``<gpu>-<date>`` (``h200-2026-12-01``), so the files can be committed to benchmarks/results as
they are. At the end the script prints each stage's status, the headline table and issue 17's targets per N.

Recipe (benchmarks/README.md says more). Once, on a machine with PyPI access, in the repository root, the
wheels the GPU machine lacks (Liger-Kernel; TRL and what ``import trl.kernels.chunked_divergence`` needs
there: datasets, dill, multiprocess; setuptools for the build), 3.5 MB, into the git-ignored ``.whl/``::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \\
        liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 setuptools==84.2.1

Then one device call, with ``carry: [".whl"]`` and ``timeout_s: 500`` (the budget of 440 s covers the build and
every stage; the rest is the wheels' install and slack; with the machine's 1–2 minute start that is ~10 of the
window's 15 minutes, which leaves room for one more call)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; OPD_FAST_CUDA_ARCHS=90a PYTHONUNBUFFERED=1 \\
        python3 benchmarks/gpu_verify.py --build --budget 440 --out $OUT

Triton runs with fixed configurations (``OPD_FAST_TRITON_FIXED_CONFIG=1``: no autotuning in the window) unless
``--autotune``. If stages were cut or failed, the same call with ``--stages 3,4,5`` (say) and a smaller budget
runs only those; keep ``--build`` unless the machine is still the warm one that built.

On the CPU, the same stages and code paths run in a rehearsal (Triton interpreter, tiny fp32 shapes, CUDA
stages recorded as skipped with the reason), in CI through tests/test_gpu_verify.py::

    python benchmarks/gpu_verify.py --rehearse --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
EXIT_CONTEXT_LOST = 75  # a child's exit status after a sticky CUDA error: the runner restarts it after that row
MAX_RESTARTS = 3
MARGIN_SECONDS = 10  # kept free at the end of the budget for the summary
FILTER_EPS = 2.0**-12  # bf16 eps / 32: Cut Cross-Entropy's default threshold, and this library's before issue 17
TORCH_WITHIN_NAIVE = 3.0  # the torch backend's row runs only if one call is within this factor of naive

# The issue-16 FLOP/byte model at the headline shape on an H200 (790 TFLOP/s, 4.3 TB/s), in ms: (low, high).
# The streaming rows are the pre-issue-17 kernels ("today's cuda ≈115, triton ≈150"); TRL ≈ today's cuda.
PREDICTED_MS = {
    "naive": (111, 111),
    "compile": (83, 83),
    "liger_chunked": (80, 80),
    "liger": (148, 148),
    "trl": (115, 115),
    "cuda-streaming": (115, 115),
    "triton-streaming": (150, 150),
    "cuda": (66, 75),
    "triton": (66, 75),
}
PREDICTED_FLOOR_MS = 54.9


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    gpu_seconds: float  # the time box on a GPU
    rehearsal_seconds: float  # the time box in a rehearsal
    min_seconds: float  # on a GPU, not started with less time left than this

    def needs(self, rehearse: bool) -> float:
        """Seconds that must be left to start the stage: half its box in a rehearsal."""
        return self.rehearsal_seconds / 2 if rehearse else self.min_seconds

    def path(self, out: Path, stem: str) -> Path:
        return out / f"{stem}.{self.number}-{self.name}.json"


# Rehearsal boxes: about 1.8× each stage's time alone on a 2-core CPU (7, 16, 16, 19, 15, 6 s), since in the CI tier
# the rehearsal shares the CPU with a second pytest worker, which made the stages up to 1.6× slower.
STAGES = (
    Stage(0, "env", 30, 20, 10),
    Stage(1, "correctness", 120, 35, 30),  # Triton compiles most kernels for the first time here
    Stage(2, "headline", 170, 35, 40),
    Stage(3, "sweep", 150, 42, 30),
    Stage(4, "tests", 120, 35, 30),
    Stage(5, "ncu", 90, 14, 45),
)
BUILD_SECONDS = 240


@dataclass(frozen=True)
class Sizes:
    """Shapes and timing of one kind of run: the GPU window or the CPU rehearsal."""

    correctness: dict
    headline: dict
    sweep_tokens: tuple[int, ...]
    loss_tokens: int  # the sweep's forward KL, JSD and top-k rows
    topk_ks: tuple[int, ...]
    chunk_rows: int  # rows per chunk of the correctness stage's several-chunk check
    profile_tokens: int
    gemm_size: int
    copy_mib: int
    warmup: int
    repeats: int
    row_seconds: float  # bound on a row's timed calls (at least one runs)
    call_limit_ms: float  # a row whose second (warm) call is slower is skipped
    interpreter: bool = False
    notes: list[str] = field(default_factory=list)


QWEN3 = dict(hidden=4096, teacher_hidden=5120, vocab=151936, dtype="bf16")
GPU_SIZES = Sizes(
    correctness=dict(tokens=1024, **QWEN3),  # the float64 reference needs ~1.2 GB per [N, V] tensor
    headline=dict(tokens=8192, **QWEN3),
    sweep_tokens=(4096, 16384),
    loss_tokens=8192,
    topk_ks=(16, 64),
    chunk_rows=256,  # 4 chunks of the 1024 rows, which the default budget (1536-row chunks) takes in one
    profile_tokens=4096,
    gemm_size=8192,
    copy_mib=2048,
    warmup=2,
    repeats=10,
    row_seconds=3.0,
    call_limit_ms=5000.0,
)
TINY = dict(hidden=16, teacher_hidden=24, dtype="fp32")  # the interpreter runs fp32 (no bf16 tl.dot)
REHEARSAL_SIZES = Sizes(
    correctness=dict(tokens=48, vocab=160, **TINY),  # 3 chunks of chunk_rows in the several-chunk check
    headline=dict(tokens=32, vocab=128, **TINY),
    sweep_tokens=(16,),
    loss_tokens=16,
    topk_ks=(2,),  # the top-k kernel is slow in the interpreter: ~1 s a call at k=2, N=32, V=128
    chunk_rows=16,  # chunking.MIN_ROWS: fewer rows would tile the vocabulary instead
    profile_tokens=16,
    gemm_size=256,
    copy_mib=32,
    warmup=1,
    repeats=1,
    row_seconds=1.0,
    call_limit_ms=60000.0,
    interpreter=True,
    notes=[
        "rehearsal on the CPU: Triton interpreter, tiny fp32 shapes, torch.compile disabled "
        "(TORCH_COMPILE_DISABLE=1); the times say nothing about speed"
    ],
)


# ---------------------------------------------------------------------------------------------------------------
# The runner: standard library only (it must work before anything is built), one child process per stage.


class Log:
    """Echoes lines to stdout and appends them to the log file, as they come."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            with self.path.open("a") as handle:
                handle.write(text + "\n")


def run_streamed(command: list[str], log: Log, timeout: float, env: dict) -> tuple[int | None, float]:
    """Run ``command`` with every output line copied to the log as it comes; after ``timeout`` seconds its whole
    process group is killed. Returns (exit status, or None when killed at the time box; seconds)."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: the kill takes its children (pytest, ncu) too
    )
    reader = threading.Thread(target=lambda: [log.write(line.rstrip("\n")) for line in process.stdout], daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=5)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        status = None
    reader.join(timeout=5)
    return status, time.monotonic() - started


def command_outcome(status: int | None) -> str:
    """A ``run_streamed`` exit status in words."""
    return "ok" if status == 0 else "timeout" if status is None else f"failed (exit {status})"


def nvidia_smi(query: str) -> str | None:
    """First line of ``nvidia-smi --query-gpu=QUERY``, or None without a GPU or nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def file_stem(rehearse: bool) -> str:
    """``<gpu>-<date>``: e.g. ``h200-2026-12-01``; ``rehearsal-<date>`` for a rehearsal."""
    today = datetime.date.today().isoformat()
    name = None if rehearse else nvidia_smi("name")
    if rehearse or not name:
        return f"{'rehearsal' if rehearse else 'gpu'}-{today}"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"{slug.removeprefix('nvidia-')}-{today}"


def cuda_archs() -> str | None:
    """``OPD_FAST_CUDA_ARCHS`` for this GPU from its compute capability: "90a" on Hopper, e.g. "80" on an A100."""
    capability = nvidia_smi("compute_cap")
    if not capability:
        return None
    major, _, minor = capability.partition(".")
    return f"{major}{minor}" + ("a" if major == "9" else "")


def child_environment(rehearse: bool, autotune: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not autotune:
        env["OPD_FAST_TRITON_FIXED_CONFIG"] = "1"
    if rehearse:
        env.update(TRITON_INTERPRET="1", TORCH_COMPILE_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    return env


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` so that a reader (or a kill) never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1, default=str) + "\n")
    partial.replace(path)


class Runner:
    """Runs the build and the stages within the budget and keeps their outcome in the env file's "runner"."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.out = args.out
        self.stem = file_stem(args.rehearse)
        self.log = Log(self.out / f"{self.stem}.log")
        self.env = child_environment(args.rehearse, args.autotune)
        self.record: dict = {"budget_seconds": args.budget, "rehearsal": args.rehearse, "stages": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save_record(self) -> None:
        path = STAGES[0].path(self.out, self.stem)
        data = read_json(path) or {"stage": 0, "name": "env"}
        data["runner"] = self.record
        write_json_atomic(path, data)

    def build(self) -> None:
        if self.args.rehearse:
            self.record["build"] = {"status": "skipped: a rehearsal builds nothing (the CUDA extension needs a GPU)"}
            return
        env = dict(self.env, PIP_BREAK_SYSTEM_PACKAGES="1")  # an externally managed python3 (PEP 668)
        env.setdefault("OPD_FAST_CUDA_ARCHS", cuda_archs() or "80;90a")
        command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(REPO)]
        self.log.write(f"\n=== build (OPD_FAST_CUDA_ARCHS={env['OPD_FAST_CUDA_ARCHS']}): {' '.join(command)}")
        status, seconds = run_streamed(command, self.log, min(BUILD_SECONDS, self.left() - MARGIN_SECONDS), env)
        outcome = command_outcome(status)
        self.record["build"] = {"status": outcome, "seconds": round(seconds, 1), "archs": env["OPD_FAST_CUDA_ARCHS"]}
        self.log.write(f"=== build: {outcome} in {seconds:.0f} s")
        if status not in (0, None):
            self.record["build"]["in_place"] = self.build_in_place(env, BUILD_SECONDS - seconds)

    def build_in_place(self, env: dict, seconds: float) -> str:
        """When pip could not install (a read-only environment, an old pip): the extension built into opd_fast/
        by ``setup.py build_ext --inplace``, and the stages import the package from the repository, with
        ``opd_fast/kernels`` linked to ``kernels/`` as setup.py's package_dir maps it. If that build fails too,
        the package still imports (pure Python): torch, Triton and the baselines run, cuda says why not."""
        link = REPO / "opd_fast" / "kernels"
        if not link.exists():
            link.symlink_to(Path("..") / "kernels", target_is_directory=True)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        command = [sys.executable, "setup.py", "build_ext", "--inplace"]
        self.log.write(f"\n=== build in place: {' '.join(command)}; the stages import opd_fast from {REPO}")
        status, taken = run_streamed(command, self.log, min(seconds, self.left() - MARGIN_SECONDS), env)
        outcome = command_outcome(status)
        self.log.write(f"=== build in place: {outcome} in {taken:.0f} s")
        return outcome

    def run_stage(self, stage: Stage) -> None:
        path = stage.path(self.out, self.stem)
        nominal = stage.rehearsal_seconds if self.args.rehearse else stage.gpu_seconds
        entry = {"stage": stage.number, "name": stage.name}
        self.record["stages"].append(entry)
        left = self.left() - MARGIN_SECONDS
        needed = stage.needs(self.args.rehearse)
        if left < needed:
            entry["status"] = f"skipped: {max(left, 0):.0f} s left, it needs at least {needed:.0f}"
            write_json_atomic(path, {"stage": stage.number, "name": stage.name, "status": entry["status"]})
            self.log.write(f"\n=== stage {stage.number} {stage.name}: {entry['status']}")
            return
        started = time.monotonic()
        for attempt in range(MAX_RESTARTS + 1):
            box = min(nominal - (time.monotonic() - started), self.left() - MARGIN_SECONDS)
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(stage.number)]
            command += ["--out", str(self.out), "--stem", self.stem, "--box", f"{box:.0f}"]
            command += ["--rehearse"] * self.args.rehearse + ["--resume"] * (attempt > 0)
            self.log.write(f"\n=== stage {stage.number} {stage.name} (box {box:.0f} s, attempt {attempt + 1})")
            status, _ = run_streamed(command, self.log, box, self.env)
            if status != EXIT_CONTEXT_LOST or self.left() - MARGIN_SECONDS < needed:
                break
        seconds = time.monotonic() - started
        data = read_json(path) or {"stage": stage.number, "name": stage.name, "rows": []}
        if status is None:
            data["status"] = f"timeout after {seconds:.0f} s" + (
                f" during {data['in_progress']}" if data.get("in_progress") else ""
            )
        elif status not in (0, EXIT_CONTEXT_LOST) or data.get("status") in (None, "running"):
            data["status"] = f"crashed (exit {status})"
        data["seconds"] = round(seconds, 1)
        data["restarts"] = attempt
        write_json_atomic(path, data)
        entry.update(status=data["status"], seconds=round(seconds, 1), restarts=attempt)
        self.log.write(f"=== stage {stage.number} {stage.name}: {data['status']} in {seconds:.0f} s")

    def run(self) -> int:
        self.log.write(
            f"gpu_verify: out {self.out}, stem {self.stem}, budget {self.args.budget:.0f} s"
            + (" (rehearsal on the CPU)" if self.args.rehearse else "")
        )
        if self.args.build:
            self.build()
        for stage in STAGES:
            if stage.number in self.args.stages:
                self.run_stage(stage)
                self.save_record()
        self.record["seconds"] = round(time.monotonic() - self.started, 1)
        self.record["targets"] = check_targets(benchmark_rows(self.out, self.stem))
        self.save_record()
        self.log.write("\n" + summary(self.out, self.stem))
        return 0


# ---------------------------------------------------------------------------------------------------------------
# The summary printed last (the device call returns the output's tail).


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def summary(out: Path, stem: str) -> str:
    lines = ["=== summary"]
    for stage in STAGES:
        data = read_json(stage.path(out, stem))
        if data is None:
            continue
        rows = data.get("rows", [])
        failed = sum(1 for r in rows if r.get("error") and not r["error"].startswith("skipped"))
        skipped = sum(1 for r in rows if str(r.get("error", "")).startswith("skipped"))
        counts = f"{len(rows) - failed - skipped} ok, {failed} failed, {skipped} skipped" if rows else ""
        extra = ""
        if stage.number == 0 and data.get("ceilings"):
            c = data["ceilings"]
            extra = (
                f"GEMM {_fmt(c.get('matmul_tflops_bf16'), '.0f')} TFLOP/s, copy {_fmt(c.get('copy_gbps'), '.0f')} GB/s"
            )
        if stage.number == 1:
            checks = [r for r in rows if "passed" in r]
            extra = f"{sum(r['passed'] for r in checks)}/{len(checks)} checks passed"
            wrong = [r["id"] for r in checks if not r["passed"]]
            extra += f"; not passed: {', '.join(wrong)}" if wrong else ""
        if stage.number == 4 and data.get("totals"):
            extra = ", ".join(f"{v} {k}" for k, v in data["totals"].items())
        lines.append(f"stage {stage.number} {stage.name:<12} {data.get('status', '?'):<22} {counts} {extra}".rstrip())
    headline = read_json(STAGES[2].path(out, stem))
    if headline and headline.get("rows"):
        lines.append("")
        lines.append(headline_table(headline["rows"]))
    benchmarked = benchmark_rows(out, stem)
    if benchmarked:
        lines += ["", "issue-17 targets (reverse KL):", format_targets(check_targets(benchmarked))]
    return "\n".join(lines)


def benchmark_rows(out: Path, stem: str) -> list[dict]:
    """The rows of the headline and the sweep (stages 2 and 3) as far as they got."""
    return [row for n in (2, 3) for row in (read_json(STAGES[n].path(out, stem)) or {}).get("rows", [])]


# Issue 17's targets for our fastest exact backend at each N (reverse KL forward+backward, bf16).
FLOOR_RATIO = 1.25  # median within 1.25× the matmul floor at the measured GEMM rate
SPEEDUP_VS_NAIVE = 1.5
SPEEDUP_VS_RIVAL = 1.15  # against the fastest of Liger's two paths, TRL's chunked divergence and torch.compile
RIVALS = ("liger", "liger_chunked", "trl", "compile")
OURS = ("torch", "triton", "cuda", "triton-streaming", "cuda-streaming")


def check_targets(rows: list[dict]) -> list[dict]:
    """Per token count: our fastest exact backend against the floor and the baselines (issue 17's targets).

    ``rows`` are benchmark rows (``opd-fast bench --json`` format); only reverse-KL rows without an ``error``
    count. Exact rows (no gradient filtering) decide the targets: median ≤ 1.25× the floor (where the row has
    one: bf16 at a measured GEMM rate), ≥ 1.5× faster than ``naive``, ≥ 1.15× faster than the fastest of
    ``liger``, ``liger_chunked``, ``trl`` and ``compile``. Memory is reported against naive's, not judged.
    Separately, our fastest row with filtering on the peaked inputs should come in below the dense floor.
    """
    exact: dict[int, dict[str, dict]] = {}
    filtered: dict[int, list[dict]] = {}
    for row in rows:
        if "error" in row or row.get("loss", "reverse_kl") != "reverse_kl":
            continue
        if not row.get("filter_eps"):
            exact.setdefault(row["tokens"], {})[row["backend"]] = row
        elif row["backend"] in OURS and row.get("inputs") == "peaked":
            filtered.setdefault(row["tokens"], []).append(row)
    verdicts = []
    for tokens, named in sorted(exact.items()):
        ours = [named[name] for name in OURS if name in named]
        if not ours or "naive" not in named:
            verdicts.append({"tokens": tokens, "error": "needs a row of ours and a naive row"})
            continue
        best, naive = min(ours, key=lambda r: r["median_ms"]), named["naive"]
        ratio = best.get("ratio_to_floor")
        verdict = {
            "tokens": tokens,
            "backend": best["backend"],
            "median_ms": best["median_ms"],
            "ratio_to_floor": ratio,
            "meets_floor": None if ratio is None else ratio <= FLOOR_RATIO,
            "speedup_vs_naive": naive["median_ms"] / best["median_ms"],
            "memory_fraction_of_naive": best["peak_mem_mb"] / naive["peak_mem_mb"] if naive["peak_mem_mb"] else None,
            "rival": None,
            "speedup_vs_rival": None,
            "meets_rival": False,
        }
        verdict["meets_naive"] = verdict["speedup_vs_naive"] >= SPEEDUP_VS_NAIVE
        rivals = [named[name] for name in RIVALS if name in named]
        if rivals:
            rival = min(rivals, key=lambda r: r["median_ms"])
            verdict.update(rival=rival["backend"], speedup_vs_rival=rival["median_ms"] / best["median_ms"])
            verdict["meets_rival"] = verdict["speedup_vs_rival"] >= SPEEDUP_VS_RIVAL
        verdict["met"] = verdict["meets_floor"] is not False and verdict["meets_naive"] and verdict["meets_rival"]
        if tokens in filtered:
            fastest = min(filtered[tokens], key=lambda r: r["median_ms"])
            floor_ms = fastest.get("floor_ms")
            verdict["filtered"] = {
                "backend": fastest["backend"],
                "filter_eps": fastest["filter_eps"],
                "median_ms": fastest["median_ms"],
                "skipped_fraction": fastest.get("filter_skipped_fraction"),
                "below_floor": None if floor_ms is None else fastest["median_ms"] < floor_ms,
            }
        verdicts.append(verdict)
    return verdicts


def format_targets(verdicts: list[dict]) -> str:
    header = f"{'N':>6} {'ours':>16} {'ms':>9} {'×floor':>6} {'×naive':>7} {'×rival':>7} {'rival':>14} {'mem/naive':>9}"
    lines = [header + "  met  | filtered (peaked inputs): ms, skipped, below the floor"]
    for v in verdicts:
        if "error" in v:
            lines.append(f"{v['tokens']:>6} {v['error']}")
            continue
        line = (
            f"{v['tokens']:>6} {v['backend']:>16} {v['median_ms']:>9.2f} {_fmt(v['ratio_to_floor'], '6.2f'):>6} "
            f"{v['speedup_vs_naive']:>7.2f} {_fmt(v['speedup_vs_rival'], '7.2f'):>7} {v['rival'] or 'none':>14} "
            f"{_fmt(v['memory_fraction_of_naive'], '.3%'):>9}  {'yes' if v['met'] else 'NO ':<3}  | "
        )
        filtered = v.get("filtered")
        if filtered is None:
            line += "no filtered row"
        else:
            below = {None: "no floor", True: "yes", False: "NO"}[filtered["below_floor"]]
            skipped = _fmt(filtered["skipped_fraction"], ".1%", "?")
            line += f"{filtered['backend']} {filtered['median_ms']:.2f} ms, {skipped} skipped, {below}"
        lines.append(line.rstrip())
    targets = (
        f"targets: ≤ {FLOOR_RATIO}× floor, ≥ {SPEEDUP_VS_NAIVE}× naive, ≥ {SPEEDUP_VS_RIVAL}× the fastest of "
        f"{', '.join(RIVALS)}; filtered rows below the dense floor"
    )
    return "\n".join([*lines, targets])


def headline_table(rows: list[dict]) -> str:
    """Median, ratio to the floor, the prediction, speed-up and memory against naive, input statistics."""
    naive = next((r for r in rows if r["backend"] == "naive" and "median_ms" in r), None)
    header = f"{'row':<24} {'plan':<9} {'median ms':>9} {'×floor':>6} {'predicted':>9} {'×naive':>6} {'peak GB':>7} "
    header += f"{'H(p_s)':>6} {'shared':>6} {'skipped':>7}"
    lines = [header, "-" * len(header)]
    floor = next((r["floor_ms"] for r in rows if r.get("floor_ms")), None)
    for r in rows:
        label = r["backend"] + (f" ε={r['filter_eps']:.3g}" if r.get("filter_eps") else "")
        if "median_ms" not in r:
            lines.append(f"{label:<24} {r.get('plan') or '':<9} {r.get('error', '')[:110]}")
            continue
        low, high = PREDICTED_MS.get(r["backend"], (None, None)) if not r.get("filter_eps") else (None, None)
        predicted = "-" if low is None else f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"
        speedup = naive["median_ms"] / r["median_ms"] if naive else None
        skipped = r.get("filter_skipped_fraction")
        lines.append(
            f"{label:<24} {r.get('plan') or '':<9} {r['median_ms']:>9.1f} {_fmt(r.get('ratio_to_floor'), '6.2f'):>6} "
            f"{predicted:>9} {_fmt(speedup, '6.2f'):>6} {r['peak_mem_mb'] / 1024:>7.2f} "
            f"{_fmt(r.get('entropy_student'), '6.2f'):>6} {_fmt(r.get('shared_mass'), '6.3f'):>6} "
            f"{_fmt(None if skipped is None else 100 * skipped, '6.1f'):>6}%"
        )
    if floor is not None:
        lines.append(
            f"floor at the measured GEMM rate: {floor:.1f} ms (predicted {PREDICTED_FLOOR_MS} ms at 790 TFLOP/s)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Stage processes.


class ContextLost(Exception):
    """A sticky CUDA error: every later call in this process would fail, so the stage restarts in a new one."""


STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "an illegal",
)


def context_lost(message: str) -> bool:
    return any(text in message for text in STICKY_CUDA_ERRORS)


class StageFile:
    """A stage's JSON file, rewritten after every row: a kill leaves the rows done so far and the one in progress."""

    def __init__(self, path: Path, stage: Stage, box: float, resume: bool):
        self.path = path
        previous = read_json(path) if resume else None
        self.data = previous or {"stage": stage.number, "name": stage.name, "rows": []}
        self.data.update(status="running", box_seconds=box, in_progress=None)
        self.done = {row["id"] for row in self.data["rows"]}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def begin(self, row_id: str) -> None:
        self.data["in_progress"] = row_id
        self.save()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.data["in_progress"] = None
        self.done.add(row["id"])
        self.save()
        message = str(row.get("error", ""))
        if context_lost(message):
            raise ContextLost(message)


class Context:
    """What a stage process knows: the device, the sizes, its time box, where its files go."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.rehearse = args.rehearse
        self.sizes = REHEARSAL_SIZES if args.rehearse else GPU_SIZES
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
        self.out, self.stem = args.out, args.stem
        self.deadline = time.monotonic() + args.box

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage_data(self, number: int) -> dict:
        return read_json(STAGES[number].path(self.out, self.stem)) or {}

    def say(self, text: str) -> None:
        print(text, flush=True)


def _package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stage_env(ctx: Context, record: StageFile) -> None:
    import torch

    import opd_fast
    from opd_fast import bench
    from opd_fast.backends import sweep

    env = bench.environment(ctx.device)
    env["packages"] = _package_versions(
        ("torch", "triton", "numpy", "transformers", "accelerate", "huggingface_hub", "datasets", "pyarrow", "fsspec",
         "dill", "multiprocess", "trl", "liger_kernel", "setuptools", "pytest", "matplotlib")
    )  # fmt: skip
    variables = ("OPD_FAST_TRITON_FIXED_CONFIG", "OPD_FAST_CUDA_ARCHS", "TRITON_INTERPRET", "TORCH_COMPILE_DISABLE")
    env["variables"] = {name: os.environ.get(name) for name in variables}
    env["opd_fast_from"] = str(Path(opd_fast.__file__).parent)  # the repository (editable or in place) or a copy
    if ctx.device.type == "cuda":
        env["addmm_takes_fp32_accumulator"] = sweep._cuda_addmm_takes_a_wider_accumulator(ctx.device)
        props = torch.cuda.get_device_properties(ctx.device)
        env["gpu_properties"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
        env["nvidia_smi"] = nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu")
    record.data["env"] = env
    record.data["notes"] = ctx.sizes.notes
    record.save()
    ctx.say(f"[0 env] {env['gpu'] or env['cpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    ceilings = {
        "matmul_tflops_bf16": bench.measure_matmul_tflops(ctx.device, ctx.sizes.gemm_size),
        "gemm_size": ctx.sizes.gemm_size,
        "copy_gbps": bench.measure_copy_gbps(ctx.device, ctx.sizes.copy_mib),
        "copy_mib": ctx.sizes.copy_mib,
    }
    record.data["ceilings"] = ceilings
    record.save()
    ctx.say(f"[0 env] bf16 GEMM {ceilings['matmul_tflops_bf16']:.1f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s")
    available = {}
    for name in bench.BACKENDS:
        reason = bench.unavailable_reason(name, ctx.device, interpreter=ctx.sizes.interpreter)
        available[name] = reason or "ok"
        ctx.say(f"[0 env] {name}: {reason or 'ok'}")
    record.data["backends"] = available


def _rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when the expected norm is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


VALUE_AND_GRADS = ("value", "d_hidden", "d_weight")  # what _value_and_grads returns, in order


def _value_and_grads(fn: Callable, inputs: list) -> list:
    """[value, ∂Σvalue/∂inputs[0], ∂Σvalue/∂inputs[1]] of ``fn(*inputs)`` (the student's hidden states, weight)."""
    import torch

    value = fn(*inputs)
    return [value.detach(), *torch.autograd.grad(value.sum(), inputs[:2])]


def _targets() -> list[tuple[str, str]]:
    from opd_fast import bench

    return [(backend, plan) for backend in bench.OURS for plan in bench.PLANS]  # torch-chunked first: the base


def stage_correctness(ctx: Context, record: StageFile) -> None:
    import torch

    import opd_fast
    from opd_fast import backends, bench, bench_inputs, reference

    shape = ctx.sizes.correctness
    dtype = bench.DTYPES[shape["dtype"]]
    inputs = list(
        bench_inputs.make_inputs(
            "peaked", shape["tokens"], shape["hidden"], shape["teacher_hidden"], shape["vocab"], dtype, ctx.device
        ).values()
    )
    record.data["shape"] = shape
    record.data["inputs"] = bench_inputs.input_statistics(*inputs)
    record.save()
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    token_ids = torch.randint(0, shape["vocab"], (shape["tokens"],), device=ctx.device)

    def compare(check_id: str, backend: str, plan: str, fn: Callable, args: list, expected: list, plain: list, base):
        """Value and gradients of ``fn(*args)`` against ``expected`` (float64) and ``base`` (the torch backend's);
        passes within 2× the error of ``plain`` (materialized PyTorch in the inputs' dtype). Returns them."""
        row_id = f"{check_id}/{backend}-{plan}"
        if row_id in record.done:
            return None
        row = {"id": row_id, "check": check_id, "backend": backend, "plan": plan}
        reason = backends.unavailable_reason(backend, ctx.device)
        if reason is not None:
            record.add({**row, "error": f"skipped: {reason}"})
            return None
        record.begin(row_id)
        started = time.perf_counter()
        try:
            got = _value_and_grads(fn, args)
        except Exception as exc:
            record.add({**row, "error": _error_line(exc)})
            ctx.say(f"[1 correctness] {row_id}: {_error_line(exc)[:160]}")
            return None
        names = VALUE_AND_GRADS
        errors = {n: _rel_err(a, e) for n, a, e in zip(names, got, expected)}
        plain_errors = {n: _rel_err(p, e) for n, p, e in zip(names, plain, expected)}
        row.update(errors=errors, plain_errors=plain_errors, seconds=round(time.perf_counter() - started, 2))
        if base is not None:
            row["vs_torch"] = {n: _rel_err(a, b) for n, a, b in zip(names, got, base)}
        row["passed"] = all(errors[n] <= 2 * plain_errors[n] + 1e-6 for n in names)
        if "filter" in check_id and getattr(opd_fast, "last_filter_stats", None) is not None:
            row["filter_skipped_fraction"] = opd_fast.last_filter_stats()["skipped_fraction"]
        record.add(row)
        worst = max(names, key=lambda n: errors[n] / (2 * plain_errors[n] + 1e-6))
        ctx.say(
            f"[1 correctness] {row_id}: {'ok' if row['passed'] else 'NOT PASSED'} "
            f"(worst {worst}: {errors[worst]:.2e} vs plain {plain_errors[worst]:.2e})"
        )
        return got

    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        math_options = dict(divergence=divergence, beta=bench.JSD_BETA)
        materialized = functools.partial(reference.materialized_divergence, **math_options)
        expected, plain = _value_and_grads(materialized, exact), _value_and_grads(materialized, inputs)
        base = None
        for backend, plan in _targets():
            options = dict(math_options, backend=backend, **bench.plan_option(plan))
            fn = functools.partial(opd_fast.linear_divergence, **options)
            got = compare(divergence, backend, plan, fn, inputs, expected, plain, base)
            base = got if base is None and backend == "torch" else base
        if divergence == "reverse_kl":  # gradient filtering on: the skipped tiles must not move the gradients
            for backend in ("triton", "cuda"):
                fn = functools.partial(opd_fast.linear_divergence, backend=backend, filter_eps=FILTER_EPS)
                check_id = f"reverse_kl-filter{FILTER_EPS:.3g}"
                compare(check_id, backend, bench.PLANS[0], fn, inputs, expected, plain, None)
            check_chunks(ctx, record, compare, inputs, expected, plain)
        del expected, plain

    def token_logprobs(hidden, weight, **options):
        return opd_fast.linear_token_logprobs(hidden, weight, token_ids, **options)

    def materialized_token_logprobs(hidden, weight):
        return reference.materialized_token_logprobs(hidden, weight, token_ids)

    expected = _value_and_grads(materialized_token_logprobs, exact[:2])
    plain = _value_and_grads(materialized_token_logprobs, inputs[:2])
    base = None
    for backend, plan in _targets():
        fn = functools.partial(token_logprobs, backend=backend, **bench.plan_option(plan))
        got = compare("token_logprobs", backend, plan, fn, inputs[:2], expected, plain, base)
        base = got if base is None and backend == "torch" else base
    del expected, plain, exact
    for k in ctx.sizes.topk_ks:
        check_topk(ctx, record, inputs, k)


def check_chunks(ctx: Context, record: StageFile, compare: Callable, inputs: list, expected: list, plain: list):
    """Reverse KL over several row chunks of the chunked plan (the headline's N=8192 is six; the correctness
    shape is one at the default budget): the side stream's overlap of chunk i's epilogue with the gradient
    GEMMs of chunk i−1, the two G buffers and the fp32 dW accumulation across chunks. Each backend against
    float64 as above, then the same call with the overlap off (``OPD_FAST_OVERLAP=0``): everything runs on one
    stream in order, so both must agree to fp32 rounding (bit-identical unless a kernel uses atomics)."""
    import torch

    import opd_fast
    from opd_fast import bench, chunking
    from opd_fast.backends.sweep import OVERLAP_ENV

    n_tokens, vocab = inputs[0].shape[0], inputs[1].shape[0]
    chunks = -(-n_tokens // ctx.sizes.chunk_rows)
    check_id = f"reverse_kl-chunks{chunks}"
    with opd_fast.chunk_budget(ctx.sizes.chunk_rows * vocab):
        plan = chunking.plan_tiles(n_tokens, vocab, device=ctx.device)
        if plan.cols < vocab or plan.rows != ctx.sizes.chunk_rows:
            record.add({"id": check_id, "error": f"the plan is not {chunks} whole-row chunks: {plan}"})
            return
        for backend in bench.OURS:
            fn = functools.partial(opd_fast.linear_divergence, backend=backend, plan="chunked")
            got = compare(check_id, backend, "chunked", fn, inputs, expected, plain, None)
            if got is None:
                continue
            row_id = f"{check_id}-overlap-off/{backend}-chunked"
            with mock.patch.dict(os.environ, {OVERLAP_ENV: "0"}):  # read on every call
                serial = _value_and_grads(fn, inputs)
            differences = {n: _rel_err(a, b) for n, a, b in zip(VALUE_AND_GRADS, got, serial)}
            identical = all(torch.equal(a, b) for a, b in zip(got, serial))
            passed = max(differences.values()) <= 1e-6
            record.add(
                {
                    "id": row_id,
                    "check": f"{check_id}-overlap-off",
                    "backend": backend,
                    "plan": "chunked",
                    "differences": differences,
                    "identical": identical,
                    "passed": passed,
                }
            )
            ctx.say(
                f"[1 correctness] {row_id}: {'ok' if passed else 'NOT PASSED'} "
                f"({'bit-identical' if identical else f'max rel. difference {max(differences.values()):.2e}'})"
            )


def _error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


TOPK_STATISTICS = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "student_entropy",
    "teacher_entropy",
)


def check_topk(ctx: Context, record: StageFile, inputs: list, k: int) -> None:
    """Top-k ids and statistics of every backend × plan against float64 materialized ones on the same inputs.

    Near-tied logits may swap under different summation orders, so ids must agree at ≥ 99% of the positions
    and each statistic within 2e-3 + 1e-3·|value| (as tests/test_gpu.py asks of Triton against torch)."""
    import torch

    import opd_fast
    from opd_fast import backends, bench, reference

    with torch.no_grad():
        expected = reference.materialized_topk_overlap(*(t.detach().double() for t in inputs), k=k)
    for backend, plan in _targets():
        row_id = f"topk_k{k}/{backend}-{plan}"
        if row_id in record.done:
            continue
        row = {"id": row_id, "check": f"topk_k{k}", "backend": backend, "plan": plan}
        reason = backends.unavailable_reason(backend, ctx.device)
        if reason is not None:
            record.add({**row, "error": f"skipped: {reason}"})
            continue
        record.begin(row_id)
        try:
            got = opd_fast.linear_topk_overlap(*inputs, k=k, backend=backend, **bench.plan_option(plan))
        except Exception as exc:
            record.add({**row, "error": _error_line(exc)})
            ctx.say(f"[1 correctness] {row_id}: {_error_line(exc)[:160]}")
            continue
        agreement = {
            side: float((getattr(got, f"{side}_topk_ids") == getattr(expected, f"{side}_topk_ids")).float().mean())
            for side in ("student", "teacher")
        }
        deviation = {}
        for name in TOPK_STATISTICS:
            ours, ref = getattr(got, name).double(), getattr(expected, name).double()
            deviation[name] = float(((ours - ref).abs() - 1e-3 * ref.abs()).max())
        row.update(id_agreement=agreement, max_deviation=deviation)
        row["passed"] = min(agreement.values()) >= 0.99 and max(deviation.values()) <= 2e-3
        record.add(row)
        ctx.say(
            f"[1 correctness] {row_id}: {'ok' if row['passed'] else 'NOT PASSED'} (ids agree at "
            f"{100 * min(agreement.values()):.1f}%, worst statistic {max(deviation.values()):.1e} beyond 1e-3·|ref|)"
        )


def headline_cases(shape: dict, loss: str, filtering: bool, topk_k: int | None = None) -> list:
    """The rows of one comparison, most valuable first: naive, our chunked plans and the peers that compile
    little, then our plans with gradient filtering (issue 17's second target), then the two peers that first
    compile for tens of seconds (torch.compile, Liger's chunked loss), then the streaming plans; torch last (it
    runs only within 3× naive). ``topk_k``: the k of a ``topk_overlap`` comparison."""
    from opd_fast import bench

    common = dict(shape, mode="fwd" if loss == "topk_overlap" else "fwd+bwd", loss=loss, inputs="peaked")
    if loss == "topk_overlap":
        common["topk_k"] = topk_k
        names = ["naive", "cuda", "triton", "cuda-streaming", "triton-streaming", "torch"]
        return [bench.Case(name, **common) for name in names]
    cases = [bench.Case(name, **common) for name in ("naive", "cuda", "triton", "liger", "trl")]
    if filtering:
        cases += [bench.Case(name, **common, filter_eps=FILTER_EPS) for name in ("cuda", "triton")]
    names = ("compile", "liger_chunked", "cuda-streaming", "triton-streaming", "torch")
    return [*cases, *(bench.Case(name, **common) for name in names)]


def case_id(case) -> str:
    label = case.backend + (f"-filter{case.filter_eps:.3g}" if case.filter_eps else "")
    loss = case.loss + (f"_k{case.topk_k}" if case.loss == "topk_overlap" else "")
    return f"{loss}/N{case.tokens}/{label}"


def run_cases(ctx: Context, record: StageFile, cases: list, tag: str, predict: bool = False) -> None:
    """Benchmark ``cases`` in order, one row each; torch gets a call limit of 3× naive's median. ``predict``
    attaches the issue-16 prediction (made for the GPU's headline shape) to each row."""
    from opd_fast import bench

    rate = ctx.stage_data(0).get("ceilings", {}).get("matmul_tflops_bf16")
    if rate is None and ctx.device.type == "cuda":
        rate = bench.measure_matmul_tflops(ctx.device, ctx.sizes.gemm_size)
    record.data["matmul_tflops_bf16"] = rate
    naive_ms = {}
    for case in cases:
        row_id = case_id(case)
        if row_id in record.done:
            previous = next(r for r in record.data["rows"] if r["id"] == row_id)
            if case.backend == "naive" and "median_ms" in previous:
                naive_ms[(case.loss, case.tokens)] = previous["median_ms"]
            continue
        if ctx.left() < 2:
            record.add({"id": row_id, **case.row(), "error": "skipped: the stage's time box ran out"})
            continue
        limit = ctx.sizes.call_limit_ms
        if case.backend == "torch" and (case.loss, case.tokens) in naive_ms:
            limit = min(limit, TORCH_WITHIN_NAIVE * naive_ms[(case.loss, case.tokens)])
        record.begin(row_id)
        started = time.perf_counter()
        row = bench.run_case(
            case,
            ctx.device,
            warmup=ctx.sizes.warmup,
            repeats=ctx.sizes.repeats,
            max_seconds=min(ctx.sizes.row_seconds, max(ctx.left() / 4, 0.1)),
            call_limit_ms=None if case.backend == "naive" else limit,
            matmul_tflops=rate,
            interpreter=ctx.sizes.interpreter,
        )
        row["seconds"] = round(time.perf_counter() - started, 3)  # inputs, warm-up, timing and the memory run
        if predict and not case.filter_eps:
            row["predicted_ms"] = PREDICTED_MS.get(case.backend)
        if case.backend == "naive" and "median_ms" in row:
            naive_ms[(case.loss, case.tokens)] = row["median_ms"]
        ctx.say(f"[{tag}] {row_id}: {_row_text(row)}")
        record.add({"id": row_id, **row})


def _row_text(row: dict) -> str:
    if "median_ms" not in row:
        return row.get("error", "")[:200]
    text = f"{row['median_ms']:.2f} ms, peak {row['peak_mem_mb']:.0f} MB"
    if row.get("ratio_to_floor"):
        text += f", {row['ratio_to_floor']:.2f}× floor"
    if row.get("filter_skipped_fraction") is not None:
        text += f", filter skipped {100 * row['filter_skipped_fraction']:.1f}% of tiles"
    return text + f" (H(p_s) {row['entropy_student']:.2f}, shared mass {row['shared_mass']:.3f})"


def stage_headline(ctx: Context, record: StageFile) -> None:
    record.data["notes"] = ctx.sizes.notes
    run_cases(ctx, record, headline_cases(ctx.sizes.headline, "reverse_kl", filtering=True), "2 headline", predict=True)
    write_plot(ctx)


def stage_sweep(ctx: Context, record: StageFile) -> None:
    record.data["notes"] = ctx.sizes.notes
    cases = []
    for tokens in ctx.sizes.sweep_tokens:
        cases += headline_cases(dict(ctx.sizes.headline, tokens=tokens), "reverse_kl", filtering=False)
    shape = dict(ctx.sizes.headline, tokens=ctx.sizes.loss_tokens)
    for loss in ("forward_kl", "jsd", "topk_overlap"):
        cases += headline_cases(shape, loss, filtering=False, topk_k=ctx.sizes.topk_ks[0])
    run_cases(ctx, record, cases, "3 sweep")
    write_plot(ctx)


def write_plot(ctx: Context) -> None:
    """``<stem>.png``: the headline's medians as bars against the floor and the prediction; time vs N."""
    from opd_fast._plotting import require_matplotlib

    try:
        plt = require_matplotlib()
    except RuntimeError as exc:
        ctx.say(f"no plot: {exc}")
        return
    headline = [r for r in ctx.stage_data(2).get("rows", []) if "median_ms" in r]
    sweep = [r for r in ctx.stage_data(3).get("rows", []) if "median_ms" in r and r["loss"] == "reverse_kl"]
    fig, (ax_bars, ax_lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [r["backend"] + (" ε" if r.get("filter_eps") else "") for r in headline]
    ax_bars.barh(labels, [r["median_ms"] for r in headline], color="tab:blue", label="measured")
    predicted = [(i, r["predicted_ms"]) for i, r in enumerate(headline) if r.get("predicted_ms")]
    for i, (low, high) in predicted:
        ax_bars.plot([low, high], [i, i], color="tab:orange", marker="|", markersize=14, linewidth=3)
    floors = [r["floor_ms"] for r in headline if r.get("floor_ms")]
    if floors:
        ax_bars.axvline(floors[0], color="black", linestyle="--", label=f"floor {floors[0]:.1f} ms")
    if predicted:
        ax_bars.plot([], [], color="tab:orange", marker="|", linewidth=3, label="issue-16 prediction")
    ax_bars.set_xlabel("median ms, reverse KL forward+backward")
    ax_bars.invert_yaxis()
    ax_bars.legend(fontsize="small")
    if headline:
        h = headline[0]
        ax_bars.set_title(f"N={h['tokens']}, Hs/Ht={h['hidden']}/{h['teacher_hidden']}, V={h['vocab']}, {h['dtype']}")
    by_backend: dict[str, list] = {}
    for r in headline + sweep:
        if not r.get("filter_eps"):
            by_backend.setdefault(r["backend"], []).append(r)
    for backend, mine in by_backend.items():
        mine = sorted({r["tokens"]: r for r in mine}.values(), key=lambda r: r["tokens"])
        ax_lines.plot([r["tokens"] for r in mine], [r["median_ms"] for r in mine], marker="o", label=backend)
    ax_lines.set_xscale("log", base=2)
    ax_lines.set_yscale("log")
    ax_lines.set_xlabel("tokens N")
    ax_lines.set_ylabel("median ms")
    ax_lines.grid(True, which="both", alpha=0.3)
    ax_lines.legend(fontsize="small")
    gpu = ctx.stage_data(0).get("env", {}).get("gpu") or "CPU rehearsal"
    fig.suptitle(f"opd_fast GPU verification, {gpu}")
    fig.tight_layout()
    fig.savefig(ctx.out / f"{ctx.stem}.png", dpi=110)
    plt.close(fig)


def stage_tests(ctx: Context, record: StageFile) -> None:
    """``pytest -m "gpu or device_semantics"`` (the GPU tier, and the CPU tests of what compiled kernels can get
    wrong that the interpreter does not: NaN handling) with a JUnit report, read back into per-test outcomes
    (failures with their message)."""
    import importlib.util
    import xml.etree.ElementTree as ElementTree

    junit = Path(tempfile.mkdtemp(prefix="gpu_verify-")) / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu or device_semantics", "-v", "-p", "no:cacheprovider"]
    command += ["--durations=10"]
    command += ["--junitxml", str(junit), *gpu_test_files()]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", "60"]  # one hung test must not take the whole box
    record.data["command"] = " ".join(command)
    record.save()
    ctx.say(f"[4 tests] {' '.join(command)}")
    try:
        status = subprocess.run(command, cwd=REPO, timeout=max(ctx.left() - 3, 1)).returncode
    except subprocess.TimeoutExpired:
        status = f"timed out after {max(ctx.left() - 3, 1):.0f} s (the log has the outcomes so far)"
    record.data["pytest_exit"] = status
    if not junit.exists():
        record.data["error"] = "pytest wrote no JUnit report"
        return
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", None
        for child, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(child)
            if found is not None:
                outcome, message = name, (found.get("message") or "").strip().splitlines()[:1]
                break
        totals[outcome] += 1
        if outcome != "passed":
            record.data["rows"].append(
                {
                    "id": test_id,
                    "outcome": outcome,
                    "message": message[0][:300] if message else "",
                    "seconds": float(case.get("time", 0)),
                }
            )
    record.data["totals"] = totals


def gpu_test_files() -> list[str]:
    """The test files that hold tests of stage 4 (``pytest.mark.gpu``, ``pytest.mark.device_semantics``):
    collecting only these saves the ~10 s of collecting the whole suite."""
    marks = ("mark.gpu", "mark.device_semantics")
    paths = sorted((REPO / "tests").glob("test_*.py"))
    return [str(path) for path in paths if any(mark in path.read_text() for mark in marks)]


NCU_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy")
NCU_LAUNCHES = 60


def find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    candidates = [*sorted(Path("/opt/nvidia/nsight-compute").glob("*/ncu")), Path("/usr/local/cuda/bin/ncu")]
    return next((str(p) for p in candidates if p.exists()), None)


def parse_ncu_csv(text: str) -> list[dict]:
    """Per-kernel metrics from ``ncu --csv --page details`` output: [{"kernel", "id", "metrics": {name: value}}].

    The report is one line per (kernel launch, metric) with columns "ID", "Kernel Name", "Section Name",
    "Metric Name", "Metric Unit", "Metric Value"; lines before its header (the program's own output, ncu's
    ``==PROF==`` notes) are skipped."""
    import csv

    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Metric Name"' in line and '"Metric Value"' in line), None)
    if start is None:
        return []
    reader = csv.DictReader(line for line in lines[start:] if line.startswith('"'))
    kernels: dict[str, dict] = {}
    name_column = next(
        (c for c in ("Kernel Name", "Function Name", "Demangled Name", "Name") if c in reader.fieldnames), None
    )
    for row in reader:
        launch = kernels.setdefault(row["ID"], {"id": row["ID"], "kernel": row.get(name_column, "?"), "metrics": {}})
        unit = row.get("Metric Unit") or ""
        launch["metrics"][row["Metric Name"] + (f" ({unit})" if unit else "")] = row["Metric Value"]
    return list(kernels.values())


def stage_ncu(ctx: Context, record: StageFile) -> None:
    ncu = find_ncu()
    step = [sys.executable, str(Path(__file__).resolve()), "--profile-step", "--out", str(ctx.out)]
    step += ["--stem", ctx.stem, "--box", "60"] + ["--rehearse"] * ctx.rehearse
    if ctx.device.type != "cuda" or ncu is None:
        reason = "no CUDA GPU" if ctx.device.type != "cuda" else "ncu is not on PATH nor in /opt/nvidia/nsight-compute"
        record.data["status_reason"] = f"skipped: {reason}; the profiled step ran without ncu"
        ctx.say(f"[5 ncu] {record.data['status_reason']}")
        status = subprocess.run(step, cwd=REPO, timeout=max(ctx.left() - 2, 1)).returncode
        record.data["step_exit"] = status
        return
    command = [ncu, "--clock-control", "none", "--target-processes", "all", "--nvtx", "--nvtx-include", "opd_step/"]
    command += ["--launch-count", str(NCU_LAUNCHES), "--csv", "--page", "details"]
    command += [arg for section in NCU_SECTIONS for arg in ("--section", section)]
    record.data["command"] = " ".join(command + step)
    record.save()
    ctx.say(f"[5 ncu] {record.data['command']}")
    result = subprocess.run(
        command + step, cwd=REPO, capture_output=True, text=True, errors="replace", timeout=max(ctx.left() - 3, 1)
    )
    for line in (result.stdout + result.stderr).splitlines():
        if not line.startswith('"'):
            ctx.say(f"[5 ncu] {line}")
    record.data["ncu_exit"] = result.returncode
    kernels = parse_ncu_csv(result.stdout)
    record.data["rows"] = [{"id": f"{k['id']}:{k['kernel'][:80]}", **k} for k in kernels]
    if not kernels:
        record.data["raw_tail"] = result.stdout[-4000:]
    for kernel in kernels:
        metrics = kernel["metrics"]
        picked = [f"{name}={value}" for name, value in metrics.items() if name.split(" (")[0] in NCU_SUMMARY]
        ctx.say(f"[5 ncu] {kernel['kernel'][:60]}: {', '.join(picked)}")


NCU_SUMMARY = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "Registers Per Thread", "Achieved Occupancy")


def profile_step(args: argparse.Namespace) -> int:
    """One forward+backward per backend (cuda, triton) in the NVTX range ``opd_step``, after warm-up calls
    outside it, so ``ncu --nvtx --nvtx-include opd_step/`` profiles only the measured kernels."""
    import contextlib

    import torch

    from opd_fast import bench

    ctx = Context(args)
    shape = dict(ctx.sizes.headline, tokens=ctx.sizes.profile_tokens)
    for backend in ("cuda", "triton"):
        case = bench.Case(backend, **shape, mode="fwd+bwd", inputs="peaked")
        reason = bench.unavailable_reason(backend, ctx.device, interpreter=ctx.sizes.interpreter)
        if reason is not None:
            print(f"profile step {backend}: skipped: {reason}", flush=True)
            continue
        fn, _ = bench.timed_call(case, bench.make_inputs(case, ctx.device))
        for _ in range(2):
            fn()
        cuda = ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        with torch.cuda.nvtx.range("opd_step") if cuda else contextlib.nullcontext():
            fn()
        if cuda:
            torch.cuda.synchronize()
        print(f"profile step {backend}: done", flush=True)
    return 0


STAGE_FUNCTIONS: dict[str, Callable[[Context, StageFile], None]] = {
    "env": stage_env,
    "correctness": stage_correctness,
    "headline": stage_headline,
    "sweep": stage_sweep,
    "tests": stage_tests,
    "ncu": stage_ncu,
}


def child_main(args: argparse.Namespace) -> int:
    stage = STAGES[args.child]
    record = StageFile(stage.path(args.out, args.stem), stage, args.box, args.resume)
    try:
        STAGE_FUNCTIONS[stage.name](Context(args), record)
    except ContextLost as exc:
        record.data["status"] = f"CUDA context lost ({str(exc)[:200]}); restarting after that row"
        record.save()
        return EXIT_CONTEXT_LOST
    except Exception as exc:
        record.data.update(status="failed", error=traceback.format_exc(limit=-3))
        record.save()
        print(f"[{stage.number} {stage.name}] failed: {type(exc).__name__}: {exc}", flush=True)
        return 0
    record.data["status"] = record.data.pop("status_reason", "done")
    record.save()
    return 0


def default_out() -> Path:
    """$OUT on the device machine (what is written there comes back), else a new temporary directory."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path(tempfile.mkdtemp(prefix="gpu_verify-"))


def parse_stages(text: str) -> set[int]:
    try:
        chosen = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected stage numbers such as 0,1,2, got {text!r}") from None
    if not chosen or not chosen <= {s.number for s in STAGES}:
        raise argparse.ArgumentTypeError(f"stages are 0 to {len(STAGES) - 1}, got {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results directory (default: $OUT if set, else a new temp dir)")
    parser.add_argument("--rehearse", action="store_true", help="the CPU rehearsal: interpreter, tiny shapes")
    parser.add_argument("--build", action="store_true", help="build the CUDA extension first (pip install -e .)")
    parser.add_argument("--budget", type=float, help="seconds for everything (default: 440 on a GPU, 155 rehearsing)")
    parser.add_argument(
        "--stages", type=parse_stages, default=set(range(len(STAGES))), help="e.g. 0,4,5 (default: all)"
    )
    parser.add_argument("--autotune", action="store_true", help="let Triton autotune (default: fixed configurations)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stem", help=argparse.SUPPRESS)
    parser.add_argument("--box", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_step:
        return profile_step(args)
    if args.child is not None:
        return child_main(args)
    args.out = (args.out or default_out()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget is None:
        args.budget = 155.0 if args.rehearse else 440.0
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
