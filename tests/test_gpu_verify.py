"""benchmarks/gpu_verify.py: the CPU rehearsal of the GPU window runs every stage and writes every file, and the
runner's pieces (time box, targets, ncu parsing) do what the window relies on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_verify.py"
# Issue 16 asked for 2 minutes in CI; the rehearsal takes ~80 s alone on a 2-core CPU, and up to 1.6× that in the
# CI tier, where it shares the CPU with a second pytest worker (-n auto): its budget is 155 s.
REHEARSAL_LIMIT_SECONDS = 165


def _gpu_verify():
    spec = importlib.util.spec_from_file_location("gpu_verify", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_verify = _gpu_verify()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One ``--rehearse`` run shared by the tests below: (output folder, completed process, wall seconds)."""
    out = tmp_path_factory.mktemp("gpu_verify")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rehearse", "--build", "--out", str(out)],  # --build: as on the GPU
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2 * REHEARSAL_LIMIT_SECONDS,
    )
    return out, done, time.monotonic() - started


def _stage(out: Path, number: int) -> dict:
    (path,) = out.glob(f"*.{number}-*.json")
    return json.loads(path.read_text())


def test_rehearsal_exits_0_in_time_with_eight_files_and_a_summary(rehearsal):
    out, done, seconds = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < REHEARSAL_LIMIT_SECONDS
    (log,) = out.glob("*.log")
    stem = log.stem
    assert stem.startswith("rehearsal-20")  # rehearsal-<date>
    names = {f"{stem}.log", f"{stem}.png"} | {f"{stem}.{s.number}-{s.name}.json" for s in gpu_verify.STAGES}
    assert {p.name for p in out.iterdir()} == names  # 8: the most files a device call brings back
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "=== summary" in done.stdout and "issue-17 targets" in done.stdout
    assert "=== summary" in log.read_text()  # the log has everything the output had


def test_rehearsal_runs_every_stage_to_its_end(rehearsal):
    out, _, _ = rehearsal
    statuses = {n: _stage(out, n)["status"] for n in range(len(gpu_verify.STAGES))}
    assert statuses == {**dict.fromkeys(range(5), "done"), 5: statuses[5]}
    assert statuses[5].startswith("skipped: no CUDA GPU")  # the profiled step still ran, without ncu
    assert _stage(out, 5)["step_exit"] == 0
    runner = _stage(out, 0)["runner"]
    assert runner["rehearsal"] and runner["build"]["status"].startswith("skipped")
    assert [(s["stage"], s["status"]) for s in runner["stages"]] == sorted(statuses.items())


def test_env_stage_measures_ceilings_and_says_which_backends_run(rehearsal):
    data = _stage(rehearsal[0], 0)
    assert data["ceilings"]["matmul_tflops_bf16"] > 0 and data["ceilings"]["copy_gbps"] > 0
    backends = data["backends"]
    assert backends["naive"] == backends["torch"] == backends["triton"] == "ok"  # triton: the interpreter
    assert "CUDA" in backends["cuda"] and "CUDA" in backends["cuda-streaming"]
    assert data["env"]["variables"]["TRITON_INTERPRET"] == "1"
    assert data["env"]["variables"]["OPD_FAST_TRITON_FIXED_CONFIG"] == "1"
    assert data["env"]["packages"]["torch"]
    assert Path(data["env"]["opd_fast_from"]).is_dir()


def test_correctness_stage_checks_every_backend_and_plan(rehearsal):
    data = _stage(rehearsal[0], 1)
    rows = {row["id"]: row for row in data["rows"]}
    checks = ["reverse_kl", "forward_kl", "jsd", "token_logprobs", "topk_k2"]
    targets = [f"{backend}-{plan}" for backend in ("torch", "triton", "cuda") for plan in ("chunked", "streaming")]
    assert {f"{check}/{target}" for check in checks for target in targets} <= set(rows)
    for check in checks:
        for backend in ("torch", "triton"):
            assert rows[f"{check}/{backend}-chunked"]["passed"], rows[f"{check}/{backend}-chunked"]
            assert rows[f"{check}/{backend}-streaming"]["passed"], rows[f"{check}/{backend}-streaming"]
        for plan in ("chunked", "streaming"):
            assert rows[f"{check}/cuda-{plan}"]["error"].startswith("skipped:")
    filtered = rows[f"reverse_kl-filter{gpu_verify.FILTER_EPS:.3g}/triton-chunked"]
    assert filtered["passed"]
    for backend in ("torch", "triton"):  # 48 rows in 3 chunks of 16, with the overlap on and off (CPU: in order)
        assert rows[f"reverse_kl-chunks3/{backend}-chunked"]["passed"]
        assert rows[f"reverse_kl-chunks3-overlap-off/{backend}-chunked"]["passed"]
    assert rows["reverse_kl-chunks3/cuda-chunked"]["error"].startswith("skipped:")
    assert data["inputs"]["entropy_student"] == pytest.approx(1.5, rel=0.25)


