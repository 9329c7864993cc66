"""What is specific to the Triton backend's streaming kernels; the contract every backend meets (values,
gradients, plans, dtypes, shapes, top-k) is tests/test_backend_contract.py, and the kernels' compiled
configurations are tests/test_triton_aot.py.

Runs on the GPU when there is one, else in Triton's CPU interpreter (tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from opd_fast import last_filter_stats, linear_token_logprobs
from opd_fast.backends import triton_backend

pytestmark = [pytest.mark.interpreter, pytest.mark.skipif(triton_backend is None, reason="no triton")]


def test_token_logprobs_filter_keeps_the_token_column():
    """Streaming plan: with a threshold above every probability only the tiles holding a row's token
    survive, and the gradient is exactly W_y − Σ_{v in those tiles} p_v W_v."""
    from opd_fast.kernels.linear_grad import tile_shape

    g = torch.Generator().manual_seed(8)
    h = torch.randn(8, 16, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(256, 16, generator=g) * 0.2).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 256, (8,), generator=g).to(DEVICE)
    out = linear_token_logprobs(h, w, ids, backend="triton", filter_eps=0.99, plan="streaming")
    (dh,) = torch.autograd.grad(out.sum(), h)
    assert last_filter_stats()["skipped"] > 0
    _, bv = tile_shape()
    kept_tiles = torch.zeros(-(-256 // bv), dtype=torch.bool, device=DEVICE)
    kept_tiles[ids // bv] = True  # all 8 rows share one row block
    kept = kept_tiles.repeat_interleave(bv)[:256]
    with torch.no_grad():
        p = torch.softmax(h @ w.T, dim=-1)
        expected = w[ids] - (p * kept) @ w
    torch.testing.assert_close(dh, expected, rtol=1e-4, atol=1e-5)
