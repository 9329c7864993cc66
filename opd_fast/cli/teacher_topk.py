"""``opd-fast teacher-topk``: score a JSONL of sequences with a teacher once and store its top-k log-probs in shards,
for off-policy distillation or a cold start (the trainer's ``teacher.topk_dir``; opd_fast.trainer.teacher_topk)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opd_fast.cli._common import fail, output_path_problem


def add_teacher_topk_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "teacher-topk",
        help="score a JSONL of sequences with a teacher (in-process vLLM or a server) into top-k shards",
        description="Score every sequence of IN.jsonl (lines of {input_ids, start}, {prompt, completion} or {text}) "
        "with a teacher, in-process (--teacher-path, needs vLLM) or served (--server, vLLM's OpenAI-compatible API), "
        "and write its top-k ids and log-probs to safetensors shards in --out. Resumable: run the same command again "
        "after a kill and the finished shards are kept. Train from them with teacher.topk_dir=DIR.",
    )
    p.add_argument("input", metavar="IN.jsonl", help="the sequences, one JSON object a line")
    p.add_argument("--out", metavar="DIR", required=True, help="the shard folder (created; resumed when it exists)")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher-path", metavar="P", help="the teacher's model directory, run by vLLM in-process")
    teacher.add_argument(
        "--server", metavar="URL", nargs="+", help="one or more vLLM servers of the teacher (round-robin)"
    )
    p.add_argument("--k", type=int, default=16, help="the top-k stored per token (vLLM's prompt_logprobs; default 16)")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard (default 1024)")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer for text lines and for checking a server (default: --teacher-path's)",
    )
    p.add_argument("--model", help="the model a server must serve (its name or directory; default: whatever it serves)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="a server request's time limit (default 120)")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed server request (default 5)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the in-process engine's dtype")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="the in-process engine's KV cache (default 1 GiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_teacher_topk)


def _scorer(args, tokenizer):
    if args.server:
        from opd_fast.trainer.teacher_server import TeacherServer

        return TeacherServer(
            args.server, args.k, tokenizer=tokenizer, model=args.model, timeout_s=args.timeout_s, retries=args.retries
        )
    from opd_fast.trainer.vllm_engine import VllmScorer

    return VllmScorer(args.teacher_path, args.k, dtype=args.dtype, kv_cache_gb=args.kv_cache_gb)


def run_teacher_topk(args: argparse.Namespace) -> int:
    from opd_fast.trainer.teacher_server import TeacherServerError
    from opd_fast.trainer.teacher_topk import TopKShardError, write_topk_shards

    if args.k < 1 or args.shard_size < 1:
        return fail(f"--k and --shard-size must be positive; got {args.k} and {args.shard_size}")
    if not Path(args.input).is_file():
        return fail(f"{args.input}: no such file; give the JSONL of sequences to score")
    problem = output_path_problem(args.out, directory=True)
    if problem:
        return fail(f"--out {args.out}: {problem}")
    tokenizer = None
    tokenizer_dir = args.tokenizer or args.teacher_path
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        scorer = _scorer(args, tokenizer)
    except (TeacherServerError, ImportError, ValueError) as exc:
        return fail(exc)
    try:
        manifest = write_topk_shards(
            args.input,
            args.out,
            scorer,
            tokenizer=tokenizer,
            shard_size=args.shard_size,
            teacher=args.teacher_path or getattr(scorer, "model", None) or ",".join(args.server),
            progress=not args.no_progress,
        )
    except (TopKShardError, TeacherServerError, OSError) as exc:
        return fail(exc)
    finally:
        scorer.close()
    print(json.dumps(manifest, indent=2))
    return 0
