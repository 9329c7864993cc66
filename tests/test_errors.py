"""Every bad input of DESIGN.md §3 gets a ValueError/TypeError that names the argument and the fix."""

import math

import pytest
import torch
from conftest import make_pair

from opd_fast import (
    OPDLoss,
    chunk_budget,
    linear_divergence,
    linear_reverse_kl,
    linear_token_logprobs,
    linear_topk_overlap,
    set_chunk_budget,
)


@pytest.fixture
def pair():
    return make_pair(lead=(2, 3), hs_dim=8, ht_dim=12, vocab=50)


def _div(pair, **overrides):
    hs, ws, ht, wt = pair
    args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    kwargs = {"backend": "torch", **{k: v for k, v in overrides.items() if k not in args}}
    args.update({k: v for k, v in overrides.items() if k in args})
    return linear_divergence(*args.values(), **kwargs)


DIVERGENCE_CASES = [
    # (overrides, exception, pattern)
    (
        dict(teacher_weight=torch.randn(52, 12)),
        ValueError,
        r"student_weight has 50 .* teacher_weight has 52.*vocab_size=50",
    ),
    (dict(vocab_size=51), ValueError, r"vocab_size must be in \[1, 50\]"),
    (dict(vocab_size=0), ValueError, r"vocab_size must be in"),
    (dict(vocab_size=2.0), TypeError, r"vocab_size must be an int"),
    (
        dict(student_hidden=torch.randn(2, 3, 9)),
        ValueError,
        r"student_hidden has hidden size 9 .* student_weight has 8",
    ),
    (
        dict(teacher_hidden=torch.randn(2, 3, 8)),
        ValueError,
        r"teacher_hidden has hidden size 8 .* teacher_weight has 12",
    ),
    (dict(teacher_hidden=torch.randn(2, 4, 12)), ValueError, r"same leading shape.*\(2, 3\) and \(2, 4\)"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, r"mask must have the leading shape .*\(2, 3\)"),
    (dict(mask=torch.ones(2, 3)), TypeError, r"mask must be a bool tensor.*mask.bool\(\)"),
    (dict(mask=[[True] * 3] * 2), TypeError, r"mask must be a bool torch.Tensor"),
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1), ValueError, r"temperature must be a finite number > 0"),
    (dict(temperature=math.nan), ValueError, r"temperature must be a finite number > 0"),
    (dict(temperature=math.inf), ValueError, r"temperature must be a finite number > 0"),
    (dict(temperature="1"), TypeError, r"temperature must be a number"),
    (dict(divergence="kl"), ValueError, r"divergence must be one of 'reverse_kl', 'forward_kl', 'jsd', got 'kl'"),
    (dict(divergence="jsd", beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    (dict(beta=-0.1), ValueError, r"beta must be in \[0, 1\]"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(backend="tpu"), ValueError, r"backend must be one of 'auto', 'torch', 'triton', 'cuda', got 'tpu'"),
    (dict(student_hidden=[1.0, 2.0]), TypeError, r"student_hidden must be a torch.Tensor, got list"),
    (
        dict(student_hidden=torch.ones(2, 3, 8, dtype=torch.int64)),
        TypeError,
        r"student_hidden must be a floating-point",
    ),
    (dict(student_weight=torch.randn(50, 8, 1)), ValueError, r"student_weight must be 2-D \[V, H\]"),
    (dict(teacher_weight=torch.randn(0, 12)), ValueError, r"teacher_weight has no vocabulary rows"),
    (dict(student_hidden=torch.tensor(1.0)), ValueError, r"student_hidden must have shape \[\.\.\., H\]"),
    (dict(teacher_weight=torch.randn(50, 12, device="meta")), ValueError, r"same device.*teacher_weight is on meta"),
    (dict(process_group=object()), TypeError, r"process_group must be a torch\.distributed ProcessGroup"),
]


@pytest.mark.parametrize(("overrides", "exc", "pattern"), DIVERGENCE_CASES, ids=lambda v: None)
def test_divergence_bad_inputs(pair, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _div(pair, **overrides)


@pytest.mark.parametrize("name", ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_check_finite_names_the_tensor(pair, name, bad):
    tensors = dict(zip(("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"), pair))
    poisoned = tensors[name].detach().clone()
    poisoned.view(-1)[3] = bad
    with pytest.raises(ValueError, match=f"{name} contains 1 non-finite"):
        _div(pair, **{name: poisoned}, check_finite=True)
    loss = _div(pair, **{name: poisoned})  # unchecked: NaN propagates, never a finite wrong number
    assert not torch.isfinite(loss)


TOKEN_CASES = [
    (dict(token_ids=torch.tensor([[0, 1, 50]] * 2)), ValueError, r"token_ids must lie in \[0, 50\).*\[0, 50\]"),
    (dict(token_ids=torch.tensor([[0, -1, 2]] * 2)), ValueError, r"token_ids must lie in \[0, 50\)"),
    (dict(token_ids=torch.zeros(2, 3)), TypeError, r"token_ids must be an integer tensor.*\.long\(\)"),
    (dict(token_ids=torch.zeros(3, 2, dtype=torch.long)), ValueError, r"token_ids must have the leading shape"),
    (dict(token_ids=[0, 1]), TypeError, r"token_ids must be an integer torch.Tensor"),
    (dict(hidden=torch.randn(2, 3, 7)), ValueError, r"hidden has hidden size 7 but weight has 8"),
    (dict(weight=torch.randn(50)), ValueError, r"weight must be 2-D"),
    (dict(temperature=0), ValueError, r"temperature must be a finite number > 0"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
    (dict(process_group=object()), TypeError, r"process_group must be a torch\.distributed ProcessGroup"),
]


@pytest.mark.parametrize(("overrides", "exc", "pattern"), TOKEN_CASES, ids=lambda v: None)
def test_token_logprobs_bad_inputs(pair, overrides, exc, pattern):
    hs, ws, _, _ = pair
    args = dict(hidden=hs, weight=ws, token_ids=torch.zeros(2, 3, dtype=torch.long))
    args.update({k: v for k, v in overrides.items() if k in args})
    kwargs = {k: v for k, v in overrides.items() if k not in args}
    kwargs.setdefault("backend", "torch")
    with pytest.raises(exc, match=pattern):
        linear_token_logprobs(*args.values(), **kwargs)


@pytest.mark.parametrize(
    ("k", "exc", "pattern"),
    [
        (0, ValueError, r"k must be in \[1, V\] = \[1, 50\], got 0"),
        (51, ValueError, r"got 51"),
        (2.0, TypeError, "k must be an int"),
    ],
)
def test_topk_bad_k(pair, k, exc, pattern):
    with pytest.raises(exc, match=pattern):
        linear_topk_overlap(*pair, k=k, backend="torch")


def test_topk_checks_pair_inputs(pair):
    hs, ws, ht, _ = pair
    with pytest.raises(ValueError, match="vocab_size=50"):
        linear_topk_overlap(hs, ws, ht, torch.randn(60, 12), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        linear_topk_overlap(*pair, temperature=-2.0, backend="torch")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(divergence="tvd"), "divergence must be one of"),
        (dict(beta=2.0), r"beta must be in \[0, 1\]"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(reduction="mean_tokens"), "reduction must be one of"),
        (dict(backend="metal"), "backend must be one of"),
    ],
)
def test_opdloss_validates_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        OPDLoss(**kwargs)


def test_reverse_kl_passes_errors_through(pair):
    hs, ws, ht, wt = pair
    with pytest.raises(ValueError, match="reduction"):
        linear_reverse_kl(hs, ws, ht, wt, reduction="max")


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_chunk_budget(bad):
    with pytest.raises(ValueError, match="positive integer"):
        set_chunk_budget(bad)
    with pytest.raises(ValueError, match="positive integer"), chunk_budget(bad):
        pass


def test_bad_chunk_budget_env(monkeypatch, pair):
    monkeypatch.setenv("OPD_FAST_CHUNK_ELEMENTS", "lots")
    with pytest.raises(ValueError, match="OPD_FAST_CHUNK_ELEMENTS='lots' is not an integer"):
        _div(pair)
    monkeypatch.setenv("OPD_FAST_CHUNK_ELEMENTS", "-3")
    with pytest.raises(ValueError, match="OPD_FAST_CHUNK_ELEMENTS must be a positive integer"):
        _div(pair)
