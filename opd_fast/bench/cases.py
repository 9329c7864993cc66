"""What `opd-fast bench` can measure: the backends, losses, modes, dtypes and shapes, one :class:`Case` per row, and
what a case computes (:func:`loss_function`) on which inputs (:func:`case_inputs`).

Backend names: ``naive`` and the peer baselines of :mod:`opd_fast.bench.baselines`, and ours, each named with its
plan: ``torch``, ``triton``, ``cuda`` (the library's default plan, chunked) and ``triton-streaming``,
``cuda-streaming`` (``plan="streaming"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from opd_fast import backends
from opd_fast.bench import baselines
from opd_fast.bench.inputs import PEAKED_ENTROPY, PEAKED_SHARED_MASS, make_inputs
from opd_fast.chunking import PLANS
from opd_fast.functional import linear_divergence
from opd_fast.reference import materialized_divergence, materialized_topk_overlap
from opd_fast.topk import linear_topk_overlap

OURS = ("torch", "triton", "cuda")
BENCH_BACKENDS = (
    "naive",
    "torch",
    "triton",
    "triton-streaming",
    "cuda",
    "cuda-streaming",
    "compile",
    "liger",
    "liger_chunked",
    "trl",
)
LOSSES = ("reverse_kl", "forward_kl", "jsd", "topk_overlap")
MEASURED_MODES = ("fwd", "bwd", "fwd+bwd")  # which pass a row times (and measures the memory of)
SKIPPED = "skipped: "  # how the error of a case that did not run begins
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
JSD_BETA = 0.5
TOPK_K = 16

# Shapes swept: tokens, hidden sizes, shared vocabulary. cpu-quick takes about a minute on a 2-core CPU with every
# installed baseline; cpu-small, its 8 times larger sweep, about ten minutes and 6 GB (TRL's loss); then real
# student/teacher pairs, for GPUs.
PRESETS: dict[str, dict] = {
    "cpu-quick": dict(tokens=[128, 256, 512], hidden=64, teacher_hidden=64, vocab=32768),
    "cpu-small": dict(tokens=[1024, 2048, 4096], hidden=64, teacher_hidden=64, vocab=32768),
    "qwen2.5-1.5b-7b": dict(tokens=[4096, 8192, 16384], hidden=1536, teacher_hidden=3584, vocab=151936),
    "qwen3-8b-14b": dict(tokens=[4096, 8192, 16384], hidden=4096, teacher_hidden=5120, vocab=151936),
    "llama3.1-8b-70b": dict(tokens=[4096, 8192, 16384], hidden=4096, teacher_hidden=8192, vocab=128256),
}
# The preset run with no shape options, per device type. On a GPU, cpu-small's largest call is ~70 GFLOP of matmuls
# (milliseconds at GPU rates; compilation dominates the run) where cpu-quick's would time little but kernel launches.
DEFAULT_PRESETS = {"cpu": "cpu-quick", "cuda": "cpu-small"}


@dataclass(frozen=True)
class Case:
    backend: str
    tokens: int
    hidden: int
    teacher_hidden: int
    vocab: int
    dtype: str
    mode: str
    loss: str = "reverse_kl"
    inputs: str = "random"
    filter_eps: float | None = None
    target_entropy: float = PEAKED_ENTROPY
    target_shared_mass: float = PEAKED_SHARED_MASS
    topk_k: int = TOPK_K  # the k of the topk_overlap loss

    def row(self) -> dict:
        """The case as the leading fields of a result row (the peaked targets only for peaked inputs, k only for
        the top-k overlap)."""
        row = asdict(self)
        if self.inputs != "peaked":
            del row["target_entropy"], row["target_shared_mass"]
        if self.loss != "topk_overlap":
            del row["topk_k"]
        return {**row, "plan": plan_of(self.backend)}


def split_backend(name: str) -> tuple[str, str | None]:
    """("triton", "streaming") for "triton-streaming", ("cuda", "chunked") for "cuda", (name, None) for baselines."""
    base, _, plan = name.partition("-")
    if base in OURS:
        return base, plan or PLANS[0]
    return name, None


def plan_of(name: str) -> str | None:
    return split_backend(name)[1]


def display_name(name: str) -> str:
    """The backend as human-facing output names it: ours as "opd_fast/torch", "opd_fast/triton-streaming" (plain
    "torch" reads as plain PyTorch), baselines as they are."""
    return f"opd_fast/{name}" if split_backend(name)[0] in OURS else name


def backend_skip_reason(backend: str, device: torch.device, *, interpreter: bool = False) -> str | None:
    """Why the bench backend ``backend`` cannot be benchmarked on ``device`` (None when it can).

    The Triton backends need CUDA here unless ``interpreter`` (a rehearsal under ``TRITON_INTERPRET=1``,
    whose timings say nothing about speed).
    """
    device = torch.device(device)
    base, _ = split_backend(backend)
    if base == "naive":
        return None
    if base == "triton" and device.type != "cuda" and not interpreter:
        return "the Triton kernels need a CUDA GPU (Triton's CPU interpreter checks correctness, not speed)"
    if base in OURS:
        return backends.unavailable_reason(base, device)
    return baselines.baseline_unavailable_reason(base, device)


def skip_reason(case: Case, device: torch.device, *, interpreter: bool = False) -> str | None:
    """Why ``case`` cannot run on ``device`` (None when it can): its backend is unavailable here, or it has no such
    loss or mode."""
    reason = backend_skip_reason(case.backend, device, interpreter=interpreter)
    if reason is None and case.loss == "topk_overlap" and case.mode != "fwd":
        reason = "the top-k overlap statistics are a diagnostic without gradients: mode fwd only"
    if reason is None and case.loss == "topk_overlap" and split_backend(case.backend)[0] not in ("naive", *OURS):
        reason = f"{case.backend} has no top-k overlap statistics"
    return reason


def case_inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """The case's inputs on ``device``: student_hidden [N, Hs] and student_weight [V, Hs] (requiring gradients),
    teacher_hidden [N, Ht] and teacher_weight [V, Ht], in the case's dtype."""
    return make_inputs(
        case.inputs,
        case.tokens,
        case.hidden,
        case.teacher_hidden,
        case.vocab,
        DTYPES[case.dtype],
        torch.device(device),
        seed,
        entropy=case.target_entropy,
        shared_mass=case.target_shared_mass,
    )


