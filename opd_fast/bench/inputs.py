"""Inputs for `opd-fast bench` and ``benchmarks/gpu_verify.py``, drawn on the target device.

Two presets of student/teacher hidden states and lm_head weights:

* ``random``: hidden states ~ N(0, 1), weights ~ N(0, 16/H), so every logit is ~ N(0, 16). These
  distributions have a few nats of entropy but no structure shared between positions: the tokens that
  carry probability are scattered uniformly over the vocabulary, so gradient filtering finds no logits
  tile to skip on them.
* ``peaked``: a small generative model of a language model's next-token distributions with a chosen mean
  entropy and a chosen top-k shared mass between student and teacher. Logits are

      z_s = prior + σ_s · g_s + x_s,        z_t = prior + σ_t · g_t + x_t,

  where ``prior[v] = −zipf · ln(1 + v)`` is a Zipf log-frequency prior (frequent tokens at small ids, as
  BPE vocabularies order them), ``g = E c`` are context preferences (``E`` [V, D] token embeddings shared by
  both heads, ``c`` a position's context, so ``g`` ~ N(0, 1) per entry), the teacher's context is
  ``ρ c + √(1 − ρ²) c'`` (``c'`` independent), and ``x`` ~ N(0, 1/16) is each model's own noise from its
  hidden sizes beyond the shared D = min(Hs, Ht) − 1 dimensions. Hidden column 0 is 1 and weight column 0
  the prior, so the prior is part of h Wᵀ like any other logit term. σ_s and σ_t are bisected so that the
  mean entropies hit the target (entropy falls as σ grows), then ρ so that the student's mean probability
  mass on the tokens in both top-k sets hits its target (it grows with ρ), on a sample of positions.

Everything is drawn with a generator on ``device`` (a GPU draws the ~1.4 G normals of the largest cases in
milliseconds). The same seed gives the same inputs on one device type, not across CPU and CUDA.
:func:`input_statistics` measures what the inputs actually are, for every benchmark row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

INPUT_PRESETS = ("random", "peaked")
PEAKED_ENTROPY = 1.5  # nats: a confident LM's mean next-token entropy
PEAKED_SHARED_MASS = 0.9  # student's mass on the shared top-k: a teacher the student mostly agrees with
SHARED_K = 16  # the k of the shared top-k mass (docs/design.md §3's default k)
ZIPF = 1.0  # exponent of the prior: unigram frequencies of natural language fall as 1/rank
# Positions the bisections look at: a GPU does 256 in microseconds; a CPU takes ~0.1 s per softmax over 256 rows of
# a 32k vocabulary, times ~50 bisection steps, so it tunes on 64 (the targets are then met within ~10%).
TUNING_ROWS = {"cuda": 256, "cpu": 64}
STATISTICS_ROWS = 256  # positions input_statistics measures (once per benchmark row)
_OWN_NOISE_STD = 0.25


def random_inputs(
    tokens: int, hidden: int, teacher_hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The ``random`` preset: hidden ~ N(0, 1) [N, H], weights ~ N(0, 16/H) [V, H], in ``dtype`` on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(std)

    return dict(
        student_hidden=normal(tokens, hidden).requires_grad_(),
        student_weight=normal(vocab, hidden, std=4 / hidden**0.5).requires_grad_(),
        teacher_hidden=normal(tokens, teacher_hidden),
        teacher_weight=normal(vocab, teacher_hidden, std=4 / teacher_hidden**0.5),
    )


class _PeakedDraw:
    """The random parts of the ``peaked`` preset (fp32), drawn in a fixed order from one seeded generator."""

    def __init__(self, tokens: int, hidden: int, teacher_hidden: int, vocab: int, device: torch.device, seed: int):
        self.shared = min(hidden, teacher_hidden) - 1
        if self.shared < 1:
            raise ValueError(f"the peaked preset needs hidden sizes of at least 2, got {hidden} and {teacher_hidden}")
        gen = torch.Generator(device=device).manual_seed(seed)

        def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=device).mul_(std)

        d = self.shared
        self.prior = -ZIPF * torch.log1p(torch.arange(vocab, device=device, dtype=torch.float32))
        self.embed = normal(vocab, d)
        self.context = normal(tokens, d, std=d**-0.5)
        self.teacher_context = normal(tokens, d, std=d**-0.5)
        extra_s, extra_t = hidden - 1 - d, teacher_hidden - 1 - d
        self.student_extra_weight = normal(vocab, extra_s)
        self.teacher_extra_weight = normal(vocab, extra_t)
        self.student_extra_hidden = normal(tokens, extra_s, std=_OWN_NOISE_STD / max(extra_s, 1) ** 0.5)
        self.teacher_extra_hidden = normal(tokens, extra_t, std=_OWN_NOISE_STD / max(extra_t, 1) ** 0.5)


def _bisect(f: Callable[[float], float], target: float, lo: float, hi: float, increasing: bool, steps: int):
    """x in [lo, hi] with f(x) ≈ target for a monotone f; the nearer end when the target is out of range."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def _shared_topk_mass(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: the student's probability mass on the tokens in both models' top-k sets, and |shared| / k."""
    k = min(k, student_logits.shape[-1])
    p_s = torch.softmax(student_logits.float(), dim=-1)
    s_ids = student_logits.topk(k, dim=-1).indices
    t_ids = teacher_logits.topk(k, dim=-1).indices
    shared = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1)  # [rows, k]: student top-k id also in teacher's
    return p_s.gather(-1, s_ids).mul(shared).sum(-1), shared.float().mean(-1)


