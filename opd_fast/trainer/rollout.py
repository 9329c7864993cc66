"""Sampling completions with transformers' ``generate`` and packing them into training batches.

Prompts are left-padded for generation (KV cache, batched) and the results re-packed right-padded as
``prompt + completion``, so positions during training equal those during sampling. A completion ends at
the first EOS (kept, so the model learns to stop) or after ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.integrations.transformers import causal_lm, is_fsdp_sharded
from opd_fast.trainer.tasks import Example


@dataclass
class Batch:
    """A micro-batch of prompt + completion sequences, for the student and (possibly other prompts) the teacher.

    ``input_ids``/``attention_mask`` ``[B, T]`` are the student's right-padded sequences; the teacher's
    ``teacher_input_ids``/``teacher_attention_mask`` ``[B, T']`` are the same tensors unless the teacher
    sees another prompt (self-distillation with privileged context). Completions are aligned in
    ``[B, L]`` tensors (L = the longest completion): ``targets`` holds completion token j of each row,
    ``completion_mask`` whether it exists, and ``student_positions``/``teacher_positions`` the position
    in each sequence whose hidden state predicts it (the position just before the token).
    ``teacher_topk_ids``/``teacher_topk_logprobs`` ``[B, L, K]``: the teacher's stored top-k at each completion
    token, for batches of offline sequences (teacher.topk_dir); None otherwise.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    teacher_input_ids: torch.Tensor
    teacher_attention_mask: torch.Tensor
    student_positions: torch.Tensor
    teacher_positions: torch.Tensor
    targets: torch.Tensor
    completion_mask: torch.Tensor
    examples: list[Example]
    completions: list[str]
    correct: list[bool]
    behaviour_logprobs: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None

    TENSORS = (
        "input_ids",
        "attention_mask",
        "teacher_input_ids",
        "teacher_attention_mask",
        "student_positions",
        "teacher_positions",
        "targets",
        "completion_mask",
        "behaviour_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
    )

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] at positions [B, L] → [B, L, H] (differentiable)."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def encode_prompts(tokenizer, examples: list[Example]) -> list[list[int]]:
    return [tokenizer(example.prompt, add_special_tokens=True)["input_ids"] for example in examples]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Completion token ids per prompt (ending with EOS when the model stopped).

    Padded lm_head rows (ids ≥ ``vocab_size``) are suppressed, so the model never samples a token the
    tokenizer does not have.
    """
    lm = causal_lm(model)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids)
        attention[row, longest - len(ids) :] = 1
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    if greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)  # top_k=0: off
    head_rows = lm.get_output_embeddings().weight.shape[0]  # a DTensor shard (FSDP2) has the global shape
    if vocab_size is not None and head_rows > vocab_size:
        kwargs["suppress_tokens"] = list(range(vocab_size, head_rows))
    # An FSDP2 student's forward all-gathers over the ranks: every rank runs it until all ranks are done.
    kwargs["synced_gpus"] = is_fsdp_sharded(lm)
    out = lm.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    if was_training:
        lm.train()
    completions = []
    for row in out[:, longest:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        completions.append(row)
    return completions


def decode_completion(tokenizer, completion_ids: list[int]) -> str:
    return tokenizer.decode(completion_ids, skip_special_tokens=True)


def reference_completions(tokenizer, examples: list[Example]) -> list[list[int]]:
    """The dataset's answers as completions (for SFT on references)."""
    return [tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for e in examples]


def _pack(prompt_ids, completion_ids, pad_id):
    """Right-padded prompt + completion sequences and, per completion token, the position predicting it."""
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    longest = max(len(s) for s in sequences)
    longest_completion = max(len(c) for c in completion_ids)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    positions = torch.zeros((len(sequences), longest_completion), dtype=torch.long)
    for row, (prompt, sequence) in enumerate(zip(prompt_ids, sequences)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        positions[row, : len(sequence) - len(prompt)] = torch.arange(len(prompt) - 1, len(sequence) - 1)
    return input_ids, attention, positions


def make_batch(tokenizer, examples, prompt_ids, completion_ids, task, device, teacher_prompt_ids=None) -> Batch:
    """Pack a micro-batch; ``teacher_prompt_ids`` (default: the student's) are the teacher's prompts."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention, student_positions = _pack(prompt_ids, completion_ids, pad_id)
    if teacher_prompt_ids is None:
        teacher_ids, teacher_attention, teacher_positions = input_ids, attention, student_positions
    else:
        teacher_ids, teacher_attention, teacher_positions = _pack(teacher_prompt_ids, completion_ids, pad_id)
    longest = student_positions.shape[1]
    targets = torch.full((len(completion_ids), longest), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completion_ids), longest), dtype=torch.bool)
    for row, completion in enumerate(completion_ids):
        targets[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        completion_mask[row, : len(completion)] = True
    texts = [decode_completion(tokenizer, c) for c in completion_ids]
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        teacher_input_ids=teacher_ids.to(device),
        teacher_attention_mask=teacher_attention.to(device),
        student_positions=student_positions.to(device),
        teacher_positions=teacher_positions.to(device),
        targets=targets.to(device),
        completion_mask=completion_mask.to(device),
        examples=list(examples),
        completions=texts,
        correct=[task.verify(e, t) for e, t in zip(examples, texts)],
    )