def test_benchmark_stages_time_each_row_and_describe_its_inputs(rehearsal):
    out = rehearsal[0]
    headline, sweep = _stage(out, 2)["rows"], _stage(out, 3)["rows"]
    ids = [row["id"] for row in headline]
    assert ids[:3] == ["reverse_kl/N32/naive", "reverse_kl/N32/cuda", "reverse_kl/N32/triton"]
    assert ids[-1] == "reverse_kl/N32/torch"  # last: it runs only when one call is within 3× naive's median
    filtered = f"reverse_kl/N32/triton-filter{gpu_verify.FILTER_EPS:.3g}"
    assert ids.index(filtered) < ids.index("reverse_kl/N32/compile")  # before the rows that compile for long
    for row in headline + sweep:
        if "error" in row:  # a skip says why; nothing fails
            assert row["error"].startswith("skipped:"), row
            continue
        assert row["median_ms"] > 0 and row["peak_mem_mb"] >= 0 and row["seconds"] >= 0, row
        assert row["entropy_student"] == pytest.approx(1.5, rel=0.25), row
        assert 0 < row["shared_mass"] <= 1, row
    measured = {row["backend"] for row in headline if "median_ms" in row}
    assert {"naive", "triton", "compile", "trl", "liger_chunked"} <= measured
    assert {row["loss"] for row in sweep} == {"reverse_kl", "forward_kl", "jsd", "topk_overlap"}
    assert {row["mode"] for row in sweep if row["loss"] == "topk_overlap"} == {"fwd"}
    assert sorted({row["tokens"] for row in sweep if row["loss"] == "reverse_kl"}) == [16]


def test_tests_stage_ran_the_gpu_tier_and_the_nan_semantics_tests(rehearsal):
    data = _stage(rehearsal[0], 4)
    assert "-m gpu or device_semantics" in data["command"] and data["pytest_exit"] == 0
    totals = data["totals"]
    assert totals["failed"] == totals["errors"] == 0 and totals["skipped"] > 0  # skipped: the GPU tier
    assert totals["passed"] > 0  # the NaN tests of test_numerics, here in the interpreter


def test_run_streamed_kills_a_hung_command_at_its_time_box(tmp_path):
    log = gpu_verify.Log(tmp_path / "log")
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    started = time.monotonic()
    status, seconds = gpu_verify.run_streamed(command, log, timeout=2, env=None)
    assert status is None and seconds < 15 and time.monotonic() - started < 20
    assert (tmp_path / "log").read_text() == "started\n"  # streamed before the kill


def test_a_lost_cuda_context_ends_the_stage_process_and_a_resumed_one_skips_the_rows_done(tmp_path):
    stage = gpu_verify.STAGES[2]
    path = stage.path(tmp_path, "gpu-2026-12-01")
    record = gpu_verify.StageFile(path, stage, box=60, resume=False)
    record.begin("reverse_kl/N8192/naive")
    assert json.loads(path.read_text())["in_progress"] == "reverse_kl/N8192/naive"  # a kill here leaves this
    record.add({"id": "reverse_kl/N8192/naive", "median_ms": 111.0})
    sticky = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    with pytest.raises(gpu_verify.ContextLost):
        record.add({"id": "reverse_kl/N8192/cuda", "error": sticky})
    resumed = gpu_verify.StageFile(path, stage, box=30, resume=True)
    assert resumed.done == {"reverse_kl/N8192/naive", "reverse_kl/N8192/cuda"}
    assert resumed.data["status"] == "running" and resumed.data["box_seconds"] == 30
    assert gpu_verify.StageFile(path, stage, box=30, resume=False).done == set()  # a fresh run starts over


