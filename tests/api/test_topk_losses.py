"""Top-k losses (linear_topk_divergence, linear_topk_target_divergence) against autograd on the
materialized reference, on the torch backend; every backend's are checked by tests/backends/test_backend_contract.py."""

from __future__ import annotations

import pytest
import torch
from conftest import grads, make_pair, rel_err

from opd_fast import (
    chunk_budget,
    linear_divergence,
    linear_topk_divergence,
    linear_topk_target_divergence,
)
from opd_fast.reference import materialized_topk_divergence, materialized_topk_target_divergence

SUPPORTS = ["student", "teacher", "union", "intersection"]


def _torch_topk_divergence(*tensors, **kwargs):
    return linear_topk_divergence(*tensors, backend="torch", **kwargs)


def _torch_topk_target_divergence(*tensors, **kwargs):
    return linear_topk_target_divergence(*tensors, backend="torch", **kwargs)


def _compare(fn_ours, fn_ref, inputs, tol, n_grad=2, **kwargs):
    """fn_ours(*inputs, **kwargs) vs fn_ref(*inputs, **kwargs): value and the first n_grad input gradients."""
    ours = fn_ours(*inputs, **kwargs)
    ref = fn_ref(*inputs, **kwargs)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < tol, (ours, ref)
    grad_output = torch.randn_like(ref) if ref.dim() else torch.tensor(1.3, dtype=ref.dtype, device=ref.device)
    for a, b in zip(grads(ours, inputs[:n_grad], grad_output), grads(ref, inputs[:n_grad], grad_output)):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("support", SUPPORTS)
def test_topk_divergence_matches_reference(support, divergence, renormalize):
    inputs = make_pair(lead=(3, 7), hs_dim=12, ht_dim=20, vocab=89)
    mask = torch.rand(3, 7) > 0.3
    kw = dict(k=6, support=support, divergence=divergence, renormalize=renormalize, mask=mask, temperature=1.4)
    for budget in (1 << 22, 40):
        with chunk_budget(budget):
            _compare(_torch_topk_divergence, materialized_topk_divergence, inputs, 1e-10, reduction="none", **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 89])
def test_topk_divergence_k_extremes(k, reduction):
    inputs = make_pair(lead=(9,), vocab=89)
    for support in SUPPORTS:
        kw = dict(k=k, support=support, renormalize=False, reduction=reduction)
        _compare(_torch_topk_divergence, materialized_topk_divergence, inputs, 1e-10, **kw)


def test_topk_divergence_with_k_equal_vocab_is_the_full_divergence():
    hs, ws, ht, wt = make_pair(lead=(6,), vocab=40)
    for divergence in ("reverse_kl", "forward_kl"):
        for renormalize in (True, False):
            ours = linear_topk_divergence(hs, ws, ht, wt, k=40, divergence=divergence, renormalize=renormalize)
            full = linear_divergence(hs, ws, ht, wt, divergence=divergence)
            assert rel_err(ours, full) < 1e-12


