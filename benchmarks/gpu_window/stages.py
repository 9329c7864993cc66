"""A stage's process: its JSON file rewritten after every row, what it knows (device, sizes, time box, ceilings), the
env stage, the tests stage, and the dispatch to the others."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpu_window import profiling
from gpu_window.config import REPO, STAGES, Stage, read_json, sizes, stage_data, write_json_atomic
from gpu_window.runner import EXIT_CONTEXT_LOST, nvidia_smi


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


def error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


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
    """What a stage process knows: the device, the sizes, its time box, where its files go, the ceilings."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.rehearse = args.rehearse
        self.sizes = sizes(args.rehearse)
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
        self.out, self.stem = args.out, args.stem
        self.deadline = time.monotonic() + args.box
        self._ceilings = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage_data(self, number: int) -> dict:
        return stage_data(self.out, self.stem, number)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def measured(self) -> dict:
        """The env stage's measured ceilings, or measured here when that stage did not get to them."""
        found = self.stage_data(0).get("ceilings") or {}
        if found.get("matmul_tflops_bf16") is None:
            found = profiling.measure_ceilings(self.device, self.sizes)
        return found

    def ceilings(self):
        """:class:`opd_fast.perf_model.DeviceCeilings` at the measured rates, for the model's predictions."""
        if self._ceilings is None:
            from opd_fast import perf_model

            measured = self.measured()
            self._ceilings = perf_model.DeviceCeilings(
                name=measured.get("device") or str(self.device),
                matmul_tflops=measured["matmul_tflops_bf16"],
                copy_gbps=measured["copy_gbps"],
                fp32_matmul_tflops=measured.get("matmul_tflops_fp32"),
            )
        return self._ceilings


def _package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


ENV_VARIABLES = (
    "OPD_FAST_TRITON_FIXED_CONFIG",
    "OPD_FAST_CUDA_ARCHS",
    "OPD_FAST_CHUNK_ELEMENTS",
    "OPD_FAST_DW_GEMM",
    "OPD_FAST_OVERLAP",
    "TRITON_INTERPRET",
    "TORCH_COMPILE_DISABLE",
    "PYTHONPATH",
)


def stage_env(ctx: Context, record: StageFile) -> None:
    """Versions, the device, the measured ceilings (first: every later stage predicts with them), which backends
    and peers can run and why not, and the addmm micro-benchmark at the headline's dW chunk shape."""
    import torch

    import opd_fast
    from opd_fast.bench import cases, runner

    env = runner.environment(ctx.device)
    env["packages"] = _package_versions(
        ("torch", "triton", "numpy", "transformers", "accelerate", "huggingface_hub", "datasets", "pyarrow", "fsspec",
         "dill", "multiprocess", "trl", "liger_kernel", "setuptools", "pytest", "matplotlib")
    )  # fmt: skip
    env["variables"] = {name: os.environ.get(name) for name in ENV_VARIABLES}
    env["opd_fast_from"] = str(Path(opd_fast.__file__).parent)  # the repository (editable or in place) or a copy
    if ctx.device.type == "cuda":
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
    ceilings = profiling.measure_ceilings(ctx.device, ctx.sizes)
    record.data["ceilings"] = ceilings
    record.save()
    ctx.say(
        f"[0 env] bf16 GEMM {ceilings['matmul_tflops_bf16']:.1f} TFLOP/s, fp32 {ceilings['matmul_tflops_fp32']:.1f}, "
        f"copy {ceilings['copy_gbps']:.0f} GB/s"
    )
    available = {}
    for name in cases.BENCH_BACKENDS:
        reason = cases.backend_skip_reason(name, ctx.device, interpreter=ctx.sizes.interpreter)
        available[name] = reason or "ok"
        ctx.say(f"[0 env] {name}: {reason or 'ok'}")
    record.data["backends"] = available
    record.save()
    try:
        record.data["addmm"] = profiling.addmm_microbenchmark(ctx.device, ctx.sizes.headline)
    except Exception as exc:  # its inputs did not fit, say: the stages after it do not need it
        record.data["addmm_error"] = error_line(exc)
        ctx.say(f"[0 env] addmm micro-benchmark: {record.data['addmm_error']}")
        return
    for line in profiling.format_addmm(record.data["addmm"]).splitlines():
        ctx.say(f"[0 env] {line}")


# Stage 1 runs these checks on the GPU already (every backend and plan against float64 at the realistic shape):
# the test stage leaves them out and keeps what only it checks (determinism, memory bounds, NaN semantics of the
# compiled kernels, custom-op registration, awkward small shapes).
STAGE_ONE_DUPLICATES = ("within_twice_plain_pytorch", "realistic_token_logprobs", "realistic_topk_overlap")
# In a rehearsal the other backends' tests are the CPU tier's own (interpreter, host build): torch's run, and the GPU
# tier is collected and skipped.
REHEARSAL_KEYWORD = "(torch or gpu)"
FIRST_TEST_FILES = ("test_numerics.py", "test_cuda_backend.py", "test_gpu.py")  # NaN semantics first


def pytest_command(junit: Path, rehearse: bool) -> list[str]:
    keyword = f"not ({' or '.join(STAGE_ONE_DUPLICATES)})"
    if rehearse:
        keyword = f"{REHEARSAL_KEYWORD} and {keyword}"
    command = [sys.executable, "-m", "pytest", "-m", "gpu or device_semantics", "-k", keyword, "-v"]
    command += ["-p", "no:cacheprovider", "--durations=10", "--junitxml", str(junit), *gpu_test_files()]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", "60"]  # one hung test must not take the whole box
    return command


def gpu_test_files() -> list[str]:
    """The test files that hold tests of the tests stage (``pytest.mark.gpu``, ``pytest.mark.device_semantics``),
    the NaN-semantics and CUDA files first: collecting only these saves collecting the whole suite."""
    marks = ("mark.gpu", "mark.device_semantics")
    paths = [path for path in sorted((REPO / "tests").rglob("test_*.py")) if any(m in path.read_text() for m in marks)]
    first = {name: rank for rank, name in enumerate(FIRST_TEST_FILES)}
    return [str(path) for path in sorted(paths, key=lambda path: first.get(path.name, len(first)))]


def stage_tests(ctx: Context, record: StageFile) -> None:
    """``pytest -m "gpu or device_semantics"`` less what stage 1 checked, with a JUnit report read back into
    per-test outcomes (failures with their message)."""
    import xml.etree.ElementTree as ElementTree

    junit = Path(tempfile.mkdtemp(prefix="gpu_verify-")) / "junit.xml"
    command = pytest_command(junit, ctx.rehearse)
    record.data["command"] = " ".join(command)
    record.save()
    ctx.say(f"[5 tests] {' '.join(command)}")
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
                    "id": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "message": message[0][:300] if message else "",
                    "seconds": float(case.get("time", 0)),
                }
            )
    record.data["totals"] = totals


def stage_functions() -> dict:
    from gpu_window import correctness, timing

    return {
        "env": stage_env,
        "correctness": correctness.stage_correctness,
        "headline": timing.stage_headline,
        "sweep": timing.stage_sweep,
        "peers": timing.stage_peers,
        "tests": stage_tests,
    }


def child_main(args: argparse.Namespace) -> int:
    stage = STAGES[args.child]
    record = StageFile(stage.path(args.out, args.stem), stage, args.box, args.resume)
    try:
        stage_functions()[stage.name](Context(args), record)
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
