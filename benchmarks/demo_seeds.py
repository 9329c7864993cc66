"""The built-in demo (``opd-fast train``) over several seeds: what its OPD-vs-SFT comparison shows, and how much of
it varies between runs.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--jobs 2] [--out runs/demo_seeds] [--docs docs]

Runs ``opd-fast train --out <out>/seed-<s> seed=<s>`` once per seed (each seed trains its own teacher and student
from its own random initialization, and samples its own prompts), ``--jobs`` at a time, then writes
``<docs>/demo_summary.json`` (per seed: the accuracies, both students' curves, the first step at which each reaches
90%, the mean accuracy over the run's evaluations and the wall time; across seeds: mean, min and max, and in how
many seeds OPD is ahead) and ``<docs>/demo_accuracy_vs_steps.png`` (every seed's curves). With ``--jobs`` above 1
the runs share the CPU, so their wall times are not the demo's own: time it alone with ``time opd-fast train``.
Not a test: about a minute and a half per seed on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opd_fast._plotting import require_matplotlib, save_figure
from opd_fast.trainer.demo import COLD_START_STEPS, accuracy_curve

TARGET = 0.9  # "steps to 90%": the first evaluation at or above it


def run_seed(seed: int, out: Path) -> dict:
    """One demo run (a subprocess, as a user runs it); returns its summary and both curves."""
    run_dir = out / f"seed-{seed}"
    log = out / f"seed-{seed}.log"
    command = [sys.executable, "-m", "opd_fast.cli", "train", "--out", str(run_dir), f"seed={seed}"]
    with log.open("w") as stream:
        status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False).returncode
    if status != 0:
        raise SystemExit(f"seed {seed}: `{' '.join(command)}` exited with {status}; see {log}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        **summary,
        "opd_curve": accuracy_curve(run_dir / "metrics.jsonl"),
        "sft_curve": accuracy_curve(run_dir / "demo" / "sft_only" / "metrics.jsonl"),
    }


def first_step_at(curve: tuple[list[int], list[float]], target: float) -> int | None:
    return next((step for step, value in zip(*curve) if value >= target), None)


def describe(runs: list[dict]) -> dict:
    """Per-seed figures and their spread across seeds."""
    per_seed = []
    for run in runs:
        opd_steps, opd = run["opd_curve"]
        sft_steps, sft = run["sft_curve"]
        if opd_steps != sft_steps:
            raise SystemExit(f"seed {run['seed']}: the two students were evaluated at different steps")
        per_seed.append(
            {
                "seed": run["seed"],
                "teacher_accuracy": run["teacher_accuracy"],
                "student_accuracy_before": run["student_accuracy_before"],
                "opd_accuracy_after": run["student_accuracy_after"],
                "sft_only_accuracy_after": run["sft_only_accuracy_after"],
                "opd_steps_to_90": first_step_at(run["opd_curve"], TARGET),
                "sft_only_steps_to_90": first_step_at(run["sft_curve"], TARGET),
                "opd_mean_accuracy_over_run": statistics.fmean(opd[1:]),
                "sft_only_mean_accuracy_over_run": statistics.fmean(sft[1:]),
                "evaluations_with_opd_ahead": sum(o > s for o, s in zip(opd[1:], sft[1:])),
                "evaluations_with_sft_ahead": sum(s > o for o, s in zip(opd[1:], sft[1:])),
                "demo_seconds": run["demo_seconds"],
                "opd_curve": run["opd_curve"],
                "sft_only_curve": run["sft_curve"],
            }
        )
    spread = {}
    for key in (
        "teacher_accuracy",
        "opd_accuracy_after",
        "sft_only_accuracy_after",
        "opd_mean_accuracy_over_run",
        "sft_only_mean_accuracy_over_run",
        "demo_seconds",
    ):
        values = [seed[key] for seed in per_seed]
        spread[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    spread["seeds_with_opd_ahead_at_the_end"] = sum(
        s["opd_accuracy_after"] > s["sft_only_accuracy_after"] for s in per_seed
    )
    spread["seeds_with_sft_ahead_at_the_end"] = sum(
        s["sft_only_accuracy_after"] > s["opd_accuracy_after"] for s in per_seed
    )
    spread["seeds_where_opd_reaches_90_first"] = sum(
        s["opd_steps_to_90"] is not None
        and (s["sft_only_steps_to_90"] is None or s["opd_steps_to_90"] < s["sft_only_steps_to_90"])
        for s in per_seed
    )
    return {"per_seed": per_seed, "across_seeds": spread}


def plot(result: dict, path: Path) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for index, seed in enumerate(result["per_seed"]):
        label = "" if index else "{} (one line per seed)"
        ax.plot(*seed["opd_curve"], color="tab:blue", marker="o", markersize=3, label=label.format("OPD reverse KL"))
        ax.plot(
            *seed["sft_only_curve"],
            color="tab:orange",
            linestyle="--",
            marker="s",
            markersize=3,
            label=label.format("SFT-only on teacher samples"),
        )
    teacher = result["across_seeds"]["teacher_accuracy"]["mean"]
    ax.axhline(teacher, linestyle=":", color="gray", linewidth=1)
    ax.text(
        0.01,
        teacher,
        f"teacher {teacher:.1%} (mean)",
        va="top",
        ha="left",
        fontsize=8,
        color="gray",
        transform=ax.get_yaxis_transform(),
    )
    ax.set_xlabel(f"training step (after the {COLD_START_STEPS}-step cold start)")
    ax.set_ylabel("held-out accuracy (greedy, 256 prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    seeds = ", ".join(str(seed["seed"]) for seed in result["per_seed"])
    ax.set_title(f"opd-fast train demo: anagrams, seeds {seeds}")
    return save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="demo runs at a time (each uses one CPU thread)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda seed: run_seed(seed, args.out), args.seeds))
    result = {
        "command": " ".join(["python", "benchmarks/demo_seeds.py", *sys.argv[1:]]),
        "task": runs[0]["task"],
        "steps": runs[0]["steps"],
        "jobs": args.jobs,
        **describe(runs),
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "demo_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.docs / "demo_accuracy_vs_steps.png")
    print(json.dumps(result["across_seeds"], indent=2))


if __name__ == "__main__":
    main()
