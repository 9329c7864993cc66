"""opd_fast.overlap_averages: the two averages of the top-k overlap masses (all tokens, non-empty intersections)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pair

import opd_fast
from opd_fast import linear_topk_overlap, overlap_averages


def _stats(mask=None, k=8):
    """Nearly independent student and teacher over 101 tokens: with k = 8 most top-k pairs are disjoint."""
    hs, ws, ht, wt = make_pair(lead=(4, 9), requires_grad=False)
    return linear_topk_overlap(hs, ws, ht, wt, k=k, mask=mask, backend="torch")


def _by_definition(stats, counted):
    nonempty = counted & (stats.overlap_ratio > 0)
    return {
        "ratio_all_tokens": stats.overlap_ratio[counted].double().mean(),
        "mass_student_all_tokens": stats.overlap_mass_student[counted].double().mean(),
        "mass_teacher_all_tokens": stats.overlap_mass_teacher[counted].double().mean(),
        "mass_student_nonempty": stats.overlap_mass_student[nonempty].double().mean(),
        "mass_teacher_nonempty": stats.overlap_mass_teacher[nonempty].double().mean(),
        "nonempty_fraction": nonempty.sum() / counted.sum(),
    }


def test_exported():
    assert opd_fast.overlap_averages is overlap_averages and "overlap_averages" in opd_fast.__all__
    assert "OverlapAverages" in opd_fast.__all__


def test_both_averages_by_definition_and_they_differ():
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(3)) < 0.7
    stats = _stats(mask)
    averages = overlap_averages(stats)  # the op's mask is read from the statistics (ids -1)
    expected = _by_definition(stats, mask)
    assert 0 < expected["nonempty_fraction"] < 0.8  # disjoint pairs exist: the two averages must differ
    for name, value in expected.items():
        got = getattr(averages, name)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == pytest.approx(value.item(), rel=1e-6), name
    assert averages.mass_student_nonempty > 1.2 * averages.mass_student_all_tokens
    # A disjoint token's mass is exactly 0: the non-empty average is the all-token one over the fraction.
    assert averages.mass_teacher_nonempty.item() == pytest.approx(
        (averages.mass_teacher_all_tokens / averages.nonempty_fraction).item(), rel=1e-6
    )


def test_a_mask_restricts_the_counted_tokens():
    stats = _stats()
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[1:3, 2:] = True
    averages = overlap_averages(stats, mask)
    for name, value in _by_definition(stats, mask).items():
        assert getattr(averages, name).item() == pytest.approx(value.item(), rel=1e-6), name


def test_no_counted_or_no_intersecting_token_gives_zeros():
    stats = _stats()
    assert all(value.item() == 0 for value in overlap_averages(stats, torch.zeros(4, 9, dtype=torch.bool)))
    disjoint = (stats.overlap_ratio == 0) & torch.ones(4, 9, dtype=torch.bool)
    averages = overlap_averages(stats, disjoint)
    assert averages.nonempty_fraction == 0 and averages.mass_student_nonempty == 0
    assert averages.mass_student_all_tokens == 0  # a disjoint token's mass is 0


def test_bad_mask_is_refused():
    stats = _stats()
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(4, 9\)"):
        overlap_averages(stats, torch.ones(4, 9))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(4, 9\)"):
        overlap_averages(stats, torch.ones(36, dtype=torch.bool))
