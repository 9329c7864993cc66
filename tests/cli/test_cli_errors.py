"""Bad input on the command line (docs/design.md §4) and in trainer configs: exit status 2 and one line on stderr
that names the option or config key and says what to do, never a traceback, and nothing run first.

The commands run in-process (``opd_fast.cli.main``); one subprocess test checks the console entry point.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from opd_fast.cli import main
from opd_fast.trainer import ConfigError, TrainConfig, Trainer, load_config

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
# Tiny shapes for bench: if a check ever let a case through, it would run in well under a second.
TINY = ["--tokens", "2", "--hidden", "2", "--vocab", "8", "--backends", "naive", "--repeats", "1", "--warmup", "0"]


@pytest.fixture
def files(tmp_path):
    """Paths to misuse: a regular file, an empty directory, non-UTF-8 bytes, non-mappings, broken YAML."""
    paths = {
        "file": tmp_path / "regular.txt",
        "dir": tmp_path / "empty_dir",
        "binary": tmp_path / "binary.yaml",
        "list": tmp_path / "list.yaml",
        "scalar": tmp_path / "scalar.yaml",
        "broken": tmp_path / "broken.yaml",
        "fake_st": tmp_path / "fake.safetensors",
        "unknown_key": tmp_path / "unknown_key.yaml",
        "wrong_type": tmp_path / "wrong_type.yaml",
        "section_scalar": tmp_path / "section_scalar.yaml",
    }
    paths["file"].write_text("not a directory\n")
    paths["dir"].mkdir()
    paths["binary"].write_bytes(b"\xff\xfe\x00loss: 1")
    paths["list"].write_text("- loss\n- optim\n")
    paths["scalar"].write_text("42\n")
    paths["broken"].write_text("loss: [unclosed\n")
    paths["fake_st"].write_text("not safetensors")
    paths["unknown_key"].write_text("loss:\n  mod: jsd\n")
    paths["wrong_type"].write_text("train:\n  steps: many\n")
    paths["section_scalar"].write_text("loss: 3\n")
    return {name: str(path) for name, path in paths.items()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``opd-fast argv``: argparse errors exit via SystemExit, ours return 2."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_bad_input(argv: list[str], pattern: str, capsys) -> None:
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def _fill(argv: list[str], files: dict[str, str]) -> list[str]:
    return [arg.format(**files) for arg in argv]


# ---------------------------------------------------------------------------------------------------------------
# opd-fast (no or unknown command)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        ([], r"opd-fast: error: the following arguments are required: command \(run 'opd-fast --help'"),
        (["frobnicate"], r"argument command: invalid choice: 'frobnicate' \(choose from .*bench.*train.*diagnose"),
        (["bench", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    ],
)
def test_top_level(argv, pattern, capsys):
    assert_bad_input(argv, pattern, capsys)


# ---------------------------------------------------------------------------------------------------------------
# opd-fast bench

BENCH_CASES = [
    # bad numbers: 0, negative, non-numeric, float text, missing value
    *[
        ([option, value], rf"argument {option}: expected a positive integer, got {re.escape(shown)}")
        for option in ("--tokens", "--hidden", "--teacher-hidden", "--vocab", "--repeats", "--threads")
        for value, shown in (("0", "0"), ("-3", "-3"), ("abc", "'abc'"), ("1e3", "'1e3'"))
    ],
    (["--tokens", "8", "0"], r"argument --tokens: expected a positive integer, got 0"),
    (["--tokens"], r"argument --tokens: expected at least one argument"),
    (["--warmup", "-1"], r"argument --warmup: expected an integer >= 0, got -1"),
    (["--warmup", "x"], r"argument --warmup: expected an integer >= 0, got 'x'"),
    # unknown names
    (["--backends", "naive,jax"], r"argument --backends: unknown backend 'jax'; choose from naive,torch,"),
    (["--backends", ","], r"argument --backends: unknown backend \(none given\); choose from"),
    (["--modes", "train"], r"argument --modes: unknown mode 'train'; choose from fwd,bwd,fwd\+bwd"),
    (["--preset", "gpt5"], r"argument --preset: invalid choice: 'gpt5' \(choose from .*cpu-small"),
    (["--dtype", "fp64"], r"argument --dtype: invalid choice: 'fp64' \(choose from 'bf16', 'fp16', 'fp32'\)"),
    (["--device", "tpu"], r"argument --device: invalid choice: 'tpu' \(choose from 'cpu', 'cuda'\)"),
    # output paths that cannot be written: checked before anything runs
    (["--json", "{file}/out.json", *TINY], r"--json .*/out\.json: cannot write there: .*regular\.txt is a file, not"),
    (["--csv", "{file}/sub/out.csv", *TINY], r"--csv .*out\.csv: cannot write there: .*regular\.txt is a file, not"),
    (["--plot", "{file}/out.png", *TINY], r"--plot .*/out\.png: cannot write there: .*regular\.txt is a file, not"),
    (["--json", "{dir}", *TINY], r"--json .*empty_dir: cannot write there: .*empty_dir is a directory; give a file"),
]


@pytest.mark.parametrize(("argv", "pattern"), BENCH_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_bad_input(argv, pattern, files, capsys):
    assert_bad_input(["bench", *_fill(argv, files)], pattern, capsys)


@NO_GPU
def test_bench_cuda_without_gpu(capsys):
    assert_bad_input(["bench", "--device", "cuda", *TINY], r"^error: --device cuda but torch sees no CUDA GPU", capsys)


# ---------------------------------------------------------------------------------------------------------------
# opd-fast diagnose

DIAGNOSE_CASES = [
    (["{dir}/missing", "{dir}/missing2"], r"checkpoint not found: .*missing \(pass a model directory"),
    (["{dir}", "{dir}"], r"no \*\.safetensors file in the directory .*empty_dir"),
    (["{fake_st}", "{fake_st}"], r"cannot read .*fake\.safetensors: .*complete, uncorrupted \.safetensors"),
    (["{file}", "{file}"], r"regular\.txt is not a \.safetensors file; .*safe_serialization=True"),
    (["{dir}"], r"diagnose needs BEFORE and AFTER checkpoints, got only .*; pass two"),
    ([], r"the following arguments are required: CHECKPOINT"),
    *[
        (["a", "b", option, value], rf"argument {option}: expected a positive integer, got {re.escape(shown)}")
        for option in ("--top-k", "--rank", "--sim-k", "--threads")
        for value, shown in (("0", "0"), ("-2", "-2"), ("x", "'x'"))
    ],
    (["a", "b", "--hill-k", "1"], r"argument --hill-k: the Hill estimator needs k >= 2, got 1"),
    (["a", "b", "--eta", "-1"], r"argument --eta: expected a finite number >= 0 such as 1e-3, got -1"),
    (["a", "b", "--eta", "nan"], r"argument --eta: expected a finite number >= 0"),
    (["a", "b", "--eta", "tiny"], r"argument --eta: expected a number >= 0 such as 1e-3, got 'tiny'"),
    (["a", "b", "--alpha", "1"], r"argument --alpha: expected a fraction strictly between 0 and 1, got 1"),
    (["a", "b", "--alpha", "half"], r"argument --alpha: expected a fraction in \(0, 1\)"),
    (["a", "b", "--include", "("], r"argument --include: not a valid regular expression"),
    (["a", "b", "--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
    # output paths are checked before the (slow) checkpoint comparison: these checkpoints do not even exist
    (["a", "b", "--json", "{file}/report.json"], r"--json .*report\.json: cannot write there: .*is a file, not a"),
    (["a", "b", "--json", "{dir}"], r"--json .*empty_dir: cannot write there: .*is a directory; give a file path"),
    (["a", "b", "--plot", "{file}"], r"--plot .*regular\.txt: cannot write there: .*exists and is not a directory"),
]


@pytest.mark.parametrize(
    ("argv", "pattern"), DIAGNOSE_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_diagnose_bad_input(argv, pattern, files, capsys):
    assert_bad_input(["diagnose", *_fill(argv, files)], pattern, capsys)


@NO_GPU
def test_diagnose_cuda_without_gpu(files, capsys):
    assert_bad_input(["diagnose", "a", "b", "--device", "cuda"], r"--device cuda but torch sees no CUDA GPU", capsys)


# ---------------------------------------------------------------------------------------------------------------
# opd-fast train: config files, overrides, output directory. All of these fail before any training starts.

TRAIN_CASES = [
    # the YAML file
    (["--config", "{dir}/missing.yaml"], r"config file .*missing\.yaml does not exist; check the path"),
    (["--config", "{dir}"], r"config file .*empty_dir is a directory; pass a YAML file"),
    (["--config", "{binary}"], r"config file .*binary\.yaml cannot be read as UTF-8 text"),
    (["--config", "{list}"], r"config file .*list\.yaml must hold a mapping of sections, got list"),
    (["--config", "{scalar}"], r"config file .*scalar\.yaml must hold a mapping of sections, got int"),
    (["--config", "{broken}"], r"config file .*broken\.yaml is not valid YAML: .* at line 2, column 1$"),
    (["--config", "{unknown_key}"], r"unknown config key 'loss\.mod'; valid keys here: .*mode"),
    (["--config", "{wrong_type}"], r"train\.steps must be an integer \(e\.g\. 100\); got 'many'"),
    (["--config", "{section_scalar}"], r"loss must be a mapping of its keys \(mode, beta, "),
    (["--config"], r"argument --config: expected one argument"),
    # override syntax and keys
    (["noequals"], r"override 'noequals' must look like section\.key=value \(e\.g\. optim\.lr=3e-4\)"),
    (["=3"], r"override '=3' has an empty key part"),
    (["loss.=3"], r"override 'loss\.=3' has an empty key part"),
    (["bogus=1"], r"unknown config key 'bogus'; valid keys here: data, device, lora, loss"),
    (["loss.bogus=1"], r"unknown config key 'loss\.bogus'; valid keys here: .*temperature"),
    (["optim.lr=[1"], r"override 'optim\.lr=\[1': cannot parse the value as YAML \(.*\); quote text values"),
    # wrong value types
    (["train.steps=1.5"], r"train\.steps must be an integer \(e\.g\. 100\); got 1\.5"),
    (["train.steps=true"], r"train\.steps must be an integer \(e\.g\. 100\); got True"),
    (["seed=abc"], r"seed must be an integer \(e\.g\. 0\); got 'abc'"),
    (["optim.lr=fast"], r"optim\.lr must be a number \(e\.g\. 0\.5, 1e-4, \.inf\); got 'fast'"),
    (["loss.beta=null"], r"loss\.beta must be a number"),
    (["loss.renormalize=maybe"], r"loss\.renormalize must be true or false; got 'maybe'"),
    (
        ["lora.target_modules=q_proj"],
        r"lora\.target_modules must be a list of str; got 'q_proj' \(write it as \[a, b\]",
    ),
    (["loss.mode.x=1"], r"loss\.mode must be a string \(quote it in YAML\); got \{'x': 1\}"),
    (["student=3"], r"student must be a mapping of its keys \(path, dtype, "),
    # out-of-range numbers: 0, negative, NaN, beyond the interval
    (["optim.lr=0"], r"optim\.lr must be in \(0\.0, inf\]; got 0"),
    (["optim.lr=-1e-4"], r"optim\.lr must be in \(0\.0, inf\]; got -0\.0001"),
    (["optim.lr=.nan"], r"optim\.lr must be a number; got nan"),
    (["train.steps=0"], r"train\.steps must be a positive integer; got 0"),
    (["rollout.batch_size=-4"], r"rollout\.batch_size must be a positive integer; got -4"),
    (["loss.beta=1.5"], r"loss\.beta must be in \[0\.0, 1\.0\]; got 1\.5"),
    (["rollout.top_p=0"], r"rollout\.top_p must be in \(0\.0, 1\.0\]; got 0"),
    (["loss.temperature=0"], r"loss\.temperature must be in \(0\.0, inf\); got 0"),
    (["loss.temperature=.inf"], r"loss\.temperature must be in \(0\.0, inf\); got inf"),
    (["loss.entry_clip=.inf"], r"loss\.entry_clip must be in \(0\.0, inf\); got inf"),
    (["train.cold_start_steps=500"], r"train\.cold_start_steps must be in \[0, 100\]; got 500"),
    # unknown names
    (
        ["loss.mode=kl"],
        r"loss\.mode must be one of reverse_kl, forward_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd, topk, "
        r"sampled_token, sft; got 'kl'",
    ),
    (["device=tpu"], r"device must be one of auto, cpu, cuda; got 'tpu'"),
    (["student.dtype=fp8"], r"student\.dtype must be one of fp32, bf16; got 'fp8'"),
    (["optim.schedule=step"], r"optim\.schedule must be one of cosine, linear, constant; got 'step'"),
    (["loss.backend=tpu"], r"loss\.backend must be one of auto, torch, triton, cuda; got 'tpu'"),
    (["loss.support=all"], r"loss\.support must be one of student, teacher, union, intersection; got 'all'"),
    (["data.verifier=fuzzy"], r"data\.verifier must be one of exact, same_letters, contains, boxed or"),
    (["loss.reward=no_such_module:f"], r"loss\.reward 'no_such_module:f' cannot be imported: No module named"),
    (["data.format_filter=nocolon"], r"data\.format_filter must be 'package\.module:function'; got 'nocolon'"),
    # missing or ignored inputs
    (["student.path={dir}/nowhere"], r"student\.path: .*nowhere is not a local transformers model directory"),
    (["data.task=nope"], r"data\.task=nope needs student\.path .*built-in demo always trains on its own"),
    (["data.train_path={dir}/x.jsonl"], r"data\.train_path=.*x\.jsonl needs student\.path"),
    (
        ["train.overlap_k=16"],
        r"train\.overlap_k=16 exceeds the vocabulary .*\(15 tokens\); use train\.overlap_k=15",
    ),
    (["loss.mode=topk", "loss.top_k=99"], r"loss\.top_k=99 exceeds the vocabulary .*\(15 tokens\)"),
    # output directory
    (["--out", "{file}/run"], r"--out .*regular\.txt/run: cannot write the run there: .*regular\.txt is a file, not"),
    (["--out", "{file}"], r"--out .*regular\.txt: cannot write the run there: .*exists and is not a directory"),
    (["out_dir={file}/run"], r"^error: out_dir .*regular\.txt/run: cannot write the run there"),
    # overrides may follow the options: this one reaches the config, not argparse's "unrecognized arguments"
    (["--out", "{dir}/run", "optim.lr=0"], r"^error: optim\.lr must be in \(0\.0, inf\]; got 0\.0"),
    (["optim.lr=0.1", "--out", "{dir}/run", "--bogus"], r"^opd-fast: error: unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("argv", "pattern"), TRAIN_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_bad_input(argv, pattern, files, capsys):
    assert_bad_input(["train", *_fill(argv, files)], pattern, capsys)


@NO_GPU
def test_train_cuda_without_gpu(capsys):
    assert_bad_input(
        ["train", "device=cuda"], r"^error: device=cuda but torch sees no CUDA GPU here; use device=cpu", capsys
    )


# ---------------------------------------------------------------------------------------------------------------
# The trainer's Python API: load_config and configs edited in code, refused by Trainer before any model loads


def test_load_config_raises_config_error(files):
    with pytest.raises(ConfigError, match=r"config file .*empty_dir is a directory"):
        load_config(files["dir"])
    with pytest.raises(ConfigError, match=r"cannot be read as UTF-8 text"):
        load_config(files["binary"])
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.mod'"):
        load_config(files["unknown_key"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be in"):
        load_config(None, [], optim={"lr": -1.0})


def test_exponent_notation_is_a_number(tmp_path):
    """PyYAML reads 3e-4 as text; the error messages' own example (optim.lr=3e-4) must work."""
    assert load_config(None, ["optim.lr=3e-4", "loss.temperature=1E0"]).optim.lr == 3e-4
    config_file = tmp_path / "run.yaml"
    config_file.write_text("optim:\n  lr: 1e-6\n")
    assert load_config(config_file).optim.lr == 1e-6
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer \(e\.g\. 100\); got '1e3'"):
        load_config(None, ["train.steps=1e3"])


