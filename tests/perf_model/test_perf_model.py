"""The performance model (opd_fast.perf_model): its FLOPs against torch's FLOP counter running the real ops, its
bytes against a hand count, the floor, the bench-row mapping, the table and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_pair
from torch.utils.flop_counter import FlopCounterMode

from opd_fast import chunk_budget, chunking, linear_divergence, perf_model
from opd_fast.bench import baselines, cases
from opd_fast.perf_model import DEVICES, DeviceCeilings, KernelCost, Workload, _ours, _peers, floor_ms, predict
from opd_fast.perf_model.__main__ import main as perf_main
from opd_fast.reference import materialized_divergence

DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]
HEADLINE = Workload(8192, 4096, 5120, 151936)


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _step(n, hs_dim, ht_dim, vocab, divergence="reverse_kl", beta=0.5, **options):
    hs, ws, ht, wt = (t.float() for t in make_pair(lead=(n,), hs_dim=hs_dim, ht_dim=ht_dim, vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    return lambda: linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, **options).backward()


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
@pytest.mark.parametrize(
    ("plan", "budget"),
    [("chunked", 16 * 101), ("chunked", 101 * 40), ("chunked", 48 * 16), ("streaming", 40 * 32)],
    ids=["3-chunks", "1-chunk", "vocab-tiled", "streaming"],
)
def test_sweep_flops_match_the_flop_counter(plan, budget, divergence, beta):
    """The model's GEMM FLOPs of our plans are what torch's FLOP counter sees the torch backend run (the sweep and
    its GEMMs are shared by every backend), at budgets giving several chunks, one, vocabulary tiles, streaming."""
    n, hs_dim, ht_dim, vocab = 40, 16, 24, 101
    cpu, cuda = (chunking.plan_tiles(n, vocab, budget, plan=plan, device=d) for d in ("cpu", "cuda"))
    assert (cpu.rows, cpu.cols) == (cuda.rows, cuda.cols)  # the model plans for CUDA; the run is on the CPU
    with chunk_budget(budget):
        counted = _counted_flops(_step(n, hs_dim, ht_dim, vocab, divergence, beta, backend="torch", plan=plan))
    workload = Workload(n, hs_dim, ht_dim, vocab, "fp32", divergence)
    assert predict(plan, workload, "h200", backend="cuda", budget=budget).flops == counted
    if plan == "chunked" and cpu.vocab_tiles == 1 and divergence != "jsd":
        assert predict(plan, workload, "h200", backend="torch", budget=budget).flops == counted
    if plan == "chunked" and cpu.vocab_tiles == 1:
        single = predict(plan, workload, "h200", backend="cuda", budget=budget, dw_gemm="single")
        with chunk_budget(budget), chunking.dw_gemm("single"):
            assert single.flops == counted == _counted_flops(_step(n, hs_dim, ht_dim, vocab, divergence, beta))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_naive_flops_match_the_flop_counter(divergence):
    n, hs_dim, ht_dim, vocab = 24, 8, 12, 64
    hs, ws, ht, wt = (t.float() for t in make_pair(lead=(n,), hs_dim=hs_dim, ht_dim=ht_dim, vocab=vocab))
    hs, ws = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    counted = _counted_flops(lambda: materialized_divergence(hs, ws, ht, wt, divergence=divergence).backward())
    workload = Workload(n, hs_dim, ht_dim, vocab, "fp32", divergence)
    assert predict("naive", workload, "h200").flops == counted == workload.floor_flops()


def _by_name(prediction) -> dict[str, tuple]:
    return {k.name: (k.count, k.flops, k.bytes_read, k.bytes_written) for k in prediction.kernels}


def test_chunked_bytes_match_a_hand_count():
    """N = 40, Hs = 2, Ht = 3, V = 64 in bf16 (2 B), budget 16·64: chunks of 14, 14, 12 rows over whole rows (ld = 64).
    fp32 workspaces (4 B), G in bf16. Per kernel: (launches, FLOPs, bytes read, bytes written), summed over chunks."""
    workload = Workload(40, 2, 3, 64, "bf16")
    plan = chunking.plan_tiles(40, 64, 16 * 64, device="cuda")
    assert [s.stop - s.start for s in plan.row_chunks(40)] == [14, 14, 12]
    hand = {
        # [r, 2]·[2, 64]: reads every chunk's 14|14|12 rows of H (40 · 2 · 2 B) and all of Ws (3 · 64 · 2 · 2 B),
        # writes fp32 logits 40 · 64 · 4 B
        "logits GEMM (student)": (3, 2 * 40 * 64 * 2, 40 * 2 * 2 + 3 * 64 * 2 * 2, 40 * 64 * 4),
        "logits GEMM (teacher)": (3, 2 * 40 * 64 * 3, 40 * 3 * 2 + 3 * 64 * 3 * 2, 40 * 64 * 4),
        "stats epilogue": (3, 0, 2 * 40 * 64 * 4, 0),  # both fp32 tiles read once
        "gradient epilogue": (3, 0, 2 * 40 * 64 * 4, 40 * 64 * 2),  # both read again, G written in bf16
        # G [r, 64]·Ws [64, 2]: G (40 · 64 · 2 B) and Ws per chunk (3 · 64 · 2 · 2 B); fp32 dH rows written once
        "dH GEMM": (3, 2 * 40 * 64 * 2, 40 * 64 * 2 + 3 * 64 * 2 * 2, 40 * 2 * 4),
        # Gᵀ [64, 14]·H [14, 2] into the fp32 [64, 2] accumulator, β = 0: written, never read
        "dW GEMM (β=0, first chunk)": (1, 2 * 14 * 64 * 2, 14 * 64 * 2 + 14 * 2 * 2, 64 * 2 * 4),
        # the other two chunks (14 + 12 rows), β = 1: the accumulator read and written by each
        "dW GEMM (β=1)": (2, 2 * 26 * 64 * 2, 26 * 64 * 2 + 26 * 2 * 2 + 2 * 64 * 2 * 4, 2 * 64 * 2 * 4),
        "dW scale+cast (backward)": (1, 0, 64 * 2 * 4, 64 * 2 * 2),  # one pass: fp32 in, bf16 out
        "dH scale+cast (backward)": (1, 0, 40 * 2 * 4, 40 * 2 * 2),
    }
    assert _by_name(predict("chunked", workload, "h200", budget=16 * 64, dw_gemm="per_chunk")) == hand
    # the default, "auto": G of all 40 rows (5 KB) fits, so one dW GEMM, as chunking.single_dw_gemm decides on CUDA
    assert (
        predict("chunked", workload, "h200", budget=16 * 64).kernels
        == predict("chunked", workload, "h200", budget=16 * 64, dw_gemm="single").kernels
    )
    single = _by_name(predict("chunked", workload, "h200", budget=16 * 64, dw_gemm="single"))
    assert not any(name.startswith("dW GEMM (β") for name in single)
    assert single["dW GEMM (all N, one)"] == (1, 2 * 40 * 64 * 2, 40 * 64 * 2 + 40 * 2 * 2, 64 * 2 * 2)
    assert single["dW scale+cast (backward)"] == (1, 0, 64 * 2 * 2, 64 * 2 * 2)  # already in bf16


def test_naive_bytes_match_a_hand_count():
    """materialized_divergence (reverse KL, bf16) per logit pair [N, V]: every op reads its inputs and writes its
    output once, except torch's CUDA (log_)softmax rows that do not fit shared memory, read 3 times."""
    n, v = 4, 8
    forward = 2 * (2 + (2 + 4) + (4 + 4) * 2 + (3 * 4 + 4))  # per model: bf16 logits, to fp32, ×scale and ÷τ, lsm
    kl = (4 + 4) + (8 + 4) + (8 + 4) + 4  # exp, sub, mul, sum
    backward = 2 * (4 + 4) + (8 + 4) + (8 + 4) + (3 * 4 + 4) + 2 * (4 + 4) + (4 + 2)  # … down to G in bf16
    # the GEMMs' other traffic: logits read H and W of both models; dH reads G and Ws, writes [N, Hs]; dW reads G and
    # H, writes [V, Hs] (the logits they write are in the forward count above)
    gemm_bytes = (n + v) * (2 + 3) * 2 + (n * v + v * 2) * 2 + n * 2 * 2 + (n * v + n * 2) * 2 + v * 2 * 2
    p = predict("naive", Workload(n, 2, 3, v, "bf16"), "h200")
    assert p.bytes == n * v * (forward + kl + backward) + gemm_bytes


