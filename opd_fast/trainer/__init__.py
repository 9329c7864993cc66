"""The bundled on-policy distillation trainer (``opd-fast train``); see :mod:`opd_fast.trainer.loop`."""

from __future__ import annotations

import json
from pathlib import Path

from opd_fast.trainer.config import ConfigError, TrainConfig
from opd_fast.trainer.config_loader import load_config
from opd_fast.trainer.loop import Trainer, TrainingInterrupted
from opd_fast.trainer.plots import read_metrics
from opd_fast.trainer.subspace_lock import SubspaceLock

__all__ = ["ConfigError", "SubspaceLock", "TrainConfig", "Trainer", "TrainingInterrupted", "load_config", "run"]


def run(config: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Train as ``opd-fast train`` does: the built-in demo when no student is given, else the configured
    models. Writes metrics.jsonl, checkpoints, plots, the final student and summary.json; returns the summary."""
    if config.student.path is None:
        from opd_fast.trainer.demo import run_demo

        return run_demo(config, resume=resume, log=log)
    trainer = Trainer(config)
    try:
        return _train_and_summarize(trainer, config, resume, log)
    finally:
        trainer.close()


def _train_and_summarize(trainer: Trainer, config: TrainConfig, resume: bool, log) -> dict:
    out_dir = Path(config.out_dir)
    resuming = resume and (out_dir / "checkpoints" / "latest").is_file()
    if resume and not resuming:
        log(f"--resume: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0")
    trainer.train(resume=resuming)
    trainer.export(out_dir / "student_final")
    before = next((r["eval/student_accuracy"] for r in read_metrics(out_dir / "metrics.jsonl") if r["step"] == 0), None)
    summary = {
        "teacher_accuracy": trainer.evaluate(trainer.teacher) if trainer.teacher is not None else None,
        "student_accuracy_before": before,
        "student_accuracy_after": trainer.evaluate(),
        "steps": config.train.steps,
        "loss_mode": config.loss.mode,
    }
    if trainer.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