def loss_function(case: Case) -> Callable[..., object]:
    """fn(student_hidden, student_weight, teacher_hidden, teacher_weight) computing the case's loss."""
    base, plan = split_backend(case.backend)
    if case.loss == "topk_overlap":
        if base == "naive":
            return lambda *t: materialized_topk_overlap(*t, k=case.topk_k)
        if base in OURS:
            return lambda *t: linear_topk_overlap(*t, k=case.topk_k, backend=base, **plan_option(plan))
        raise ValueError(f"{case.backend} has no top-k overlap statistics")
    if base == "naive":
        return lambda *t: materialized_divergence(*t, divergence=case.loss, beta=JSD_BETA)
    if base in OURS:
        options = plan_option(plan)
        if case.filter_eps is not None:
            options["filter_eps"] = case.filter_eps
        return lambda *t: linear_divergence(*t, divergence=case.loss, beta=JSD_BETA, backend=base, **options)
    return baselines.divergence_loss(base, case.loss)


def plan_option(plan: str | None) -> dict:
    """The keyword that selects ``plan``: none for the library's default plan."""
    return {} if plan in (None, PLANS[0]) else {"plan": plan}


def floor_flops(case: Case) -> float:
    """Matmul FLOPs any exact method needs: 2·N·V·(Hs+Ht) forward, 4·N·V·Hs backward."""
    forward = 2.0 * case.tokens * case.vocab * (case.hidden + case.teacher_hidden)
    backward = 4.0 * case.tokens * case.vocab * case.hidden
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[case.mode]
