"""linear_topk_overlap against the materialized reference (exact ids, tie order) on the torch backend; every
backend's top-k (the Triton kernels, the CUDA ones) is checked by tests/backends/test_backend_contract.py."""

import pytest
import torch
from conftest import make_pair

from opd_fast import TopKOverlap, chunk_budget, linear_topk_overlap
from opd_fast.reference import materialized_topk_overlap


def _assert_matches(ours: TopKOverlap, ref: TopKOverlap, tol=1e-6):
    for name, a, b in zip(TopKOverlap._fields, ours, ref):
        assert a.shape == b.shape, name
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("budget", [pytest.param(1 << 22, id="rows"), pytest.param(30, id="tiled")])
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize(("lead", "vocab"), [((9,), 97), ((2, 4), 64), ((), 23), ((3,), 70001)])
def test_matches_reference(lead, vocab, k, budget):
    hs, ws, ht, wt = make_pair(lead=lead, vocab=vocab, requires_grad=False)
    with chunk_budget(budget):
        ours = linear_topk_overlap(hs, ws, ht, wt, k=k, temperature=0.9, backend="torch")
    _assert_matches(ours, materialized_topk_overlap(hs, ws, ht, wt, k=k, temperature=0.9))


@pytest.mark.parametrize("budget", [1 << 22, 12])
def test_k_equal_vocab_and_ties_broken_by_smaller_id(budget):
    """Zero weight rows (padding) give exactly tied logits; the order among them is by token id."""
    hs, ws, ht, wt = make_pair(lead=(5,), vocab=20, requires_grad=False)
    ws[[2, 7, 11, 19]] = 0.0
    wt[[0, 3, 7, 8, 15]] = 0.0
    with chunk_budget(budget):
        ours = linear_topk_overlap(hs, ws, ht, wt, k=20, backend="torch")
        _assert_matches(ours, materialized_topk_overlap(hs, ws, ht, wt, k=20))
        assert torch.all(ours.overlap_ratio == 1)
        torch.testing.assert_close(ours.overlap_mass_student, torch.ones(5))
        small = linear_topk_overlap(hs, ws, ht, wt, k=3, backend="torch")
        _assert_matches(small, materialized_topk_overlap(hs, ws, ht, wt, k=3))


def test_all_equal_rows():
    hs = torch.zeros(3, 4, dtype=torch.float64)
    ws = torch.randn(10, 4, dtype=torch.float64)
    out = linear_topk_overlap(hs, ws, hs, ws, k=4, backend="torch")
    assert torch.equal(out.student_topk_ids, torch.arange(4).expand(3, 4))
    torch.testing.assert_close(out.student_entropy, torch.full((3,), float(torch.log(torch.tensor(10.0)))))


def test_identical_models_overlap_fully():
    hs, ws, _, _ = make_pair(lead=(6,), hs_dim=8, ht_dim=8, requires_grad=False)
    out = linear_topk_overlap(hs, ws, hs, ws, k=8, backend="torch")
    assert torch.all(out.overlap_ratio == 1)
    torch.testing.assert_close(out.overlap_mass_student, out.overlap_mass_teacher)
    torch.testing.assert_close(out.student_entropy, out.teacher_entropy)


def test_mask_fills_left_out_tokens():
    hs, ws, ht, wt = make_pair(lead=(2, 3), requires_grad=False)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    out = linear_topk_overlap(hs, ws, ht, wt, k=4, mask=mask, backend="torch")
    ref = materialized_topk_overlap(hs, ws, ht, wt, k=4)
    for name, a, b in zip(TopKOverlap._fields, out, ref):
        if a.dtype == torch.int64:
            assert torch.equal(a[mask], b[mask]) and torch.all(a[~mask] == -1), name
        else:
            torch.testing.assert_close(a[mask], b[mask], rtol=1e-6, atol=1e-6)
            expected_fill = -torch.inf if name.endswith("logprobs") else 0.0
            assert torch.all(a[~mask] == expected_fill), name


def test_low_precision_inputs_give_fp32_outputs():
    hs, ws, ht, wt = make_pair(lead=(8,), dtype=torch.bfloat16, requires_grad=False)
    out = linear_topk_overlap(hs, ws, ht, wt, k=4, backend="torch")
    ref = materialized_topk_overlap(*(t.double() for t in (hs, ws, ht, wt)), k=4)
    assert all(f.dtype in (torch.float32, torch.int64) for f in out)
    torch.testing.assert_close(out.student_entropy, ref.student_entropy, rtol=1e-5, atol=1e-5)
