"""The chunk budget and the tile plans of the torch backend."""

import pytest

from opd_fast import chunk_budget, get_chunk_budget, set_chunk_budget
from opd_fast.chunking import DEFAULT_CHUNK_ELEMENTS, MIN_ROWS, plan_tiles


def test_budget_default_env_setter_and_context(monkeypatch):
    monkeypatch.delenv("OPD_FAST_CHUNK_ELEMENTS", raising=False)
    assert get_chunk_budget() == DEFAULT_CHUNK_ELEMENTS
    monkeypatch.setenv("OPD_FAST_CHUNK_ELEMENTS", "12345")
    assert get_chunk_budget() == 12345
    set_chunk_budget(777)
    try:
        assert get_chunk_budget() == 777
        with chunk_budget(99):
            assert get_chunk_budget() == 99
        assert get_chunk_budget() == 777
    finally:
        set_chunk_budget(None)
    assert get_chunk_budget() == 12345


@pytest.mark.parametrize("n_tokens", [1, 5, 16, 1000, 65536])
@pytest.mark.parametrize("vocab", [1, 97, 32768, 151936, 262144])
@pytest.mark.parametrize("budget", [7, 1 << 12, 1 << 22])
def test_plans_respect_the_budget_and_cover_everything(n_tokens, vocab, budget):
    plan = plan_tiles(n_tokens, vocab, budget)
    assert plan.rows * plan.cols <= max(budget, 1) or plan.cols == 1
    row_slices, col_slices = list(plan.row_chunks(n_tokens)), list(plan.col_tiles())
    assert sum(s.stop - s.start for s in row_slices) == n_tokens
    assert sum(s.stop - s.start for s in col_slices) == vocab == plan.vocab
    assert len(col_slices) == plan.vocab_tiles


def test_whole_rows_when_they_fit():
    plan = plan_tiles(4096, 151936, 1 << 22)
    assert plan.vocab_tiles == 1 and plan.rows == (1 << 22) // 151936
    tiled = plan_tiles(4096, 151936, 1 << 20)
    assert tiled.vocab_tiles > 1 and tiled.rows == MIN_ROWS
