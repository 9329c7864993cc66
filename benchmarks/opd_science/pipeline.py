"""The whole reproduction: models (cached), runs, measurements, claims, report."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import claims, measure, models, report, runs
from .corpus import SkillTask
from .models import BaseSpec, TeacherSpec
from .runs import RUNS, FinetuneSpec


@dataclass(frozen=True)
class Preset:
    base: BaseSpec
    teacher_steps: int
    finetune: FinetuneSpec
    final_eval_size: int  # problems in the final, per-problem (paired) evaluation
    analysis_size: int  # rollouts per checkpoint for the overlap and drift statistics
    sim_k: int

    @property
    def teacher_specs(self) -> dict[str, TeacherSpec]:
        common = dict(steps=self.teacher_steps, batch=self.base.batch, lr=self.base.lr)
        return {
            "teacher": TeacherSpec("direct", "direct", **common),
            "incompatible_teacher": TeacherSpec("mixed", "think", **common),
        }

    @property
    def diagnose_top_k(self) -> int:
        """Principal angles on the top 1/8 of the spectrum: the paper's k = 512 of Qwen3-8B's 4096."""
        return max(1, self.base.hidden // 8)

    @property
    def diagnose_rank(self) -> int:
        """The principal-weight mask from a rank-(hidden/64) reconstruction: the paper's r = 64 of 4096."""
        return max(1, self.base.hidden // 64)


PRESETS = {
    "full": Preset(
        base=BaseSpec(hidden=128, layers=4, heads=4, steps=1000, batch=64, lr=1e-3),
        teacher_steps=400,
        finetune=FinetuneSpec(
            steps=200, batch=64, lr=3e-5, eval_every=20, eval_size=384, checkpoints=5, overlap_k=4, lock_rank=16
        ),
        final_eval_size=1536,
        analysis_size=256,
        sim_k=16,
    ),
    "quick": Preset(
        base=BaseSpec(hidden=64, layers=2, heads=4, steps=300, batch=32, lr=3e-3),
        teacher_steps=30,
        finetune=FinetuneSpec(
            steps=6, batch=8, lr=3e-5, eval_every=3, eval_size=24, checkpoints=3, overlap_k=4, lock_rank=16
        ),
        final_eval_size=48,
        analysis_size=24,
        sim_k=16,
    ),
}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def _teacher_accuracies(preset: Preset, prepared: models.Models, tokenizer, log) -> dict:
    """Greedy accuracy of every model that teaches, on the prompts it is used with, per problem."""
    size = preset.final_eval_size
    base = measure.load_model(prepared.base)
    teacher = measure.load_model(prepared.teachers["teacher"])
    incompatible = measure.load_model(prepared.teachers["incompatible_teacher"])
    direct, think = SkillTask("direct"), SkillTask("think")
    log("evaluating the base and the teachers")
    return {
        "base": measure.correctness(base, tokenizer, direct, size),
        "base_think_prompts": measure.correctness(base, tokenizer, think, size),
        "base_with_answer_in_context": measure.correctness(base, tokenizer, direct, size, runs.PRIVILEGED_TEMPLATE),
        "teacher": measure.correctness(teacher, tokenizer, direct, size),
        "incompatible_teacher": measure.correctness(incompatible, tokenizer, direct, size),
        "incompatible_teacher_think_prompts": measure.correctness(incompatible, tokenizer, think, size),
    }


def _measure_run(run: runs.RunSpec, trained: dict, preset: Preset, prepared: models.Models, tokenizer) -> dict:
    """Final per-problem accuracy, visited-state statistics at step 0 and every checkpoint, drift, geometry."""
    task = SkillTask(run.prompt_style)
    ckpts = [Path(c) for c in trained["checkpoints"]]
    teacher_dir = prepared.base if run.teacher == "self" else prepared.teachers[run.teacher]
    teacher = measure.load_model(teacher_dir)
    common = dict(teacher_template=run.teacher_template, k=preset.finetune.overlap_k)
    visited = []
    for weights in [None, *(c / "model.safetensors" for c in ckpts)]:
        student = measure.load_model(prepared.base, weights)
        stats = measure.visited_state_statistics(student, teacher, tokenizer, task, preset.analysis_size, **common)
        step = 0 if weights is None else int(weights.parent.name.split("-")[1])
        visited.append({"step": step, **stats})
    final = measure.load_model(prepared.base, ckpts[-1] / "model.safetensors")
    teacher_samples = measure.visited_state_statistics(
        final, teacher, tokenizer, task, preset.analysis_size, sampler="teacher", **common
    )
    geometry = measure.geometry(
        prepared.base, ckpts, top_k=preset.diagnose_top_k, rank=preset.diagnose_rank, sim_k=preset.sim_k
    )
    return {
        **trained,
        "prompt_style": run.prompt_style,
        "teacher": run.teacher,
        "final_correct": measure.correctness(final, tokenizer, task, preset.final_eval_size),
        "visited_states": visited,
        "final_on_teacher_samples": teacher_samples,
        "geometry": geometry,
    }


def run(preset_name: str, out: Path, cache: Path, docs: Path | None, *, threads: int, progress: bool = True, log=print):
    """Everything; writes ``out/results.json`` (and, with ``docs``, the committed report) and returns the results."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint read would drown the log
    preset = PRESETS[preset_name]
    started = time.perf_counter()
    prepared = models.prepare(preset.base, preset.teacher_specs, cache, progress=progress, log=log)
    tokenizer = AutoTokenizer.from_pretrained(prepared.base, local_files_only=True)
    reference = _teacher_accuracies(preset, prepared, tokenizer, log)
    results: dict = {}
    bar = tqdm(RUNS, desc="fine-tuning runs", unit="run", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        log(f"run {spec.name}: {spec.label.strip()}")
        trained = runs.train(
            spec, preset.finetune, prepared.base, prepared.teachers, out / "runs" / spec.name, progress=progress
        )
        results[spec.name] = _measure_run(spec, trained, preset, prepared, tokenizer)
    data = {
        "preset": preset_name,
        "settings": {
            **asdict(preset),
            "diagnose_top_k": preset.diagnose_top_k,
            "diagnose_rank": preset.diagnose_rank,
            "teacher_specs": {k: asdict(v) for k, v in preset.teacher_specs.items()},
            "threads": threads,
            "vocab_size": len(tokenizer),
        },
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "commit": _commit(),
        },
        "models": prepared.info,
        "reference_correct": reference,
        "runs": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    data["claims"] = claims.evaluate(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / report.RESULTS_FILE).write_text(json.dumps(report.to_json(data), indent=1) + "\n")
    if docs is not None:
        report.write(data, docs)
    return data