@functools.lru_cache(maxsize=16)
def _peaked_scales(
    tokens: int,
    hidden: int,
    teacher_hidden: int,
    vocab: int,
    device: str,
    seed: int,
    entropy: float,
    shared_mass: float,
) -> tuple[float, float, float]:
    """(σ_s, σ_t, ρ) of the ``peaked`` preset for these shapes and targets, bisected on a sample of positions."""
    draw = _PeakedDraw(tokens, hidden, teacher_hidden, vocab, torch.device(device), seed)
    rows = slice(0, min(tokens, TUNING_ROWS.get(torch.device(device).type, TUNING_ROWS["cpu"])))
    context = draw.context[rows] @ draw.embed.T
    teacher_context = draw.teacher_context[rows] @ draw.embed.T
    own_s = draw.prior + draw.student_extra_hidden[rows] @ draw.student_extra_weight.T
    own_t = draw.prior + draw.teacher_extra_hidden[rows] @ draw.teacher_extra_weight.T
    # 18 halvings of [0, 64] and 12 of [0, 1]: σ and ρ to ~2e-4, far below the sampling noise of the means.
    sigma_s = _bisect(lambda s: _entropy(own_s + s * context), entropy, 0.0, 64.0, increasing=False, steps=18)
    student = own_s + sigma_s * context

    def teacher(sigma: float, rho: float) -> torch.Tensor:
        return own_t + sigma * (rho * context + math.sqrt(1 - rho * rho) * teacher_context)

    sigma_t = _bisect(lambda s: _entropy(teacher(s, 0.0)), entropy, 0.0, 64.0, increasing=False, steps=18)
    rho = _bisect(
        lambda r: float(_shared_topk_mass(student, teacher(sigma_t, r), SHARED_K)[0].mean()),
        shared_mass,
        0.0,
        1.0,
        increasing=True,
        steps=12,
    )
    return sigma_s, sigma_t, rho


def peaked_inputs(
    tokens: int,
    hidden: int,
    teacher_hidden: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    entropy: float = PEAKED_ENTROPY,
    shared_mass: float = PEAKED_SHARED_MASS,
) -> dict[str, torch.Tensor]:
    """The ``peaked`` preset (module docstring): hidden [N, H] and weights [V, H] in ``dtype`` on ``device``
    whose next-token distributions have mean entropy ≈ ``entropy`` nats (both models) and a student mass
    ≈ ``shared_mass`` on the tokens in both top-16 sets; targets out of reach give the nearest reachable."""
    device = torch.device(device)
    sigma_s, sigma_t, rho = _peaked_scales(
        tokens, hidden, teacher_hidden, vocab, str(device), seed, float(entropy), float(shared_mass)
    )
    draw = _PeakedDraw(tokens, hidden, teacher_hidden, vocab, device, seed)

    def assemble(first_column: torch.Tensor, shared: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return torch.cat([first_column.unsqueeze(-1), shared, extra], dim=-1).to(dtype)

    ones = torch.ones(tokens, device=device)
    teacher_context = rho * draw.context + math.sqrt(1 - rho * rho) * draw.teacher_context
    inputs = dict(
        student_hidden=assemble(ones, sigma_s * draw.context, draw.student_extra_hidden),
        student_weight=assemble(draw.prior, draw.embed, draw.student_extra_weight),
        teacher_hidden=assemble(ones, sigma_t * teacher_context, draw.teacher_extra_hidden),
        teacher_weight=assemble(draw.prior, draw.embed, draw.teacher_extra_weight),
    )
    inputs["student_hidden"].requires_grad_()
    inputs["student_weight"].requires_grad_()
    return inputs


def make_inputs(
    preset: str,
    tokens: int,
    hidden: int,
    teacher_hidden: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    *,
    entropy: float = PEAKED_ENTROPY,
    shared_mass: float = PEAKED_SHARED_MASS,
) -> dict[str, torch.Tensor]:
    """Inputs of ``preset`` (``INPUT_PRESETS``); the student's hidden states and weight require gradients."""
    if preset == "random":
        return random_inputs(tokens, hidden, teacher_hidden, vocab, dtype, device, seed)
    if preset == "peaked":
        return peaked_inputs(
            tokens, hidden, teacher_hidden, vocab, dtype, device, seed, entropy=entropy, shared_mass=shared_mass
        )
    raise ValueError(f"unknown input preset {preset!r}; choose from {', '.join(INPUT_PRESETS)}")


@torch.no_grad()
def input_statistics(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    rows: int = STATISTICS_ROWS,
) -> dict[str, float]:
    """What the inputs are, from fp32 logits of their first ``rows`` positions: mean entropies (nats) of both
    models, the student's mean mass on the shared top-16 tokens and the mean shared fraction of the top-16 (the
    top-k overlap ratio)."""
    n = min(rows, student_hidden.shape[0])
    z_s = student_hidden[:n].float() @ student_weight.float().T
    z_t = teacher_hidden[:n].float() @ teacher_weight.float().T
    mass, ratio = _shared_topk_mass(z_s, z_t, SHARED_K)
    return {
        "entropy_student": _entropy(z_s),
        "entropy_teacher": _entropy(z_t),
        "shared_mass": float(mass.mean()),
        "overlap_ratio": float(ratio.mean()),
    }
