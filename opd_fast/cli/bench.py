"""``opd-fast bench``: time and peak memory of the OPD losses per backend (docs/design.md §4)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from opd_fast._argtypes import nonnegative_int, positive_float, positive_int, probability
from opd_fast.cli._common import fail, preflight_problem


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or its help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from opd_fast.bench import cases, inputs

    quick, small = cases.DEFAULT_PRESETS["cpu"], cases.DEFAULT_PRESETS["cuda"]
    p = sub.add_parser(
        "bench",
        help="time forward+backward of the reverse-KL loss (and the other OPD losses) per backend",
        description="Time and peak memory of the reverse-KL loss (or --losses) per backend, side by side in one "
        f"run. With no shape options it runs the '{quick}' preset on the CPU (about a minute on 2 cores) and "
        f"'{small}' on a GPU; '--preset {small}' is the CPU's full sweep (about ten minutes and 6 GB on 2 cores). "
        "A run estimated to take minutes or much of the free memory is announced with a warning first.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--backends",
        type=_csv_choices(cases.BENCH_BACKENDS, "backend"),
        default=None,
        help=f"comma-separated subset of {','.join(cases.BENCH_BACKENDS)} (default: all; unavailable ones are reported "
        "as skipped with the reason; torch, triton and cuda are opd_fast's, shown as opd_fast/torch etc.)",
    )
    p.add_argument("--tokens", type=positive_int, nargs="+", help="token counts N to sweep (default: the preset's)")
    p.add_argument("--hidden", type=positive_int, help="student hidden size Hs (default: the preset's)")
    p.add_argument("--teacher-hidden", type=positive_int, help="teacher hidden size Ht (default: Hs)")
    p.add_argument("--vocab", type=positive_int, help="vocabulary size V (default: the preset's)")
    p.add_argument(
        "--preset",
        choices=sorted(cases.PRESETS),
        help=f"the shapes swept: {'; '.join(_preset_text(name, shape) for name, shape in cases.PRESETS.items())} "
        f"(default: {quick} on the CPU, {small} on a GPU)",
    )
    p.add_argument(
        "--dtype", choices=sorted(cases.DTYPES), nargs="+", default=["fp32"], help="one or more dtypes (default: fp32)"
    )
    p.add_argument(
        "--modes", type=_csv_choices(cases.MEASURED_MODES, "mode"), default="fwd+bwd", help="fwd, bwd and/or fwd+bwd"
    )
    p.add_argument(
        "--losses",
        type=_csv_choices(cases.LOSSES, "loss"),
        default="reverse_kl",
        help=f"comma-separated subset of {','.join(cases.LOSSES)} (jsd: beta 0.5; topk_overlap: k 16, mode fwd)",
    )
    p.add_argument(
        "--inputs",
        choices=inputs.INPUT_PRESETS,
        default="random",
        help="random: logits ~ N(0, 16), unrelated models; peaked: LM-like distributions with --entropy and "
        "--shared-mass",
    )
    p.add_argument(
        "--entropy",
        type=positive_float,
        default=inputs.PEAKED_ENTROPY,
        help="peaked inputs: mean next-token entropy in nats",
    )
    p.add_argument(
        "--shared-mass",
        type=probability,
        default=inputs.PEAKED_SHARED_MASS,
        help="peaked inputs: the student's mean probability mass on the tokens in both models' top-16",
    )
    p.add_argument(
        "--filter-eps",
        type=positive_float,
        help="turn on our backends' gradient filtering with this threshold (default: exact); rows report the "
        "share of tiles skipped",
    )
    p.add_argument(
        "--predict",
        choices=("measured", "h100", "h200", "off"),
        default=None,
        help="add the performance model's predicted time per row (pred. ms; JSON predicted_ms) for these device "
        "ceilings: measured (timed on this GPU first), or the named H100/H200 ones (default: measured on a GPU, "
        "off on the CPU, where the model, which is for GPUs, says nothing about the time)",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per case (at least)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed calls per case first")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the results as CSV (environment in env_* columns)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory vs tokens")
    p.set_defaults(run=run_bench)


def _preset_text(name: str, shape: dict) -> str:
    """The preset as --help lists it: "cpu-quick N=128,256,512 H=64 V=32768", H=Hs/Ht where they differ."""
    hs, ht = shape["hidden"], shape["teacher_hidden"]
    hidden = hs if hs == ht else f"{hs}/{ht}"
    return f"{name} N={','.join(map(str, shape['tokens']))} H={hidden} V={shape['vocab']}"


def _ceilings(choice: str | None, device: torch.device, matmul_tflops: float | None):
    """The device ceilings the rows are predicted with (None: no prediction); see --predict."""
    from opd_fast import perf_model

    choice = choice or ("measured" if device.type == "cuda" else "off")
    if choice == "off":
        return None
    if choice == "measured":
        return perf_model.measure_ceilings(device, matmul_tflops)
    return perf_model.DEVICES[choice]


def run_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from opd_fast import perf_model
    from opd_fast.bench import cases, estimate, report, runner

    outputs = [(f"--{option}", getattr(args, option), False) for option in ("json", "csv", "plot")]
    problem = preflight_problem(args.device, outputs, plot=bool(args.plot))
    if problem:
        return fail(problem)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.predict == "measured" and device.type != "cuda":
        return fail("--predict measured times the GPU's ceilings; on the CPU name them: --predict h100 or h200")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(cases.PRESETS[args.preset or cases.DEFAULT_PRESETS[device.type]])
    for key in ("tokens", "hidden", "teacher_hidden", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.teacher_hidden is None and args.hidden is not None and args.preset is None:
        shape["teacher_hidden"] = args.hidden
    names = args.backends or list(cases.BENCH_BACKENDS)
    options = dict(
        inputs=args.inputs,
        filter_eps=args.filter_eps,
        target_entropy=args.entropy,
        target_shared_mass=args.shared_mass,
    )
    measured = [
        cases.Case(name, n, shape["hidden"], shape["teacher_hidden"], shape["vocab"], dtype, mode, loss, **options)
        for loss in args.losses
        for dtype in args.dtype
        for mode in (["fwd"] if loss == "topk_overlap" else args.modes)
        for n in shape["tokens"]
        for name in names
    ]
    warning = estimate.run_warning(measured, device, warmup=args.warmup, repeats=args.repeats)
    if warning:
        print(warning, file=sys.stderr)
    matmul_tflops = perf_model.measure_matmul_tflops(device) if device.type == "cuda" else None
    ceilings = _ceilings(args.predict, device, matmul_tflops)
    env = runner.environment(device, matmul_tflops)
    if ceilings is not None:
        env["predicted_with"] = asdict(ceilings)
    rows = []
    for case in tqdm(measured, desc="opd-fast bench", unit="case", file=sys.stderr):
        timing = dict(warmup=args.warmup, repeats=args.repeats, matmul_tflops=matmul_tflops, ceilings=ceilings)
        rows.append(runner.run_case(case, device, **timing))
    print(f"device: {env['gpu'] or env['cpu']} ({device}), torch {env['torch']}, threads {env['threads']}")
    if ceilings is not None:
        print(
            f"pred. ms: the performance model (predicted, not measured) at {ceilings.name}: "
            f"{ceilings.matmul_tflops:.0f} TFLOP/s, {ceilings.copy_gbps:.0f} GB/s"
        )
    print(report.format_table(rows))
    try:
        if args.json:
            report.write_json(args.json, env, rows)
            print(f"wrote {args.json}")
        if args.csv:
            report.write_csv(args.csv, env, rows)
            print(f"wrote {args.csv}")
        if args.plot:
            title = (
                f"{'/'.join(args.losses)}, Hs/Ht={shape['hidden']}/{shape['teacher_hidden']}, V={shape['vocab']}, "
                f"{'/'.join(args.dtype)}, {args.inputs} inputs, {env['gpu'] or 'CPU'}"
            )
            report.plot(args.plot, rows, title)
            print(f"wrote {args.plot}")
    except OSError as exc:
        return fail(f"cannot write the output: {exc}")
    return 0
