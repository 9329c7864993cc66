"""One reverse-KL forward+backward at the issue-11 shapes, for a profiler to wrap (ncu, nsys).

    ncu --set basic python benchmarks/profile_step.py --tokens 4096 --backend triton

Warm-up calls run first (compilation, autotuning) outside the profiled NVTX range ``opd_step``; then one
step runs inside it, so ``ncu --nvtx --nvtx-include opd_step/`` profiles only the measured kernels.
"""

from __future__ import annotations

import argparse

import torch

from opd_fast import linear_reverse_kl


def main(tokens: int, backend: str, warmup: int) -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=generator) * scale).to(torch.bfloat16)

    student_hidden = normal(tokens, 4096).requires_grad_()
    student_weight = normal(151936, 4096, scale=4 / 64).requires_grad_()
    teacher_hidden = normal(tokens, 5120)
    teacher_weight = normal(151936, 5120, scale=4 / 5120**0.5)
    for _ in range(warmup):
        linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, backend=backend).backward()
    torch.cuda.synchronize()
    with torch.cuda.nvtx.range("opd_step"):
        linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, backend=backend).backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--backend", default="triton", choices=["triton", "cuda", "torch"])
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    main(args.tokens, args.backend, args.warmup)
