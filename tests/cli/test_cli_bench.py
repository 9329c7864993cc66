"""`opd-fast bench`: the docs/design.md §4 contract on a tiny CPU case."""

import json
import subprocess
import sys
import time

import pytest
import torch

from opd_fast.bench import cases, estimate, report, runner
from opd_fast.bench.cases import Case
from opd_fast.bench.runner import run_case
from opd_fast.cli import main
from opd_fast.memory import peak_extra_bytes

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


def test_bench_writes_json_plot_and_table(tmp_path, capsys, monkeypatch):
    # Tiles of 16 tokens: at these tiny shapes the default budget (2**22 logits elements) holds every token at
    # once, and the torch backend's memory advantage over naive (checked below) shows only once it tiles.
    monkeypatch.setenv("OPD_FAST_CHUNK_ELEMENTS", str(16 * 1000))
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
    assert "vs naive" in table and ("× faster" in table or "× slower" in table) and "x faster" not in table
    assert "opd_fast/torch" in table and table.count("skipped opd_fast/cuda: ") == 1


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


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_baselines_agree_with_our_loss(divergence):
    """The comparison is fair: every baseline computes the same divergence (value and gradients) as ours."""
    import torch

    from opd_fast import linear_divergence
    from opd_fast.bench.cases import JSD_BETA, backend_skip_reason, case_inputs, loss_function

    shape = dict(tokens=37, hidden=8, teacher_hidden=12, vocab=300, dtype="fp32", mode="fwd+bwd", loss=divergence)
    inputs = list(case_inputs(Case("naive", **shape), torch.device("cpu")).values())
    expected = linear_divergence(*inputs, divergence=divergence, beta=JSD_BETA)
    expected_grads = torch.autograd.grad(expected, inputs[:2])
    compared = []
    for name in ("naive", "compile", "liger_chunked", "trl"):
        if backend_skip_reason(name, torch.device("cpu")):
            continue
        loss = loss_function(Case(name, **shape))(*inputs)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=name)
        for a, b in zip(torch.autograd.grad(loss, inputs[:2]), expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        compared.append(name)
    assert "naive" in compared and "compile" in compared


def test_any_exception_of_a_case_becomes_an_error_row():
    """Not only RuntimeError: here the peaked preset's ValueError (it needs hidden sizes of at least 2)."""
    row = run_case(Case("torch", 8, 1, 1, 32, "fp32", "fwd", inputs="peaked"), "cpu")
    assert row["error"].startswith("ValueError: the peaked preset needs hidden sizes of at least 2")


def test_call_limit_judges_a_warm_call_not_the_compiling_first_one(monkeypatch):
    """The first call pays for compilation: a row whose first call is slow but whose warm calls are fast runs;
    a row whose warm calls are over the limit is skipped with the warm call's time."""
    calls = []
    compute = runner.timed_call

    def first_call_slow(case, inputs):
        fn, setup = compute(case, inputs)

        def slow_once():
            if not calls:
                time.sleep(0.5)
            calls.append(1)
            return fn()

        return slow_once, setup

    monkeypatch.setattr(runner, "timed_call", first_call_slow)
    case = Case("torch", 8, 4, 4, 32, "fp32", "fwd+bwd")
    row = run_case(case, "cpu", warmup=2, repeats=3, call_limit_ms=300.0)
    assert "error" not in row and row["repeats"] == 3, row
    assert len(calls) == 2 + 3 + 1  # two judged warm-ups (no more warm-up), the timed calls, the memory run
    skipped = run_case(case, "cpu", call_limit_ms=1e-6)
    assert skipped["error"].startswith("skipped: a warm call took"), skipped


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_peak_memory_counts_the_gradients_the_call_makes(device):
    """The timing loop leaves gradients on the inputs; they are freed before the memory run, so the fwd+bwd row's
    peak is what one call on fresh inputs needs, gradients included, on CUDA's allocator counter as on the CPU
    tracker (before, CUDA rows came out short by the gradients' size: here [N, H] and [V, H] fp32)."""
    n, hidden, vocab = 64, 16, 512
    case = Case("torch", n, hidden, hidden, vocab, "fp32", "fwd+bwd")
    row = run_case(case, device)
    fresh_call, _ = runner.timed_call(case, cases.case_inputs(case, torch.device(device), 0))
    fresh = peak_extra_bytes(fresh_call, torch.device(device))
    gradients = 4 * (n * hidden + vocab * hidden)
    assert fresh >= gradients
    assert abs(row["peak_mem_mb"] * 2**20 - fresh) < gradients / 4, (row["peak_mem_mb"] * 2**20, fresh)


def test_peaked_inputs_hit_their_targets():
    """The peaked preset's measured mean entropy and shared top-16 mass are near what was asked, for two targets,
    and far from the random preset's (which has no structure shared by student and teacher)."""
    import torch

    from opd_fast.bench import inputs as bench_inputs

    shape = (512, 32, 48, 4096, torch.float32, torch.device("cpu"))
    for entropy, shared_mass in ((1.5, 0.9), (3.0, 0.6)):
        inputs = bench_inputs.make_inputs("peaked", *shape, entropy=entropy, shared_mass=shared_mass)
        stats = bench_inputs.input_statistics(*inputs.values())
        assert stats["entropy_student"] == pytest.approx(entropy, rel=0.15)
        assert stats["entropy_teacher"] == pytest.approx(entropy, rel=0.15)
        assert stats["shared_mass"] == pytest.approx(shared_mass, abs=0.08)
        assert inputs["student_hidden"].requires_grad and not inputs["teacher_hidden"].requires_grad
    random_stats = bench_inputs.input_statistics(*bench_inputs.make_inputs("random", *shape).values())
    assert random_stats["shared_mass"] < 0.3


def test_bench_cli_losses_inputs_and_filtering(tmp_path):
    """--losses, --inputs peaked and --filter-eps reach the rows: each row names its loss, plan and inputs, and
    reports what the inputs were; top-k overlap rows run forward only."""
    out_json = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--backends", "naive,torch,trl,compile", "--tokens", "32", "--hidden", "16"]
    args += ["--teacher-hidden", "24", "--vocab", "256", "--repeats", "1", "--losses", "forward_kl,topk_overlap"]
    args += ["--inputs", "peaked", "--entropy", "2", "--shared-mass", "0.8", "--filter-eps", "1e-4"]
    assert main([*args, "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["loss"], r["mode"]) for r in rows[::4]] == [("forward_kl", "fwd+bwd"), ("topk_overlap", "fwd")]
    assert all(r["inputs"] == "peaked" and r["target_entropy"] == 2 and r["filter_eps"] == 1e-4 for r in rows)
    by_name = {(r["backend"], r["loss"]): r for r in rows}
    assert by_name["torch", "forward_kl"]["plan"] == "chunked" and by_name["trl", "forward_kl"]["plan"] is None
    assert by_name["compile", "topk_overlap"]["error"] == "skipped: compile has no top-k overlap statistics"
    assert by_name["torch", "topk_overlap"]["topk_k"] == 16 and "topk_k" not in by_name["torch", "forward_kl"]
    for key in (("naive", "forward_kl"), ("torch", "forward_kl"), ("naive", "topk_overlap"), ("torch", "topk_overlap")):
        assert by_name[key]["median_ms"] > 0, key
        assert by_name[key]["entropy_student"] == pytest.approx(2, rel=0.2), key
        assert by_name[key]["shared_mass"] == pytest.approx(0.8, abs=0.1), key


def test_bench_cli_rejects_bad_input_targets(capsys):
    for option, value, message in (
        ("--shared-mass", "1.5", "expected a number in (0, 1]"),
        ("--entropy", "-1", "expected a positive number"),
        ("--filter-eps", "nan", "expected a positive number"),
        ("--inputs", "zipf", "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            main(["bench", option, value])
        assert message in capsys.readouterr().err, option


def test_speed_is_worded_faster_or_slower():
    """A row slower than naive reads "1.35× slower", not "0.74x faster"."""
    assert report.speed_text(2.1) == "2.10× faster"
    assert report.speed_text(1.0) == "1.00× faster"
    assert report.speed_text(1 / 1.35) == "1.35× slower"


def test_table_names_our_backends_and_gives_each_skip_reason_once():
    """Our backends read opd_fast/torch etc. (plain "torch" reads as PyTorch); a skip reason shared by many rows is
    one line naming their backends, while a failure (out of memory) stays a row of its own."""
    measured = [run_case(Case(name, 32, 8, 8, 256, "fp32", "fwd+bwd"), "cpu", repeats=1) for name in ("naive", "torch")]
    reason = "the CUDA kernels need CUDA tensors " + "and more words " * 20
    skipped = [
        {**Case(name, n, 8, 8, 256, "fp32", "fwd+bwd").row(), "error": f"skipped: {reason}"}
        for n in (32, 64, 128)
        for name in ("cuda", "cuda-streaming")
    ]
    failed = {**Case("trl", 32, 8, 8, 256, "fp32", "fwd+bwd").row(), "error": "out of memory: no room"}
    table = report.format_table([*measured, *skipped, failed])
    lines = table.splitlines()
    assert table.count(reason) == 1
    assert lines[-1] == f"skipped opd_fast/cuda, opd_fast/cuda-streaming: {reason}"
    assert [line.split()[0] for line in lines[2:-1]] == ["naive", "opd_fast/torch", "trl"]
    assert lines[-2].endswith("out of memory: no room")


def test_plot_legend_names_our_backends(tmp_path, monkeypatch):
    legends = []

    def keep_legend(fig, path, *, dpi):
        legends.append([text.get_text() for text in fig.axes[0].get_legend().get_texts()])

    monkeypatch.setattr(report, "save_figure", keep_legend)
    rows = [
        run_case(Case(name, n, 8, 8, 256, "fp32", "fwd"), "cpu", repeats=1)
        for n in (16, 32)
        for name in ("naive", "torch")
    ]
    report.plot(tmp_path / "bench.png", rows, "title")
    assert legends == [["naive", "opd_fast/torch"]]


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--repeats REPEATS timed calls per case (at least) (default: 5)",
        "untimed calls per case first (default: 1)",
        "one or more dtypes (default: fp32)",
        "fwd, bwd and/or fwd+bwd (default: fwd+bwd)",
        "(default: reverse_kl)",
        "(default: random)",
        "mean next-token entropy in nats (default: 1.5)",
        "(default: 0.9)",
        "(default: cpu-quick on the CPU, cpu-small on a GPU)",
        "cpu-quick N=128,256,512 H=64 V=32768",
        "(default: cuda if available, else cpu)",
    ):
        assert shown in text, shown
    assert "(default: None)" not in text and "['" not in text


def test_default_cpu_run_is_small_and_the_full_sweep_one_flag_away(monkeypatch, capsys):
    """With no shape options the CPU runs cpu-quick (about a minute on 2 cores), an eighth of cpu-small's
    tokens × vocabulary: the sweep that was the default, with --preset cpu-small."""
    ran = []

    def record(case, device, **kwargs):
        ran.append(case)
        return {**case.row(), "error": "skipped: recorded"}

    monkeypatch.setattr(runner, "run_case", record)
    monkeypatch.setattr(estimate, "run_warning", lambda *args, **kwargs: None)

    def work(argv):
        ran.clear()
        assert main(["bench", "--device", "cpu", *argv]) == 0
        assert {case.backend for case in ran} == set(cases.BENCH_BACKENDS)
        assert {(case.hidden, case.vocab, case.dtype, case.mode, case.loss) for case in ran} == {
            (64, 32768, "fp32", "fwd+bwd", "reverse_kl")
        }
        return sorted({case.tokens for case in ran})

    assert work([]) == [128, 256, 512]
    assert work(["--preset", "cpu-small"]) == [1024, 2048, 4096]
    assert cases.DEFAULT_PRESETS == {"cpu": "cpu-quick", "cuda": "cpu-small"}


def test_naive_memory_estimate_matches_the_measured_peak():
    """naive_peak_bytes, which the long-run warning reports, is what the naive baseline's fwd+bwd measures."""
    case = Case("naive", 256, 4, 4, 2048, "fp32", "fwd+bwd")
    row = run_case(case, "cpu", repeats=1)
    assert row["peak_mem_mb"] * 2**20 == pytest.approx(estimate.naive_peak_bytes(case), rel=0.05)


def test_run_warning_announces_long_or_memory_hungry_runs(monkeypatch):
    cases = [Case(name, 4096, 64, 64, 32768, "fp32", "fwd+bwd") for name in ("naive", "torch")]
    monkeypatch.setattr(estimate, "available_memory_bytes", lambda device: 20 * 2**30)
    monkeypatch.setattr(estimate, "estimate_seconds", lambda cases, device, **kw: 10.0 * len(cases))
    assert estimate.run_warning(cases, "cpu", warmup=1, repeats=5) is None  # 20 s, 2.5 GiB of 20 GiB free
    monkeypatch.setattr(estimate, "estimate_seconds", lambda cases, device, **kw: 600.0)
    warning = estimate.run_warning(cases, "cpu", warmup=1, repeats=5)
    assert warning.startswith("warning: 2 cases, expected to take roughly 10 min, the naive baseline needing 2.5 GiB")
    assert "\n" not in warning and "(20.0 GiB free)" in warning
    monkeypatch.setattr(estimate, "estimate_seconds", lambda cases, device, **kw: 10.0)
    monkeypatch.setattr(estimate, "available_memory_bytes", lambda device: 8 * 2**30)
    assert "needing 2.5 GiB" in estimate.run_warning(cases, "cpu", warmup=1, repeats=5)


def test_estimate_seconds_scales_the_measured_naive_rate(monkeypatch):
    """One naive calibration per hidden sizes and dtype, scaled by tokens × vocabulary and by the calls per case
    (warm-up, timed, memory run)."""
    probe = Case("naive", 64, 8, 8, 512, "fp32", "fwd+bwd")
    assert 0 < estimate._naive_seconds_per_logit(probe, torch.device("cpu")) < 1e-3
    calibrated = []

    def per_logit(case, device):
        calibrated.append((case.hidden, case.dtype))
        return 1e-9

    monkeypatch.setattr(estimate, "_naive_seconds_per_logit", per_logit)
    cases = [Case("torch", n, 8, 8, 512, dtype, "fwd+bwd") for dtype in ("fp32", "bf16") for n in (64, 128)]
    seconds = estimate.estimate_seconds(cases, torch.device("cpu"), warmup=1, repeats=5)
    assert calibrated == [(8, "fp32"), (8, "bf16")]
    assert seconds == pytest.approx(7 * 2 * (64 + 128) * 512 * 1e-9)


def test_bench_predicts_beside_measured_when_asked(tmp_path, capsys):
    """On the CPU the model's column appears only with --predict DEVICE (the model is for GPUs); its JSON key is
    additive, and backends the model does not cover keep no prediction."""
    from opd_fast import perf_model

    out_json = tmp_path / "bench.json"
    common = ["bench", "--device", "cpu", "--backends", "naive,torch", "--tokens", "32", "--hidden", "8"]
    common += ["--vocab", "256", "--repeats", "1", "--warmup", "0", "--json", str(out_json)]
    assert main([*common, "--predict", "h200"]) == 0
    table = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["env"]["predicted_with"]["name"] == "H200" and "pred. ms" in table
    for row in data["results"]:
        assert set(row) >= ROW_KEYS and row["predicted_ms"] > 0
    assert main(common) == 0
    assert "pred. ms" not in capsys.readouterr().out
    assert not any("predicted_ms" in row for row in json.loads(out_json.read_text())["results"])
    assert main([*common, "--predict", "measured"]) != 0
    assert "--predict h100 or h200" in capsys.readouterr().err
    liger = {**Case("liger", 32, 8, 8, 256, "fp32", "fwd+bwd").row(), "median_ms": 1.0}
    assert perf_model.predict_bench_row(liger, "h200") is None
