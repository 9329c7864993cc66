"""Issue 11 in one go on a GPU machine: build, verify, profile, benchmark, check the targets.

    python benchmarks/gpu_verify.py [--out benchmarks/results] [--tokens 4096 8192 16384] [--skip-tests]
                                    [--profile] [--build]

Steps, each logged with its wall time to ``<out>/<gpu>-<date>-verify.log``:

1. environment: ``nvidia-smi``, torch / triton / CUDA versions;
2. ``--build``: ``pip install --no-build-isolation --no-deps -e .`` so setup.py compiles the CUDA
   extension against this machine's torch (the machine has no internet, hence no isolation and no deps),
   then checks that ``backend="cuda"`` is available;
3. the GPU test tier: ``pytest -m gpu`` (triton and cuda backends, bf16/fp16/fp32, realistic shapes,
   determinism), with a JUnit XML report;
4. ``--profile``: ``ncu`` on one Triton forward+backward at N=4096 (the two kernels' achieved occupancy,
   SM throughput and DRAM throughput) when ncu is on PATH;
5. the benchmark sweep of the issue — N ∈ --tokens, Hs=4096, Ht=5120, V=151936, bf16, forward+backward,
   every backend side by side in one run — written as ``<gpu>-<date>.json`` (``opd-fast bench --json``
   format), ``.csv`` and ``.png``;
6. the targets, per N, for our fastest backend: ≥ 3× faster than ``naive``, ≥ 1.2× faster than the faster
   of ``liger`` and ``liger_chunked`` (``compile`` when Liger-Kernel cannot run), peak extra memory ≤ 5% of
   ``naive``'s; printed as a table and saved as ``<gpu>-<date>-targets.json``. The exit status is 1 when a
   target is missed, so a CI job on a GPU runner can gate on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("triton", "cuda", "torch")
SPEEDUP_VS_NAIVE = 3.0
SPEEDUP_VS_LIGER = 1.2
MEMORY_FRACTION = 0.05


def check_targets(results: list[dict]) -> list[dict]:
    """Per token count: our fastest backend against the baselines, and whether each target is met.

    ``results`` are ``opd-fast bench --json`` rows of one dtype and mode; rows with an ``error`` do not
    count. The Liger comparison uses the faster of its two paths, or torch.compile when neither ran.
    """
    by_tokens: dict[int, dict[str, dict]] = {}
    for row in results:
        if "error" not in row:
            by_tokens.setdefault(row["tokens"], {})[row["backend"]] = row
    verdicts = []
    for tokens, rows in sorted(by_tokens.items()):
        ours = [rows[name] for name in OURS if name in rows]
        if not ours or "naive" not in rows:
            verdicts.append({"tokens": tokens, "error": "needs a row of ours and a naive row"})
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        naive = rows["naive"]
        rivals = [rows[name] for name in ("liger", "liger_chunked") if name in rows] or (
            [rows["compile"]] if "compile" in rows else []
        )
        verdict = {
            "tokens": tokens,
            "backend": best["backend"],
            "median_ms": best["median_ms"],
            "speedup_vs_naive": naive["median_ms"] / best["median_ms"],
            "memory_fraction_of_naive": best["peak_mem_mb"] / naive["peak_mem_mb"],
        }
        verdict["meets_naive"] = verdict["speedup_vs_naive"] >= SPEEDUP_VS_NAIVE
        verdict["meets_memory"] = verdict["memory_fraction_of_naive"] <= MEMORY_FRACTION
        if rivals:
            rival = min(rivals, key=lambda r: r["median_ms"])
            verdict["rival"] = rival["backend"]
            verdict["speedup_vs_rival"] = rival["median_ms"] / best["median_ms"]
            verdict["meets_rival"] = verdict["speedup_vs_rival"] >= SPEEDUP_VS_LIGER
        else:
            verdict["meets_rival"] = False
            verdict["rival"] = None
        if "fraction_of_matmul_rate" in best:
            verdict["fraction_of_matmul_rate"] = best["fraction_of_matmul_rate"]
        verdicts.append(verdict)
    return verdicts


def format_targets(verdicts: list[dict]) -> str:
    lines = [f"{'N':>6} {'ours':>7} {'ms':>9} {'×naive':>7} {'×rival':>7} {'rival':>14} {'mem/naive':>9}  met"]
    for v in verdicts:
        if "error" in v:
            lines.append(f"{v['tokens']:>6} {v['error']}")
            continue
        met = all(v[key] for key in ("meets_naive", "meets_rival", "meets_memory"))
        rival = f"{v['speedup_vs_rival']:>7.2f}" if v["rival"] else f"{'-':>7}"
        lines.append(
            f"{v['tokens']:>6} {v['backend']:>7} {v['median_ms']:>9.2f} {v['speedup_vs_naive']:>7.2f} {rival} "
            f"{v['rival'] or 'none':>14} {v['memory_fraction_of_naive']:>9.3%}  {'yes' if met else 'NO'}"
        )
    return "\n".join(lines)


class Log:
    """Runs the steps, echoing and appending each command's output to one log file."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def write(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as handle:
            handle.write(text + "\n")

    def run(self, title: str, command: list[str], check: bool = True) -> int:
        self.write(f"\n=== {title}: {' '.join(command)}")
        started = time.perf_counter()
        process = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        self.write(process.stdout + process.stderr)
        self.write(f"=== {title}: exit {process.returncode} in {time.perf_counter() - started:.1f} s")
        if check and process.returncode != 0:
            raise SystemExit(f"{title} failed (exit {process.returncode}); see {self.path}")
        return process.returncode


