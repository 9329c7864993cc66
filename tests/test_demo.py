"""The built-in demo of `opd-fast train`: a quick run of every stage, and (slow) the full acceptance run."""

from __future__ import annotations

import json
import time

from opd_fast.trainer import demo, load_config
from opd_fast.trainer.demo import DEMO_DEFAULTS, run_demo

SUMMARY_KEYS = {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "sft_only_accuracy_after"}


def test_demo_stages_run_and_cache_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TEACHER_STEPS", 40)
    monkeypatch.setattr(demo, "COLD_START_STEPS", 3)
    monkeypatch.setattr(demo, "TEACHER_TARGET_ACCURACY", 0.0)  # 40 steps teach little; the stages are what count
    overrides = ["train.steps=6", "train.eval_every=3", "train.save_every=3", "data.eval_size=16", "device=cpu"]
    config = load_config(None, overrides, base=DEMO_DEFAULTS, out_dir=str(tmp_path))
    summary = run_demo(config, log=lambda _: None)
    assert set(summary) >= SUMMARY_KEYS and summary["steps"] == 6
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for name in ("metrics.jsonl", "training_curves.png", "accuracy_vs_steps.png", "student_final/config.json"):
        assert (tmp_path / name).is_file(), name
    teacher_files = sorted(p.name for p in (tmp_path / "demo" / "teacher").iterdir())
    log = []
    run_demo(config, log=log.append)  # a re-run skips the teacher and the cold start
    assert any("teacher cached" in line for line in log) and any("cold-started student cached" in line for line in log)
    assert sorted(p.name for p in (tmp_path / "demo" / "teacher").iterdir()) == teacher_files


def test_full_demo_meets_its_promises(tmp_path):
    """Acceptance: ≤ 10 minutes on a 2-core CPU, teacher ≥ 90%, the OPD student gains ≥ 30 points."""
    started = time.perf_counter()
    summary = run_demo(load_config(None, ["device=cpu"], base=DEMO_DEFAULTS, out_dir=str(tmp_path)), log=print)
    elapsed = time.perf_counter() - started
    assert elapsed < 600, elapsed
    assert summary["teacher_accuracy"] >= 0.9
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.30
