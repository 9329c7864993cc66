"""One FSDP2 training step's hidden states + fused loss + backward: the gathered head vs the vocabulary-parallel
head of opd_fast.integrations.fsdp.fsdp_linear_divergence, on R gloo ranks on the CPU.

Each rank builds the same one-layer Llama student (untied lm_head, sharded with fully_shard_causal_lm) and
teacher with a realistic vocabulary (tiny backbones, so that the head dominates as it does in the loss), takes
its own batch of N tokens, and times ``final_hidden_states`` + ``fsdp_linear_divergence`` + ``backward``
(the slowest rank's time per step; median and spread over repeats). Peak memory is the largest over ranks of
the resident memory one step adds (Linux: the peak RSS, reset through /proc/self/clear_refs before the step,
minus the RSS then; glibc's mmap threshold is pinned at 128 KiB so that freed tensors leave the RSS at once).
opd_fast.memory.TensorMemoryTracker cannot be used here: it sees DTensor ops but not the local tensors their
collectives allocate. The two modes' losses are compared (relative difference).

    python benchmarks/fsdp_head.py --vocab 65536 --hidden 128 --tokens 1024 --json benchmarks/results/fsdp_head-cpu.json

Not run in CI. On a shared 2-core machine the times are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = ("gathered", "vocab_parallel")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_rss_added_mib(fn, *args) -> float:
    """The peak resident memory ``fn(*args)`` adds, in MiB (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    start = _status_kib("VmRSS")
    fn(*args)
    return (_status_kib("VmHWM") - start) / 1024


def build(vocab: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def rank_main(rank: int, world: int, init_file: str, args, out_file: str) -> None:
    from opd_fast import LMHead
    from opd_fast.integrations.fsdp import final_hidden_states, fsdp_linear_divergence, fully_shard_causal_lm

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student = fully_shard_causal_lm(build(args.vocab, args.hidden, 0))
    teacher = build(args.vocab, args.teacher_hidden, 1).eval().requires_grad_(False)
    teacher_head = LMHead.from_model(teacher)
    g = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq), generator=g)
    with torch.no_grad():
        teacher_hidden = teacher.get_decoder()(input_ids=input_ids).last_hidden_state

    def step(mode: str) -> torch.Tensor:
        hidden = final_hidden_states(student, input_ids)
        loss = fsdp_linear_divergence(
            hidden, student, teacher_hidden, teacher_head, head=mode, divergence=args.divergence, backend="torch"
        )
        loss.backward()
        student.zero_grad(set_to_none=True)
        return loss.detach()

    results = {}
    for mode in MODES:
        loss = step(mode)  # warm-up
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            step(mode)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed) * 1e3)
        peak = torch.tensor([peak_rss_added_mib(step, mode)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        results[mode] = {"times_ms": times, "peak_mem_mb": float(peak), "loss": float(loss)}
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--seq", type=int, default=256, help="sequence length (tokens is a multiple of it)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--divergence", default="reverse_kl", choices=("reverse_kl", "forward_kl", "jsd"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.tokens % args.seq:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --seq ({args.seq})")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the ranks' (spawned) interpreters at start
    with tempfile.TemporaryDirectory() as scratch:
        out_file = os.path.join(scratch, "results.json")
        mp.spawn(rank_main, args=(args.ranks, os.path.join(scratch, "init"), args, out_file), nprocs=args.ranks)
        with open(out_file) as handle:
            results = json.load(handle)
    rows = []
    reference = results["gathered"]["loss"]
    for mode in MODES:
        times = sorted(results[mode]["times_ms"])
        row = {
            "mode": mode,
            "ranks": args.ranks,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "teacher_hidden": args.teacher_hidden,
            "tokens_per_rank": args.tokens,
            "divergence": args.divergence,
            "median_ms": statistics.median(times),
            "min_ms": times[0],
            "max_ms": times[-1],
            "peak_mem_mb": results[mode]["peak_mem_mb"],
            "loss_rel_diff_vs_gathered": abs(results[mode]["loss"] - reference) / abs(reference),
        }
        rows.append(row)
        print(
            f"{mode:>15}: median {row['median_ms']:8.1f} ms  [{row['min_ms']:.1f}, {row['max_ms']:.1f}]  "
            f"peak {row['peak_mem_mb']:7.1f} MiB  loss rel. diff {row['loss_rel_diff_vs_gathered']:.1e}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