def test_targets_on_the_committed_cpu_results():
    results = json.loads((REPO / "benchmarks" / "results" / "cpu-2core-2026-12-01.json").read_text())["results"]
    verdicts = {v["tokens"]: v for v in gpu_verify.check_targets(results)}
    assert sorted(verdicts) == [1024, 2048, 4096]
    rows = {(r["backend"], r["tokens"]): r for r in results}
    at_4096 = verdicts[4096]
    assert at_4096["backend"] == "torch"  # triton/cuda are skipped rows on CPU and must not count
    assert at_4096["speedup_vs_naive"] == pytest.approx(rows["naive", 4096]["median_ms"] / at_4096["median_ms"])
    fastest_rival = min(("liger_chunked", "trl", "compile"), key=lambda name: rows[name, 4096]["median_ms"])
    assert at_4096["rival"] == fastest_rival  # liger (fused) is a skipped row on CPU: it is no rival
    assert at_4096["ratio_to_floor"] is None and at_4096["meets_floor"] is None  # fp32 rows have no floor time
    assert at_4096["meets_naive"] and at_4096["met"]
    assert not verdicts[1024]["met"]  # 0.87× the fastest rival at N=1024


def test_targets_judge_floor_rivals_and_filtered_rows_and_flag_missing_ones():
    row = {"tokens": 8, "peak_mem_mb": 1.0, "loss": "reverse_kl", "inputs": "peaked", "floor_ms": 1.6}
    results = [
        {**row, "backend": "naive", "median_ms": 10.0, "peak_mem_mb": 100.0},
        {**row, "backend": "triton", "median_ms": 2.0, "ratio_to_floor": 1.25},
        {**row, "backend": "cuda", "median_ms": 1.0, "filter_eps": 2**-12, "filter_skipped_fraction": 0.5},
        {**row, "backend": "triton", "median_ms": 1.2, "filter_eps": 2**-12},  # slower of the two filtered rows
        {**row, "backend": "liger", "median_ms": 0.1, "filter_eps": 2**-12},  # not ours: never a filtered row
        {**row, "backend": "cuda-streaming", "median_ms": 3.0, "ratio_to_floor": 1.875},
        {**row, "backend": "cuda", "median_ms": 0.5, "loss": "forward_kl"},  # another loss: ignored
        {**row, "backend": "compile", "median_ms": 2.5},
        {**row, "backend": "trl", "median_ms": 2.2},  # the fastest rival
        {**row, "backend": "liger", "error": "skipped: no Liger-Kernel"},
        {**row, "tokens": 16, "backend": "torch", "median_ms": 1.0},
        {**row, "tokens": 32, "backend": "naive", "median_ms": 4.0},
        {**row, "tokens": 32, "backend": "cuda", "median_ms": 2.0, "ratio_to_floor": 1.3},
        {**row, "tokens": 32, "backend": "liger_chunked", "median_ms": 3.0},
        {**row, "tokens": 32, "backend": "triton", "median_ms": 2.0, "filter_eps": 1e-3, "floor_ms": None},
    ]
    eight, sixteen, thirty_two = gpu_verify.check_targets(results)
    assert eight["backend"] == "triton" and eight["rival"] == "trl"
    assert eight["speedup_vs_rival"] == pytest.approx(1.1) and not eight["meets_rival"] and not eight["met"]
    assert eight["meets_floor"] and eight["meets_naive"] and eight["memory_fraction_of_naive"] == 0.01
    assert eight["filtered"] == {
        "backend": "cuda",
        "filter_eps": 2**-12,
        "median_ms": 1.0,
        "skipped_fraction": 0.5,
        "below_floor": True,
    }
    assert "error" in sixteen
    assert thirty_two["meets_naive"] and thirty_two["meets_rival"] and not thirty_two["meets_floor"]
    assert not thirty_two["met"] and thirty_two["filtered"]["below_floor"] is None
    table = gpu_verify.format_targets([eight, sixteen, thirty_two])
    assert "NO" in table and "needs a row of ours and a naive row" in table
    assert "cuda 1.00 ms, 50.0% skipped, yes" in table and "no floor" in table


def test_parse_ncu_csv_groups_metrics_by_launch():
    text = "\n".join(
        [
            "profile step cuda: done",
            "==PROF== Disconnected from process 1",
            '"ID","Process ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"',
            '"0","1","logit_grad","GPU Speed Of Light Throughput","Duration","us","812.5"',
            '"0","1","logit_grad","Launch Statistics","Registers Per Thread","register/thread","168"',
            '"1","1","softmax_stats","GPU Speed Of Light Throughput","Duration","us","90.1"',
        ]
    )
    kernels = gpu_verify.parse_ncu_csv(text)
    assert [k["kernel"] for k in kernels] == ["logit_grad", "softmax_stats"]
    assert kernels[0]["metrics"] == {"Duration (us)": "812.5", "Registers Per Thread (register/thread)": "168"}
    assert gpu_verify.parse_ncu_csv("ncu: no kernels were profiled") == []
