"""The fine-tuning runs, with ``opd_fast.trainer.Trainer`` used as a user would (``section.key=value`` overrides).

Two regimes, each the protocol of the papers it tests:

* **accuracy runs** (``regime="main"``): every method from the same pretrained base at one learning rate
  (:attr:`FinetuneSpec.lr`) and token budget, the main ones over several seeds. The learning rate scales the
  geometry paper's 1e-6 at width 4096 to width 128 as Adam learning rates of hidden matrices scale with 1/width
  (μP): 1e-6 · 4096/128 ≈ 3e-5. It moves most weights by more than a bf16 ulp, so these runs say nothing
  about bf16-visible update geometry.
* **geometry runs** (``regime="geometry"``): the geometry paper's protocol. SFT's update is measured from the
  base to its checkpoint (the accuracy-regime SFT run, seed 0); OPD and RLVR start from that SFT checkpoint
  (the *anchor*) and train at :attr:`FinetuneSpec.geometry_lr` = 1e-6, the paper's own learning rate: the
  paper's Qwen3-8B and this base are both initialised at std 0.02 (the Llama / Qwen3 ``initializer_range``), so
  an Adam step of 1e-6 moves a weight by the same relative amount, small against a bf16 ulp (2⁻⁸ relative),
  and most bf16 weights stay put: the regime in which bf16-visible sparsity separates methods. The geometry
  paper's controls (sparsified update tokens, off-policy rollouts, an RLVR-dominated objective mix) run there
  too.

Common settings: constant learning rate, no warm-up, Adam β = (0.9, 0.98) and no weight decay (the geometry
paper's OPD run: constant 1e-6, β = (0.9, 0.98), weight decay 0.1, whose shrinkage 1e-7 per step is negligible
over a run), gradient clipping 1, rollouts of ``batch`` prompts per step sampled at temperature 1 with at most
:data:`corpus.MAX_COMPLETION_TOKENS` new tokens (worked traces, about 34 tokens on average), the loss on
completion tokens only. OPSD's examples carry the bare answer for its privileged context (:attr:`RunSpec.task`).
RLVR is GRPO-style (:mod:`.grpo`): :data:`GRPO_GROUP` samples per prompt, group-normalised advantages, the same
number of completions per step as every other method.
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
from .grpo import GroupBaselineTrainer, GroupedTask

PRIVILEGED_TEMPLATE = "{answer}|{prompt}"  # OPSD: the final answer before the question (RunSpec.task)
GRPO_GROUP = 4  # samples per prompt (Rethinking OPD's default; OPSD's GRPO baseline uses 8)
TOKEN_KEEP = 0.5  # the geometry paper's sparsification control keeps ρ ∈ {0.25, 0.5} of the tokens
RLVR_MIX_ALPHA = 0.05  # its objective mix α·A_OPD + (1 − α)·A_RLVR, α ∈ {0.75, …, 0.05, 0.01}: RLVR-dominated


@dataclass(frozen=True)
class FinetuneSpec:
    steps: int
    batch: int
    lr: float
    eval_every: int
    eval_size: int
    checkpoints: int  # evenly spaced, the last at the final step
    overlap_k: int  # k of the trainer's logged overlap and of the visited-state analysis
    lock_rank: int
    geometry_lr: float
    geometry_steps: int


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run. ``teacher``: "teacher", "incompatible_teacher", "same_data_teacher" or "self" (OPSD:
    the frozen start seeing :data:`PRIVILEGED_TEMPLATE`); ``prompt_style``: the prompts trained and evaluated on;
    ``seeded``: trained once per seed of the preset (else seed 0 only); ``regime``: "main" (from the base at
    :attr:`FinetuneSpec.lr`) or "geometry" (from the SFT anchor at :attr:`FinetuneSpec.geometry_lr`, measured for
    its update geometry only)."""

    name: str
    label: str
    teacher: str
    overrides: tuple[str, ...] = ()
    prompt_style: str = "direct"
    cold_start: bool = False  # the first 20% of the steps: SFT on format-filtered teacher samples
    lock: bool = False  # after 20% of the steps: gradients projected onto the rank-r subspace of the update
    group: int = 1  # samples per prompt with GRPO advantages (> 1: RLVR)
    seeded: bool = False
    regime: str = "main"

    @property
    def teacher_template(self) -> str:
        return PRIVILEGED_TEMPLATE if self.teacher == "self" else "{prompt}"

    @property
    def task(self) -> SkillTask:
        """The run's prompts; OPSD's examples carry the bare answer, which :data:`PRIVILEGED_TEMPLATE` puts before
        the question (the reference completion is a whole trace, not a hint)."""
        return SkillTask(self.prompt_style, "answer" if self.teacher == "self" else None)


SFT = ("loss.mode=sft", "rollout.source=teacher")
JSD = ("loss.mode=jsd", "loss.beta=0.5")  # OPSD v1's full-vocabulary generalized JSD, β = 0.5
GRPO = ("loss.mode=sampled_token", "loss.reward_mix=0.0")

