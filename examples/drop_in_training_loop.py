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

from opd_fast import LMHead, linear_reverse_kl


def tiny_models(directory: str) -> tuple[str, str]:
    """Save a tiny student and a (wider) tiny teacher with the same vocabulary; return their paths."""
    common = dict(
        vocab_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    for name, hidden in (("student", 64), ("teacher", 96)):
        torch.manual_seed(hidden)
        config = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, **common)
        AutoModelForCausalLM.from_config(config).save_pretrained(f"{directory}/{name}")
    return f"{directory}/student", f"{directory}/teacher"


def main(student_path: str, teacher_path: str, steps: int = 3, batch: int = 4, new_tokens: int = 16) -> list[float]:
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    prompts = torch.randint(0, student.config.vocab_size, (batch, 8))
    losses = []
    for _ in range(steps):
        # 1. The student samples completions of the prompts (on-policy data).
        with torch.no_grad():
            sequences = student.generate(
                prompts,
                do_sample=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                attention_mask=torch.ones_like(prompts),
            )
        # 2. Final hidden states of both models; the decoder skips the lm_head, so no logits are built.
        student_hidden = student.get_decoder()(sequences).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(sequences).last_hidden_state
        # 3. Position t predicts token t + 1: count the positions whose next token is a completion token.
        predicts_completion = torch.zeros_like(sequences, dtype=torch.bool)[:, :-1]
        predicts_completion[:, prompts.shape[1] - 1 :] = True
        # 4. The heads as the models' forwards apply them (read each step: views of the current parameters).
        loss = linear_reverse_kl(
            student_hidden[:, :-1],
            LMHead.from_model(student),
            teacher_hidden[:, :-1],
            LMHead.from_model(teacher).detach(),
            mask=predicts_completion,
        )
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