def test_topk_divergence_masked_everything_is_zero():
    hs, ws, ht, wt = make_pair(lead=(2, 3))
    loss = linear_topk_divergence(hs, ws, ht, wt, k=4, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    dh, dw = grads(loss, (hs, ws))
    assert torch.all(dh == 0) and torch.all(dw == 0)


def _teacher_topk(ht, wt, k, temperature=1.0):
    with torch.no_grad():
        lpt = torch.log_softmax((ht @ wt.T) / temperature, dim=-1)
        values, ids = lpt.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_target_divergence_matches_reference(divergence, add_tail):
    hs, ws, ht, wt = make_pair(lead=(4, 5), hs_dim=10, ht_dim=14, vocab=73)
    ids, lpt = _teacher_topk(ht, wt, 8)
    mask = torch.rand(4, 5) > 0.25
    kw = dict(divergence=divergence, add_tail=add_tail, mask=mask, temperature=0.8)
    for reduction in ("mean", "none"):
        _compare(
            _torch_topk_target_divergence,
            materialized_topk_target_divergence,
            (hs, ws, ids, lpt),
            1e-10,
            reduction=reduction,
            **kw,
        )


def test_target_divergence_with_the_whole_vocabulary_is_the_full_forward_kl():
    hs, ws, ht, wt = make_pair(lead=(7,), vocab=31)
    ids, lpt = _teacher_topk(ht, wt, 31)
    ours = linear_topk_target_divergence(hs, ws, ids, lpt, divergence="forward_kl")
    full = linear_divergence(hs, ws, ht, wt, divergence="forward_kl")
    assert rel_err(ours, full) < 1e-10
    ours_rkl = linear_topk_target_divergence(hs, ws, ids, lpt, divergence="reverse_kl")
    assert rel_err(ours_rkl, linear_divergence(hs, ws, ht, wt, divergence="reverse_kl")) < 1e-10


def test_target_divergence_k1_and_tail_bucket():
    hs, ws, ht, wt = make_pair(lead=(5,), vocab=20)
    ids, lpt = _teacher_topk(ht, wt, 1)
    with_tail = linear_topk_target_divergence(hs, ws, ids, lpt, reduction="none")
    without = linear_topk_target_divergence(hs, ws, ids, lpt, add_tail=False, reduction="none")
    ref = materialized_topk_target_divergence(hs, ws, ids, lpt, reduction="none")
    assert rel_err(with_tail, ref) < 1e-10 and not torch.allclose(with_tail, without)


@pytest.mark.parametrize(
    ("ids", "logprobs", "exc", "pattern"),
    [
        ([[0, 1, 20]], [[-1.0, -2.0, -3.0]], ValueError, r"teacher_topk_ids must lie in \[0, 20\)"),
        ([[0, -1, 2]], [[-1.0, -2.0, -3.0]], ValueError, r"must lie in"),
        ([[3, 1, 3]], [[-1.0, -2.0, -3.0]], ValueError, r"repeat a token id"),
        ([[0, 1, 2]], [[0.5, -2.0, -3.0]], ValueError, r"log-probabilities \(≤ 0\), found 0.5"),
        ([[0, 1, 2]], [[-0.1, -0.2, -0.3]], ValueError, r"probability mass of 2\.4.* > 1"),
        ([[0, 1, 2]], [[float("nan"), -2.0, -3.0]], ValueError, r"NaN"),
        ([[0.0, 1.0, 2.0]], [[-1.0, -2.0, -3.0]], TypeError, r"teacher_topk_ids must be an integer"),
        ([[0, 1]], [[-1.0, -2.0, -3.0]], ValueError, r"teacher_topk_logprobs must have the shape"),
    ],
)
def test_invalid_teacher_inputs(ids, logprobs, exc, pattern):
    hs, ws, _, _ = make_pair(lead=(1,), vocab=20)
    ids_t = torch.tensor(ids)
    with pytest.raises(exc, match=pattern):
        linear_topk_target_divergence(hs, ws, ids_t, torch.tensor(logprobs, dtype=torch.float64))


def test_invalid_teacher_rows_outside_the_mask_are_ignored():
    hs, ws, _, _ = make_pair(lead=(2,), vocab=20)
    ids = torch.tensor([[0, 1, 2], [5, 5, 5]])  # the second row is padding
    lpt = torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    loss = linear_topk_target_divergence(hs, ws, ids, lpt, mask=torch.tensor([True, False]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "bad", [dict(k=0), dict(k=21), dict(support="both"), dict(divergence="jsd"), dict(renormalize=1)]
)
def test_topk_divergence_bad_arguments(bad):
    hs, ws, ht, wt = make_pair(lead=(2,), vocab=20)
    with pytest.raises((ValueError, TypeError)):
        linear_topk_divergence(hs, ws, ht, wt, **bad)
