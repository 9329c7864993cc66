"""One training step's loss forward + backward: TRL's distillation trainers vs opd_fast's fused subclasses.

For each trainer pair (``DistillationTrainer`` / ``FusedDistillationTrainer``, ``GKDTrainer`` /
``FusedGKDTrainer``) this builds a tiny student and a wider teacher with a realistic vocabulary (Qwen's 151936
ids by default; the backbones are tiny so that the vocabulary dominates, as the loss does in a real step), one
fixed batch, and times ``compute_loss`` + ``backward`` as the trainer's ``training_step`` runs them (backbones
included; generation excluded: it is the same for both). Reported per trainer: median and spread over repeats,
and peak memory beyond the inputs (CUDA: the allocator's peak delta; CPU: live tensor bytes, counted by
opd_fast.memory.TensorMemoryTracker). The fused loss is also checked against the parent's (relative error).

    python benchmarks/trl_step.py --tokens 512 --json benchmarks/results/trl_step_cpu.json

Not run in CI (tens of seconds on the CPU at V = 151936).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DistillationConfig, DistillationTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from opd_fast.integrations.trl import FusedDistillationTrainer, FusedGKDTrainer
from opd_fast.memory import TensorMemoryTracker
from opd_fast.trainer.demo import build_tokenizer


def tiny_llama(vocab: int, hidden: int, seed: int, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(device)
    with torch.no_grad():  # logits of std ≈ 3, as a trained model's are (random init gives ≈ 0: a flat softmax)
        model.lm_head.weight.normal_(0.0, 3.0 / hidden**0.5)
    return model


def trainer_args(out_dir: str, device: torch.device) -> dict:
    return dict(
        output_dir=out_dir,
        report_to="none",
        use_cpu=device.type == "cpu",
        bf16=False,
        per_device_train_batch_size=2,
        save_strategy="no",
    )


def distillation_batch(batch: int, prompt: int, completion: int, vocab: int, device: torch.device) -> dict:
    """What DistillationTrainer._prepare_inputs hands compute_loss, with random token ids."""
    completion_mask = torch.ones(batch, completion, dtype=torch.long, device=device)
    completion_mask[0, completion // 2 :] = 0  # one completion ended early
    return {
        "prompt_ids": torch.randint(3, vocab, (batch, prompt), device=device),
        "prompt_mask": torch.ones(batch, prompt, dtype=torch.long, device=device),
        "completion_ids": torch.randint(3, vocab, (batch, completion), device=device),
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }


def gkd_batch(batch: int, prompt: int, completion: int, vocab: int, device: torch.device) -> dict:
    """What GKD's collator makes: full sequences, labels -100 on the prompt (the loss counts the completion)."""
    input_ids = torch.randint(3, vocab, (batch, prompt + completion), device=device)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[0, prompt + completion // 2 :] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def measure(trainer, inputs: dict, device: torch.device, repeats: int) -> dict:
    """Median/p20/p80 ms and peak memory (MB beyond the inputs) of compute_loss + backward; the loss."""
    model = trainer.model
    model.train()
    times, peak_mb, loss = [], 0.0, None
    for _ in range(repeats + 1):  # the first run warms up (allocator, lazy inits) and is not timed
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        tracker = TensorMemoryTracker() if device.type == "cpu" else None
        start = time.perf_counter()
        if tracker is not None:
            with tracker:
                loss = trainer.compute_loss(model, inputs)
                loss.backward()
        else:
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak_mb = tracker.peak_bytes / 2**20
        times.append((time.perf_counter() - start) * 1e3)
    times = sorted(times[1:])
    quantile = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {
        "median_ms": statistics.median(times),
        "p20_ms": quantile[0],
        "p80_ms": quantile[3],
        "peak_mem_mb": peak_mb,
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=512, help="completion tokens per step (2 sequences)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--teacher-hidden", type=int, default=96)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows here")
    cli = parser.parse_args()
    device = torch.device(cli.device)
    student = tiny_llama(cli.vocab, cli.hidden, 1, device)
    teacher = tiny_llama(cli.vocab, cli.teacher_hidden, 2, device).eval()
    tokenizer = build_tokenizer("abc")  # only read for pad/eos ids and the collator; the batches are built here
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    completion = cli.tokens // 2
    cases = [
        ("distillation", DistillationTrainer, FusedDistillationTrainer, DistillationConfig, distillation_batch),
        ("gkd", GKDTrainer, FusedGKDTrainer, GKDConfig, gkd_batch),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        progress = tqdm(total=2 * len(cases), desc="trainers")
        for name, parent_class, fused_class, config_class, make_batch in cases:
            torch.manual_seed(0)
            inputs = make_batch(2, cli.prompt, completion, cli.vocab, device)
            dataset = (
                Dataset.from_dict({"prompt": ["a"]})
                if name == "distillation"
                else Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}]]})
            )
            losses = {}
            for trainer_class in (parent_class, fused_class):
                trainer = trainer_class(
                    model=student,
                    teacher_model=teacher,
                    args=config_class(**trainer_args(tmp, device), beta=cli.beta),
                    train_dataset=dataset,
                    processing_class=tokenizer,
                )
                row = measure(trainer, inputs, device, cli.repeats)
                losses[trainer_class.__name__] = row["loss"]
                rows.append({"trainer": trainer_class.__name__, "vocab": cli.vocab, "tokens": cli.tokens, **row})
                progress.update()
            parent_loss, fused_loss = losses[parent_class.__name__], losses[fused_class.__name__]
            rows[-1]["loss_rel_err_vs_parent"] = abs(fused_loss - parent_loss) / abs(parent_loss)
        progress.close()
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for row in rows:
        error = row.get("loss_rel_err_vs_parent")
        extra = "" if error is None else f"  loss rel err vs parent {error:.1e}"
        print(
            f"{row['trainer']:26s} V={row['vocab']} N={row['tokens']}: {row['median_ms']:8.1f} ms "
            f"[{row['p20_ms']:.1f}, {row['p80_ms']:.1f}]  peak {row['peak_mem_mb']:8.1f} MB{extra}"
        )
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump({"env": env, "args": vars(cli), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
