"""benchmarks/gpu_verify.py: the CPU rehearsal of the GPU window runs every stage and writes every file, and the
runner's pieces (time boxes, setup that never ends the call, targets measured and predicted, the kernel profile's
kinds) do what the window relies on."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_verify.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_window import config, profiling, report, runner, stages, targets  # noqa: E402

# .ci/run's slow step runs this file's slow tests: python -m pytest -m "slow and ci_slow"
pytestmark = pytest.mark.ci_slow

# The rehearsal takes ~80 s alone on a 2-core CPU, and up to 1.6× that in CI, where it shares the CPU with a second
# pytest worker (-n auto): its budget is 165 s.
REHEARSAL_LIMIT_SECONDS = 165
# The tests that read the rehearsal: outside README's quick tier (-m "not slow"), run by .ci/run as its own step.
REHEARSAL = pytest.mark.slow


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


def _rows(out: Path, number: int) -> dict[str, dict]:
    return {row["id"]: row for row in _stage(out, number)["rows"]}


@REHEARSAL
def test_rehearsal_exits_0_in_time_with_eight_files_and_a_summary(rehearsal):
    out, done, seconds = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < REHEARSAL_LIMIT_SECONDS
    (log,) = out.glob("*.log")
    stem = log.stem
    assert stem.startswith("rehearsal-20")  # rehearsal-<date>
    names = {f"{stem}.log", f"{stem}.png"} | {f"{stem}.{s.number}-{s.name}.json" for s in config.STAGES}
    assert {p.name for p in out.iterdir()} == names  # 8: the most files a device call brings back
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = done.stdout[done.stdout.index("=== summary") :]
    for text in ("headline N=16", "×floor m/p", "kernel profile, triton", "targets (reverse KL), measured", "pred."):
        assert text in summary
    assert "targets, predicted by the model at the measured ceilings" in summary
    assert "=== summary" in log.read_text()  # the log has everything the output had


@REHEARSAL
def test_rehearsal_runs_every_stage_to_its_end_and_no_setup_step_stops_it(rehearsal):
    out, _, _ = rehearsal
    statuses = {n: _stage(out, n)["status"] for n in range(len(config.STAGES))}
    assert statuses == dict.fromkeys(range(6), "done")
    runner_record = _stage(out, 0)["runner"]
    assert runner_record["rehearsal"] and runner_record["build"]["status"].startswith("skipped")
    assert runner_record["wheels"]["status"].startswith("skipped")  # no .whl/ in CI: a note, not the end
    assert [(s["stage"], s["status"]) for s in runner_record["stages"]] == sorted(statuses.items())
    assert set(runner_record["targets"]) == {"measured", "predicted"}


@REHEARSAL
def test_env_stage_measures_ceilings_and_the_addmm_variants(rehearsal):
    data = _stage(rehearsal[0], 0)
    ceilings = data["ceilings"]
    assert ceilings["matmul_tflops_bf16"] > 0 and ceilings["matmul_tflops_fp32"] > 0 and ceilings["copy_gbps"] > 0
    backends = data["backends"]
    assert backends["naive"] == backends["torch"] == backends["triton"] == "ok"  # triton: the interpreter
    assert "CUDA" in backends["cuda"] and "CUDA" in backends["cuda-streaming"]
    assert data["env"]["variables"]["TRITON_INTERPRET"] == "1"
    assert data["env"]["variables"]["OPD_FAST_TRITON_FIXED_CONFIG"] == "1"
    assert data["env"]["packages"]["torch"]
    addmm = data["addmm"]
    assert addmm["chunk_rows"] == 16 and addmm["vocab"] == 128
    times = addmm["times"]
    assert len(times) == 7 and all(t.get("ms", 0) > 0 or t["error"] for t in times.values())
    assert times["mm out= (β=0), bf16 out"]["ms"] > 0  # the CPU has bf16 mm; out_dtype overloads are CUDA's


@REHEARSAL
def test_correctness_stage_checks_chunked_cuda_and_triton_first_and_every_plan(rehearsal):
    data = _stage(rehearsal[0], 1)
    ids = [row["id"] for row in data["rows"]]
    assert ids[:3] == ["reverse_kl/cuda-chunked", "reverse_kl/triton-chunked", "reverse_kl/torch-chunked"]
    rows = {row["id"]: row for row in data["rows"]}
    checks = ["reverse_kl", "forward_kl", "jsd", "token_logprobs", "topk_k2"]
    for check in checks:
        for backend in ("torch", "triton"):
            for plan in ("chunked", "streaming"):
                assert rows[f"{check}/{backend}-{plan}"]["passed"], rows[f"{check}/{backend}-{plan}"]
        for plan in ("chunked", "streaming"):
            assert rows[f"{check}/cuda-{plan}"]["error"].startswith("skipped:")
    assert "vs_torch" in rows["reverse_kl/triton-chunked"]  # filled in once torch's result came
    assert rows[f"reverse_kl-filter{config.FILTER_EPS:.3g}/triton-chunked"]["passed"]
    for backend in ("torch", "triton"):  # 48 rows in 3 chunks of 16; the overlap off; one dW GEMM; V = 125
        for check in ("chunks3", "chunks3-overlap-off", "chunks3-dw-single", "chunks3-V125"):
            assert rows[f"reverse_kl-{check}/{backend}-chunked"]["passed"], check
    assert rows["reverse_kl-chunks3/cuda-chunked"]["error"].startswith("skipped:")
    assert ids.index("reverse_kl-chunks3-V125/triton-chunked") < ids.index("reverse_kl/triton-streaming")
    assert data["inputs"]["entropy_student"] == pytest.approx(1.5, rel=0.25)


@REHEARSAL
def test_headline_has_the_variants_predictions_and_a_kernel_profile(rehearsal):
    data = _stage(rehearsal[0], 2)
    ids = [row["id"] for row in data["rows"]]
    assert ids[:3] == ["reverse_kl/N16/naive", "reverse_kl/N16/cuda", "reverse_kl/N16/triton"]
    assert ids[-1] == "reverse_kl/N16/torch"  # last: it runs only when one call is within 3× naive's median
    rows = {row["id"]: row for row in data["rows"]}
    fields = {
        "overlap-off": {"overlap": False},
        "budget-2^29": {"budget": 2**29},
        "dw-single": {"dw_gemm": "single"},
        "dw-per-chunk": {"dw_gemm": "per_chunk"},
    }
    for variant, expected in [*fields.items(), ("V125", {"vocab": 125})]:
        assert rows[f"reverse_kl/N16/cuda+{variant}"]["error"].startswith("skipped:")
        row = rows[f"reverse_kl/N16/triton+{variant}"]
        assert row["median_ms"] > 0 and row["variant"] == variant and expected.items() <= row.items(), row
    assert rows["reverse_kl/N16/triton"]["predicted_ms"] > 0  # fp32 at the measured fp32 rate
    assert "predicted_ms" not in rows[f"reverse_kl/N16/triton-filter{config.FILTER_EPS:.3g}"]  # not modeled
    assert rows["reverse_kl/N16/cuda"]["predicted_ms"] > 0  # the model's verdict needs no run
    profile = data["profile"]
    assert profile["cuda"]["error"].startswith("skipped:")
    for backend in ("naive", "triton"):
        kinds = profile[backend]["kinds"]
        assert kinds["gemm"]["count"] >= 4 and kinds["gemm"]["ms"] > 0, kinds  # 2 logits GEMMs, dH, dW at least
        assert profile[backend]["predicted"]["kinds"]["gemm"]["count"] >= 4


@REHEARSAL
def test_sweep_runs_ours_and_naive_at_every_n_before_the_rest_and_peers_come_after(rehearsal):
    out = rehearsal[0]
    sweep, peers = _stage(out, 3)["rows"], _stage(out, 4)["rows"]
    backends = [row["backend"] for row in sweep]
    first_other = min(i for i, name in enumerate(backends) if name not in ("naive", "cuda", "triton"))
    assert set(backends[:first_other]) == {"naive", "cuda", "triton"} and first_other == 12  # 3 losses' rows
    assert {row["loss"] for row in sweep} == {"reverse_kl", "forward_kl", "jsd", "topk_overlap"}
    assert {row["mode"] for row in sweep if row["loss"] == "topk_overlap"} == {"fwd"}
    assert not {row["backend"] for row in sweep} & set(targets.RIVALS)
    assert {row["backend"] for row in peers} == set(targets.RIVALS)
    assert [row["tokens"] for row in peers[:4]] == [16] * 4  # the headline N first
    measured = {row["backend"] for row in peers if "median_ms" in row}
    assert {"compile", "trl", "liger_chunked"} <= measured
    for row in _stage(out, 2)["rows"] + sweep + peers:
        if "error" in row:  # a skip says why; nothing fails
            assert row["error"].startswith("skipped:"), row
            continue
        assert row["median_ms"] > 0 and row["peak_mem_mb"] >= 0 and row["seconds"] >= 0, row
        assert row["entropy_student"] == pytest.approx(1.5, rel=0.25), row
        assert 0 < row["shared_mass"] <= 1, row


@REHEARSAL
def test_tests_stage_runs_what_only_a_gpu_checks(rehearsal):
    data = _stage(rehearsal[0], 5)
    assert "-m gpu or device_semantics" in data["command"] and "within_twice_plain_pytorch" in data["command"]
    assert data["pytest_exit"] == 0
    totals = data["totals"]
    assert totals["failed"] == totals["errors"] == 0 and totals["skipped"] > 0  # skipped: the GPU tier
    assert totals["passed"] > 0  # the torch backend's NaN tests


def test_pytest_command_leaves_out_what_stage_one_checked(tmp_path):
    on_gpu = stages.pytest_command(tmp_path / "junit.xml", rehearse=False)
    keyword = on_gpu[on_gpu.index("-k") + 1]
    assert keyword == "not (within_twice_plain_pytorch or realistic_token_logprobs or realistic_topk_overlap)"
    files = [Path(arg).name for arg in on_gpu if arg.endswith(".py")]
    assert files[:3] == ["test_numerics.py", "test_cuda_backend.py", "test_gpu.py"] and "test_compile.py" in files
    rehearsed = stages.pytest_command(tmp_path / "junit.xml", rehearse=True)
    assert rehearsed[rehearsed.index("-k") + 1] == f"(torch or gpu) and {keyword}"


def _runner(tmp_path: Path, wheels: Path) -> runner.Runner:
    args = argparse.Namespace(out=tmp_path, rehearse=False, budget=60.0, autotune=False, wheels=wheels)
    return runner.Runner(args)


def test_missing_or_broken_wheels_are_recorded_and_the_window_goes_on(tmp_path):
    missing = _runner(tmp_path, tmp_path / "no-such-folder")
    missing.setup_step("wheels", missing.install_wheels)
    assert missing.record["wheels"]["status"].startswith("skipped: no wheels in")
    folder = tmp_path / "whl"
    folder.mkdir()
    (folder / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    broken = _runner(tmp_path, folder)
    broken.setup_step("wheels", broken.install_wheels)
    wheel = "broken-1.0-py3-none-any.whl"
    assert broken.record["wheels"] == {"installed": 0, "failed": [wheel], "status": f"failed: {wheel}"}

    def raises():
        raise OSError("read-only file system")

    broken.setup_step("build", raises)
    assert broken.record["build"]["status"] == "failed: OSError: read-only file system"


def test_run_streamed_kills_a_hung_command_at_its_time_box(tmp_path):
    log = runner.Log(tmp_path / "log")
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    started = time.monotonic()
    status, seconds = runner.run_streamed(command, log, timeout=2, env=None)
    assert status is None and seconds < 15 and time.monotonic() - started < 20
    assert (tmp_path / "log").read_text() == "started\n"  # streamed before the kill


def test_a_lost_cuda_context_ends_the_stage_process_and_a_resumed_one_skips_the_rows_done(tmp_path):
    stage = config.STAGES[2]
    path = stage.path(tmp_path, "gpu-2026-12-01")
    record = stages.StageFile(path, stage, box=60, resume=False)
    record.begin("reverse_kl/N8192/naive")
    assert json.loads(path.read_text())["in_progress"] == "reverse_kl/N8192/naive"  # a kill here leaves this
    record.add({"id": "reverse_kl/N8192/naive", "median_ms": 111.0})
    sticky = "AcceleratorError: CUDA error: an illegal memory access was encountered"
    with pytest.raises(stages.ContextLost):
        record.add({"id": "reverse_kl/N8192/cuda", "error": sticky})
    resumed = stages.StageFile(path, stage, box=30, resume=True)
    assert resumed.done == {"reverse_kl/N8192/naive", "reverse_kl/N8192/cuda"}
    assert resumed.data["status"] == "running" and resumed.data["box_seconds"] == 30
    assert stages.StageFile(path, stage, box=30, resume=False).done == set()  # a fresh run starts over


def test_targets_on_the_committed_cpu_results():
    results = json.loads((REPO / "benchmarks" / "results" / "cpu-2core-2026-12-01.json").read_text())["results"]
    verdicts = {v["tokens"]: v for v in targets.check_targets(results)}
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
    assert targets.check_targets(results, predicted=True) == []  # these rows carry no prediction


def test_targets_judge_floor_rivals_and_filtered_rows_and_flag_missing_ones():
    row = {"tokens": 8, "peak_mem_mb": 1.0, "loss": "reverse_kl", "inputs": "peaked", "floor_ms": 1.6}
    results = [
        {**row, "backend": "naive", "median_ms": 10.0, "peak_mem_mb": 100.0},
        {**row, "backend": "triton", "median_ms": 2.0, "ratio_to_floor": 1.25},
        {**row, "backend": "cuda", "median_ms": 1.0, "filter_eps": 2**-12, "filter_skipped_fraction": 0.5},
        {**row, "backend": "triton", "median_ms": 1.2, "filter_eps": 2**-12},  # slower of the two filtered rows
        {**row, "backend": "liger", "median_ms": 0.1, "filter_eps": 2**-12},  # not ours: never a filtered row
        {**row, "backend": "cuda", "median_ms": 0.5, "variant": "dw-single"},  # a variant: not the default path
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
    eight, sixteen, thirty_two = targets.check_targets(results)
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
    table = report.format_targets([eight, sixteen, thirty_two])
    assert "NO" in table and "needs a row of ours and a naive row" in table
    assert "cuda 1.00 ms, 50.0% skipped, yes" in table and "no floor" in table


def test_predicted_targets_use_the_model_on_every_row_it_covers_run_or_not():
    row = {"tokens": 8, "loss": "reverse_kl", "predicted_floor_ms": 50.0}
    rows = [
        {**row, "backend": "naive", "median_ms": 100.0, "predicted_ms": 120.0, "predicted_peak_mb": 1000.0},
        {**row, "backend": "cuda", "median_ms": 90.0, "predicted_ms": 60.0, "predicted_peak_mb": 100.0},
        {**row, "backend": "liger_chunked", "error": "skipped: no Liger-Kernel", "predicted_ms": 75.0},
        {**row, "backend": "liger", "error": "skipped: no Liger-Kernel"},  # not modeled: no prediction
    ]
    (measured,) = targets.check_targets(rows)
    (predicted,) = targets.check_targets(rows, predicted=True)
    assert measured["rival"] is None and not measured["met"] and measured["ratio_to_floor"] is None
    assert predicted["backend"] == "cuda" and predicted["rival"] == "liger_chunked"
    assert predicted["ratio_to_floor"] == pytest.approx(1.2) and predicted["speedup_vs_naive"] == pytest.approx(2)
    assert predicted["speedup_vs_rival"] == pytest.approx(1.25) and predicted["met"]
    assert predicted["memory_fraction_of_naive"] == pytest.approx(0.1)
    table = report.headline_table([{**r, "id": f"reverse_kl/N8/{r['backend']}"} for r in rows])
    assert "cuda" in table and "-/1.20" in table and "NO/yes" in table  # ×floor m/p; met m/p


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize1x1x1", "gemm"),
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>", "memset"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float>, ...>", "elementwise"),
        ("Memcpy DtoD (Device -> Device)", "elementwise"),
        ("_stats_update_kernel", "epilogue"),
        ("aten::addmm", "gemm"),
        ("aten::softmax", "elementwise"),
    ],
)
def test_kernel_kinds_follow_the_models_kinds(name, kind):
    assert profiling.kernel_kind(name) == kind
