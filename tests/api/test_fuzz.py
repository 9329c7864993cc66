"""Property-based fuzzing: every backend on this machine against the float64 materialized reference.

Hypothesis draws shapes (leading dims, student and teacher hidden sizes, vocabularies that fit no tile),
dtypes, temperatures (the teacher's own or the student's), logit scales (0 = all-equal rows, up to very
peaked), masks (none, random, all out), divergences and β, reductions, k, top-k supports, the torch backend's
chunk budget, and vocabulary-shard layouts (empty shards included). Values and both gradients are compared.

Tolerances: fp64 and fp32 inputs against the reference within a few ulps of their dtype's accumulation;
fp16/bf16 inputs by the project's rule — our error at most twice plain PyTorch's at the same precision
(plain PyTorch = the materialized loss run in that dtype), plus a small absolute floor.

Budget: the ``ci`` profile (default, derandomized so CI is reproducible) keeps the whole file near a
minute on 2 cores. The long run: ``OPD_FAST_FUZZ=long python -m pytest tests/api/test_fuzz.py`` (thousands of
examples, random seeds; ``OPD_FAST_FUZZ_EXAMPLES=N`` overrides the count).
"""

from __future__ import annotations

import itertools
import os
from contextlib import nullcontext

import pytest
import torch
import torch.multiprocessing as mp
import vp_worker
from conftest import rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opd_fast import (
    chunk_budget,
    linear_divergence,
    linear_token_logprobs,
    linear_topk_divergence,
    linear_topk_overlap,
    linear_topk_target_divergence,
)
from opd_fast.backends import triton_backend, unavailable_reason
from opd_fast.reference import (
    materialized_divergence,
    materialized_token_logprobs,
    materialized_topk_divergence,
    materialized_topk_overlap,
    materialized_topk_target_divergence,
)

PROFILE = os.environ.get("OPD_FAST_FUZZ", "ci")
_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", max_examples=24, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("OPD_FAST_FUZZ_EXAMPLES", 2000)), **_COMMON)
BASE = settings.get_profile(PROFILE)


def fuzz(share: float = 1.0):
    """The profile's settings with ``share`` of its examples (slow backends get fewer)."""
    return settings(BASE, max_examples=max(4, int(BASE.max_examples * share)))


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"  # Triton without a GPU runs in its interpreter: small shapes, few examples


def _runs_here(backend: str) -> bool:
    if backend == "triton" and INTERPRETED:
        return triton_backend is not None
    return unavailable_reason(backend, DEVICE) is None


BACKENDS = [b for b in ("torch", "triton", "cuda") if _runs_here(b)]


def backend_params(backends: list[str]) -> list:
    """pytest params of ``backends``. Triton's interpreter takes 30-90 s per fuzz test even at a quarter of the
    examples: the slow tier fuzzes it, while the fast one runs its kernels in
    tests/backends/test_backend_contract.py."""
    return [pytest.param(b, marks=pytest.mark.slow) if b == "triton" and INTERPRETED else b for b in backends]


# Triton's interpreter has no bf16 tl.dot; the CPU has no fp16/bf16 kernels worth fuzzing in Triton.
DTYPES = {
    "torch": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "triton": [torch.float32, torch.float16] if INTERPRETED else [torch.float32, torch.bfloat16, torch.float16],
    "cuda": [torch.float32, torch.bfloat16, torch.float16],
}
SHARE = {"torch": 1.0, "triton": 0.25 if INTERPRETED else 1.0, "cuda": 1.0}
MAX_VOCAB = {"torch": 300, "triton": 160 if INTERPRETED else 3000, "cuda": 3000}
LOW_PRECISION = (torch.bfloat16, torch.float16)


@st.composite
def problems(draw, backend: str, min_vocab: int = 1):
    """A student/teacher pair as a seed plus sizes (tensors are built from the seed, small to shrink)."""
    lead = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    return dict(
        lead=lead,
        hs_dim=draw(st.integers(1, 24)),
        ht_dim=draw(st.integers(1, 24)),
        vocab=draw(st.integers(min_vocab, MAX_VOCAB[backend])),
        dtype=draw(st.sampled_from(DTYPES[backend])),
        scale=draw(st.sampled_from([0.0, 0.3, 2.0, 6.0, 25.0])),
        temperature=draw(st.floats(0.25, 4.0)),
        teacher_temperature=draw(st.one_of(st.none(), st.floats(0.25, 4.0))),
        mask=draw(st.sampled_from(["none", "random", "all-out"])),
        budget=draw(st.sampled_from([None, 1, 7, 64, 4096])),
        seed=draw(st.integers(0, 2**20)),
    )


