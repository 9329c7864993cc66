"""Sampling completions with transformers' ``generate`` and packing them into training batches.

Prompts are left-padded for generation (KV cache, batched) and the results re-packed right-padded as
``prompt + completion``, so positions during training equal those during sampling. A completion ends at
the first EOS (kept, so the model learns to stop) or after ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.trainer.modeling import causal_lm
from opd_fast.trainer.tasks import Example


@dataclass
class Batch:
    """A micro-batch of prompt + completion sequences.

    ``input_ids``/``attention_mask`` are ``[B, T]`` (right-padded). Position t predicts token t + 1, so the
    per-token tensors are ``[B, T-1]``: ``targets`` = input_ids[:, 1:] and ``completion_mask`` marks the
    positions whose next token belongs to a completion.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    completion_mask: torch.Tensor
    examples: list[Example]
    completions: list[str]
    correct: list[bool]
    behaviour_logprobs: torch.Tensor | None = None

    TENSORS = ("input_ids", "attention_mask", "targets", "completion_mask", "behaviour_logprobs")

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


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
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    head_rows = lm.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and head_rows > vocab_size:
        kwargs["suppress_tokens"] = list(range(vocab_size, head_rows))
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


def make_batch(tokenizer, examples, prompt_ids, completion_ids, task, device) -> Batch:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((len(sequences), longest - 1), dtype=torch.bool)
    for row, (prompt, sequence) in enumerate(zip(prompt_ids, sequences)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        completion_mask[row, len(prompt) - 1 : len(sequence) - 1] = True
    texts = [decode_completion(tokenizer, c) for c in completion_ids]
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        targets=input_ids[:, 1:].to(device),
        completion_mask=completion_mask.to(device),
        examples=list(examples),
        completions=texts,
        correct=[task.verify(e, t) for e, t in zip(examples, texts)],
    )
