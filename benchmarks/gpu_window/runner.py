"""The runner: setup (wheels, build) and one child process per stage within the budget, then the summary.

Standard library only: it must work before anything is installed or built. No setup step ends the call: a missing
wheel folder is a note, a failed install or build is recorded and the stages run on what is there.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from gpu_window import report
from gpu_window.config import (
    BUILD_SECONDS,
    DEFAULT_BUDGET,
    REPO,
    STAGES,
    WHEELS_SECONDS,
    benchmark_rows,
    read_json,
    write_json_atomic,
)
from gpu_window.targets import check_targets

ENTRY = REPO / "benchmarks" / "gpu_verify.py"  # the children start through the same script
EXIT_CONTEXT_LOST = 75  # a child's exit status after a sticky CUDA error: the runner restarts it after that row
MAX_RESTARTS = 3
MARGIN_SECONDS = 10  # kept free at the end of the budget for the summary
SITE = Path(tempfile.gettempdir()) / "gpu_window-site"  # where the carried wheels are installed


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


def run_streamed(command: list[str], log: Log, timeout: float, env: dict | None) -> tuple[int | None, float]:
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
        start_new_session=True,  # its own process group: the kill takes its children (pytest, pip) too
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


class Runner:
    """Runs the setup and the stages within the budget and keeps their outcome in the env file's "runner"."""

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

    def setup_step(self, name: str, step) -> None:
        """Run one setup step; whatever it raises is recorded under ``name`` and the window goes on."""
        try:
            step()
        except Exception:
            error = traceback.format_exc(limit=-2)
            self.record[name] = {"status": f"failed: {error.strip().splitlines()[-1]}", "traceback": error}
            self.log.write(f"=== {name}: failed, going on without it\n{error}")

    def install_wheels(self) -> None:
        """The carried wheels (Liger-Kernel, TRL and what they need) into a folder the stages import from. None there
        is a note: the peers that need them become skipped rows. If the install of all of them fails, each is tried
        alone, so that one bad wheel does not keep the others out."""
        folder = self.args.wheels
        wheels = sorted(str(p) for p in folder.glob("*.whl")) if folder.is_dir() else []
        if not wheels:
            status = f"skipped: no wheels in {folder}; the stages use what is installed"
        elif self.args.rehearse:
            status = "skipped: a rehearsal installs nothing"
        else:
            command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            command += ["--no-cache-dir", "--upgrade", "--target", str(SITE)]
            self.log.write(f"\n=== wheels: {len(wheels)} from {folder} into {SITE}")
            box = min(WHEELS_SECONDS, self.left() - MARGIN_SECONDS)
            outcome, _ = run_streamed(command + wheels, self.log, box, self.env)
            failed = [] if outcome == 0 else [Path(wheel).name for wheel in wheels]
            if outcome != 0 and len(wheels) > 1:
                failed = []
                for wheel in wheels:
                    alone, _ = run_streamed([*command, wheel], self.log, box / 4, self.env)
                    failed += [] if alone == 0 else [Path(wheel).name]
            status = "ok" if not failed else f"failed: {', '.join(failed)}"
            self.record["wheels"] = {"installed": len(wheels) - len(failed), "failed": failed}
            if SITE.is_dir():
                self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), self.env.get("PYTHONPATH")]))
        self.record.setdefault("wheels", {})["status"] = status
        self.log.write(f"=== wheels: {status}")

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
        the package still imports (pure Python): torch, Triton and the peers run, cuda says why not."""
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

    def run_stage(self, stage) -> None:
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
            command = [sys.executable, str(ENTRY), "--child", str(stage.number)]
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
        self.setup_step("wheels", self.install_wheels)
        if self.args.build:
            self.setup_step("build", self.build)
        for stage in STAGES:
            if stage.number in self.args.stages:
                self.setup_step(f"stage {stage.number}", lambda stage=stage: self.run_stage(stage))
                self.save_record()
        for partial in self.out.glob("*.partial"):  # a stage killed mid-write: only 8 files come back from $OUT
            partial.unlink()
        self.record["seconds"] = round(time.monotonic() - self.started, 1)
        rows = benchmark_rows(self.out, self.stem)
        self.record["targets"] = {"measured": check_targets(rows), "predicted": check_targets(rows, predicted=True)}
        self.save_record()
        try:
            self.log.write("\n" + report.summary(self.out, self.stem))
        except Exception:
            self.log.write(f"=== summary failed (the files are complete):\n{traceback.format_exc(limit=-3)}")
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
    parser = argparse.ArgumentParser(description="GPU verification in one short window (benchmarks/README.md)")
    parser.add_argument("--out", type=Path, help="results directory (default: $OUT if set, else a new temp dir)")
    parser.add_argument("--rehearse", action="store_true", help="the CPU rehearsal: interpreter, tiny shapes")
    parser.add_argument("--build", action="store_true", help="build the CUDA extension first (pip install -e .)")
    parser.add_argument(
        "--wheels", type=Path, default=REPO / ".whl", help="wheels to install first, if any (default: .whl)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for everything (default: {DEFAULT_BUDGET['gpu']:.0f} on a GPU, "
        f"{DEFAULT_BUDGET['rehearsal']:.0f} rehearsing)",
    )
    parser.add_argument(
        "--stages", type=parse_stages, default=set(range(len(STAGES))), help="e.g. 0,4,5 (default: all)"
    )
    parser.add_argument("--autotune", action="store_true", help="let Triton autotune (default: fixed configurations)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stem", help=argparse.SUPPRESS)
    parser.add_argument("--box", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        from gpu_window.stages import child_main

        return child_main(args)
    args.out = (args.out or default_out()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget is None:
        args.budget = DEFAULT_BUDGET["rehearsal" if args.rehearse else "gpu"]
    return Runner(args).run()
