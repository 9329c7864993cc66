"""The summary printed last (a device call returns only the output's tail): setup and stage outcomes, the addmm
micro-benchmark, the headline table with predicted beside measured, the kernel profile against the model, and the
targets per N, measured and predicted. Standard library only."""

from __future__ import annotations

from pathlib import Path

from gpu_window import profiling
from gpu_window.config import STAGES, benchmark_rows, read_json, stage_data
from gpu_window.targets import (
    FLOOR_RATIO,
    OURS,
    RIVALS,
    SPEEDUP_VS_NAIVE,
    SPEEDUP_VS_RIVAL,
    check_targets,
    comparable,
    row_verdict,
)


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def stage_line(number: int, name: str, data: dict) -> str:
    rows = data.get("rows", [])
    failed = sum(1 for r in rows if r.get("error") and not r["error"].startswith("skipped"))
    skipped = sum(1 for r in rows if str(r.get("error", "")).startswith("skipped"))
    counts = f"{len(rows) - failed - skipped} ok, {failed} failed, {skipped} skipped" if rows else ""
    if name == "tests":  # its rows are the tests that did not pass; the totals say it all
        counts = ", ".join(f"{v} {k}" for k, v in data.get("totals", {}).items())
    extra = ""
    if name == "env" and data.get("ceilings"):
        c = data["ceilings"]
        extra = f"GEMM bf16 {fmt(c.get('matmul_tflops_bf16'), '.0f')} TFLOP/s, "
        extra += f"fp32 {fmt(c.get('matmul_tflops_fp32'), '.1f')}, copy {fmt(c.get('copy_gbps'), '.0f')} GB/s"
    if name == "correctness":
        checks = [r for r in rows if "passed" in r]
        extra = f"{sum(r['passed'] for r in checks)}/{len(checks)} checks passed"
        wrong = [r["id"] for r in checks if not r["passed"]]
        extra += f"; not passed: {', '.join(wrong)}" if wrong else ""
    if data.get("model_error"):
        extra += f" (no predictions: {data['model_error'][:100]})"
    return f"stage {number} {name:<12} {data.get('status', '?'):<22} {counts} {extra}".rstrip()


def summary(out: Path, stem: str) -> str:
    env = stage_data(out, stem, 0)
    runner = env.get("runner", {})
    setup = [f"{step} {runner[step]['status']}" for step in ("wheels", "build") if step in runner]
    lines = ["=== summary", "setup: " + (" | ".join(setup) or "none")]
    for stage in STAGES:
        data = read_json(stage.path(out, stem))
        if data is not None:
            lines.append(stage_line(stage.number, stage.name, data))
    if env.get("addmm"):
        lines += ["", profiling.format_addmm(env["addmm"])]
    rows = benchmark_rows(out, stem)
    headline = stage_data(out, stem, 2)
    if headline.get("rows"):
        tokens = headline["rows"][0]["tokens"]
        lines += ["", headline_table([r for r in rows if r["tokens"] == tokens and r.get("loss") == "reverse_kl"])]
    for backend, data in headline.get("profile", {}).items():
        lines += ["", profiling.format_profile(f"kernel profile, {backend}", data)]
    if rows:
        lines += ["", "targets (reverse KL), measured:", format_targets(check_targets(rows))]
        lines += ["targets, predicted by the model at the measured ceilings:"]
        lines += [format_targets(check_targets(rows, predicted=True))]
        lines += [
            f"targets: ≤ {FLOOR_RATIO}× floor, ≥ {SPEEDUP_VS_NAIVE}× naive, ≥ {SPEEDUP_VS_RIVAL}× the fastest of "
            f"{', '.join(RIVALS)}; filtered rows below the dense floor"
        ]
    return "\n".join(lines)


def _pair(measured, predicted, spec: str) -> str:
    """``measured/predicted``, each "-" where missing."""
    return f"{fmt(measured, spec)}/{fmt(predicted, spec)}"


