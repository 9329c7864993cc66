"""The on-policy distillation training loop.

Each optimizer step: sample prompts → the student samples completions (or the teacher, or the dataset's
answers, for SFT) → the teacher runs over prompt + completion and returns final hidden states only →
the student's final hidden states → the fused loss on completion tokens → backward → AdamW step with
warm-up, schedule, gradient clipping and accumulation. Every ``log_every`` steps a line goes to
``metrics.jsonl`` (with top-k overlap and entropy diagnostics), every ``eval_every`` the held-out
accuracy, every ``save_every`` an atomic checkpoint.

Reproducibility: the prompts and the sampling randomness of step s are seeded from (seed, rank, s), and
checkpoints hold the weights, optimizer, scheduler, RNG states and any reused rollout, so a resumed run
continues the same trajectory and its losses match the uninterrupted run's exactly on CPU.

Data parallelism: under ``torchrun`` each rank samples its own prompts; the student's hidden-state
module is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU), so gradients — including the
lm_head's, which is applied inside the loss — are averaged across ranks. With ``train.fsdp`` the student is
sharded with FSDP2 instead (opd_fast.integrations.fsdp: the lm_head gathered once per micro-step, its
gradient averaged like every other), generation runs in lockstep over the ranks, and checkpoints hold the
full, unsharded state.

Where the sequences come from (the student, the teacher, the dataset's answers, a vLLM rollout engine, stored
sequences with the teacher's top-k) and the greedy evaluation: opd_fast.trainer.sampling.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from opd_fast import LMHead, TopKOverlap, linear_topk_overlap
from opd_fast.integrations.transformers import causal_lm
from opd_fast.trainer import checkpoint as ckpt
from opd_fast.trainer.bookkeeping import MetricsLog, StopRequest
from opd_fast.trainer.config import ConfigError, TrainConfig, check_vocabulary_settings, overlap_k
from opd_fast.trainer.losses import compute_loss, overlap_metrics
from opd_fast.trainer.modeling import (
    HiddenStates,
    apply_lora,
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
    shared_vocab_size,
)
from opd_fast.trainer.plots import plot_training_curves, read_metrics
from opd_fast.trainer.prompts import select_prompts
from opd_fast.trainer.rollout import Batch, encode_prompts, gather_positions, generate, make_batch
from opd_fast.trainer.sampling import Rollouts
from opd_fast.trainer.subspace_lock import SubspaceLock
from opd_fast.trainer.tasks import Task, build_task, resolve_format_filter, resolve_reward
from opd_fast.trainer.teacher import Teacher, TopKTeacher, build_topk_teacher
from opd_fast.trainer.teacher_topk import TopKShards

# Below this hidden size the models' per-op work (tokens × hidden²) is microseconds: one CPU thread runs it as fast as
# two that meet at an OpenMP barrier per op, and on a busy machine each barrier waits for a time slice. The demo
# (hidden 64/128) on a 2-core CPU: 95 s with one thread, 93 s with two; beside one other busy process 115 s with one
# thread, 211 s with two.
SMALL_MODEL_HIDDEN = 512


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written first."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint: {path}")


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but torch sees no CUDA GPU here; use device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer(Rollouts):
    """Builds everything from a :class:`TrainConfig` and runs :meth:`train`; the sampling of rollouts and the greedy
    evaluation are :class:`opd_fast.trainer.sampling.Rollouts`'s.

    ``task`` overrides the task built from ``config.data`` (the demo passes its own); ``progress`` shows a
    tqdm bar on rank 0.
    """

    def __init__(
        self, config: TrainConfig, *, task: Task | None = None, progress: bool = True, label: str = "opd-fast train"
    ) -> None:
        self.config = config.validate()
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = _resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.owns_process_group = self.world_size > 1 and not dist.is_initialized()
        if self.owns_process_group:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.label = label
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics = MetricsLog(self.metrics_path, enabled=self.is_main)
        torch.manual_seed(config.seed)
        self.task = task or build_task(
            config.data.task, config.data.train_path, config.data.eval_path, config.data.verifier
        )
        if config.student.path is None:
            raise ValueError("student.path is required (the built-in demo supplies its own models)")
        self.tokenizer = load_tokenizer(config.student, "student.path")
        self.needs_teacher = not (
            config.loss.mode == "sft" and config.rollout.source == "reference" and config.train.cold_start_steps == 0
        )
        student = load_causal_lm(config.student, "student.path", self.device)
        self.student = apply_lora(student, config.lora) if config.lora.enabled else student
        self.teacher: Teacher | None = None
        # A teacher known by its top-k log-probs only (teacher.server, teacher.engine=vllm): the top-k target loss.
        self.topk_teacher: TopKTeacher | None = None
        if config.teacher.topk_only:
            # A server's tokenizer is checked by a probe (TeacherServer.check_tokenizer); its teacher.path may name a
            # model that is not on this machine.
            if config.teacher.engine == "vllm":
                check_same_tokenizer(self.tokenizer, load_tokenizer(config.teacher, "teacher.path"))
            self.topk_teacher = build_topk_teacher(config.teacher, self.tokenizer)
        elif config.teacher.self_distill:
            # Frozen at the initial weights: the LoRA student with its adapters disabled, or a frozen copy.
            if config.lora.enabled:
                self.teacher = Teacher(self.student, adapters_disabled=True)
            else:
                self.teacher = Teacher(copy.deepcopy(student).eval().requires_grad_(False))
        elif self.needs_teacher and not config.teacher.offline:
            if config.teacher.path is None:
                raise ValueError(
                    f"teacher.path is required for loss.mode={config.loss.mode}, rollout.source={config.rollout.source}"
                )
            check_same_tokenizer(self.tokenizer, load_tokenizer(config.teacher, "teacher.path"))
            teacher = load_causal_lm(config.teacher, "teacher.path", self.device)
            self.teacher = Teacher(teacher.eval().requires_grad_(False))
        teacher_model = None if self.teacher is None else self.teacher.model
        self.vocab_size = shared_vocab_size(self.tokenizer, self.student, teacher_model)
        check_vocabulary_settings(config, self.vocab_size)
        self.overlap_k = overlap_k(config, self.vocab_size)
        self.cpu_threads = self._set_cpu_threads(student, teacher_model)
        self.rollout_engine = self._build_rollout_engine() if config.rollout.engine == "vllm" else None
        hidden = HiddenStates(self.student)
        if config.train.fsdp:
            self._shard_student()
            self.forward = hidden
        else:
            self.forward = torch.nn.parallel.DistributedDataParallel(hidden) if self.world_size > 1 else hidden
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2),
            weight_decay=config.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.eval_examples = self.task.eval_set(config.data.eval_size)
        self.format_filter = resolve_format_filter(config.data.format_filter, self.task)
        self.reward_fn = resolve_reward(config.loss.reward, self.task)
        # Offline sequences with the teacher's stored top-k (teacher.topk_dir): every step, or the cold start.
        self.topk_shards = TopKShards(config.teacher.topk_dir) if config.teacher.topk_dir is not None else None
        # The cold start: SFT on teacher samples, or the top-k target loss on the stored sequences.
        cold_mode = "sft" if self.topk_shards is None else "topk"
        self.cold_start_loss = dataclasses.replace(config.loss, mode=cold_mode, token_keep=1.0, reward_mix=1.0)
        self.selection: dict[str, float] = {}
        if config.data.select_pool is not None or config.data.dedup_threshold is not None:
            pool_size = config.data.select_pool or 4 * config.rollout.batch_size
            self.task, self.selection = select_prompts(
                self.task, config.data, pool_size, config.seed, self._probe_overlap_mass
            )
        self.lock = None
        if config.train.subspace_lock_step is not None:
            self.lock = SubspaceLock(
                self.student, rank=config.train.subspace_lock_rank, include=config.train.subspace_lock_include
            )
        self._rollouts: list[Batch] = []

    def _set_cpu_threads(self, *models) -> int:
        """Apply train.cpu_threads (see LoopConfig) on the CPU; returns torch's CPU thread count."""
        threads = self.config.train.cpu_threads
        if threads is None and self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            hidden = [getattr(causal_lm(m).config, "hidden_size", None) for m in models if m is not None]
            threads = 1 if None not in hidden and max(hidden) < SMALL_MODEL_HIDDEN else None
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        return torch.get_num_threads()

    def _shard_student(self) -> None:
        """FSDP2 over all ranks (train.fsdp): decoder layers, an untied lm_head, then the model."""
        from torch.distributed.device_mesh import init_device_mesh

        from opd_fast.integrations.fsdp import fully_shard_causal_lm

        if self.world_size < 2:
            raise ConfigError(
                "train.fsdp=true shards the student over the ranks: launch with torchrun --nproc_per_node=N (N >= 2), "
                "or set train.fsdp=false for one process"
            )
        if self.config.data.eval_size < self.world_size:
            raise ConfigError(
                f"data.eval_size ({self.config.data.eval_size}) must be at least the number of ranks "
                f"({self.world_size}) with train.fsdp: every rank evaluates in lockstep"
            )
        fully_shard_causal_lm(self.student, init_device_mesh(self.device.type, (self.world_size,)))

    def _student_head(self) -> LMHead:
        """The student's output head; under FSDP2 all-gathered, its gradient averaged over the ranks."""
        if self.config.train.fsdp:
            from opd_fast.integrations.fsdp import gathered_head

            return gathered_head(self.student)
        return LMHead.from_model(self.student)

    # ----------------------------------------------------------------------------------------------- schedule
    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine / linear decay to min_lr_ratio, or constant."""
        optim, total = self.config.optim, self.config.train.steps
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape

    def _seed_step(self, step: int) -> random.Random:
        """Seed torch for this step's sampling and return its prompt RNG: both pure functions of (seed, rank, step)."""
        torch.manual_seed(self.config.seed * 1_000_003 + self.rank * 7_919 + step)
        return random.Random(f"{self.config.seed}/{self.rank}/{step}")

    @torch.no_grad()
    def _overlap(self, batch: Batch, student_hidden, teacher_hidden, student_head: LMHead) -> TopKOverlap:
        """Per-token top-k agreement of the student and the teacher at the completion positions."""
        cfg = self.config
        return linear_topk_overlap(
            student_hidden,
            student_head.detach(),
            teacher_hidden,
            self.teacher.head(),
            k=self.overlap_k,
            mask=batch.completion_mask,
            temperature=cfg.loss.temperature,
            backend=cfg.loss.backend,
            vocab_size=self.vocab_size,
            teacher_temperature=cfg.loss.teacher_temperature,
        )

    @torch.no_grad()
    def _probe_overlap_mass(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        """For prompt selection: the student samples data.select_probe_tokens tokens per prompt; returns the
        per-token teacher–student top-k overlap mass of that rollout and its completion mask."""
        cfg = self.config
        prompts = encode_prompts(self.tokenizer, examples)
        completions = generate(
            self.student,
            self.tokenizer,
            prompts,
            max_new_tokens=cfg.data.select_probe_tokens,
            greedy=False,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            vocab_size=self.vocab_size,
        )
        batch = make_batch(
            self.tokenizer, examples, prompts, completions, self.task, self.device, self._teacher_prompts(examples)
        )
        stats = self._overlap(
            batch, self._student_hidden(batch), self.teacher.hidden_states(batch), self._student_head()
        )
        return stats.overlap_mass_student, batch.completion_mask

    # ---------------------------------------------------------------------------------------------- training
    def _micro_step(self, batch: Batch, diagnostics: bool, loss_config) -> dict[str, float]:
        student_hidden = gather_positions(self.forward(batch.input_ids, batch.attention_mask), batch.student_positions)
        teacher_hidden = teacher_head = teacher_topk = None
        if batch.teacher_topk_ids is not None:
            teacher_topk = batch.teacher_topk_ids, batch.teacher_topk_logprobs
        elif self.topk_teacher is not None:
            teacher_topk = self.topk_teacher.topk(batch, self.vocab_size)
        needs_hidden = loss_config.mode != "sft" and teacher_topk is None
        if self.teacher is not None and (needs_hidden or diagnostics):
            teacher_hidden, teacher_head = self.teacher.hidden_states(batch), self.teacher.head()
        rewards = None
        if loss_config.reward_mix < 1.0:
            rewards = torch.tensor(
                [self.reward_fn(e, c) for e, c in zip(batch.examples, batch.completions)], device=self.device
            )
        student_head = self._student_head()
        loss, metrics = compute_loss(
            loss_config,
            batch,
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            self.vocab_size,
            batch.behaviour_logprobs,
            rewards,
            teacher_topk,
        )
        (loss / self.config.optim.grad_accum).backward()
        if diagnostics and teacher_hidden is not None:
            metrics.update(
                overlap_metrics(
                    self._overlap(batch, student_hidden.detach(), teacher_hidden, student_head), batch.completion_mask
                )
            )
        if batch.correct:  # stored sequences (teacher.topk_dir) have no answer to check
            metrics["rollout/accuracy"] = sum(batch.correct) / len(batch.correct)
        metrics["rollout/completion_tokens"] = batch.completion_tokens / len(batch.examples)
        return metrics

    def train_step(self, step: int, diagnostics: bool) -> dict[str, float]:
        """One optimizer step (step is 0-based); returns the step's metrics averaged over micro-batches."""
        rng = self._seed_step(step)
        cold = step < self.config.train.cold_start_steps
        if step % self.config.rollout.reuse == 0 or not self._rollouts:
            offline = self.topk_shards is not None and (cold or self.config.teacher.offline)
            self._rollouts = self.shard_rollouts(rng) if offline else self.make_rollouts(rng, self._source(step, rng))
        loss_config = self.cold_start_loss if cold else self.config.loss
        self.student.train()
        records = []
        for index, batch in enumerate(self._rollouts):
            last = index == len(self._rollouts) - 1
            ddp = isinstance(self.forward, torch.nn.parallel.DistributedDataParallel)
            sync = self.forward.no_sync() if ddp and not last else nullcontext()
            with sync:
                records.append(self._micro_step(batch, diagnostics and index == 0, loss_config))
        if cold:
            records[0]["cold_start"] = 1.0
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The rollout engine's weights are the student's of before this step: pushed before it samples again.
        self._engine_stale = self.rollout_engine is not None
        metrics = {
            key: sum(r[key] for r in records if key in r) / sum(key in r for r in records)
            for key in dict.fromkeys(k for r in records for k in r)
        }
        metrics["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return self._all_reduce_mean(metrics)

    def _all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {k: v / self.world_size for k, v in zip(keys, values.tolist())}

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _lock_subspace(self) -> dict[str, int]:
        """Capture the subspace of each locked matrix's update so far and project gradients from now on.

        Adam's moments for those matrices restart: what they gathered before holds unprojected gradients.
        """
        ranks = self.lock.capture(self.student)
        self.lock.attach(self.student)
        for param in self.lock.locked_parameters(self.student).values():
            self.optimizer.state.pop(param, None)
        return ranks

    def save(self, step: int) -> Path | None:
        path = None
        full_state = ckpt.fsdp_full_state(self.student, self.optimizer) if self.config.train.fsdp else None
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.checkpoint_dir,
                step,
                self.student,
                self.optimizer,
                self.scheduler,
                self.config.to_dict(),
                self.config.train.keep_checkpoints,
                self._rollouts,
                self.lock.bases if self.lock is not None else None,
                full_state,
            )
        if self.world_size > 1:
            dist.barrier()
        return path

    def export(self, directory: Path) -> Path:
        """The trained student as a transformers model directory (plus tokenizer), loadable as a model path;
        LoRA adapters are merged into a copy of the base weights first; an FSDP2 student's full weights are
        gathered (on every rank) first."""
        full_state = ckpt.fsdp_full_model_state(self.student) if self.config.train.fsdp else None
        if self.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            merged = copy.deepcopy(self.student).merge_and_unload() if self.config.lora.enabled else self.student
            merged.save_pretrained(directory, state_dict=full_state)
            self.tokenizer.save_pretrained(directory)
        if self.world_size > 1:
            dist.barrier()
        return directory

    def close(self) -> None:
        """Shut the vLLM engines down (rollouts, an in-process teacher), then destroy the process group this trainer
        created under torchrun (none otherwise), as torch.distributed asks of every process before it exits; the
        trainer makes no collective calls afterwards. The engines first: an in-process engine under torchrun made its
        own groups inside the trainer's, and destroys them when it shuts down."""
        if self.rollout_engine is not None:
            self.rollout_engine.close()
            self.rollout_engine = None
        if self.topk_teacher is not None:
            self.topk_teacher.close()
            self.topk_teacher = None
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    # ---------------------------------------------------------------------------------------------------- run
    def train(self, resume: bool = False) -> dict:
        """Run to ``train.steps``; returns the final metrics. Raises TrainingInterrupted on SIGINT/SIGTERM."""
        cfg = self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume:
            path = ckpt.latest_checkpoint(self.checkpoint_dir)
            if path is None:
                raise ckpt.CheckpointError(f"--resume: no checkpoint in {self.checkpoint_dir}")
            start, self._rollouts, bases = ckpt.load_checkpoint(
                path, self.student, self.optimizer, self.scheduler, self.device, fsdp=self.config.train.fsdp
            )
            self._engine_stale = self.rollout_engine is not None
            if self.lock is not None and bases:
                self.lock.bases = bases
                self.lock.attach(self.student)
            self.metrics.truncate_after(start)
            evaluations = [r for r in read_metrics(self.metrics_path) if "eval/student_accuracy" in r]
            last: dict = evaluations[-1] if evaluations else {}
        else:
            self.metrics.clear()
            if self.is_main:
                (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            last = {"step": 0, "eval/student_accuracy": self.evaluate(), **self.selection}
            self.metrics.append(last)
        bar = tqdm(total=cfg.steps, initial=start, desc=self.label, disable=not self.progress, dynamic_ncols=True)
        started = time.perf_counter()
        with StopRequest(self.world_size) as stop, bar:
            for step in range(start, cfg.steps):
                number = step + 1
                diagnostics = number % cfg.log_every == 0 or number == cfg.steps
                metrics = self.train_step(step, diagnostics)
                record = {"step": number, **metrics, "time_s": time.perf_counter() - started}
                if self.lock is not None and number == cfg.subspace_lock_step:
                    ranks = self._lock_subspace()
                    record["subspace/locked_matrices"] = len(ranks)
                    record["subspace/mean_rank"] = sum(ranks.values()) / max(1, len(ranks))
                if number % cfg.eval_every == 0 or number == cfg.steps:
                    record["eval/student_accuracy"] = self.evaluate()
                if diagnostics or "eval/student_accuracy" in record or "subspace/locked_matrices" in record:
                    self.metrics.append(record)
                last = {**last, **record}
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", acc=f"{last.get('eval/student_accuracy', float('nan')):.2f}"
                )
                scheduled = number % cfg.save_every == 0 or number == cfg.steps
                path = self.save(number) if scheduled else None
                signum = stop.requested()
                if signum is not None and number < cfg.steps:
                    if not scheduled:  # a step is saved once: never over the latest checkpoint
                        path = self.save(number)
                    self.plot()
                    raise TrainingInterrupted(signum, number, path)
        self.plot()
        return last

    def plot(self) -> Path | None:
        if not self.is_main:
            return None
        title = f"{self.config.loss.mode} — {Path(self.config.student.path).name}"
        return plot_training_curves(self.metrics_path, self.out_dir / "training_curves.png", title)
