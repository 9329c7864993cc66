"""Numerics at the edges: logits of ±1e4, all-equal rows, near one-hot rows, fp16 overflow, NaN and Inf.

The rule: a finite result is the right one (it matches the float64 reference); when the inputs make that
impossible, the result is NaN/Inf (or, with ``check_finite=True``, a ValueError naming the tensor) —
never a finite wrong number.

Logits are set exactly by feeding them as the hidden states of an identity lm_head (H = V).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from conftest import DEVICE, use_cuda_backend

from opd_fast import (
    chunk_budget,
    linear_divergence,
    linear_token_logprobs,
    linear_topk_divergence,
    linear_topk_overlap,
    linear_topk_target_divergence,
)
from opd_fast.backends import get_backend, triton_backend
from opd_fast.reference import materialized_divergence, materialized_token_logprobs
from opd_fast.types import Need, Side

# NaN/Inf inputs make Triton's interpreter (NumPy) warn; the values are what the tests check.
# .ci/run's slow step runs this file's slow tests: python -m pytest -m "slow and ci_slow"
pytestmark = [
    pytest.mark.ci_slow,
    pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning"),
]
BACKENDS = ["torch"] + (["triton"] if triton_backend is not None else [])
V = 37


def _rows(kind: str, n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "huge":
        return (torch.rand(n, V, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    if kind == "shifted":  # logits near 1e4 with a spread-out distribution: an lse of 1e4 and no single winner
        return 1e4 + torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    if kind == "all-equal":
        return torch.full((n, V), 5e3, dtype=torch.float64)
    if kind == "one-hot":
        rows = torch.zeros(n, V, dtype=torch.float64)
        rows[torch.arange(n), torch.randint(0, V, (n,), generator=g)] = 1e4
        return rows
    return torch.randn(n, V, generator=g, dtype=torch.float64) * 3


def _as_pair(student_logits, teacher_logits, dtype=torch.float32):
    eye = torch.eye(V, dtype=torch.float64)
    hs, ws = student_logits.to(DEVICE, dtype), eye.to(DEVICE, dtype)
    ht, wt = teacher_logits.to(DEVICE, dtype), eye.to(DEVICE, dtype)
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool(((actual.double() - expected.double()).abs() <= rel * (1 + expected.double().abs())).all())


def _within(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> bool:
    return bool(((actual.double() - expected.double()).abs() <= bound + 1e-5 * expected.double().abs()).all())


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def _as_accurate_as_plain(ours: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, slack: float = 0.0) -> bool:
    """ours is within 2× the error of plain fp32 PyTorch (log_softmax on materialized logits) against float64, plus
    2 ulps of the result (where plain happens to be exact) and ``slack``."""
    assert torch.isfinite(ours).all()
    eps = torch.finfo(torch.float32).eps
    return _error(ours, exact) <= 2 * _error(plain, exact) + 2 * eps * exact.abs().max().item() + slack


KINDS = [
    ("huge", "huge"),
    ("shifted", "shifted"),
    ("all-equal", "all-equal"),
    ("one-hot", "one-hot"),
    ("one-hot", "all-equal"),
]
# Both plans on the Triton and CUDA backends (CUDA's host build of csrc/ on a machine without a GPU): the chunk
# epilogue and the streaming kernels (the torch backend's streaming plan is the same sweep as its tiled chunks,
# covered by tests/api/test_plans.py).
BACKEND_PLANS = [("torch", "chunked")] + [
    (b, plan) for b in [*BACKENDS[1:], "cuda"] for plan in ("chunked", "streaming")
]
DIVERGENCES = [
    ("reverse_kl", 1.0),
    ("forward_kl", 0.25),
    ("jsd", 2.0),
    ("skew_forward_kl", 1.0),
    ("skew_reverse_kl", 0.5),
    ("tvd", 1.0),
]


# Issue 33's divergences on the kernel backends run in CI's slow step (.ci/run); the torch backend's run in the tier.
NEW_DIVERGENCES = ("skew_forward_kl", "skew_reverse_kl", "tvd")


def _slow_if_new(divergence: str, backend: str) -> list:
    return [pytest.mark.slow] if divergence in NEW_DIVERGENCES and backend != "torch" else []


def _divergence_cases() -> list:
    cases = []
    for divergence, temperature in DIVERGENCES:
        for student, teacher in KINDS:
            for backend, plan in BACKEND_PLANS:
                case_id = f"{divergence}-{student}-{teacher}-{backend}-{plan}"
                marks = _slow_if_new(divergence, backend)
                cases.append(
                    pytest.param(backend, plan, student, teacher, divergence, temperature, id=case_id, marks=marks)
                )
    return cases


@pytest.mark.parametrize("budget", [None, 64], ids=["whole-rows", "tiles"])
@pytest.mark.parametrize(("backend", "plan", "student", "teacher", "divergence", "temperature"), _divergence_cases())
def test_extreme_logits_are_as_accurate_as_log_softmax(
    backend, plan, student, teacher, divergence, temperature, budget, request
):
    """At logits of ±1e4, a row's lse rounded to fp32 is off by ~ulp(1e4) = 1e-3, and log p = z − lse would carry
    that into every log-probability; log_softmax keeps the row's max and log Σ apart (error ~ulp(log p)), and so
    must every backend: the loss and both gradients within 2× plain fp32 PyTorch's own error against float64.
    One-hot against all-equal rows sets the two heads' logits 5e3 apart: the online KL statistics stay relative
    to both rows' maxes there, or E_p[z_s − z_t] and lse_s − lse_t would cancel to ~ulp(5e3). A budget of 64
    elements splits the 37 columns into tiles, so the rows' maxes move from tile to tile."""
    if backend == "cuda":
        use_cuda_backend(request)
    pair = _as_pair(_rows(student, seed=1), _rows(teacher, seed=2))
    kw = dict(divergence=divergence, beta=0.5, temperature=temperature, reduction="none")
    extra = {} if backend == "torch" else {"filter_eps": 0.0}
    with chunk_budget(budget) if budget else nullcontext():
        ours = linear_divergence(*pair, backend=backend, plan=plan, **kw, **extra)
        ours_grads = torch.autograd.grad(ours.sum(), pair[:2])
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in pair]
    plain_pair = [t.detach().clone().requires_grad_(t.requires_grad) for t in pair]
    reference, plain = materialized_divergence(*exact, **kw), materialized_divergence(*plain_pair, **kw)
    assert _as_accurate_as_plain(ours, plain, reference), (ours, plain, reference)
    if student == teacher == "all-equal" and divergence in ("reverse_kl", "forward_kl"):
        assert torch.equal(ours, torch.zeros_like(ours))  # identical distributions: exactly 0 (JSD: to rounding)
    plain_grads = torch.autograd.grad(plain.sum(), plain_pair[:2])
    exact_grads = torch.autograd.grad(reference.sum(), exact[:2])
    # Reverse KL's logit gradient p_s((log p_s − log p_t) − D) subtracts two numbers of size |D| (up to 2e4 on "huge"
    # rows). Whole rows take both from the same log-probabilities, as autograd does (exact zeros where p_s is one-hot
    # in fp32); over tiles D comes from the statistics pass before the gradient pass, and the two carry ~ulp(|D|):
    # δG through dH = G·W (W = I) and dW = Gᵀ·h (columns of Σ_n |h|).
    tiled_kl = budget is not None and divergence == "reverse_kl"
    logit_slack = 4 * torch.finfo(torch.float32).eps * reference.abs().max().item() if tiled_kl else 0.0
    slacks = (logit_slack, logit_slack * pair[0].detach().abs().sum(0).max().item())
    for name, a, p, e, slack in zip(("hidden", "weight"), ours_grads, plain_grads, exact_grads, slacks):
        assert _as_accurate_as_plain(a, p, e, slack), (name, _error(a, e), _error(p, e))


