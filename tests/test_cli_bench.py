"""`opd-fast bench`: the DESIGN.md §4 contract on a tiny CPU case."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd_fast.bench import Case, run_case
from opd_fast.cli import main

REPO = Path(__file__).resolve().parent.parent

ROW_KEYS = {
    "backend",
    "tokens",
    "hidden",
    "teacher_hidden",
    "vocab",
    "dtype",
    "mode",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
}


def test_bench_writes_json_plot_and_table(tmp_path, capsys):
    out_json, out_png, out_csv = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.csv"
    args = [
        "bench",
        "--device",
        "cpu",
        "--backends",
        "naive,torch,cuda,liger",
        "--tokens",
        "64",
        "128",
        "--hidden",
        "16",
        "--teacher-hidden",
        "24",
        "--vocab",
        "1000",
        "--repeats",
        "2",
        "--modes",
        "fwd,fwd+bwd",
        "--json",
        str(out_json),
        "--csv",
        str(out_csv),
        "--plot",
        str(out_png),
    ]
    assert main(args) == 0
    data = json.loads(out_json.read_text())
    assert {"python", "torch", "triton", "gpu", "commit"} <= set(data["env"])
    rows = data["results"]
    assert len(rows) == 2 * 2 * 4
    measured = [r for r in rows if r["backend"] in ("naive", "torch")]
    assert all(set(r) >= ROW_KEYS and "error" not in r for r in measured)
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in measured)
    for r in measured:  # the matmul floor: 2·N·V·(Hs+Ht) forward, plus 4·N·V·Hs backward
        floor = 2 * r["tokens"] * 1000 * (16 + 24) + (4 * r["tokens"] * 1000 * 16 if r["mode"] == "fwd+bwd" else 0)
        assert r["floor_gflop"] == pytest.approx(floor / 1e9)
        assert r["effective_tflops"] == pytest.approx(floor / (r["median_ms"] * 1e-3) / 1e12)
    import csv

    with open(out_csv) as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(rows) and csv_rows[0]["env_torch"] == data["env"]["torch"]
    assert all(r["error"].startswith("skipped:") for r in rows if r["backend"] in ("cuda", "liger"))
    torch_rows = {(r["tokens"], r["mode"]): r for r in rows if r["backend"] == "torch"}
    naive_rows = {(r["tokens"], r["mode"]): r for r in rows if r["backend"] == "naive"}
    for key, row in torch_rows.items():
        assert (row["hidden"], row["teacher_hidden"], row["vocab"]) == (16, 24, 1000)
        assert row["peak_mem_mb"] < naive_rows[key]["peak_mem_mb"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "vs naive" in table and "faster" in table


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--backends", "naive,jax"])
    assert "unknown backend 'jax'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--tokens", "0"])


def test_failed_case_becomes_an_error_row():
    row = run_case(Case("naive", 8, 4, 4, 2**40, "fp32", "fwd"), "cpu")
    assert row["error"].startswith("out of memory") and "median_ms" not in row


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "opd_fast.cli", "bench", "--help"], capture_output=True, text=True, check=True
    )
    assert "--preset" in out.stdout and "--json" in out.stdout


def test_baselines_agree_with_our_loss():
    """The comparison is fair: every baseline computes the same reverse KL (value and gradients)."""
    import torch

    from opd_fast import linear_reverse_kl
    from opd_fast.bench import loss_function, make_inputs, unavailable_reason

    case = Case("naive", 37, 8, 12, 300, "fp32", "fwd+bwd")
    inputs = list(make_inputs(case, torch.device("cpu")).values())
    expected = linear_reverse_kl(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs[:2])
    for name in ("naive", "compile", "liger_chunked"):
        if unavailable_reason(name, torch.device("cpu")):
            continue
        loss = loss_function(name)(*inputs)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=name)
        for a, b in zip(torch.autograd.grad(loss, inputs[:2]), expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def _gpu_verify():
    spec = importlib.util.spec_from_file_location("gpu_verify", REPO / "benchmarks" / "gpu_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_verify_targets_on_the_committed_cpu_results():
    results = json.loads((REPO / "benchmarks" / "results" / "cpu-2core-2026-11-22.json").read_text())["results"]
    verdicts = {v["tokens"]: v for v in _gpu_verify().check_targets(results)}
    assert sorted(verdicts) == [1024, 2048, 4096]
    rows = {(r["backend"], r["tokens"]): r for r in results}
    at_4096 = verdicts[4096]
    assert at_4096["backend"] == "torch"  # triton/cuda are skipped rows on CPU and must not count
    assert at_4096["speedup_vs_naive"] == pytest.approx(rows["naive", 4096]["median_ms"] / at_4096["median_ms"])
    assert at_4096["rival"] == "liger_chunked"  # liger (fused) is skipped on CPU: the chunked path is the rival
    assert at_4096["meets_naive"] and at_4096["meets_memory"]
    assert not verdicts[1024]["meets_naive"]  # 2.5× at N=1024: below the 3× target


def test_gpu_verify_falls_back_to_compile_and_flags_missing_rows():
    row = {"tokens": 8, "peak_mem_mb": 1.0}
    results = [
        {**row, "backend": "naive", "median_ms": 10.0, "peak_mem_mb": 100.0},
        {**row, "backend": "triton", "median_ms": 2.0},
        {**row, "backend": "cuda", "median_ms": 3.0},
        {**row, "backend": "compile", "median_ms": 2.2},
        {**row, "backend": "liger", "error": "skipped: no Liger-Kernel"},
        {**row, "tokens": 16, "backend": "torch", "median_ms": 1.0},
    ]
    module = _gpu_verify()
    eight, sixteen = module.check_targets(results)
    assert eight["backend"] == "triton" and eight["rival"] == "compile"
    assert eight["speedup_vs_rival"] == pytest.approx(1.1) and not eight["meets_rival"]
    assert eight["meets_naive"] and eight["meets_memory"]
    assert "error" in sixteen
    table = module.format_targets([eight, sixteen])
    assert "NO" in table and "needs a row of ours and a naive row" in table
