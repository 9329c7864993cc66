"""The fine-tuning runs: every method from the same base, at the same small learning rate and token budget, with
``opd_fast.trainer.Trainer`` used as a user would (a config of ``section.key=value`` overrides).

Common settings: constant learning rate, no warm-up, Adam β = (0.9, 0.98) and no weight decay (the geometry
paper's OPD run: constant 1e-6, β = (0.9, 0.98), weight decay 0.1, which at its learning rate moves weights by
~3e-5 relative over the run: negligible there, but not at ours), gradient clipping 1, rollouts of
``batch`` prompts per step sampled at temperature 1 with at most :data:`corpus.MAX_COMPLETION_TOKENS` new tokens,
the loss on completion tokens only. The learning rate scales the paper's 1e-6 at width 4096 to width 128 as
Adam learning rates of hidden matrices scale with 1/width (μP): 1e-6 · 4096/128 ≈ 3e-5.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from opd_fast.trainer import Trainer, load_config
from opd_fast.trainer.plots import read_metrics

from .corpus import MAX_COMPLETION_TOKENS, SkillTask

PRIVILEGED_TEMPLATE = "{answer}|{prompt}"  # OPSD: the reference answer before the question


@dataclass(frozen=True)
class FinetuneSpec:
    steps: int
    batch: int
    lr: float
    eval_every: int
    eval_size: int
    checkpoints: int  # evenly spaced, the last at the final step
    overlap_k: int
    lock_rank: int


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run. ``teacher``: "teacher", "incompatible_teacher" or "self" (OPSD: the frozen base
    seeing :data:`PRIVILEGED_TEMPLATE`); ``prompt_style``: the prompts trained and evaluated on."""

    name: str
    label: str
    teacher: str
    overrides: tuple[str, ...] = ()
    prompt_style: str = "direct"
    cold_start: bool = False  # the first 20% of the steps: SFT on format-filtered teacher samples
    lock: bool = False  # after 20% of the steps: gradients projected onto the rank-r subspace of the update

    @property
    def teacher_template(self) -> str:
        return PRIVILEGED_TEMPLATE if self.teacher == "self" else "{prompt}"


SFT = ("loss.mode=sft", "rollout.source=teacher")
JSD = ("loss.mode=jsd", "loss.beta=0.5")  # OPSD v1's full-vocabulary generalized JSD, β = 0.5

RUNS = (
    RunSpec("sft", "SFT on teacher samples", "teacher", SFT),
    RunSpec("opd", "OPD, reverse KL", "teacher"),
    RunSpec(
        "rlvr",
        "RLVR-like: REINFORCE, 0/1 verifiable reward",
        "teacher",
        ("loss.mode=sampled_token", "loss.reward_mix=0.0"),
    ),
    RunSpec("opsd", "OPSD, answer as privileged context", "self", JSD),
    RunSpec(
        "offpolicy_sd",
        "off-policy self-distillation (privileged teacher's samples)",
        "self",
        (*JSD, "rollout.source=teacher"),
    ),
    RunSpec("opd_incompatible", "OPD, incompatible (always-thinking) teacher", "incompatible_teacher"),
    RunSpec(
        "opd_incompatible_cold_start",
        "  + off-policy cold start (20% of steps)",
        "incompatible_teacher",
        cold_start=True,
    ),
    RunSpec(
        "opd_incompatible_aligned",
        "  + teacher-aligned prompts (the think template, `?`)",
        "incompatible_teacher",
        prompt_style="think",
    ),
    RunSpec("opd_lock", "OPD, subspace-locked after 20%", "teacher", lock=True),
    RunSpec("sft_lock", "SFT, subspace-locked after 20%", "teacher", SFT, lock=True),
)


def run_config(run: RunSpec, spec: FinetuneSpec, base: Path, teachers: dict[str, Path], out_dir: Path):
    """The trainer configuration of ``run``."""
    every = spec.steps // spec.checkpoints
    overrides = [
        f"student.path={base}",
        f"rollout.batch_size={spec.batch}",
        f"rollout.max_new_tokens={MAX_COMPLETION_TOKENS}",
        "rollout.temperature=1.0",
        f"optim.lr={spec.lr}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.beta2=0.98",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        f"train.steps={spec.steps}",
        "train.log_every=1",
        f"train.eval_every={spec.eval_every}",
        f"train.save_every={every}",
        f"train.keep_checkpoints={spec.checkpoints}",
        f"train.overlap_k={spec.overlap_k}",
        f"data.eval_size={spec.eval_size}",
        "device=cpu",
    ]
    if run.teacher == "self":
        overrides += ["teacher.self_distill=true", f"data.teacher_template={PRIVILEGED_TEMPLATE}"]
    else:
        overrides.append(f"teacher.path={teachers[run.teacher]}")
    if run.cold_start:
        overrides += [f"train.cold_start_steps={max(1, spec.steps // 5)}", "data.format_filter=task"]
    if run.lock:
        overrides += [
            f"train.subspace_lock_step={max(1, spec.steps // 5)}",
            f"train.subspace_lock_rank={spec.lock_rank}",
        ]
    return load_config(None, [*overrides, *run.overrides], out_dir=str(out_dir))


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's checkpoint directories in step order."""
    return sorted((out_dir / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def train(
    run: RunSpec, spec: FinetuneSpec, base: Path, teachers: dict[str, Path], out_dir: Path, *, progress: bool
) -> dict:
    """Train ``run`` into ``out_dir`` and return its curves. A finished run of the same configuration there is
    reused; a run of another configuration (or an unfinished one) is deleted and trained again."""
    marker = out_dir / "science_run.json"
    config = run_config(run, spec, base, teachers, out_dir)
    if not marker.is_file() or json.loads(marker.read_text())["config"] != config.to_dict():
        shutil.rmtree(out_dir, ignore_errors=True)
        started = time.perf_counter()
        Trainer(config, task=SkillTask(run.prompt_style), progress=progress).train()
        seconds = round(time.perf_counter() - started, 1)
        marker.write_text(json.dumps({"seconds": seconds, "config": config.to_dict()}, indent=1) + "\n")
    records = read_metrics(out_dir / "metrics.jsonl")
    tokens, cumulative = {0: 0}, 0
    for record in records:
        if "rollout/completion_tokens" in record:
            # the trainer logs every step (log_every=1): mean completion tokens per sequence of that step's batch
            cumulative += record["rollout/completion_tokens"] * spec.batch
            tokens[record["step"]] = cumulative
    evals = [(r["step"], r["eval/student_accuracy"]) for r in records if "eval/student_accuracy" in r]
    curve = lambda key: [(r["step"], r[key]) for r in records if key in r]  # noqa: E731
    return {
        "label": run.label,
        "seconds": json.loads(marker.read_text())["seconds"],
        "accuracy_curve": [{"step": s, "tokens": tokens.get(s, 0), "accuracy": a} for s, a in evals],
        "completion_tokens": cumulative,
        "loss_curve": curve("loss"),
        "train_overlap_mass_curve": curve("overlap/mass_student"),
        "checkpoints": [str(c) for c in checkpoints(out_dir)],
    }
