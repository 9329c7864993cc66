"""The built-in demo of `opd-fast train`: a quick run of every stage, and (slow) the full acceptance run."""

from __future__ import annotations

import json
import time

import pytest

from opd_fast.trainer import demo, load_config
from opd_fast.trainer.demo import DEMO_DEFAULTS, run_demo

SUMMARY_KEYS = {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "sft_only_accuracy_after"}


def test_demo_stages_run_and_cache_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "TEACHER_STEPS", 40)
    monkeypatch.setattr(demo, "COLD_START_STEPS", 3)
    monkeypatch.setattr(demo, "TEACHER_TARGET_ACCURACY", 0.0)  # 40 steps teach little; the stages are what count
    overrides = ["train.steps=6", "train.eval_every=3", "train.save_every=3", "data.eval_size=16", "device=cpu"]
    config = load_config(None, overrides, base=DEMO_DEFAULTS, out_dir=str(tmp_path))
    first_log = []
    summary = run_demo(config, log=first_log.append)
    assert first_log[0].startswith(f"demo: writing to {tmp_path} (choose with --out DIR)")
    assert set(summary) >= SUMMARY_KEYS and summary["steps"] == 6
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for name in ("metrics.jsonl", "training_curves.png", "accuracy_vs_steps.png", "student_final/config.json"):
        assert (tmp_path / name).is_file(), name
    teacher_files = sorted(p.name for p in (tmp_path / "demo" / "teacher").iterdir())
    log = []
    run_demo(config, log=log.append)  # a re-run skips the teacher and the cold start
    assert any("teacher cached" in line for line in log) and any("cold-started student cached" in line for line in log)
    assert sorted(p.name for p in (tmp_path / "demo" / "teacher").iterdir()) == teacher_files


@pytest.mark.slow
def test_full_demo_meets_its_promises(tmp_path):
    """Acceptance (slow tier): the whole demo as `opd-fast train` runs it. README promises about a minute and a half
    on a 2-core CPU; 5 minutes here leaves room for a loaded CI machine. Teacher ≥ 90%, the OPD student gains
    ≥ 30 points and ends ahead of the SFT-only student, as in every seed of benchmarks/demo_seeds.py."""
    started = time.perf_counter()
    summary = run_demo(load_config(None, ["device=cpu"], base=DEMO_DEFAULTS, out_dir=str(tmp_path)), log=print)
    elapsed = time.perf_counter() - started
    assert elapsed < 300, elapsed
    assert summary["teacher_accuracy"] >= 0.9
    assert summary["student_accuracy_after"] - summary["student_accuracy_before"] >= 0.30
    assert summary["student_accuracy_after"] > summary["sft_only_accuracy_after"]