def test_floor_and_the_roofline():
    """The floor is 2·N·V·(Hs + Ht) + 4·N·V·Hs FLOPs at the matmul rate: 43.3 TFLOP, 54.9 ms on an H200 (the
    design doc's numbers), as the benchmark counts it; a GEMM's C traffic adds its bytes at the copy bandwidth."""
    h200 = DEVICES["h200"]
    assert HEADLINE.floor_flops() == cases.floor_flops(cases.Case("cuda", 8192, 4096, 5120, 151936, "bf16", "fwd+bwd"))
    assert HEADLINE.floor_flops() == pytest.approx(43.33e12, rel=1e-3)
    assert floor_ms(HEADLINE, h200) == pytest.approx(HEADLINE.floor_flops() / 790e12 * 1e3)
    assert round(floor_ms(HEADLINE, h200), 1) == 54.9
    device = DeviceCeilings("test", matmul_tflops=1.0, copy_gbps=1.0)
    assert KernelCost("g", 1, 2e12, 1e9, 1e9, "gemm", epilogue_bytes=1e9).seconds(device) == pytest.approx(2.0 + 1.0)
    assert KernelCost("g", 1, 2e12, 7e9, 1e9, "gemm", epilogue_bytes=1e9).seconds(device) == pytest.approx(8.0)
    assert KernelCost("e", 1, 0, 4e9, 1e9, "epilogue", efficiency=0.5).seconds(device) == pytest.approx(10.0)
    assert KernelCost("e", 1, 0, 4e9, 1e9, "epilogue").seconds(device, epilogue_efficiency=0.5) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no fp32 matmul rate"):
        KernelCost("g", 1, 1.0, 0, 0, "gemm", precision="fp32").seconds(device)