RUNS = (
    RunSpec("sft", "SFT on teacher samples", "teacher", SFT, seeded=True),
    RunSpec("opd", "OPD, reverse KL", "teacher", seeded=True),
    RunSpec(
        "rlvr",
        f"RLVR: GRPO, {GRPO_GROUP} samples per prompt, 0/1 reward",
        "teacher",
        GRPO,
        group=GRPO_GROUP,
        seeded=True,
    ),
    RunSpec("opsd", "OPSD, answer as privileged context", "self", JSD, seeded=True),
    RunSpec(
        "offpolicy_sd",
        "off-policy self-distillation (privileged teacher's samples)",
        "self",
        (*JSD, "rollout.source=teacher"),
        seeded=True,
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
        "  + teacher-aligned prompts (data.select_pool: the half of a pool with the highest overlap mass)",
        "incompatible_teacher",
        ("data.select_pool=__POOL__",),
    ),
    RunSpec("opd_same_data", "OPD from a teacher with nothing new (the base, pretrained longer)", "same_data_teacher"),
    RunSpec("opd_lock", "OPD, subspace-locked after 20%", "teacher", lock=True),
    RunSpec("sft_lock", "SFT, subspace-locked after 20%", "teacher", SFT, lock=True),
    RunSpec("opd_geo", "geometry: OPD from the SFT anchor", "teacher", regime="geometry"),
    RunSpec(
        "rlvr_geo", "geometry: RLVR (GRPO) from the SFT anchor", "teacher", GRPO, group=GRPO_GROUP, regime="geometry"
    ),
    RunSpec(
        "opd_geo_sparse",
        f"geometry control: OPD on the top-divergence {TOKEN_KEEP:.0%} of tokens",
        "teacher",
        (f"loss.token_keep={TOKEN_KEEP}",),
        regime="geometry",
    ),
    RunSpec(
        "opd_geo_offpolicy",
        "geometry control: OPD's loss on teacher rollouts",
        "teacher",
        ("rollout.source=teacher",),
        regime="geometry",
    ),
    RunSpec(
        "opd_geo_rlvr_mix",
        f"geometry control: sampled-token OPD mixed with RLVR, α = {RLVR_MIX_ALPHA}",
        "teacher",
        ("loss.mode=sampled_token", f"loss.reward_mix={RLVR_MIX_ALPHA}"),
        regime="geometry",
    ),
)


class _NoTrainingCurvesFigure:
    """The trainer without its per-run training_curves.png: the report draws its own figures, and rendering one
    matplotlib figure per run was a third of the quick run's time."""

    def plot(self) -> None:
        return None


class ScienceTrainer(_NoTrainingCurvesFigure, Trainer):
    pass


class ScienceGroupTrainer(_NoTrainingCurvesFigure, GroupBaselineTrainer):
    pass


def run_config(
    run: RunSpec, spec: FinetuneSpec, student: Path, teachers: dict[str, Path], out_dir: Path, seed: int = 0
):
    """The trainer configuration of ``run`` (``student``: the base, or the SFT anchor for a geometry run)."""
    geometry = run.regime == "geometry"
    steps = spec.geometry_steps if geometry else spec.steps
    every = steps // spec.checkpoints
    overrides = [
        f"student.path={student}",
        f"seed={seed}",
        f"rollout.batch_size={spec.batch}",
        f"rollout.max_new_tokens={MAX_COMPLETION_TOKENS}",
        "rollout.temperature=1.0",
        f"optim.lr={spec.geometry_lr if geometry else spec.lr}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.beta2=0.98",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        f"train.steps={steps}",
        "train.log_every=1",
        # a geometry run is measured for its weights only: one evaluation, at the end
        f"train.eval_every={steps if geometry else spec.eval_every}",
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
        overrides += [f"train.cold_start_steps={max(1, steps // 5)}", "data.format_filter=task"]
    if run.lock:
        overrides += [
            f"train.subspace_lock_step={max(1, steps // 5)}",
            f"train.subspace_lock_rank={spec.lock_rank}",
        ]
    # prompt selection scores a pool of 4 batches and keeps the best half (data.select_keep = 0.5)
    extra = [o.replace("__POOL__", str(4 * spec.batch)) for o in run.overrides]
    return load_config(None, [*overrides, *extra], out_dir=str(out_dir))


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's checkpoint directories in step order."""
    return sorted((out_dir / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def train(
    run: RunSpec,
    spec: FinetuneSpec,
    student: Path,
    teachers: dict[str, Path],
    out_dir: Path,
    *,
    seed: int = 0,
    progress: bool,
) -> dict:
    """Train ``run`` into ``out_dir`` and return its curves. A finished run of the same configuration there is
    reused; a run of another configuration (or an unfinished one) is deleted and trained again."""
    marker = out_dir / "science_run.json"
    config = run_config(run, spec, student, teachers, out_dir, seed)
    if not marker.is_file() or json.loads(marker.read_text())["config"] != config.to_dict():
        shutil.rmtree(out_dir, ignore_errors=True)
        started = time.perf_counter()
        task = run.task
        if run.group > 1:
            ScienceGroupTrainer(config, task=GroupedTask(task, run.group), progress=progress).train()
        else:
            ScienceTrainer(config, task=task, progress=progress).train()
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
        "seed": seed,
        "seconds": json.loads(marker.read_text())["seconds"],
        "accuracy_curve": [{"step": s, "tokens": tokens.get(s, 0), "accuracy": a} for s, a in evals],
        "completion_tokens": cumulative,
        "loss_curve": curve("loss"),
        "train_overlap_mass_curve": curve("overlap/mass_student"),
        "checkpoints": [str(c) for c in checkpoints(out_dir)],
    }
