"""`opd-fast bench`: the DESIGN.md §4 contract on a tiny CPU case."""

import json
import subprocess
import sys

import pytest

from opd_fast.bench import Case, run_case
from opd_fast.cli import main

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
