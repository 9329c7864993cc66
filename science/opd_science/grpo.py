"""RLVR as the papers run it: GRPO-style group-normalised advantages over several samples of each prompt.

The trainer's ``loss.mode=sampled_token`` with ``loss.reward_mix=0`` is REINFORCE with the completion's reward on
every token, ``−mean_t ρ_t·R`` (ρ = 1 on fresh rollouts). GRPO replaces R by the group-normalised advantage
A_i = (R_i − mean_g R) / std_g R over the G completions of the same prompt (0 where every completion of the group
scored alike: no signal, as DAPO's dropped zero-variance groups contribute none). Here:

* :class:`GroupedTask` draws ``batch / G`` problems per step and repeats each G times (G rollouts per prompt);
* :class:`GroupBaselineTrainer` hands the loss those advantages instead of the raw 0/1 rewards: the trainer asks
  its reward function once per completion, in batch order, for the micro-batch being trained on.

With one optimizer step per rollout (no reuse) the PPO clip of GRPO never binds, so this is GRPO's gradient.
"""

from __future__ import annotations

import math
import random

from opd_fast.trainer import Trainer
from opd_fast.trainer.tasks import Example, Task


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """(R_i − mean_g) / std_g within consecutive groups of ``group`` rewards (population std; 0 if it is 0)."""
    if group < 1 or len(rewards) % group:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group}")
    out = []
    for start in range(0, len(rewards), group):
        values = rewards[start : start + group]
        mean = sum(values) / group
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / group)
        out += [0.0 if std == 0 else (v - mean) / std for v in values]
    return out


class GroupedTask(Task):
    """``base`` with every sampled prompt repeated ``group`` times in a row (the held-out set unchanged)."""

    def __init__(self, base: Task, group: int) -> None:
        super().__init__(base.verify)
        self.base, self.group, self.name = base, group, f"{base.name}×{group}"
        self.characters = getattr(base, "characters", None)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        if n % self.group:
            raise ValueError(f"rollout.batch_size {n} is not a multiple of the group size {self.group}")
        return [Example(e.prompt, e.answer) for e in self.base.sample(rng, n // self.group) for _ in range(self.group)]

    def eval_set(self, n: int) -> list[Example]:
        return self.base.eval_set(n)

    def format_ok(self, example: Example, completion: str) -> bool:
        return self.base.format_ok(example, completion)


class GroupBaselineTrainer(Trainer):
    """A trainer whose verifiable reward is the GRPO advantage of each completion within its prompt's group
    (needs ``loss.mode=sampled_token``, ``loss.reward_mix=0`` and a :class:`GroupedTask`)."""

    def __init__(self, config, *, task: GroupedTask, progress: bool = True) -> None:
        super().__init__(config, task=task, progress=progress)
        self.group = task.group
        self._advantages: list[float] = []
        self.reward_fn = self._next_advantage

    def _next_advantage(self, example: Example, completion: str) -> float:
        return self._advantages.pop(0)

    def _micro_step(self, batch, diagnostics, loss_config):
        self._advantages = group_advantages([float(c) for c in batch.correct], self.group)
        metrics = super()._micro_step(batch, diagnostics, loss_config)
        if loss_config.reward_mix < 1.0 and self._advantages:
            raise RuntimeError("the trainer did not ask for one reward per completion")
        metrics["reward/accuracy"] = sum(batch.correct) / len(batch.correct)
        return metrics