def _met(verdict: dict | None) -> str:
    return "-" if verdict is None else "yes" if verdict["met"] else "NO"


def headline_table(rows: list[dict]) -> str:
    """Every row at the headline N: measured and predicted ms, and measured/predicted ratio to the floor, speed-up
    over naive and over the fastest rival, peak memory, and whether the row meets the targets (m/p)."""
    named = {
        predicted: comparable(rows, predicted).get(("reverse_kl", rows[0]["tokens"]), {}) for predicted in (False, True)
    }
    header = f"{'row':<30} {'ms':>8} {'pred.':>8} {'×floor m/p':>11} {'×naive m/p':>11} {'×rival m/p':>11} "
    header += f"{'peak GB':>7} {'met m/p':>7}"
    lines = [f"headline N={rows[0]['tokens']} (reverse KL fwd+bwd; rival: fastest of {', '.join(RIVALS)})", header]
    lines.append("-" * len(header))
    floor = next((r["floor_ms"] for r in rows if r.get("floor_ms")), None)
    for r in rows:
        label = r["id"].split("/", 2)[2]
        if "median_ms" not in r and "predicted_ms" not in r:
            lines.append(f"{label:<30} {r.get('error', '')[:100]}")
            continue
        ours = r["backend"] in OURS
        m = row_verdict(r, named[False]) if ours else None
        p = row_verdict(r, named[True], predicted=True) if ours else None
        ratio_m = r.get("ratio_to_floor")
        ratio_p = r["predicted_ms"] / r["predicted_floor_ms"] if r.get("predicted_floor_ms") else None
        met = f"{_met(m)}/{_met(p)}"
        peak = r.get("peak_mem_mb")
        lines.append(
            f"{label:<30} {fmt(r.get('median_ms'), '.4g'):>8} {fmt(r.get('predicted_ms'), '.4g'):>8} "
            f"{_pair(ratio_m, ratio_p, '.2f'):>11} "
            f"{_pair(m and m['speedup_vs_naive'], p and p['speedup_vs_naive'], '.2f'):>11} "
            f"{_pair(m and m['speedup_vs_rival'], p and p['speedup_vs_rival'], '.2f'):>11} "
            f"{fmt(None if peak is None else peak / 1024, '7.2f'):>7} {met:>7}"
            + ("" if "median_ms" in r else f"  {r.get('error', '')[:50]}")
        )
    if floor is not None:
        lines.append(f"floor at the measured GEMM rate: {floor:.1f} ms")
    return "\n".join(lines)


def format_targets(verdicts: list[dict]) -> str:
    header = f"{'N':>6} {'ours':>16} {'ms':>9} {'×floor':>6} {'×naive':>7} {'×rival':>7} {'rival':>14} {'mem/naive':>9}"
    lines = [header + "  met  | filtered (peaked inputs): ms, skipped, below the floor"]
    for v in verdicts:
        if "error" in v:
            lines.append(f"{v['tokens']:>6} {v['error']}")
            continue
        line = (
            f"{v['tokens']:>6} {v['backend']:>16} {v['median_ms']:>9.2f} {fmt(v['ratio_to_floor'], '6.2f'):>6} "
            f"{v['speedup_vs_naive']:>7.2f} {fmt(v['speedup_vs_rival'], '7.2f'):>7} {v['rival'] or 'none':>14} "
            f"{fmt(v['memory_fraction_of_naive'], '.3%'):>9}  {'yes' if v['met'] else 'NO ':<3}  | "
        )
        filtered = v.get("filtered")
        if filtered is None:
            line += "no filtered row"
        else:
            below = {None: "no floor", True: "yes", False: "NO"}[filtered["below_floor"]]
            skipped = fmt(filtered["skipped_fraction"], ".1%", "?")
            line += f"{filtered['backend']} {filtered['median_ms']:.2f} ms, {skipped} skipped, {below}"
        lines.append(line.rstrip())
    return "\n".join(lines)
