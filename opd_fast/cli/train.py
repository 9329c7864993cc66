"""``opd-fast train``: on-policy distillation with the bundled trainer (docs/design.md §4)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from opd_fast.cli._common import fail, one_line, output_path_problem
from opd_fast.trainer.config import TrainConfig


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="on-policy distillation training (the built-in CPU demo when no model is given)",
        description="Train a student against a teacher with opd_fast's fused losses. With no student.path it runs "
        "the built-in demo end to end on the CPU. Settings come from defaults, then --config, then "
        "section.key=value overrides (e.g. loss.mode=jsd optim.lr=1e-5 student.path=/models/student).",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with the sections of TrainConfig")
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"output directory: metrics.jsonl, checkpoints, plots, summary.json (default: the config's out_dir, "
        f"else ./{TrainConfig.out_dir}; the demo caches its teacher and cold-started student in DIR/demo)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(run=run_train)


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
                    "on its own anagram task; drop the setting or give the models"
                )
        # Its vocabulary is known before any training: a k beyond it would fail only after the demo's
        # first two stages (minutes), at the first top-k call.
        from opd_fast.trainer.config import check_vocabulary_settings
        from opd_fast.trainer.demo import demo_vocab_size

        check_vocabulary_settings(config, demo_vocab_size())


def run_train(args: argparse.Namespace) -> int:
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