def build(p):
    """(hs, ws, ht, wt, mask) on DEVICE in p's dtype; hs and ws require grad."""
    g = torch.Generator().manual_seed(p["seed"])
    hs = torch.randn(*p["lead"], p["hs_dim"], generator=g, dtype=torch.float64)
    ws = torch.randn(p["vocab"], p["hs_dim"], generator=g, dtype=torch.float64) * (p["scale"] / p["hs_dim"] ** 0.5)
    ht = torch.randn(*p["lead"], p["ht_dim"], generator=g, dtype=torch.float64)
    wt = torch.randn(p["vocab"], p["ht_dim"], generator=g, dtype=torch.float64) * (p["scale"] / p["ht_dim"] ** 0.5)
    mask = {"none": None, "random": torch.rand(p["lead"], generator=g) > 0.4, "all-out": torch.zeros(p["lead"]) > 0}
    mask = mask[p["mask"]]
    hs, ws, ht, wt = (t.to(DEVICE, p["dtype"]) for t in (hs, ws, ht, wt))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, None if mask is None else mask.to(DEVICE)


def exact(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def grad_pair(out: torch.Tensor, inputs, seed: int):
    """Gradients of a random projection of ``out`` (a scalar gets a fixed weight)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches(ours, reference, plain, dtype, what):
    """fp64/fp32: ours ≈ reference; fp16/bf16: |ours − ref| ≤ 2 |plain − ref| + floor (max-abs norms)."""
    assert ours.shape == reference.shape, what
    assert torch.isfinite(ours).all() == torch.isfinite(reference).all(), (what, ours, reference)
    scale = reference.double().abs().max().item() if reference.numel() else 0.0
    if dtype in LOW_PRECISION:
        bound = 2 * _max_abs(plain, reference) + 1e-3 * (1 + scale)
    else:
        bound = (1e-9 if dtype == torch.float64 else 2e-5) * (1 + scale)
    assert _max_abs(ours, reference) <= bound, (what, _max_abs(ours, reference), bound)


def _plain(fn, tensors, dtype, **kwargs):
    """Plain PyTorch at the input precision (only needed, and only run, for fp16/bf16)."""
    if dtype not in LOW_PRECISION:
        return None
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    return fn(*inputs, **kwargs), inputs


def _with_budget(budget):
    return chunk_budget(budget) if budget is not None else nullcontext()


def check_divergence(backend, p, divergence, beta, reduction):
    hs, ws, ht, wt, mask = build(p)
    kw = dict(divergence=divergence, beta=beta, mask=mask, temperature=p["temperature"], reduction=reduction)
    kw["teacher_temperature"] = p["teacher_temperature"]
    extra = {"filter_eps": 0.0} if backend != "torch" else {}
    with _with_budget(p["budget"]):
        ours = linear_divergence(hs, ws, ht, wt, backend=backend, **kw, **extra)
    ref_inputs = exact(hs, ws, ht, wt)
    ref = materialized_divergence(*ref_inputs, **kw)
    plain = _plain(materialized_divergence, (hs, ws, ht, wt), p["dtype"], **kw)
    assert ours.dtype == (torch.float64 if p["dtype"] == torch.float64 else torch.float32)
    assert_matches(ours, ref, plain and plain[0], p["dtype"], "value")
    ours_g = grad_pair(ours, (hs, ws), p["seed"])
    ref_g = grad_pair(ref, ref_inputs[:2], p["seed"])
    plain_g = grad_pair(plain[0], plain[1][:2], p["seed"]) if plain else (None, None)
    for name, a, b, c in zip(("d_student_hidden", "d_student_weight"), ours_g, ref_g, plain_g):
        assert a.dtype == p["dtype"], name
        assert_matches(a, b, c, p["dtype"], name)


DIVERGENCE = st.sampled_from(["reverse_kl", "forward_kl", "jsd"])
BETA = st.sampled_from([0.0, 0.3, 0.5, 1.0])
REDUCTION = st.sampled_from(["mean", "sum", "none"])


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_divergence(backend):
    @fuzz(SHARE[backend])
    @given(p=problems(backend), divergence=DIVERGENCE, beta=BETA, reduction=REDUCTION)
    def run(p, divergence, beta, reduction):
        check_divergence(backend, p, divergence, beta, reduction)

    run()


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_token_logprobs(backend):
    @fuzz(SHARE[backend])
    @given(p=problems(backend))
    def run(p):
        hs, ws, _, _, _ = build(p)
        ids = torch.randint(0, p["vocab"], p["lead"], generator=torch.Generator().manual_seed(p["seed"]))
        ids = ids.to(DEVICE)
        extra = {"filter_eps": 0.0} if backend != "torch" else {}
        with _with_budget(p["budget"]):
            ours = linear_token_logprobs(hs, ws, ids, temperature=p["temperature"], backend=backend, **extra)
        ref_inputs = exact(hs, ws)
        ref = materialized_token_logprobs(*ref_inputs, ids, temperature=p["temperature"])
        plain = _plain(materialized_token_logprobs, (hs, ws), p["dtype"], token_ids=ids, temperature=p["temperature"])
        assert_matches(ours, ref, plain and plain[0], p["dtype"], "value")
        plain_g = grad_pair(plain[0], plain[1], p["seed"]) if plain else (None, None)
        for a, b, c in zip(grad_pair(ours, (hs, ws), p["seed"]), grad_pair(ref, ref_inputs, p["seed"]), plain_g):
            assert_matches(a, b, c, p["dtype"], "grad")

    run()


def _separated(log_probs: torch.Tensor, k: int) -> bool:
    """Whether the k-th and (k+1)-th largest entries of every row differ clearly: the top-k set is then
    defined by the values, not by rounding (ties are broken by id, tested separately)."""
    if k >= log_probs.shape[-1]:
        return True
    top = log_probs.topk(k + 1, dim=-1).values
    return bool(((top[..., k - 1] - top[..., k]) > 1e-6).all())


def _topk_problem(backend):
    """fp32/fp64 (top-k sets of low-precision logits are decided by rounding) and no 1-element chunk budget
    (a streaming top-k per single vocabulary column is correct but needlessly slow)."""
    return problems(backend, min_vocab=2).filter(
        lambda p: p["dtype"] in (torch.float32, torch.float64) and p["budget"] != 1
    )


MAX_K = {"torch": 24, "triton": 6 if INTERPRETED else 64, "cuda": 64}


@pytest.mark.parametrize("backend", backend_params([b for b in BACKENDS if b != "cuda"]))
def test_topk_overlap(backend):
    @fuzz(SHARE[backend] / 2)
    @given(p=_topk_problem(backend), k_fraction=st.floats(0.0, 1.0))
    def run(p, k_fraction):
        hs, ws, ht, wt, _ = build(p)
        k = max(1, round(k_fraction * min(p["vocab"], MAX_K[backend])))
        temperatures = dict(temperature=p["temperature"], teacher_temperature=p["teacher_temperature"])
        tau_t = p["teacher_temperature"] or p["temperature"]
        lps = torch.log_softmax((hs.double() @ ws.double().T) / p["temperature"], dim=-1)
        lpt = torch.log_softmax((ht.double() @ wt.double().T) / tau_t, dim=-1)
        assume(_separated(lps, k) and _separated(lpt, k))
        with _with_budget(p["budget"]):
            ours = linear_topk_overlap(hs, ws, ht, wt, k=k, backend=backend, **temperatures)
        ref = materialized_topk_overlap(*exact(hs, ws, ht, wt), k=k, **temperatures)
        for field, a, b in zip(ref._fields, ours, ref):
            if b.dtype == torch.int64:
                assert torch.equal(a.cpu(), b.cpu()), field
            else:
                assert rel_err(a.double(), b.double()) < 1e-5 or _max_abs(a, b) < 1e-5, field

    run()


@pytest.mark.parametrize("backend", backend_params([b for b in BACKENDS if b != "cuda"]))
def test_topk_divergence(backend):
    @fuzz(SHARE[backend] / 2)
    @given(
        p=_topk_problem(backend),
        k_fraction=st.floats(0.0, 1.0),
        support=st.sampled_from(["student", "teacher", "union", "intersection"]),
        divergence=st.sampled_from(["reverse_kl", "forward_kl"]),
        renormalize=st.booleans(),
        reduction=REDUCTION,
    )
    def run(p, k_fraction, support, divergence, renormalize, reduction):
        hs, ws, ht, wt, mask = build(p)
        k = max(1, round(k_fraction * min(p["vocab"], MAX_K[backend])))
        temperatures = dict(temperature=p["temperature"], teacher_temperature=p["teacher_temperature"])
        tau_t = p["teacher_temperature"] or p["temperature"]
        lps = torch.log_softmax((hs.double() @ ws.double().T) / p["temperature"], dim=-1)
        lpt = torch.log_softmax((ht.double() @ wt.double().T) / tau_t, dim=-1)
        assume(_separated(lps, k) and _separated(lpt, k))
        kw = dict(k=k, support=support, divergence=divergence, renormalize=renormalize)
        kw.update(mask=mask, reduction=reduction, **temperatures)
        with _with_budget(p["budget"]):
            ours = linear_topk_divergence(hs, ws, ht, wt, backend=backend, **kw)
        ref_inputs = exact(hs, ws, ht, wt)
        ref = materialized_topk_divergence(*ref_inputs, **kw)
        assert_matches(ours, ref, None, p["dtype"], "value")
        for a, b in zip(grad_pair(ours, (hs, ws), p["seed"]), grad_pair(ref, ref_inputs[:2], p["seed"])):
            assert_matches(a, b, None, p["dtype"], "grad")

    run()


@fuzz()
@given(
    p=problems("torch", min_vocab=2).filter(lambda p: p["dtype"] in (torch.float32, torch.float64)),
    k_fraction=st.floats(0.0, 1.0),
    divergence=st.sampled_from(["forward_kl", "reverse_kl"]),
    add_tail=st.booleans(),
    reduction=REDUCTION,
)
def test_topk_target_divergence(p, k_fraction, divergence, add_tail, reduction):
    hs, ws, ht, wt, mask = build(p)
    k = max(1, round(k_fraction * min(p["vocab"], 32)))
    with torch.no_grad():
        teacher = torch.log_softmax((ht.double() @ wt.double().T) / p["temperature"], dim=-1).topk(k, dim=-1)
    kw = dict(divergence=divergence, add_tail=add_tail, mask=mask, temperature=p["temperature"], reduction=reduction)
    with _with_budget(p["budget"]):
        ours = linear_topk_target_divergence(hs, ws, teacher.indices, teacher.values, backend="torch", **kw)
    ref_inputs = exact(hs, ws)
    ref = materialized_topk_target_divergence(*ref_inputs, teacher.indices, teacher.values, **kw)
    assert_matches(ours, ref, None, p["dtype"], "value")
    for a, b in zip(grad_pair(ours, (hs, ws), p["seed"]), grad_pair(ref, ref_inputs, p["seed"])):
        assert_matches(a, b, None, p["dtype"], "grad")


@st.composite
def shard_layouts(draw):
    """Row counts of 2 or 3 ranks over vocab_worker.V rows: uneven, empty shards allowed."""
    ranks = draw(st.integers(2, 3))
    cuts = sorted(draw(st.lists(st.integers(0, vp_worker.V), min_size=ranks - 1, max_size=ranks - 1)))
    bounds = [0, *cuts, vp_worker.V]
    return [b - a for a, b in itertools.pairwise(bounds)]


@fuzz(0.15)
@given(sizes=shard_layouts())
def test_vocabulary_shard_layouts(sizes, tmp_path_factory):
    """Every op over gloo ranks holding ``sizes`` rows each equals one process (tests/api/vp_worker.py)."""
    directory = tmp_path_factory.mktemp("shards")
    mp.spawn(
        vp_worker.worker,
        args=(len(sizes), str(directory / "init"), str(directory), sizes, "torch", "float64"),
        nprocs=len(sizes),
    )
    results = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(len(sizes))]
    hs, ws, ht, wt, mask, ids, grad = vp_worker.full_inputs(torch.float64)
    for name, kind, kwargs in vp_worker.cases():
        expected = vp_worker.run_case(kind, kwargs, hs, ws, ht, wt, mask, ids, grad)
        for rank, result in enumerate(results):
            for field, value in expected.items():
                if field == "dw":
                    start = sum(sizes[:rank])
                    value = value[start : start + sizes[rank]]
                got = result[name][field]
                if value.dtype == torch.int64:
                    assert torch.equal(got, value), (name, rank, field)
                else:
                    finite = torch.isfinite(value)
                    assert torch.equal(torch.isfinite(got), finite), (name, rank, field)
                    scale = _max_abs(value[finite], torch.zeros_like(value[finite]))
                    assert _max_abs(got[finite], value[finite]) <= 1e-9 * (1 + scale), (name, rank, field)
