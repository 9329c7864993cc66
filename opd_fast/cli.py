"""The ``opd-fast`` command line (DESIGN.md §4)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from opd_fast.diagnostics_cli import add_diagnose_parser


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from opd_fast import bench

    p = sub.add_parser(
        "bench",
        help="time forward+backward of the reverse-KL loss per backend",
        description="Time and peak memory of the reverse-KL loss per backend, side by side in one run. "
        "With no shape options it runs the 'cpu-small' preset.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--backends",
        type=_csv_choices(bench.BACKENDS, "backend"),
        default=None,
        help=f"comma-separated subset of {','.join(bench.BACKENDS)} (default: all; unavailable ones are reported "
        "as skipped with the reason)",
    )
    p.add_argument("--tokens", type=_positive_int, nargs="+", help="token counts N to sweep")
    p.add_argument("--hidden", type=_positive_int, help="student hidden size Hs")
    p.add_argument("--teacher-hidden", type=_positive_int, help="teacher hidden size Ht (default: Hs)")
    p.add_argument("--vocab", type=_positive_int, help="vocabulary size V")
    p.add_argument("--preset", choices=sorted(bench.PRESETS), help="shapes of a real student/teacher pair")
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), nargs="+", default=["fp32"], help="one or more dtypes")
    p.add_argument(
        "--modes", type=_csv_choices(bench.MODES, "mode"), default=["fwd+bwd"], help="fwd, bwd and/or fwd+bwd"
    )
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per case (at least)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case first")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the results as CSV (environment in env_* columns)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory vs tokens")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from opd_fast import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    if args.plot:
        try:
            bench.require_matplotlib()
        except RuntimeError as exc:
            print(f"error: --plot: {exc}", file=sys.stderr)
            return 2
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
    cases = [
        bench.Case(name, n, shape["hidden"], shape["teacher_hidden"], shape["vocab"], dtype, mode)
        for dtype in args.dtype
        for mode in args.modes
        for n in shape["tokens"]
        for name in names
    ]
    matmul_tflops = bench.measure_matmul_tflops(device)
    env = bench.environment(device, matmul_tflops)
    rows = []
    for case in tqdm(cases, desc="opd-fast bench", unit="case", file=sys.stderr):
        rows.append(bench.run_case(case, device, warmup=args.warmup, repeats=args.repeats, matmul_tflops=matmul_tflops))
    print(f"device: {env['gpu'] or env['cpu']} ({device}), torch {env['torch']}, threads {env['threads']}")
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(args.json, env, rows)
        print(f"wrote {args.json}")
    if args.csv:
        bench.write_csv(args.csv, env, rows)
        print(f"wrote {args.csv}")
    if args.plot:
        title = (
            f"reverse KL, Hs/Ht={shape['hidden']}/{shape['teacher_hidden']}, V={shape['vocab']}, "
            f"{'/'.join(args.dtype)}, {env['gpu'] or 'CPU'}"
        )
        bench.plot(args.plot, rows, title)
        print(f"wrote {args.plot}")
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


def _run_train(args: argparse.Namespace) -> int:
    from opd_fast.trainer import ConfigError, TrainingInterrupted, load_config, run
    from opd_fast.trainer.checkpoint import CheckpointError
    from opd_fast.trainer.demo import DEMO_DEFAULTS

    try:
        config = load_config(args.config, args.overrides, out_dir=args.out)
        if config.student.path is None:  # the demo: its defaults go under the user's settings
            config = load_config(args.config, args.overrides, base=DEMO_DEFAULTS, out_dir=args.out)
        summary = run(config, resume=args.resume, log=lambda line: print(line, file=sys.stderr))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"{exc}; continue with --resume", file=sys.stderr)
        return 128 + exc.signum
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-fast", description="Fused on-policy distillation losses: benchmarks and tools."
    )
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