def gpu_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_verify needs a CUDA GPU (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name(0).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("nvidia-", "")


def main(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu_slug()}-{datetime.date.today().isoformat()}"
    log = Log(out / f"{stem}-verify.log")
    python = sys.executable
    log.run("environment", ["nvidia-smi"], check=False)
    log.run(
        "versions",
        [python, "-c", "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"],
    )
    if args.build:
        log.run("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."])
    log.run(
        "backends",
        [
            python,
            "-c",
            "import torch; from opd_fast import backends; "
            "print({b: backends.unavailable_reason(b, torch.device('cuda')) or 'ok' for b in ('triton', 'cuda')})",
        ],
        check=False,
    )
    failures = 0
    if not args.skip_tests:
        junit = str(out / f"{stem}-gpu-tests.xml")
        failures += log.run("GPU test tier", [python, "-m", "pytest", "-m", "gpu", "-q", "--junitxml", junit], False)
    if args.profile:
        if shutil.which("ncu") is None:
            log.write("ncu not on PATH: no profile")
        else:
            profile = [python, str(REPO / "benchmarks" / "profile_step.py"), "--tokens", "4096"]
            ncu = ["ncu", "--set", "basic", "--nvtx", "--nvtx-include", "opd_step/", "--target-processes", "all"]
            log.run("ncu", [*ncu, *profile], check=False)
    bench = [
        *("opd-fast", "bench", "--device", "cuda", "--dtype", "bf16", "--modes", "fwd+bwd"),
        *("--tokens", *map(str, args.tokens), "--hidden", "4096", "--teacher-hidden", "5120", "--vocab", "151936"),
        *("--repeats", str(args.repeats), "--warmup", "3"),
        *("--json", str(out / f"{stem}.json"), "--csv", str(out / f"{stem}.csv"), "--plot", str(out / f"{stem}.png")),
    ]
    log.run("benchmark sweep", bench)
    results = json.loads((out / f"{stem}.json").read_text())["results"]
    verdicts = check_targets(results)
    (out / f"{stem}-targets.json").write_text(json.dumps(verdicts, indent=2))
    log.write("\n=== targets (ours: fastest of triton/cuda/torch)\n" + format_targets(verdicts))
    missed = [v for v in verdicts if "error" in v or not (v["meets_naive"] and v["meets_rival"] and v["meets_memory"])]
    return 1 if failures or missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--build", action="store_true", help="compile the CUDA extension first")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    parser.add_argument("--profile", action="store_true", help="ncu profile of one step (needs ncu)")
    sys.exit(main(parser.parse_args()))
