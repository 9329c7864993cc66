"""TRL's distillation trainers with opd_fast's fused loss, end to end on tiny local models.

``FusedDistillationTrainer`` and ``FusedGKDTrainer`` (opd_fast.integrations.trl) take exactly the arguments of
``trl.DistillationTrainer`` and ``trl.experimental.gkd.GKDTrainer``; only the loss differs: it is computed from
the final hidden states and each model's output head, never from [tokens × vocabulary] logits.

Runs anywhere, with nothing downloaded: it builds a character-level tokenizer and two tiny Llama models (a
student and a wider teacher) from configs, saves them to a temporary directory and trains the student for a
few steps with each trainer. Pass --student/--teacher (local model directories sharing a tokenizer) to use
your own models.

    pip install 'opd_fast[trl]'
    python examples/trl_distillation.py --steps 4
"""

from __future__ import annotations

import argparse
import os
import string
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental, which warns

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

try:
    from datasets import Dataset
    from trl import DistillationConfig
    from trl.experimental.gkd import GKDConfig
except ModuleNotFoundError as exc:
    raise SystemExit(f"this example needs TRL (and its datasets): pip install 'opd_fast[trl]' ({exc})") from None

from opd_fast.integrations.trl import FusedDistillationTrainer, FusedGKDTrainer
from opd_fast.trainer.demo import build_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
WORDS = ["abc", "hello", "trl", "fused", "kernel", "logits", "teacher", "student"]


def tiny_models(directory: str) -> tuple[str, str]:
    """Save a tiny student (hidden 64) and a wider teacher (hidden 96) sharing a character tokenizer."""
    tokenizer = build_tokenizer(string.ascii_lowercase + string.digits + " :\n")
    tokenizer.chat_template = CHAT_TEMPLATE
    paths = []
    for name, hidden in (("student", 64), ("teacher", 96)):
        torch.manual_seed(hidden)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        path = f"{directory}/{name}"
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def common_args(out_dir: str, steps: int) -> dict:
    return dict(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        seed=0,
    )


def main(student_path: str, teacher_path: str, out_dir: str, steps: int = 4) -> dict[str, list[float]]:
    """Train the student with each fused trainer; return each run's logged losses."""
    tokenizer = AutoTokenizer.from_pretrained(student_path, local_files_only=True)
    prompts = [f"reverse {w}" for w in WORDS]
    losses = {}

    # On-policy distillation: the student samples completions, the loss is the reverse KL (beta=1) to the teacher.
    trainer = FusedDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_path, local_files_only=True),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path, local_files_only=True),
        args=DistillationConfig(**common_args(f"{out_dir}/distillation", steps), beta=1.0, max_completion_length=8),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    losses["FusedDistillationTrainer"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    # GKD: half the steps on the student's own samples (lmbda=0.5), the rest on the dataset's completions, JSD(0.5).
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": p[8:][::-1]}] for p in prompts]
    trainer = FusedGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_path, local_files_only=True),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path, local_files_only=True),
        args=GKDConfig(**common_args(f"{out_dir}/gkd", steps), lmbda=0.5, beta=0.5, max_new_tokens=8, max_length=64),
        train_dataset=Dataset.from_dict({"messages": conversations}),
        processing_class=tokenizer,
    )
    trainer.train()
    losses["FusedGKDTrainer"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", help="local student model directory (default: a tiny model built here)")
    parser.add_argument("--teacher", help="local teacher model directory (same tokenizer as the student)")
    parser.add_argument("--steps", type=int, default=4)
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = (cli.student, cli.teacher) if cli.student else tiny_models(tmp)
        for name, run in main(student, teacher, tmp, cli.steps).items():
            print(f"{name}: loss per step {', '.join(f'{loss:.4f}' for loss in run)}")
