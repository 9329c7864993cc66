"""The window's stages, their time boxes, the shapes of a GPU window and of the CPU rehearsal, and the JSON files.

Standard library only: the runner imports this before anything is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILTER_EPS = 2.0**-12  # bf16 eps / 32: Cut Cross-Entropy's default threshold, and this library's former one
TORCH_WITHIN_NAIVE = 3.0  # the torch backend's row runs only if one call is within this factor of naive
DEFAULT_BUDGET = {"gpu": 560.0, "rehearsal": 155.0}  # seconds for everything: setup and every stage


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    gpu_seconds: float  # the time box on a GPU
    rehearsal_seconds: float  # the time box in a rehearsal
    min_seconds: float  # on a GPU, not started with less time left than this

    def needs(self, rehearse: bool) -> float:
        """Seconds that must be left to start the stage: half its box in a rehearsal."""
        return self.rehearsal_seconds / 2 if rehearse else self.min_seconds

    def path(self, out: Path, stem: str) -> Path:
        return out / f"{stem}.{self.number}-{self.name}.json"


# In order of value. Rehearsal boxes: about 1.8× each stage's CPU time alone on a 2-core CPU (8, 28, 14, 10, 10, 13 s
# with one thread), since in the CI tier the rehearsal shares the CPU with a second pytest worker.
STAGES = (
    Stage(0, "env", 40, 20, 10),  # versions, ceilings, the addmm β=0/β=1 micro-benchmark
    Stage(1, "correctness", 110, 50, 30),  # Triton compiles most kernels for the first time here
    Stage(2, "headline", 150, 30, 40),  # ours and naive at the headline shape, its variants, the kernel profile
    Stage(3, "sweep", 90, 20, 30),  # ours and naive at every other N and loss
    Stage(4, "peers", 100, 20, 30),  # Liger, TRL, torch.compile: the headline N first
    Stage(5, "tests", 90, 35, 30),  # the tests only a GPU can check (pytest and transformers start inside it)
)
WHEELS_SECONDS = 60
BUILD_SECONDS = 240


@dataclass(frozen=True)
class Sizes:
    """Shapes and timing of one kind of run: the GPU window or the CPU rehearsal."""

    correctness: dict
    headline: dict
    unaligned_vocab: int  # a vocabulary cut to len(tokenizer): rows off the 64-element stride
    sweep_tokens: tuple[int, ...]
    loss_tokens: int  # the sweep's forward KL, JSD and top-k rows
    topk_ks: tuple[int, ...]
    chunk_rows: int  # rows per chunk of the correctness stage's several-chunk check
    gemm_size: int
    copy_mib: int
    warmup: int
    repeats: int
    row_seconds: float  # bound on a row's timed calls (at least one runs)
    call_limit_ms: float | None  # a row whose second (warm) call is slower is skipped (None: no such check)
    interpreter: bool = False
    notes: list[str] = field(default_factory=list)


QWEN3 = dict(hidden=4096, teacher_hidden=5120, vocab=151936, dtype="bf16")
GPU_SIZES = Sizes(
    correctness=dict(tokens=1024, **QWEN3),  # the float64 reference needs ~1.2 GB per [N, V] tensor
    headline=dict(tokens=8192, **QWEN3),
    unaligned_vocab=151665,  # Qwen2.5's len(tokenizer): the trainer cuts the head to it
    sweep_tokens=(4096, 16384),
    loss_tokens=8192,
    topk_ks=(16, 64),
    chunk_rows=256,  # 4 chunks of the 1024 rows, which the default budget takes in one
    gemm_size=8192,
    copy_mib=2048,
    warmup=2,
    repeats=10,
    row_seconds=3.0,
    call_limit_ms=5000.0,
)
TINY = dict(hidden=16, teacher_hidden=24, dtype="fp32")  # the interpreter runs fp32 (no bf16 tl.dot)
REHEARSAL_SIZES = Sizes(
    correctness=dict(tokens=48, vocab=160, **TINY),  # 3 chunks of chunk_rows in the several-chunk check
    headline=dict(tokens=16, vocab=128, **TINY),
    unaligned_vocab=125,
    sweep_tokens=(8,),
    loss_tokens=8,
    topk_ks=(2,),  # the top-k kernel is slow in the interpreter: ~1 s a call at k=2
    chunk_rows=16,  # chunking.MIN_ROWS: fewer rows would tile the vocabulary instead
    gemm_size=256,
    copy_mib=32,
    warmup=0,  # nothing compiles in the interpreter; each of its calls costs ~1 s
    repeats=1,
    row_seconds=1.0,
    call_limit_ms=None,  # the torch row's limit (3× naive) still runs
    interpreter=True,
    notes=[
        "rehearsal on the CPU: Triton interpreter, tiny fp32 shapes, torch.compile disabled "
        "(TORCH_COMPILE_DISABLE=1); the times say nothing about speed"
    ],
)


def sizes(rehearse: bool) -> Sizes:
    return REHEARSAL_SIZES if rehearse else GPU_SIZES


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` so that a reader (or a kill) never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1, default=str) + "\n")
    partial.replace(path)


def stage_data(out: Path, stem: str, number: int) -> dict:
    return read_json(STAGES[number].path(out, stem)) or {}


def benchmark_rows(out: Path, stem: str) -> list[dict]:
    """The rows of the headline, the sweep and the peers (stages 2 to 4) as far as they got."""
    return [row for n in (2, 3, 4) for row in stage_data(out, stem, n).get("rows", [])]
