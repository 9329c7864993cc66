"""The chunk budget and the tile plans of the torch backend."""

import pytest
import torch

from opd_fast import chunk_budget, get_chunk_budget, set_chunk_budget
from opd_fast.chunking import (
    CUDA_ROW_ALIGN,
    DEFAULT_CHUNK_ELEMENTS,
    DW_GEMM_ENV,
    MIN_ROWS,
    ROW_STRIDE_ALIGN,
    SINGLE_DW_GEMM_BYTES,
    dw_gemm,
    get_dw_gemm,
    padded_stride,
    plan_tiles,
    set_dw_gemm,
    single_dw_gemm,
)


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


# ---- CUDA plans (they only read the device type: no GPU needed) ----------------------------------------------


@pytest.mark.parametrize(
    ("n_tokens", "budget", "chunks"),
    [(8192, 1 << 28, [1664] * 4 + [1536]), (8192, 1 << 29, [2816, 2816, 2560]), (1000, 1 << 28, [1000])],
)
def test_cuda_chunks_are_the_fewest_and_aligned(n_tokens, budget, chunks):
    """N = 8192 at V = 151936 under the default CUDA budget fits ≤ 1766 rows per chunk: 5 chunks of 1664 rows (a
    multiple of CUDA_ROW_ALIGN = 128), not 5 × 1536 + 512 as 256-row alignment made it; tokens that fit one
    chunk stay one chunk (1000 rows were 768 + 232)."""
    plan = plan_tiles(n_tokens, 151936, budget, device="cuda")
    assert [s.stop - s.start for s in plan.row_chunks(n_tokens)] == chunks
    assert plan.cols == 151936 and plan.rows * plan.cols <= budget
    assert plan.rows % CUDA_ROW_ALIGN == 0 or len(chunks) == 1


def test_cuda_default_budget_gives_five_chunks_at_8192_tokens(monkeypatch):
    monkeypatch.delenv("OPD_FAST_CHUNK_ELEMENTS", raising=False)
    plan = plan_tiles(8192, 151936, device="cuda")
    assert (plan.rows, len(list(plan.row_chunks(8192)))) == (1664, 5)
    assert plan_tiles(8192, 151936, device=torch.device("cuda", 0)) == plan


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("n_tokens", [1, 5, 16, 1000, 65536])
@pytest.mark.parametrize("vocab", [1, 97, 32768, 50257, 151665])
@pytest.mark.parametrize("budget", [7, 1 << 12, 1 << 22, 1 << 28])
def test_plans_cover_everything_on_both_devices(device, n_tokens, vocab, budget):
    plan = plan_tiles(n_tokens, vocab, budget, device=device)
    assert plan.rows * plan.cols <= budget or plan.cols == 1
    assert sum(s.stop - s.start for s in plan.row_chunks(n_tokens)) == n_tokens
    assert sum(s.stop - s.start for s in plan.col_tiles()) == vocab
    if device == "cuda":
        assert plan.stride == padded_stride(plan.cols) and plan.stride % ROW_STRIDE_ALIGN == 0
    else:
        assert plan.stride == plan.cols


def test_row_stride_is_padded_to_64_elements_on_cuda_only():
    assert [padded_stride(v) for v in (151936, 151665, 50257, 1)] == [151936, 151680, 50304, 64]
    assert plan_tiles(64, 50257, device="cuda").stride == 50304
    assert plan_tiles(64, 50257, device="cpu").stride == 50257
    tiled = plan_tiles(64, 151665, 1 << 20, device="cuda")  # vocabulary tiles: a multiple of 64, no padding
    assert tiled.vocab_tiles > 1 and tiled.cols % ROW_STRIDE_ALIGN == 0 and tiled.stride == tiled.cols


# ---- the weight-gradient mode -----------------------------------------------------------------------------------


def test_dw_gemm_default_env_setter_and_context(monkeypatch):
    monkeypatch.delenv(DW_GEMM_ENV, raising=False)
    assert get_dw_gemm() == "auto"
    monkeypatch.setenv(DW_GEMM_ENV, "single")
    assert get_dw_gemm() == "single"
    set_dw_gemm("auto")
    try:
        assert get_dw_gemm() == "auto"
        with dw_gemm("per_chunk"):
            assert get_dw_gemm() == "per_chunk"
        assert get_dw_gemm() == "auto"
    finally:
        set_dw_gemm(None)
    assert get_dw_gemm() == "single"


def test_dw_gemm_refuses_unknown_modes(monkeypatch):
    with pytest.raises(ValueError, match="mode must be one of 'per_chunk', 'single', 'auto', got 'one'"):
        set_dw_gemm("one")
    monkeypatch.setenv(DW_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match="OPD_FAST_DW_GEMM must be one of"):
        get_dw_gemm()


def test_auto_keeps_all_of_g_when_it_fits_on_cuda_only():
    """auto: N · stride · 2 bytes of bf16 G within SINGLE_DW_GEMM_BYTES (2 GiB) or the fp32 accumulator it replaces,
    whichever is larger, on CUDA; never on the CPU."""
    stride = padded_stride(151936)
    fits = SINGLE_DW_GEMM_BYTES // (2 * stride)  # 7067 tokens
    accumulator = 151936 * 4096 * 4  # fp32 [V, H] at H = 4096: 2.49 GB, as large as G of 8192 rows
    with dw_gemm("auto"):
        assert single_dw_gemm(fits, stride, 2, "cuda") and not single_dw_gemm(fits + 1, stride, 2, "cuda")
        assert single_dw_gemm(8192, stride, 2, "cuda", accumulator)
        assert not single_dw_gemm(8193, stride, 2, "cuda", accumulator)
        assert not single_dw_gemm(fits // 2, stride, 4, "cpu")
    with dw_gemm("single"):
        assert single_dw_gemm(1 << 20, stride, 2, "cpu")
    with dw_gemm("per_chunk"):
        assert not single_dw_gemm(1, stride, 2, "cuda")
