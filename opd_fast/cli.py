"""The ``opd-fast`` command line (docs/design.md §4)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from opd_fast._argtypes import nonnegative_int, positive_float, positive_int, probability
from opd_fast.diagnostics_cli import add_diagnose_parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``opd-fast bench: error: argument --tokens: ... (run ... --help)``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (run '{self.prog} --help' for usage)\n")


def one_line(message: object) -> str:
    """``message`` on one line: multi-line texts (YAML parser errors, OS errors) joined with spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: object) -> int:
    """Print ``error: message`` as one line on stderr; returns the exit status of bad input, 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def output_path_problem(path: str | os.PathLike, *, directory: bool = False) -> str | None:
    """Why ``path`` (a file to write, or a ``directory`` to create/fill) cannot be written; None when it can.

    Checked before any work starts, so a long benchmark or training run never fails at its very end.
    """
    target = Path(path)
    if target.exists():
        if directory and not target.is_dir():
            return f"{target} exists and is not a directory; choose a directory path"
        if not directory and target.is_dir():
            return f"{target} is a directory; give a file path such as {target / 'out'}"
        writable = target if directory else target.parent
        if not os.access(writable, os.W_OK):
            return f"{writable} is not writable; choose another path"
        return None
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory, so {target} cannot be created there; choose another path"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"the directory {ancestor} is not writable, so {target} cannot be created; choose another path"
    return None


def _csv_choices(choices: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; choose from {','.join(choices)}"
            )
        return items

    return parse


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from opd_fast import bench, bench_inputs

    p = sub.add_parser(
        "bench",
        help="time forward+backward of the reverse-KL loss (and the other OPD losses) per backend",
        description="Time and peak memory of the reverse-KL loss (or --losses) per backend, side by side in one "
        "run. With no shape options it runs the 'cpu-small' preset.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--backends",
        type=_csv_choices(bench.BACKENDS, "backend"),
        default=None,
        help=f"comma-separated subset of {','.join(bench.BACKENDS)} (default: all; unavailable ones are reported "
        "as skipped with the reason)",
    )
    p.add_argument("--tokens", type=positive_int, nargs="+", help="token counts N to sweep")
    p.add_argument("--hidden", type=positive_int, help="student hidden size Hs")
    p.add_argument("--teacher-hidden", type=positive_int, help="teacher hidden size Ht (default: Hs)")
    p.add_argument("--vocab", type=positive_int, help="vocabulary size V")
    p.add_argument("--preset", choices=sorted(bench.PRESETS), help="shapes of a real student/teacher pair")
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), nargs="+", default=["fp32"], help="one or more dtypes")
    p.add_argument(
        "--modes", type=_csv_choices(bench.MODES, "mode"), default=["fwd+bwd"], help="fwd, bwd and/or fwd+bwd"
    )
    p.add_argument(
        "--losses",
        type=_csv_choices(bench.LOSSES, "loss"),
        default=["reverse_kl"],
        help=f"comma-separated subset of {','.join(bench.LOSSES)} (jsd: beta 0.5; topk_overlap: k 16, mode fwd)",
    )
    p.add_argument(
        "--inputs",
        choices=bench_inputs.INPUT_PRESETS,
        default="random",
        help="random: logits ~ N(0, 16), unrelated models; peaked: LM-like distributions with --entropy and "
        "--shared-mass (default: random)",
    )
    p.add_argument(
        "--entropy",
        type=positive_float,
        default=bench_inputs.PEAKED_ENTROPY,
        help=f"peaked inputs: mean next-token entropy in nats (default {bench_inputs.PEAKED_ENTROPY})",
    )
    p.add_argument(
        "--shared-mass",
        type=probability,
        default=bench_inputs.PEAKED_SHARED_MASS,
        help="peaked inputs: the student's mean probability mass on the tokens in both models' top-16 "
        f"(default {bench_inputs.PEAKED_SHARED_MASS})",
    )
    p.add_argument(
        "--filter-eps",
        type=positive_float,
        help="turn on our backends' gradient filtering with this threshold (default: exact); rows report the "
        "share of tiles skipped",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per case (at least)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed calls per case first")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the results as CSV (environment in env_* columns)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory vs tokens")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from opd_fast import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but torch sees no CUDA GPU here; use --device cpu")
    for option in ("json", "csv", "plot"):
        path = getattr(args, option)
        problem = None if path is None else output_path_problem(path)
        if problem:
            return fail(f"--{option} {path}: cannot write there: {problem}")
    if args.plot:
        try:
            bench.require_matplotlib()
        except RuntimeError as exc:
            return fail(f"--plot: {exc}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(bench.PRESETS[args.preset or "cpu-small"])
    for key in ("tokens", "hidden", "teacher_hidden", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.teacher_hidden is None and args.hidden is not None and args.preset is None:
        shape["teacher_hidden"] = args.hidden
    names = args.backends or list(bench.BACKENDS)
    inputs = dict(
        inputs=args.inputs,
        filter_eps=args.filter_eps,
        target_entropy=args.entropy,
        target_shared_mass=args.shared_mass,
    )
    cases = [
        bench.Case(name, n, shape["hidden"], shape["teacher_hidden"], shape["vocab"], dtype, mode, loss, **inputs)
        for loss in args.losses
        for dtype in args.dtype
        for mode in (["fwd"] if loss == "topk_overlap" else args.modes)
        for n in shape["tokens"]
        for name in names
    ]
    matmul_tflops = bench.measure_matmul_tflops(device) if device.type == "cuda" else None
    env = bench.environment(device, matmul_tflops)
    rows = []
    for case in tqdm(cases, desc="opd-fast bench", unit="case", file=sys.stderr):
        rows.append(bench.run_case(case, device, warmup=args.warmup, repeats=args.repeats, matmul_tflops=matmul_tflops))
    print(f"device: {env['gpu'] or env['cpu']} ({device}), torch {env['torch']}, threads {env['threads']}")
    print(bench.format_table(rows))
    try:
        if args.json:
            bench.write_json(args.json, env, rows)
            print(f"wrote {args.json}")
        if args.csv:
            bench.write_csv(args.csv, env, rows)
            print(f"wrote {args.csv}")
        if args.plot:
            title = (
                f"{'/'.join(args.losses)}, Hs/Ht={shape['hidden']}/{shape['teacher_hidden']}, V={shape['vocab']}, "
                f"{'/'.join(args.dtype)}, {args.inputs} inputs, {env['gpu'] or 'CPU'}"
            )
            bench.plot(args.plot, rows, title)
            print(f"wrote {args.plot}")
    except OSError as exc:
        return fail(f"cannot write the output: {exc}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="on-policy distillation training (the built-in CPU demo when no model is given)",
        description="Train a student against a teacher with opd_fast's fused losses. With no student.path it runs "
        "the built-in demo end to end on the CPU. Settings come from defaults, then --config, then "
        "section.key=value overrides (e.g. loss.mode=jsd optim.lr=1e-5 student.path=/models/student).",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with the sections of TrainConfig")
    p.add_argument("--out", metavar="DIR", help="output directory (metrics.jsonl, checkpoints, plots, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(run=_run_train)


def _train_preflight(config, out_option: str) -> None:
    """Bad input that the trainer would only meet late (after the demo's first stages, or at the first
    write): refused up front with a ConfigError naming the key."""
    from opd_fast.trainer import ConfigError, TrainConfig
    from opd_fast.trainer.tasks import import_function, resolve_verifier

    problem = output_path_problem(config.out_dir, directory=True)
    if problem:
        raise ConfigError(f"{out_option} {config.out_dir}: cannot write the run there: {problem}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU here; use device=cpu or device=auto")
    resolve_verifier(config.data.verifier)
    if config.data.format_filter not in (None, "task"):
        import_function(config.data.format_filter, "data.format_filter")
    if config.loss.reward is not None:
        import_function(config.loss.reward, "loss.reward")
    if config.student.path is None:  # the demo trains on its own task: data settings would be ignored
        defaults = TrainConfig().data
        for key in ("task", "train_path", "eval_path", "verifier"):
            value = getattr(config.data, key)
            if value != getattr(defaults, key):
                raise ConfigError(
                    f"data.{key}={value} needs student.path (and teacher.path): the built-in demo always trains "
                    "on its own string-reversal task; drop the setting or give the models"
                )
        # Its vocabulary is known before any training: a k beyond it would fail only after the demo's
        # first two stages (minutes), at the first top-k call.
        from opd_fast.trainer.demo import build_tokenizer
        from opd_fast.trainer.tasks import ReverseTask

        vocab = len(build_tokenizer(ReverseTask().characters))
        ks = {"train.overlap_k": config.train.overlap_k}
        if config.loss.mode == "topk":
            ks["loss.top_k"] = config.loss.top_k
        for key, k in ks.items():
            if k > vocab:
                raise ConfigError(
                    f"{key}={k} exceeds the demo's vocabulary of {vocab} tokens; use {key}={vocab} or less"
                )


def _run_train(args: argparse.Namespace) -> int:
    from opd_fast.trainer import ConfigError, TrainingInterrupted, load_config, run
    from opd_fast.trainer.checkpoint import CheckpointError
    from opd_fast.trainer.demo import DEMO_DEFAULTS

    try:
        config = load_config(args.config, args.overrides, out_dir=args.out)
        if config.student.path is None:  # the demo: its defaults go under the user's settings
            config = load_config(args.config, args.overrides, base=DEMO_DEFAULTS, out_dir=args.out)
        _train_preflight(config, "--out" if args.out else "out_dir")
    except ConfigError as exc:
        return fail(exc)
    try:
        summary = run(config, resume=args.resume, log=lambda line: print(line, file=sys.stderr))
    except ConfigError as exc:
        return fail(exc)
    except CheckpointError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"{exc}; continue with --resume", file=sys.stderr)
        return 128 + exc.signum
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opd-fast", description="Fused on-policy distillation losses: benchmarks and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_train(sub)
    add_diagnose_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
