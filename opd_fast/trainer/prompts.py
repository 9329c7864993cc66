"""Which prompts the trainer trains on: near-duplicates removed, then (teacher-aligned selection) the prompts
on which the student's probe rollout agrees most with the teacher (data.dedup_threshold, data.select_*)."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from opd_fast.trainer.config import DataConfig
from opd_fast.trainer.tasks import Example, Task

# probe(examples) → (per-token teacher–student top-k overlap mass [B, L] of the student's probe rollout on those
# prompts, the mask of its completion tokens [B, L]).
Probe = Callable[[list[Example]], tuple[torch.Tensor, torch.Tensor]]

PROBE_BATCH = 128  # prompts per probe rollout


class SelectedTask(Task):
    """A task restricted to a fixed pool of training prompts (after deduplication or prompt selection)."""

    def __init__(self, base: Task, pool: list[Example]):
        super().__init__(base.verify)
        if not pool:
            raise ValueError("prompt selection kept no prompt; raise data.select_keep or data.select_pool")
        self.base, self.pool, self.name = base, pool, f"{base.name}(selected)"

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [rng.choice(self.pool) for _ in range(n)]

    def eval_set(self, n: int) -> list[Example]:
        return self.base.eval_set(n)

    def format_ok(self, example: Example, completion: str) -> bool:
        return self.base.format_ok(example, completion)


def _trigrams(text: str) -> set[str]:
    return {text[i : i + 3] for i in range(max(1, len(text) - 2))}


def deduplicate(examples: list[Example], threshold: float) -> list[Example]:
    """Drop prompts whose character-trigram Jaccard similarity to an earlier kept prompt is ≥ threshold.

    A lexical stand-in for embedding similarity that needs no model download; O(n²) in the pool size.
    """
    kept: list[Example] = []
    kept_grams: list[set[str]] = []
    for example in examples:
        grams = _trigrams(example.prompt)
        if all(len(grams & other) / len(grams | other) < threshold for other in kept_grams):
            kept.append(example)
            kept_grams.append(grams)
    return kept


def select_prompts(task: Task, cfg: DataConfig, pool_size: int, seed: int, probe: Probe) -> tuple[Task, dict]:
    """(the task restricted to the selected prompts, selection statistics for the log).

    Draws a candidate pool of ``data.select_pool`` prompts (``pool_size``) with its own seed, removes
    near-duplicates (data.dedup_threshold) and, with data.select_pool set, keeps the data.select_keep fraction
    whose probe rollouts have the highest mean overlap mass per completion token.
    """
    pool = task.sample(random.Random(f"{seed}/selection"), pool_size)
    unique = deduplicate(pool, cfg.dedup_threshold) if cfg.dedup_threshold is not None else pool
    stats = {"selection/pool": len(pool), "selection/after_dedup": len(unique)}
    if cfg.select_pool is None:
        return SelectedTask(task, unique), stats
    scores = []
    for start in range(0, len(unique), PROBE_BATCH):
        mass, mask = probe(unique[start : start + PROBE_BATCH])
        scores += (torch.where(mask, mass, 0.0).sum(1) / mask.sum(1).clamp_min(1)).tolist()
    order = sorted(range(len(unique)), key=lambda i: -scores[i])
    kept = order[: max(1, round(cfg.select_keep * len(unique)))]
    stats.update(
        {
            "selection/kept": len(kept),
            "selection/mass_all": sum(scores) / len(scores),
            "selection/mass_kept": sum(scores[i] for i in kept) / len(kept),
        }
    )
    return SelectedTask(task, [unique[i] for i in sorted(kept)]), stats
