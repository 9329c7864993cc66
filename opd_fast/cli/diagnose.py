"""``opd-fast diagnose``: the command-line front end of :mod:`opd_fast.diagnostics` (docs/design.md §4).

Bad input (arguments, paths, unreadable checkpoints) ends with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable

import torch

from opd_fast import diagnostics as d
from opd_fast._argtypes import positive_int
from opd_fast.cli._common import fail, preflight_problem


def _hill_k(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"the Hill estimator needs k >= 2, got {value}")
    return value


def _eta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 1e-3, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 such as 1e-3, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) such as 0.5, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {text}")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a valid regular expression ({exc}): {text!r}") from None
    return text


def _setting_options(defaults: d.DiagnoseSettings) -> tuple[tuple[str, Callable[[str], object], str | None, str], ...]:
    """One option per :class:`DiagnoseSettings` field: (field, argparse type, metavar, help)."""
    return (
        (
            "top_k",
            positive_int,
            "K",
            f"singular subspace size for the principal angles, clipped to the matrix (default {defaults.top_k}); "
            "where it spans a whole side (rows or columns), that side's angles are 0 by construction and "
            "reported as - (JSON null)",
        ),
        ("eta", _eta, None, f"relative tolerance of a bf16-unchanged entry (default {defaults.eta:g})"),
        (
            "alpha",
            _fraction,
            "A",
            f"fraction of entries in the principal and low-magnitude masks (default {defaults.alpha})",
        ),
        (
            "rank",
            positive_int,
            "R",
            f"rank of the reconstruction of BEFORE behind the principal mask (default {defaults.rank})",
        ),
        (
            "sim_k",
            positive_int,
            "K",
            f"right singular vectors compared by Sim_K in a series (default {defaults.sim_k})",
        ),
        (
            "hill_k",
            _hill_k,
            "K",
            "top singular values in the Hill estimate (default ceil(sqrt(numerical rank of the update)))",
        ),
    )


def add_diagnose_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``diagnose CHECKPOINT CHECKPOINT [CHECKPOINT ...] [options]`` on ``subparsers``."""
    p = subparsers.add_parser(
        "diagnose",
        help="geometry of the weight update between checkpoints (sparsity, angles, stable rank, ...)",
        description="Per 2-D weight matrix and per layer type: bf16-aware update sparsity, principal angles of "
        "the top-k singular subspaces, normalized spectral shift, update/mask overlaps, stable rank, "
        "Frobenius norm and Hill tail index of the update (Shen et al., arXiv:2606.07082). Give BEFORE AFTER, "
        "or a series BEFORE ... AFTER in training order to add the subspace emergence Sim_K.",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="BEFORE AFTER [MORE ...]: model directories or .safetensors files; in a directory only the model's "
        "weights are read (the shards its index names, else model*.safetensors, else every *.safetensors)",
    )
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    defaults = d.DEFAULT_SETTINGS
    for field, kind, metavar, text in _setting_options(defaults):
        option = "--" + field.replace("_", "-")
        p.add_argument(option, type=kind, default=getattr(defaults, field), metavar=metavar, help=text)
    p.add_argument("--include", type=_regex, metavar="REGEX", help="only matrices whose name matches REGEX")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the float64 SVDs run (default cpu, as in the paper)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 can be faster on a machine shared with other jobs)",
    )
    p.set_defaults(run=run_diagnose)
    return p


def run_diagnose(args: argparse.Namespace) -> int:

    if len(args.checkpoints) < 2:
        return fail(
            f"diagnose needs BEFORE and AFTER checkpoints, got only {args.checkpoints[0]}; "
            "pass two model directories or .safetensors files"
        )
    outputs = [("--json", args.json, False), ("--plot", args.plot, True)]
    problem = preflight_problem(args.device, outputs, plot=bool(args.plot))
    if problem:
        return fail(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = d.DiagnoseSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(d.DiagnoseSettings)})
        report = d.diagnose(args.checkpoints, settings, include=args.include, device=args.device)
    except d.DiagnosticsError as exc:
        return fail(exc)
    print(d.format_table(report))
    try:
        if args.json:
            d.write_json(args.json, report)
            print(f"wrote {args.json}")
        if args.plot:
            for path in d.plot(report, args.plot):
                print(f"wrote {path}")
    except OSError as exc:
        return fail(f"cannot write the output: {exc}")
    return 0