def _edited(section: str | None, key: str, value) -> TrainConfig:
    config = TrainConfig()
    setattr(config if section is None else getattr(config, section), key, value)
    return config


@pytest.mark.parametrize(
    ("section", "key", "value", "pattern"),
    [
        ("loss", "mode", 3, r"loss\.mode must be one of .*; got 3"),
        ("loss", "mode", None, r"loss\.mode must be one of .*; got None"),
        ("optim", "lr", "fast", r"optim\.lr must be a number; got 'fast'"),
        ("optim", "lr", True, r"optim\.lr must be a number; got True"),
        ("train", "steps", 2.5, r"train\.steps must be a positive integer; got 2\.5"),
        ("train", "steps", -1, r"train\.steps must be a positive integer; got -1"),
        ("rollout", "temperature", float("inf"), r"rollout\.temperature must be in \(0\.0, inf\); got inf"),
        ("data", "teacher_template", None, r"data\.teacher_template must contain \{prompt\}"),
        ("data", "teacher_template", "{answer}", r"data\.teacher_template must contain \{prompt\}"),
        (None, "device", "gpu", r"device must be one of auto, cpu, cuda; got 'gpu'"),
    ],
)
def test_config_values_edited_in_code_are_validated(section, key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _edited(section, key, value).validate()


def test_trainer_refuses_a_bad_config_before_loading_models():
    config = _edited("optim", "lr", 0.0)
    config.student.path = "/nonexistent/model"  # never reached: validation comes first
    with pytest.raises(ConfigError, match=r"optim\.lr must be in \(0\.0, inf\]; got 0\.0"):
        Trainer(config)


# ---------------------------------------------------------------------------------------------------------------
# The console entry point: exit 2, one line, no traceback (a real process, once)


def test_console_script_bad_output_path_exits_2_without_traceback(files):
    out = subprocess.run(
        [sys.executable, "-m", "opd_fast.cli", "bench", "--json", f"{files['file']}/out.json", *TINY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --json ") and "Traceback" not in out.stderr
    assert out.stdout == ""  # nothing was benchmarked
