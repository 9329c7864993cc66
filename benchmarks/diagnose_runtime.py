"""Wall time of `opd-fast diagnose` on two ~0.5B-parameter checkpoints (Qwen2-0.5B shapes, random weights).

Builds, once, BEFORE = a randomly initialized Qwen2 with Qwen2-0.5B's shapes (hidden 896, intermediate 4864,
24 layers, 14 heads, 2 KV heads, vocabulary 151936, tied embeddings: 494M parameters, 169 matrices) and
AFTER = BEFORE plus a planted update on every matrix: a rank-16 dense part (‖·‖_F = 1% of ‖W‖_F) and a
sparse part (30% of the entries scaled by 1 + N(0, 0.02²)), both saved in bf16 like real checkpoints.
Then times the `diagnose` subcommand on them (the same code path as `opd-fast diagnose BEFORE AFTER
--json PATH`) and prints the wall time with the machine. Not a test: it takes minutes.

    python benchmarks/diagnose_runtime.py [--dir /tmp/opd_diagnose_0.5b] [--threads N] [--plot]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def build_checkpoints(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save BEFORE and AFTER under ``root`` (skipped when both exist)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    before, after = root / "before", root / "after"
    if (before / "config.json").exists() and (after / "config.json").exists():
        return before, after
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(before)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim != 2:
                continue
            w = p.float()
            m, n = w.shape
            low_rank = torch.randn(m, 16) @ torch.randn(16, n)
            low_rank *= 0.01 * w.norm() / low_rank.norm()
            sparse = (torch.rand(m, n) < 0.3) * torch.randn(m, n) * 0.02 * w
            p.copy_(w + low_rank + sparse)
    model.save_pretrained(after)
    return before, after


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/opd_diagnose_0.5b"), help="where the checkpoints go")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--plot", action="store_true", help="also write the plots (DIR/plots)")
    args = parser.parse_args()

    from opd_fast.cli.diagnose import add_diagnose_parser

    started = time.perf_counter()
    before, after = build_checkpoints(args.dir)
    print(f"checkpoints ready in {time.perf_counter() - started:.0f}s: {before}, {after}")
    argv = ["diagnose", str(before), str(after), "--json", str(args.dir / "report.json")]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--plot", str(args.dir / "plots")] if args.plot else []
    cli = argparse.ArgumentParser(prog="opd-fast")
    add_diagnose_parser(cli.add_subparsers(dest="command", required=True))
    cli_args = cli.parse_args(argv)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rc = cli_args.run(cli_args)
    wall = time.perf_counter() - started
    report = json.loads((args.dir / "report.json").read_text())
    parameters = report["summary"]["overall"]["parameters"]
    print(
        f"\nopd-fast {' '.join(argv)}\n"
        f"exit code {rc}; wall time {wall:.1f}s for {len(report['matrices'])} matrices, {parameters / 1e6:.0f}M "
        f"parameters; {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
        "after (other jobs on the machine slow it down)"
    )


if __name__ == "__main__":
    main()
