"""Where the trainer's sequences come from: :class:`Rollouts`, the part of :class:`opd_fast.trainer.loop.Trainer`
that samples completions for training (the student, the teacher or the dataset's answers; stored sequences with the
teacher's top-k) and decodes greedily for evaluation.

Rollout engines: ``rollout.engine=vllm`` samples the student's completions (and greedy evaluations) with an
in-process vLLM engine per rank (opd_fast.trainer.vllm_rollout), which gets the student's weights, LoRA merged,
before it samples after an optimizer step or a resume. Offline teacher top-k (``teacher.topk_dir``, written by
``opd-fast teacher-topk``): steps on stored sequences with the teacher's stored top-k, every step when they are the
only teacher, else during train.cold_start_steps.
"""

from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist

from opd_fast.integrations.transformers import causal_lm, final_hidden_states
from opd_fast.trainer.rollout import (
    Batch,
    encode_prompts,
    gather_positions,
    generate,
    make_batch,
    reference_completions,
)
from opd_fast.trainer.tasks import Example
from opd_fast.trainer.teacher import Teacher, align_topk


class Rollouts:
    """The Trainer's sampling and evaluation methods. A mixin: they read the state the Trainer builds (config,
    tokenizer, task, student, teacher, vocab_size, rollout_engine, topk_shards, eval_examples, rank, world_size)."""

    def _build_rollout_engine(self):
        """rollout.engine=vllm: this rank's own in-process vLLM engine on the student (opd_fast.trainer.vllm_rollout).

        Its sampled tokens' log-probs serve as behaviour log-probs when they are the trainer's own: at temperature 1
        (vLLM's raw log-probs; loss.temperature scales only the trainer's) and over the same rows (a padded lm_head's
        log-softmax in vLLM spans the padded rows, the trainer's only the tokenizer's)."""
        from opd_fast.trainer.vllm_rollout import VllmRollout, save_for_engine

        lm = causal_lm(self.student)
        head_rows = lm.get_output_embeddings().weight.shape[0]
        self.engine_behaviour = self.config.loss.temperature == 1.0 and head_rows == self.vocab_size
        self._engine_stale = False
        # The ranks' initial weights are the same (one path, one seed): rank 0 saves them once for every engine.
        directory = self.out_dir / "vllm_student"
        if self.is_main:
            save_for_engine(self.student, self.tokenizer, directory)
        if self.world_size > 1:
            dist.barrier()
        return VllmRollout(
            self.student,
            self.tokenizer,
            directory,
            save=False,
            vocab_size=self.vocab_size,
            max_model_len=getattr(lm.config, "max_position_embeddings", None),
            dtype=self.config.student.dtype,
            kv_cache_gb=self.config.rollout.kv_cache_gb,
            seed=self.config.seed,
        )

    def _engine_generate(self, prompts, logprobs: bool = False, **options):
        """Sample (or decode greedily) with the rollout engine, after pushing the student's new weights into it; the
        seed comes from torch's generator, which _seed_step seeded for this step (a resumed run samples the same)."""
        if self._engine_stale:
            self.rollout_engine.sync(self.student)
            self._engine_stale = False
        options.pop("vocab_size")
        seed = 0 if options["greedy"] else int(torch.randint(2**31 - 1, ()))
        return self.rollout_engine.generate(prompts, seed=seed, logprobs=logprobs, **options)

    # ------------------------------------------------------------------------------------------------ rollout
    def _teacher_prompts(self, examples) -> list[list[int]] | None:
        """The teacher's prompts from data.teacher_template (None when it sees the student's prompts)."""
        template = self.config.data.teacher_template
        if template == "{prompt}":
            return None
        texts = [template.format(prompt=e.prompt, answer=e.answer) for e in examples]
        return [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]

    def _sample(self, source: str, examples) -> tuple[list, list, list | None, list, list | None]:
        """(examples, student prompts, teacher prompts, completions, behaviour log-probs) with completions from
        ``source``; the behaviour log-probs (per completion token) come from the rollout engine where it gives them
        and the loss needs them (sampled_token with rollout.reuse > 1), else None.

        Teacher samples failing data.format_filter are dropped (the batch may shrink; all of them
        failing is an error).
        """
        cfg = self.config.rollout
        prompts, teacher_prompts = encode_prompts(self.tokenizer, examples), self._teacher_prompts(examples)
        if source == "reference":
            return examples, prompts, teacher_prompts, reference_completions(self.tokenizer, examples), None
        options = dict(
            max_new_tokens=cfg.max_new_tokens,
            greedy=False,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            vocab_size=self.vocab_size,
        )
        behaviour = None
        if source == "teacher":
            completions = self.teacher.generate(self.tokenizer, teacher_prompts or prompts, **options)
        elif self.rollout_engine is not None:
            wanted = self.engine_behaviour and self._needs_behaviour_logprobs()
            completions, behaviour = self._engine_generate(prompts, logprobs=wanted, **options)
        else:
            completions = generate(self.student, self.tokenizer, prompts, **options)
        if source == "teacher" and self.format_filter is not None:
            keep = [
                i
                for i, (e, c) in enumerate(zip(examples, completions))
                if self.format_filter(e, self.tokenizer.decode(c, skip_special_tokens=True))
            ]
            if not keep:
                raise RuntimeError("data.format_filter rejected every teacher sample of a batch; check the filter")
            pick = lambda items: [items[i] for i in keep]  # noqa: E731
            examples, prompts, completions = pick(examples), pick(prompts), pick(completions)
            teacher_prompts = pick(teacher_prompts) if teacher_prompts else None
        return examples, prompts, teacher_prompts, completions, behaviour

    def _needs_behaviour_logprobs(self) -> bool:
        """The sampled-token loss reusing a rollout needs the log-probs of the policy that sampled it."""
        return self.config.rollout.reuse > 1 and self.config.loss.mode == "sampled_token"

    def _source(self, step: int, rng: random.Random) -> str:
        """Who produces this step's completions: the teacher during the cold start, and with probability
        1 − λ (rollout.on_policy_fraction) afterwards; otherwise rollout.source."""
        if step < self.config.train.cold_start_steps:
            return "teacher"
        if self.config.rollout.on_policy_fraction < 1.0 and rng.random() >= self.config.rollout.on_policy_fraction:
            return "teacher"
        return self.config.rollout.source

    def make_rollouts(self, rng: random.Random, source: str) -> list[Batch]:
        """``grad_accum`` micro-batches of prompts with completions from ``source``."""
        cfg = self.config.rollout
        batches = []
        for _ in range(self.config.optim.grad_accum):
            examples, prompts, teacher_prompts, completions, behaviour = self._sample(
                source, self.task.sample(rng, cfg.batch_size)
            )
            batch = make_batch(self.tokenizer, examples, prompts, completions, self.task, self.device, teacher_prompts)
            if behaviour is not None:
                values = torch.zeros(batch.targets.shape, dtype=torch.float32)
                for row, logprobs in enumerate(behaviour):
                    values[row, : len(logprobs)] = torch.tensor(logprobs, dtype=torch.float32)
                batch.behaviour_logprobs = values.to(self.device)
            elif self._needs_behaviour_logprobs():
                batch.behaviour_logprobs = self._behaviour_logprobs(batch)
            batches.append(batch)
        return batches

    def shard_rollouts(self, rng: random.Random) -> list[Batch]:
        """``grad_accum`` micro-batches of stored sequences (teacher.topk_dir), drawn at random with ``rng``: each
        sequence's scored tokens are the completion, the tokens before them the prompt, and the teacher's stored
        top-k rides along in the batch (the student does not sample; no answer is checked)."""
        cfg = self.config.rollout
        batches = []
        for _ in range(self.config.optim.grad_accum):
            items = [self.topk_shards[rng.randrange(len(self.topk_shards))] for _ in range(cfg.batch_size)]
            prompts = [item.ids[: item.start] for item in items]
            completions = [item.ids[item.start :] for item in items]
            examples = [Example(self.tokenizer.decode(p, skip_special_tokens=True), "") for p in prompts]
            batch = make_batch(self.tokenizer, examples, prompts, completions, self.task, self.device)
            batch.correct = []
            batch.teacher_topk_ids, batch.teacher_topk_logprobs = align_topk(
                [item.scores for item in items], batch.completion_mask, self.topk_shards.k, self.vocab_size
            )
            batches.append(batch)
        return batches

    @torch.no_grad()
    def _student_hidden(self, batch: Batch) -> torch.Tensor:
        """The student's final hidden states at the completion positions, without gradients."""
        hidden = final_hidden_states(self.student, batch.input_ids, batch.attention_mask)
        return gather_positions(hidden, batch.student_positions)

    @torch.no_grad()
    def _behaviour_logprobs(self, batch: Batch) -> torch.Tensor:
        """log p(y) of the sampled tokens under the student that sampled them (for the importance ratio)."""
        from opd_fast import linear_token_logprobs

        head = self._student_head().vocab_slice(0, self.vocab_size)
        return linear_token_logprobs(
            self._student_hidden(batch),
            head,
            batch.targets,
            temperature=self.config.loss.temperature,
            backend=self.config.loss.backend,
        )

    # -------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, teacher: Teacher | None = None) -> float:
        """Greedy held-out accuracy of the student, or of ``teacher`` on its own prompts (data.teacher_template),
        sharded over ranks."""
        mine = self.eval_examples[self.rank :: self.world_size]
        # Chunks of at most 128 prompts, as many on every rank (an FSDP2 student generates in lockstep).
        chunks = math.ceil(math.ceil(len(self.eval_examples) / self.world_size) / 128)
        correct = 0
        options = dict(max_new_tokens=self.config.rollout.max_new_tokens, greedy=True, vocab_size=self.vocab_size)
        for index in range(chunks):
            chunk = mine[index * len(mine) // chunks : (index + 1) * len(mine) // chunks]
            prompts = encode_prompts(self.tokenizer, chunk)
            if teacher is not None:
                completions = teacher.generate(self.tokenizer, self._teacher_prompts(chunk) or prompts, **options)
            elif self.rollout_engine is not None:
                completions, _ = self._engine_generate(prompts, **options)
            else:
                completions = generate(self.student, self.tokenizer, prompts, **options)
            texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
            correct += sum(self.task.verify(e, t) for e, t in zip(chunk, texts))
        if self.world_size > 1:
            total = torch.tensor([correct], dtype=torch.float64)
            dist.all_reduce(total)
            correct = int(total.item())
        return correct / len(self.eval_examples)
