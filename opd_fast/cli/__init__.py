"""The ``opd-fast`` command line (docs/design.md §4): ``bench``, ``train``, ``diagnose`` and ``teacher-topk``, one
module each."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from opd_fast.cli._common import Parser
from opd_fast.cli.bench import add_bench_parser
from opd_fast.cli.diagnose import add_diagnose_parser
from opd_fast.cli.teacher_topk import add_teacher_topk_parser
from opd_fast.cli.train import add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="opd-fast", description="Fused on-policy distillation losses: benchmarks and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_train_parser(sub)
    add_diagnose_parser(sub)
    add_teacher_topk_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a subcommand's positionals in one run, so `train --out DIR a.b=1` leaves a.b=1 over:
    # train's section.key=value overrides may come before, between or after its options.
    if args.command == "train":
        overrides = [arg for arg in extra if not arg.startswith("-") and "=" in arg]
        args.overrides += overrides
        extra = [arg for arg in extra if arg not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args)