@pytest.mark.parametrize(("backend", "plan"), BACKEND_PLANS)
@pytest.mark.parametrize(
    "kind",
    ["huge", "shifted", "all-equal", "one-hot"],
)
def test_extreme_logits_token_logprobs(backend, plan, kind, request):
    if backend == "cuda":
        use_cuda_backend(request)
    hs, ws, _, _ = _as_pair(_rows(kind), _rows(kind))
    ids = torch.arange(6, device=DEVICE) * 5 % V
    extra = {} if backend == "torch" else {"filter_eps": 0.0}
    ours = linear_token_logprobs(hs, ws, ids, backend=backend, plan=plan, **extra)
    reference = materialized_token_logprobs(hs.detach().double(), ws.detach().double(), ids)
    plain = materialized_token_logprobs(hs.detach(), ws.detach(), ids)
    assert _as_accurate_as_plain(ours, plain, reference), (_error(ours, reference), _error(plain, reference))
    if kind == "all-equal":
        assert _as_accurate_as_plain(ours, plain, torch.full_like(reference, -math.log(V)))


LONG_V = 32749  # a prime just under 2**15: no vector width or tile divides it


def _long_pair(student: str, teacher: str, seed: int):
    """One token's exact logits over LONG_V columns: hidden [1, 0] and weight columns (logits, noise), so h·Wᵀ is the
    logits column in fp32 too. "huge": uniform in ±1e4; "apart": 1e4 + 2·N(0, 1), against the teacher's N(0, 9)."""
    g = torch.Generator().manual_seed(seed)

    def side(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "huge":
            logits = (torch.rand(LONG_V, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
        elif kind == "apart":
            logits = 1e4 + torch.randn(LONG_V, generator=g, dtype=torch.float64) * 2
        else:
            logits = torch.randn(LONG_V, generator=g, dtype=torch.float64) * 3
        noise = torch.randn(LONG_V, generator=g, dtype=torch.float64)
        hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        return hidden.to(DEVICE, torch.float32), torch.stack([logits, noise], 1).to(DEVICE, torch.float32)

    (hs, ws), (ht, wt) = side(student), side(teacher)
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


@pytest.mark.parametrize(
    ("student", "teacher", "seed"), [("huge", "huge", 1), ("apart", "random", 1)], ids=["huge", "1e4-apart"]
)
def test_long_whole_rows_are_as_accurate_as_log_softmax(student, teacher, seed):
    """JSD(0.5) at τ = 0.7 over V = 32749 columns in the torch backend's default plan (one whole row per chunk):
    loss and both gradients within 2× plain fp32 PyTorch's error. Whole rows took log p from log_softmax, whose
    Σ e^{z − m} over a long row runs sequentially per vector lane (its log Σ off by ~V/16 ulps, an error every log p
    of the row shares), and a gradient center off by (1 − Σ p_s) · center: G then no longer summed to 0 over the
    row, and dH = G·W added those errors up coherently along W's common 1e4 component (7× and 2.4× plain's dH
    error here). Tiles and the streaming plan still carry the center's error (their JSD statistics hold no Σ p_s)."""
    pair = _long_pair(student, teacher, seed)
    kw = dict(divergence="jsd", beta=0.5, temperature=0.7, reduction="sum")
    ours = linear_divergence(*pair, backend="torch", **kw)
    ours_grads = torch.autograd.grad(ours, pair[:2])
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in pair]
    plain_pair = [t.detach().clone().requires_grad_(t.requires_grad) for t in pair]
    reference, plain = materialized_divergence(*exact, **kw), materialized_divergence(*plain_pair, **kw)
    assert _as_accurate_as_plain(ours, plain, reference), (ours.item(), plain.item(), reference.item())
    plain_grads = torch.autograd.grad(plain, plain_pair[:2])
    exact_grads = torch.autograd.grad(reference, exact[:2])
    for name, a, p, e in zip(("hidden", "weight"), ours_grads, plain_grads, exact_grads):
        assert _as_accurate_as_plain(a, p, e), (name, _error(a, e), _error(p, e))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_token_logprob_backward_takes_the_lse_residual(backend, plan, seed, request):
    """At τ = 0.05 the logits are 20× their h·Wᵀ and the rows' lse a few hundred: p = e^{z − lse} carries ~ulp(lse)
    (1.5e-5) in every p of the row (3-11× plain fp32's gradient error here) unless the backward subtracts the lse
    residual the forward returned, as the forward's log p(y) does (tests/kernels/test_triton_numerics.py for the Triton
    streaming ops; the public path below)."""
    if backend == "cuda":
        use_cuda_backend(request)
    hs, ws, _, _ = _as_pair(_rows("random", seed=seed), _rows("random", seed=seed))
    ids = torch.arange(6, device=DEVICE) * 5 % V
    ops, side = get_backend(backend, plan=plan), Side(hs.detach(), ws.detach())
    _, lse, lse_lo = ops.token_logits(side, ids, 0.05)
    ones = torch.ones(6, device=DEVICE)
    ours = ops.logits_backward(side, ids, lse, ones, 0.05, Need(hidden=True, weight=True), 0.0, lse_lo=lse_lo)
    exact = [t.detach().double().requires_grad_() for t in (hs, ws)]
    plain_pair = [t.detach().clone().requires_grad_() for t in (hs, ws)]
    exact_grads = torch.autograd.grad(materialized_token_logprobs(*exact, ids, temperature=0.05).sum(), exact)
    plain_grads = torch.autograd.grad(materialized_token_logprobs(*plain_pair, ids, temperature=0.05).sum(), plain_pair)
    for name, a, p, e in zip(("hidden", "weight"), ours[:2], plain_grads, exact_grads):
        assert _as_accurate_as_plain(a, p, e), (name, _error(a, e), _error(p, e))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("backend", "plan"), BACKEND_PLANS)
def test_token_logprob_gradients_at_a_low_temperature(backend, plan, seed, request):
    """At τ = 0.05 the logits are 20× their h·Wᵀ and the rows' lse a few hundred: the backward's p = e^{z − lse}
    carries ~ulp(lse) (1.5e-5) in every p of the row unless it has the forward's lse residual too."""
    if backend == "cuda":
        use_cuda_backend(request)
    hs, ws, _, _ = _as_pair(_rows("random", seed=seed), _rows("random", seed=seed))
    ids = torch.arange(6, device=DEVICE) * 5 % V
    extra = {} if backend == "torch" else {"filter_eps": 0.0}
    ours = linear_token_logprobs(hs, ws, ids, temperature=0.05, backend=backend, plan=plan, **extra)
    ours_grads = torch.autograd.grad(ours.sum(), (hs, ws))
    exact = [t.detach().double().requires_grad_() for t in (hs, ws)]
    plain_pair = [t.detach().clone().requires_grad_() for t in (hs, ws)]
    reference = materialized_token_logprobs(*exact, ids, temperature=0.05)
    plain = materialized_token_logprobs(*plain_pair, ids, temperature=0.05)
    assert _as_accurate_as_plain(ours, plain, reference), (_error(ours, reference), _error(plain, reference))
    plain_grads = torch.autograd.grad(plain.sum(), plain_pair)
    exact_grads = torch.autograd.grad(reference.sum(), exact)
    for name, a, p, e in zip(("hidden", "weight"), ours_grads, plain_grads, exact_grads):
        assert _as_accurate_as_plain(a, p, e), (name, _error(a, e), _error(p, e))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_rows_break_top_k_ties_by_the_smaller_id(backend):
    pair = _as_pair(_rows("all-equal"), _rows("all-equal"))
    stats = linear_topk_overlap(*pair, k=5, backend=backend)
    assert stats.student_topk_ids.tolist() == [[0, 1, 2, 3, 4]] * 6
    assert torch.equal(stats.overlap_ratio, torch.ones(6, device=DEVICE))
    logit_error = 8 * torch.finfo(torch.float32).eps * 5e3  # fp32 logits of 5e3 are known to ~5e-4
    assert _within(stats.overlap_mass_student, torch.full((6,), 5 / V), logit_error)
    assert _within(stats.student_entropy, torch.full((6,), math.log(V)), logit_error)
    loss = linear_topk_divergence(*pair, k=5, support="union", backend=backend)
    assert loss.item() == 0.0


def test_fp16_logits_beyond_the_fp16_range_are_exact_or_not_finite():
    """|logits| ≈ 1.3e5 > 65504: a backend whose logits overflow fp16 returns NaN/Inf; one that accumulates
    in fp32 (Triton, CUDA: tl.dot / cuBLAS with fp32 output) returns the exact value. Never finite and wrong."""
    g = torch.Generator().manual_seed(0)
    hs = (torch.rand(5, 8, generator=g, dtype=torch.float64) + 1) * 200
    ws = (torch.rand(V, 8, generator=g, dtype=torch.float64) - 0.5) * 120
    ht = (torch.rand(5, 8, generator=g, dtype=torch.float64) + 1) * 150
    wt = (torch.rand(V, 8, generator=g, dtype=torch.float64) - 0.5) * 120
    assert (hs @ ws.T).abs().max() > 65504
    reference = materialized_divergence(hs, ws, ht, wt, reduction="none")
    finite_results = 0
    for backend in BACKENDS:
        half = [t.to(DEVICE, torch.float16) for t in (hs, ws, ht, wt)]
        exact = materialized_divergence(*(t.double() for t in half), reduction="none")  # the fp16 inputs, exactly
        extra = {} if backend == "torch" else {"filter_eps": 0.0}
        ours = linear_divergence(*half, reduction="none", backend=backend, **extra)
        if torch.isfinite(ours).all():
            finite_results += 1
            assert _close(ours, exact.to(ours.device), 1e-3), (backend, ours, exact)
        else:
            assert not torch.isfinite(ours).any(), (backend, ours)  # every overflowing row is flagged
    assert torch.isfinite(reference).all() and finite_results >= (1 if "triton" in BACKENDS else 0)


def _poison(tensor: torch.Tensor, value: float, row: int = 2) -> torch.Tensor:
    poisoned = tensor.detach().clone()
    poisoned.view(-1, poisoned.shape[-1])[row, 3] = value
    return poisoned.requires_grad_(tensor.requires_grad)


@pytest.mark.device_semantics
@pytest.mark.parametrize("divergence", [d for d, _ in DIVERGENCES])
@pytest.mark.parametrize("filter_eps", [0.0, 2.0**-12], ids=["exact", "filtered"])
@pytest.mark.parametrize(("backend", "plan"), BACKEND_PLANS)
def test_nan_logits_reach_both_gradients_with_or_without_filtering(backend, plan, filter_eps, divergence, request):
    """A NaN logit column makes every row's log-sum-exp, loss and logit gradient NaN, so dH and dW must be NaN
    throughout. With gradient filtering a NaN |G| is not "below ε": skipping those columns or tiles would hand
    back finite, wrong (zero) gradients. The streaming Triton kernel did so even with filtering off."""
    if backend == "cuda":
        use_cuda_backend(request)
    hs, ws, ht, wt = _as_pair(_rows("random", seed=3), _rows("random", seed=4))
    ws = _poison(ws, math.nan)
    kw = dict(divergence=divergence, beta=0.5, filter_eps=filter_eps)
    loss = linear_divergence(hs, ws, ht, wt, backend=backend, plan=plan, **kw)
    d_hidden, d_weight = torch.autograd.grad(loss, (hs, ws))
    assert torch.isnan(loss)
    assert torch.isnan(d_hidden).all() and torch.isnan(d_weight).all(), (d_hidden, d_weight)


def _calls(hs, ws, ht, wt):
    """Every public op on one pair: name → callable(check_finite, backend)."""
    ids = torch.arange(hs.shape[0], device=DEVICE) % V
    with torch.no_grad():
        top = torch.log_softmax(ht.double() @ wt.double().T, dim=-1).topk(4, dim=-1)
    return {
        "divergence": lambda c, b: linear_divergence(hs, ws, ht, wt, reduction="none", check_finite=c, backend=b),
        "token_logprobs": lambda c, b: linear_token_logprobs(hs, ws, ids, check_finite=c, backend=b),
        "topk_overlap": lambda c, b: linear_topk_overlap(hs, ws, ht, wt, k=3, check_finite=c, backend=b).overlap_ratio,
        "topk_divergence": lambda c, b: linear_topk_divergence(
            hs, ws, ht, wt, k=3, reduction="none", check_finite=c, backend=b
        ),
        "topk_target": lambda c, b: linear_topk_target_divergence(
            hs, ws, top.indices, top.values.float(), reduction="none", check_finite=c, backend="torch"
        ),
    }


OPS = ["divergence", "token_logprobs", "topk_overlap", "topk_divergence", "topk_target"]


@pytest.mark.device_semantics
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["student_hidden", "student_weight"])
def test_non_finite_inputs_raise_when_checked_and_propagate_otherwise(backend, op, bad, where):
    pair = list(_as_pair(_rows("random", seed=3), _rows("random", seed=4)))
    index = {"student_hidden": 0, "student_weight": 1}[where]
    pair[index] = _poison(pair[index], bad)
    call = _calls(*pair)[op]
    name = where.removeprefix("student_") if op == "token_logprobs" else where  # its arguments: hidden, weight
    with pytest.raises(ValueError, match=f"^{name} contains 1 non-finite"):
        call(True, backend)
    out = call(False, backend)
    if op == "topk_overlap":
        return  # statistics of a NaN row: ids are undefined; the checked path is the contract here
    poisoned_rows = slice(None) if where == "student_weight" else slice(2, 3)  # one weight row feeds every token
    assert not torch.isfinite(out[poisoned_rows]).all(), out  # the poison reaches the result...
    if where == "student_weight" and math.isnan(bad):  # a NaN logit column enters every row's log-sum-exp
        assert not torch.isfinite(out).any(), out
    if where == "student_hidden":
        clean = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
        clean[2] = False
        assert torch.isfinite(out[clean]).all()  # ...and only the tokens it belongs to