def test_headline_plan_has_no_zero_fill_of_a_weight_and_one_pass_after_the_last_dw_gemm():
    """At N = 8192 the chunks come from plan_tiles (whatever its row alignment); no memset of a [V, H] tensor; after
    the last dW GEMM exactly one elementwise pass over dW; the single dW GEMM mode (the default "auto" here: its G is
    as large as the accumulator it replaces) drops every β = 1 GEMM."""
    p = predict("chunked", HEADLINE, "h200", dw_gemm="per_chunk")
    chunks = len(list(chunking.plan_tiles(8192, 151936, device="cuda").row_chunks(8192)))
    names = _by_name(p)
    assert names["logits GEMM (student)"][0] == chunks and names["dW GEMM (β=1)"][0] == chunks - 1
    assert not [k for k in p.kernels if k.kind == "memset" and k.bytes >= 151936 * 4096]
    passes = [k for k in p.kernels if k.kind != "gemm" and k.bytes >= 151936 * 4096 * 2 and k.phase == "bwd"]
    assert [k.name for k in passes] == ["dW scale+cast (backward)"]
    single = predict("chunked", HEADLINE, "h200", dw_gemm="single")
    assert single.flops == p.flops == HEADLINE.floor_flops() and single.ms < p.ms
    assert "dW GEMM (β=1)" not in _by_name(single)
    assert predict("chunked", HEADLINE, "h200").kernels == single.kernels


def test_streaming_costs_the_recomputed_logits_and_peers_are_modeled():
    floor = HEADLINE.floor_flops()
    recompute = 2.0 * 8192 * 151936 * (4096 + 5120)
    for backend in ("cuda", "triton"):
        assert predict("streaming", HEADLINE, "h200", backend=backend).flops == floor + recompute
    assert predict("trl_chunked", HEADLINE, "h200").flops == floor + recompute
    for method in ("naive", "liger_chunked", "compile"):
        assert predict(method, HEADLINE, "h200").flops == floor
    assert _peers.COMPILE_CHUNK == baselines.CHUNK_TOKENS  # mirrored: the model never imports the benchmark
    for method in perf_model.METHODS:
        p = predict(method, HEADLINE, "h100")
        assert p.ms > p.floor_ms > 0 and p.peak_extra_bytes > 0 and p.as_dict()["kernels"]
    with pytest.raises(ValueError, match="not jsd"):
        predict("liger_chunked", Workload(8, 4, 4, 16, divergence="jsd"), "h200")


