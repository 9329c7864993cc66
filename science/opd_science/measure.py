"""Measurements on trained models: held-out accuracy per problem, top-k overlap and divergence at the states a
student visits, drift by completion position, and the update geometry with ``opd-fast diagnose``.

Top-k overlap (docs/design.md §2) at a completion position with student and teacher top-k sets S_s, S_t and
I = S_s ∩ S_t: the ratio |I|/k and the masses Σ_{v∈I} p_s(v), Σ_{v∈I} p_t(v). Two averages are reported:
over all completion tokens, and over the tokens whose intersection is not empty (``overlap_ratio > 0``).
The papers' 97–99% is the second: the released verl-based code of "Rethinking OPD" averages
``student_p_sum_intersection`` over the positions with a non-empty intersection only. The student's own top-k
mass Σ_{v∈S_s} p_s(v) bounds the overlap mass from above; when it is itself ≥ 97%, a 97% overlap mass says
little more than that the two top-k sets intersect, so it is recorded too (``topk_mass_student``).

Standard errors over seeds and problems: :func:`paired_difference` (per-problem, on the seed-averaged
correctness) and :func:`mean_and_standard_error` (over seeds).
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import torch

from opd_fast import LMHead, linear_reverse_kl, linear_topk_overlap
from opd_fast.diagnostics import DiagnoseSettings, diagnose
from opd_fast.integrations.transformers import final_hidden_states
from opd_fast.trainer.rollout import encode_prompts, gather_positions, generate, make_batch

from .corpus import MAX_COMPLETION_TOKENS, SkillTask

ANALYSIS_SEED = 7


@functools.lru_cache(maxsize=8)
def _pretrained(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval().requires_grad_(False)


def load_model(base_dir: Path, weights: Path | None = None):
    """The base model directory's architecture with ``weights`` (a trainer checkpoint's model.safetensors),
    or the base weights themselves; in eval mode, without gradients. A copy of a cached ``from_pretrained``
    model: the measurements load a model per checkpoint, and ``from_pretrained`` was a seventh of the quick run."""
    from safetensors.torch import load_file

    model = copy.deepcopy(_pretrained(Path(base_dir)))
    if weights is not None:
        model.load_state_dict(load_file(str(weights)))
    return model


def _prompts(tokenizer, examples, template: str) -> list[list[int]]:
    if template == "{prompt}":
        return encode_prompts(tokenizer, examples)
    return [tokenizer(template.format(prompt=e.prompt, answer=e.answer))["input_ids"] for e in examples]


@torch.no_grad()
def correctness(model, tokenizer, task: SkillTask, size: int, template: str = "{prompt}") -> list[bool]:
    """Greedy correctness of ``model`` on the first ``size`` held-out problems of ``task``, one bool per problem."""
    examples = task.eval_set(size)
    correct: list[bool] = []
    for start in range(0, size, 256):
        chunk = examples[start : start + 256]
        completions = generate(
            model, tokenizer, _prompts(tokenizer, chunk, template), max_new_tokens=MAX_COMPLETION_TOKENS, greedy=True
        )
        correct += [task.verify(e, tokenizer.decode(c, skip_special_tokens=True)) for e, c in zip(chunk, completions)]
    return correct


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    count = int(mask.sum())
    return float(values[mask].double().mean()) if count else None


@torch.no_grad()
def visited_state_statistics(
    student,
    teacher,
    tokenizer,
    task: SkillTask,
    size: int,
    *,
    teacher_template: str = "{prompt}",
    sampler: str = "student",
    k: int,
) -> dict:
    """Top-k overlap, reverse KL(p_s ‖ p_t) and entropies at the completion positions of rollouts sampled
    (temperature 1, fixed seed) by the ``sampler`` ("student": the states the student visits; "teacher": the
    teacher's own samples, the states off-policy training sees) on ``size`` held-out prompts. The teacher
    scores each completion after its own prompt (``teacher_template``: privileged context for OPSD).

    Returns the means over all completion tokens (``*_all``) and over the tokens with a non-empty top-k
    intersection (``*_nonempty``), the fraction of such tokens, and the reverse KL by completion position.
    """
    examples = task.eval_set(size)
    student_prompts, teacher_prompts = _prompts(tokenizer, examples, "{prompt}"), None
    if teacher_template != "{prompt}":
        teacher_prompts = _prompts(tokenizer, examples, teacher_template)
    torch.manual_seed(ANALYSIS_SEED)
    if sampler == "student":
        model, prompts = student, student_prompts
    else:
        model, prompts = teacher, teacher_prompts or student_prompts
    completions = generate(model, tokenizer, prompts, max_new_tokens=MAX_COMPLETION_TOKENS, greedy=False)
    batch = make_batch(tokenizer, examples, student_prompts, completions, task, "cpu", teacher_prompts)
    hs = gather_positions(final_hidden_states(student, batch.input_ids, batch.attention_mask), batch.student_positions)
    ht = gather_positions(
        final_hidden_states(teacher, batch.teacher_input_ids, batch.teacher_attention_mask), batch.teacher_positions
    )
    ws, wt, mask = LMHead.from_model(student), LMHead.from_model(teacher).detach(), batch.completion_mask
    stats = linear_topk_overlap(hs, ws, ht, wt, k=k, mask=mask)
    kl = linear_reverse_kl(hs, ws, ht, wt, mask=mask, reduction="none")
    topk_mass = student.get_output_embeddings()(hs).softmax(-1).topk(k, dim=-1).values.sum(-1)
    nonempty = mask & (stats.overlap_ratio > 0)
    by_position = [_mean(kl[:, j], mask[:, j]) for j in range(mask.shape[1])]
    return {
        "sampler": sampler,
        "tokens": int(mask.sum()),
        "rollout_accuracy": sum(batch.correct) / len(batch.correct),
        "overlap_ratio_all": _mean(stats.overlap_ratio, mask),
        "overlap_mass_student_all": _mean(stats.overlap_mass_student, mask),
        "overlap_mass_teacher_all": _mean(stats.overlap_mass_teacher, mask),
        "nonempty_fraction": int(nonempty.sum()) / max(1, int(mask.sum())),
        "topk_mass_student": _mean(topk_mass, mask),
        "overlap_mass_student_nonempty": _mean(stats.overlap_mass_student, nonempty),
        "overlap_mass_teacher_nonempty": _mean(stats.overlap_mass_teacher, nonempty),
        "reverse_kl": _mean(kl, mask),
        "entropy_student": _mean(stats.student_entropy, mask),
        "entropy_teacher": _mean(stats.teacher_entropy, mask),
        "entropy_gap": _mean((stats.teacher_entropy - stats.student_entropy).abs(), mask),
        "reverse_kl_by_position": by_position,
    }


def geometry(start: Path, checkpoints: list[Path], *, top_k: int, rank: int, sim_k: int) -> dict:
    """``opd-fast diagnose`` of the run's update from ``start`` (a model directory: the base, or the SFT anchor):
    the series start → checkpoints (pairwise metrics of the final update, Sim_K per checkpoint) and, per
    checkpoint, the overall summary of start → that checkpoint (the trajectories of stable rank, ‖ΔW‖_F and
    sparsity). Only summaries are kept (per layer type and overall).
    """
    settings = DiagnoseSettings(top_k=top_k, rank=rank, sim_k=sim_k)
    files = [start / "model.safetensors", *(c / "model.safetensors" for c in checkpoints)]
    series = diagnose([str(f) for f in files], settings, progress=False)
    trajectory = [
        diagnose([str(files[0]), str(f)], settings, progress=False)["summary"]["overall"] for f in files[1:-1]
    ]
    trajectory.append({k: v for k, v in series["summary"]["overall"].items() if k != "sim_k"})
    summary = series["summary"]
    return {
        "overall": summary["overall"],
        "by_layer_type": summary["by_layer_type"],
        "trajectory": trajectory,
        "settings": summary["settings"],
        "command": "opd-fast diagnose "
        + " ".join(str(f) for f in files)
        + f" --top-k {top_k} --rank {rank} --sim-k {sim_k}",
    }


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Accuracy difference mean(a) − mean(b) of two models on the same problems and its standard error over
    problems, from the per-problem differences d_i = a_i − b_i: (mean(d²) − mean(d)²)/n. With 0/1 results this
    is the paired, McNemar-style variance (n₁₀ + n₀₁)/n² − d²/n; a_i may also be a seed-averaged correctness."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    n = len(a)
    differences = [float(x) - float(y) for x, y in zip(a, b)]
    difference = sum(differences) / n
    variance = max(0.0, (sum(d * d for d in differences) / n - difference**2) / n)
    return {"difference": difference, "standard_error": math.sqrt(variance), "n": n}


def mean_and_standard_error(values: list[float]) -> tuple[float, float | None]:
    """The mean of per-seed values and its standard error s/√n (None for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_interaction(a1: list[float], a0: list[float], b1: list[float], b0: list[float]) -> dict:
    """(mean(a1) − mean(a0)) − (mean(b1) − mean(b0)) for four models on the same problems, with the standard error
    of the per-problem differences D_i = (a1_i − a0_i) − (b1_i − b0_i): does a change cost one pair more than the
    other?"""
    if not a1 or len({len(a1), len(a0), len(b1), len(b0)}) != 1:
        raise ValueError("paired_interaction needs four equally long, non-empty lists of per-problem results")
    n = len(a1)
    values = [(float(w) - float(x)) - (float(y) - float(z)) for w, x, y, z in zip(a1, a0, b1, b0)]
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / n
    return {"difference": mean, "standard_error": math.sqrt(variance / n), "n": n}
