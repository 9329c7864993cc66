"""The whole reproduction: models (cached), runs, measurements, claims, report."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import claims, measure, models, report, runs
from .corpus import MAX_COMPLETION_TOKENS, SkillTask, mean_reference_tokens
from .models import BaseSpec, ContinuedPretrainingSpec, TeacherSpec
from .runs import RUNS, FinetuneSpec


@dataclass(frozen=True)
class Preset:
    base: BaseSpec
    teacher_steps: int
    finetune: FinetuneSpec
    final_eval_size: int  # problems in the final, per-problem (paired) evaluation
    analysis_size: int  # rollouts per checkpoint for the overlap and drift statistics
    sim_k: int
    seeds: int  # seeds of the main runs (RunSpec.seeded)
    same_data_steps: int  # further pretraining steps of the same-data teacher

    @property
    def teacher_specs(self) -> dict:
        common = dict(steps=self.teacher_steps, batch=self.base.batch, lr=self.base.lr)
        return {
            "teacher": TeacherSpec("direct", "direct", **common),
            "incompatible_teacher": TeacherSpec("mixed", "think", **common),
            "same_data_teacher": ContinuedPretrainingSpec(self.same_data_steps, self.base.batch, self.base.lr),
        }

    @property
    def diagnose_top_k(self) -> int:
        """Principal angles on the top 1/8 of the spectrum: the paper's k = 512 of Qwen3-8B's 4096."""
        return max(1, self.base.hidden // 8)

    @property
    def diagnose_rank(self) -> int:
        """The principal-weight mask from a rank-(hidden/64) reconstruction: the paper's r = 64 of 4096."""
        return max(1, self.base.hidden // 64)


# Sim_K's K and the lock rank: the paper's K = 16 sits well inside its updates' rank; here the updates' stable rank
# is about 5 at the accuracy learning rate (round 1) and lower in the geometry regime, so K = 16 of width 128 would
# span almost every direction the update has and "lock in" trivially. K = 2 keeps it below the stable rank.
SUBSPACE_K = 2

PRESETS = {
    "full": Preset(
        # round 2's traces are about 6× longer than round 1's bare answers (34 tokens on average, 64 at most), and a
        # rollout's cost grows with its length: the base is pretrained on 32 documents a step (1.5× the tokens of
        # round 1's 64 short ones), and a fine-tuning run trains on 80 steps × 16 rollouts, about 44k completion
        # tokens (round 1: 200 × 64 rollouts of 6 tokens, 75k), at the same learning rate. The whole run: 31 minutes
        # with the models cached, 47 from an empty cache, on the shared 2-core machine
        base=BaseSpec(hidden=128, layers=4, heads=4, steps=1000, batch=32, lr=1e-3),
        teacher_steps=400,
        finetune=FinetuneSpec(
            steps=80,
            batch=16,
            lr=3e-5,
            eval_every=10,
            eval_size=128,
            checkpoints=5,
            overlap_k=2,
            lock_rank=SUBSPACE_K,
            geometry_lr=1e-6,
            geometry_steps=50,
        ),
        final_eval_size=768,
        analysis_size=128,
        sim_k=SUBSPACE_K,
        seeds=3,
        same_data_steps=400,
    ),
    "quick": Preset(
        base=BaseSpec(hidden=64, layers=2, heads=4, steps=200, batch=32, lr=3e-3),
        teacher_steps=150,  # the teachers clearly stronger than the base (traces take more steps to learn)
        finetune=FinetuneSpec(
            steps=2,
            batch=16,
            lr=5e-4,  # large: two steps must move the models, so the verdicts past "no change" run
            eval_every=2,
            eval_size=16,
            checkpoints=2,
            overlap_k=2,
            lock_rank=SUBSPACE_K,
            geometry_lr=1e-4,  # a few steps at 1e-6 change no bf16 weight: quick checks the code path only
            geometry_steps=2,
        ),
        final_eval_size=48,
        analysis_size=8,
        sim_k=SUBSPACE_K,
        seeds=2,
        same_data_steps=30,
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
    direct, think = SkillTask("direct"), SkillTask("think")
    log("evaluating the base and the teachers")
    out = {
        "base": measure.correctness(base, tokenizer, direct, size),
        "base_think_prompts": measure.correctness(base, tokenizer, think, size),
        "base_with_answer_in_context": measure.correctness(
            base, tokenizer, SkillTask("direct", "answer"), size, runs.PRIVILEGED_TEMPLATE
        ),
    }
    for name in models.TEACHERS:
        out[name] = measure.correctness(measure.load_model(prepared.teachers[name]), tokenizer, direct, size)
    return out


def _export_anchor(base: Path, checkpoint: Path, out: Path) -> Path:
    """The SFT run's final checkpoint as a model directory (the geometry runs' start): the base's architecture
    and tokenizer with the checkpoint's weights. Named by a hash of those weights, so a changed SFT run gives a
    new anchor path, and the geometry runs (whose configurations name it) are trained again."""
    from transformers import AutoTokenizer

    weights = (checkpoint / "model.safetensors").read_bytes()
    directory = out / f"anchor-{hashlib.sha256(weights).hexdigest()[:12]}"
    if (directory / "model.safetensors").is_file():
        return directory
    model = measure.load_model(base, checkpoint / "model.safetensors")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(directory)
    return directory


def _measure_run(run: runs.RunSpec, trained: dict, preset: Preset, start: Path, prepared: models.Models, tokenizer):
    """Final per-problem accuracy, visited-state statistics at step 0 and every checkpoint, drift, geometry; a
    geometry run (from the SFT anchor ``start``) its update geometry only."""
    ckpts = [Path(c) for c in trained["checkpoints"]]
    geometry = measure.geometry(
        start, ckpts, top_k=preset.diagnose_top_k, rank=preset.diagnose_rank, sim_k=preset.sim_k
    )
    if run.regime == "geometry":
        return {**trained, "geometry": geometry}
    task = run.task
    teacher_dir = start if run.teacher == "self" else prepared.teachers[run.teacher]
    teacher = measure.load_model(teacher_dir)
    common = dict(teacher_template=run.teacher_template, k=preset.finetune.overlap_k)
    visited = []
    for weights in [None, *(c / "model.safetensors" for c in ckpts)]:
        student = measure.load_model(start, weights)
        stats = measure.visited_state_statistics(student, teacher, tokenizer, task, preset.analysis_size, **common)
        step = 0 if weights is None else int(weights.parent.name.split("-")[1])
        visited.append({"step": step, **stats})
    final = student  # the last checkpoint's weights
    teacher_samples = measure.visited_state_statistics(
        final, teacher, tokenizer, task, preset.analysis_size, sampler="teacher", **common
    )
    return {
        **trained,
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
    prepare_seconds = round(time.perf_counter() - started, 1)
    tokenizer = AutoTokenizer.from_pretrained(prepared.base, local_files_only=True)
    reference = _teacher_accuracies(preset, prepared, tokenizer, log)
    jobs = [(spec, seed) for spec in RUNS for seed in range(preset.seeds if spec.seeded else 1)]
    results: dict = {}
    anchor = None
    bar = tqdm(jobs, desc="fine-tuning runs", unit="run", disable=not progress)
    for spec, seed in bar:
        bar.set_postfix_str(f"{spec.name} seed {seed}")
        log(f"run {spec.name}, seed {seed}: {spec.label.strip()}")
        if spec.regime == "geometry" and anchor is None:
            # the geometry paper's anchor: the SFT run's (seed 0) final checkpoint
            anchor = _export_anchor(prepared.base, Path(results["sft"]["seeds"][0]["checkpoints"][-1]), out)
        start = anchor if spec.regime == "geometry" else prepared.base
        directory = out / "runs" / (spec.name if seed == 0 else f"{spec.name}-seed{seed}")
        trained = runs.train(spec, preset.finetune, start, prepared.teachers, directory, seed=seed, progress=progress)
        entry = results.setdefault(
            spec.name,
            {
                "label": spec.label,
                "regime": spec.regime,
                "teacher": spec.teacher,
                "prompt_style": spec.prompt_style,
                "seeds": [],
            },
        )
        entry["seeds"].append(_measure_run(spec, trained, preset, start, prepared, tokenizer))
    data = {
        "preset": preset_name,
        "settings": {
            **asdict(preset),
            "diagnose_top_k": preset.diagnose_top_k,
            "diagnose_rank": preset.diagnose_rank,
            "teacher_specs": {k: asdict(v) for k, v in preset.teacher_specs.items()},
            "grpo_group": runs.GRPO_GROUP,
            "token_keep": runs.TOKEN_KEEP,
            "rlvr_mix_alpha": runs.RLVR_MIX_ALPHA,
            "threads": threads,
            "vocab_size": len(tokenizer),
            "max_completion_tokens": MAX_COMPLETION_TOKENS,
            "reference_completion_tokens": {
                style: round(mean_reference_tokens(style, preset.final_eval_size), 2) for style in ("direct", "think")
            },
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
        "prepare_seconds": prepare_seconds,  # pretraining and deriving the models (about 0 with a warm cache)
    }
    # the measurements first: a failure in the verdicts leaves them for --report-only
    out.mkdir(parents=True, exist_ok=True)
    (out / report.RESULTS_FILE).write_text(json.dumps(report.to_json(data), indent=1) + "\n")
    data["claims"] = claims.evaluate(data)
    (out / report.RESULTS_FILE).write_text(json.dumps(report.to_json(data), indent=1) + "\n")
    if docs is not None:
        report.write(data, docs)
    return data