def test_unaligned_rows_cost_more_unless_padded():
    workload = Workload(8192, 4096, 5120, 151665)
    padded = predict("chunked", workload, "h200")
    assert predict("chunked", workload, "h200", padded_stride=False).ms > padded.ms
    assert _ours.padded_stride(151665) == 151680 and _ours.padded_stride(151936) == 151936


def test_preferred_gpu_backend_follows_the_epilogue_constants(monkeypatch):
    assert perf_model.preferred_gpu_backend(HEADLINE, "h200") == "cuda"  # equal constants: the documented order
    monkeypatch.setitem(_ours.EPILOGUE_EFFICIENCY, "triton", 1.0)
    assert perf_model.preferred_gpu_backend(HEADLINE, "h200") == "triton"


def test_predict_bench_row_maps_every_backend():
    expected = {
        "naive": ("naive", None),
        "torch": ("chunked", "torch"),
        "triton": ("chunked", "triton"),
        "cuda": ("chunked", "cuda"),
        "triton-streaming": ("streaming", "triton"),
        "cuda-streaming": ("streaming", "cuda"),
        "compile": ("compile", None),
        "liger": None,  # Liger's fused linear JSD: not modeled
        "liger_chunked": ("liger_chunked", None),
        "trl": ("trl_chunked", None),
    }
    assert set(expected) == set(cases.BENCH_BACKENDS)
    for name, want in expected.items():
        row = cases.Case(name, 4096, 4096, 5120, 151936, "bf16", "fwd+bwd").row()
        p = perf_model.predict_bench_row(row, DEVICES["h200"])
        assert (None if p is None else (p.method, p.backend)) == want, name
    row = cases.Case("cuda", 4096, 4096, 5120, 151936, "bf16", "fwd").row()
    fwd, bwd = (perf_model.predict_bench_row({**row, "mode": m}, "h200") for m in ("fwd", "bwd"))
    both = perf_model.predict_bench_row({**row, "mode": "fwd+bwd"}, "h200")
    assert fwd.ms + bwd.ms == pytest.approx(both.ms) and bwd.ms < fwd.ms
    for unmodeled in ({"loss": "topk_overlap"}, {"filter_eps": 1e-6}, {"loss": "jsd", "backend": "naive"}):
        assert perf_model.predict_bench_row({**row, **unmodeled}, "h200") is None
    no_fp32 = DeviceCeilings("x", 100.0, 100.0)
    assert perf_model.predict_bench_row({**row, "dtype": "fp32"}, no_fp32) is None


def test_predicted_table_has_every_device_size_and_method():
    table = perf_model.predicted_table()
    lines = table.splitlines()
    assert lines[0].startswith("Predicted (model, not measured)") and "python -m opd_fast.perf_model" in lines[0]
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert len(rows) == 2 + 2 * 3  # header, separator, 2 devices × 3 token counts
    assert all(line.count("|") == 3 + 9 + 1 for line in rows)
    assert [line.split("|")[1:3] for line in rows[2:5]] == [[" H100 ", f" {n} "] for n in (4096, 8192, 16384)]


def test_command_line(tmp_path, capsys):
    out = tmp_path / "predicted.json"
    assert perf_main(["--device", "h200", "--tokens", "8192", "--kernels", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| H200 | 8192 |" in text and "dW scale+cast (backward)" in text
    data = json.loads(out.read_text())
    assert len(data) == 9 and {d["device"]["name"] for d in data} == {"H200"}
    run = subprocess.run(
        [sys.executable, "-m", "opd_fast.perf_model", "--device", "h200", "--tokens", "8192"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "Predicted (model, not measured)" in run.stdout


def test_measure_ceilings_refuses_the_cpu():
    with pytest.raises(ValueError, match="times a GPU"):
        perf_model.measure_ceilings(torch.device("cpu"))


def test_triton_workspace_factor_is_the_backends():
    triton_backend = pytest.importorskip("opd_fast.backends.triton_backend")
    assert triton_backend.WORKSPACE_FACTOR == _ours.TRITON_WORKSPACE_FACTOR


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_docs_carry_the_table_the_command_makes(doc):
    """The predicted tables pasted into the docs are the command's output today: regenerate them when the model or
    the plan (chunking) changes."""
    text = (Path(__file__).parents[2] / doc).read_text()
    table = perf_model.predicted_table().split("\n", 2)[2]
    assert table in text
