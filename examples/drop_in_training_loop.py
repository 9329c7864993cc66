"""opd_fast as a drop-in loss in a plain PyTorch loop with transformers models.

On-policy distillation in ~40 lines: the student samples completions, the teacher scores them, and the
reverse KL between their next-token distributions on the completion tokens is computed from the final
hidden states and the output heads (``LMHead.from_model``: the lm_head with whatever bias, scale or soft-cap
the model's forward applies), never from [tokens × vocabulary] logits.

Runs anywhere: with no model paths it builds two tiny Qwen2 models from configs (random weights),
saves them and loads them back from local directories. Pass --student/--teacher to use your own.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from opd_fast import LMHead, completion_mask, linear_reverse_kl

EOS = 1  # the tiny models' end-of-sequence id (a real model's is model.generation_config.eos_token_id)


def tiny_models(directory: str) -> tuple[str, str]:
    """Save a tiny student and a (wider) tiny teacher with the same vocabulary; return their paths."""
    common = dict(
        vocab_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=EOS,
    )
    for name, hidden in (("student", 64), ("teacher", 96)):
        torch.manual_seed(hidden)
        config = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, **common)
        AutoModelForCausalLM.from_config(config).save_pretrained(f"{directory}/{name}")
    return f"{directory}/student", f"{directory}/teacher"


def left_padded_prompts(batch: int, vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of 3 to 8 tokens, left-padded as a tokenizer with padding_side="left" returns them."""
    lengths = torch.randint(3, 9, (batch,), generator=generator)
    ids = torch.randint(2, vocab_size, (batch, int(lengths.max())), generator=generator)
    mask = torch.arange(ids.shape[1]) >= ids.shape[1] - lengths[:, None]
    return ids.masked_fill(~mask, EOS), mask.long()


def reverse_kl_loss(student, teacher, sequences, prompt_mask) -> torch.Tensor:
    """The reverse KL of the completions in ``sequences`` (prompts of ``prompt_mask``'s length, then generate's
    output), counted up to each completion's first EOS, from final hidden states: no logits are built."""
    # The prompts' padding is masked out of attention and positions count from each row's first real token, as
    # generate counted them; what follows a completion's EOS needs no masking (attention is causal).
    attention_mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1] :])], dim=1)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    student_hidden = student.get_decoder()(sequences, attention_mask=attention_mask, position_ids=positions)
    with torch.no_grad():
        teacher_hidden = teacher.get_decoder()(sequences, attention_mask=attention_mask, position_ids=positions)
    # Position t predicts token t + 1: count the positions that predict completion tokens up to the first EOS.
    mask = completion_mask(sequences, prompt_mask.shape[1], EOS)
    # The heads as the models' forwards apply them (read each step: views of the current parameters).
    return linear_reverse_kl(
        student_hidden.last_hidden_state[:, :-1],
        LMHead.from_model(student),
        teacher_hidden.last_hidden_state[:, :-1],
        LMHead.from_model(teacher).detach(),
        mask=mask,
    )


def main(student_path: str, teacher_path: str, steps: int = 3, batch: int = 4, new_tokens: int = 16) -> list[float]:
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        prompts, prompt_mask = left_padded_prompts(batch, student.config.vocab_size, generator)
        # 1. The student samples completions of the prompts (on-policy data); rows that end early are padded.
        with torch.no_grad():
            sequences = student.generate(
                prompts, attention_mask=prompt_mask, do_sample=True, max_new_tokens=new_tokens, pad_token_id=EOS
            )
        # 2. The teacher scores them: the loss from both models' final hidden states and output heads.
        loss = reverse_kl_loss(student, teacher, sequences, prompt_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"reverse KL {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="local transformers model directory of the student")
    parser.add_argument("--teacher", help="local transformers model directory of the teacher")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        student_path, teacher_path = (args.student, args.teacher) if args.student else tiny_models(tmp)
        main(student_path, teacher_path, steps=args.steps)
