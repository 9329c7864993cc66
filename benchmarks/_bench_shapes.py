"""The shapes the pytest-benchmark suites that time one op against another share: a smoke shape everywhere, Qwen3-like
bf16 shapes on a GPU, and a CPU-sized fp32 shape in the slow tier without one."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SHAPES = [pytest.param(dict(tokens=256, hidden=32, teacher_hidden=32, vocab=4096, dtype="fp32"), id="smoke")]
if DEVICE.type == "cuda":
    SHAPES += [
        pytest.param(dict(tokens=n, hidden=4096, teacher_hidden=5120, vocab=151936, dtype="bf16"), id=f"N{n}-qwen3")
        for n in (4096, 8192)
    ]
else:
    SHAPES.append(
        pytest.param(
            dict(tokens=4096, hidden=64, teacher_hidden=64, vocab=32768, dtype="fp32"), id="cpu", marks=pytest.mark.slow
        )
    )
