"""Triton backend vs the float64 reference: on the GPU when there is one, else in Triton's CPU interpreter.

Interpreter runs use tiny shapes and fp32/fp16 only (bf16 tl.dot is not supported there). The shapes are
chosen to hit every edge of the kernels: vocabularies that are not a multiple of the tile, several
vocabulary splits in the forward, several workspace chunks in the backward, masked rows, 3-D inputs,
student and teacher hidden sizes that differ.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, grads, rel_err

from opd_fast import chunk_budget, last_filter_stats, linear_divergence, linear_token_logprobs
from opd_fast.backends import triton_backend
from opd_fast.reference import materialized_divergence, materialized_token_logprobs

pytestmark = [pytest.mark.interpreter, pytest.mark.skipif(triton_backend is None, reason="no triton")]

DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]


def _pair(lead, hs_dim, ht_dim, vocab, dtype, scale=3.0):
    g = torch.Generator().manual_seed(hash((lead, hs_dim, ht_dim, vocab)) % 2**31)
    hs = torch.randn(*lead, hs_dim, generator=g)
    ws = torch.randn(vocab, hs_dim, generator=g) * scale / hs_dim**0.5
    ht = torch.randn(*lead, ht_dim, generator=g)
    wt = torch.randn(vocab, ht_dim, generator=g) * scale / ht_dim**0.5
    hs, ws, ht, wt = (t.to(device=DEVICE, dtype=dtype) for t in (hs, ws, ht, wt))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def _exact(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _check_divergence(hs, ws, ht, wt, tol, **kw):
    ours = linear_divergence(hs, ws, ht, wt, backend="triton", **kw)
    exact = _exact(hs, ws, ht, wt)
    ref = materialized_divergence(*exact, **{k: v for k, v in kw.items() if k not in ("filter_eps", "plan")})
    grad_output = torch.randn_like(ref) if ref.dim() else torch.tensor(0.7, dtype=ref.dtype, device=ref.device)
    assert rel_err(ours, ref) < tol
    for a, b in zip(grads(ours, (hs, ws), grad_output.to(ours.dtype)), grads(ref, exact[:2], grad_output)):
        assert rel_err(a, b) < tol
    return ours


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_matches_reference_fp32(divergence, beta, reduction, plan):
    hs, ws, ht, wt = _pair((2, 19), 24, 40, 301, torch.float32)
    mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.25
    mask[1, :7] = False
    kw = dict(divergence=divergence, beta=beta, mask=mask, temperature=1.3, reduction=reduction, plan=plan)
    _check_divergence(hs, ws, ht, wt, 2e-5, **kw)


@pytest.mark.parametrize(
    ("plan", "budget"),
    [("chunked", 400), ("streaming", 2)],
    ids=["chunked-3-row-chunks-4-vocabulary-tiles", "streaming-one-tile-per-backward-chunk"],
)
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_several_workspace_chunks_and_odd_shapes(divergence, beta, plan, budget):
    """Small budgets force several token chunks and vocabulary tiles (chunked: 16 rows × 25 columns) or many
    backward chunks (streaming: a workspace of 16 elements); V = 97 is not a multiple of any tile."""
    hs, ws, ht, wt = _pair((37,), 20, 17, 97, torch.float32)
    with chunk_budget(budget):
        _check_divergence(hs, ws, ht, wt, 2e-5, divergence=divergence, beta=beta, reduction="none", plan=plan)


def test_single_token_and_temperature():
    hs, ws, ht, wt = _pair((1,), 16, 16, 130, torch.float32)
    _check_divergence(hs, ws, ht, wt, 2e-5, temperature=0.45, filter_eps=0.0)


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_fp16_within_twice_plain_pytorch_error(divergence, beta):
    hs, ws, ht, wt = _pair((48,), 32, 48, 200, torch.float16)
    kw = dict(divergence=divergence, beta=beta)
    exact = _exact(hs, ws, ht, wt)
    ref = materialized_divergence(*exact, **kw)
    ref_g = grads(ref, exact[:2])
    ours = linear_divergence(hs, ws, ht, wt, backend="triton", filter_eps=0.0, **kw)
    plain = materialized_divergence(hs.float(), ws.float(), ht.float(), wt.float(), **kw)  # fp16 logits on CPU
    plain_g = grads(materialized_divergence(hs, ws, ht, wt, **kw), (hs, ws)) if DEVICE.type == "cuda" else None
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6
    ours_g = grads(ours, (hs, ws))
    assert all(g.dtype == torch.float16 for g in ours_g)
    if plain_g is not None:
        for a, p, r in zip(ours_g, plain_g, ref_g):
            assert rel_err(a, r) <= 2 * rel_err(p, r) + 1e-6
    else:  # CPU PyTorch has no fp16 matmul backward worth comparing with: bound by fp16 resolution instead
        for a, r in zip(ours_g, ref_g):
            assert rel_err(a, r) < 2e-3


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_bf16_within_twice_plain_pytorch_error(divergence, beta, plan):
    """bf16, the production dtype, is computed right everywhere the backend runs (issue 21): under the
    interpreter the chunked plan's GEMMs are torch's and the streaming kernels upcast their tl.dot inputs."""
    hs, ws, ht, wt = _pair((24,), 32, 48, 200, torch.bfloat16)
    kw = dict(divergence=divergence, beta=beta)
    exact = _exact(hs, ws, ht, wt)
    ref = materialized_divergence(*exact, **kw)
    plain = materialized_divergence(hs, ws, ht, wt, **kw)  # bf16 logits, as a plain training loop has them
    ours = linear_divergence(hs, ws, ht, wt, backend="triton", plan=plan, **kw)
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6
    ours_g = grads(ours, (hs, ws))
    for a, r in zip(ours_g, grads(ref, exact[:2])):  # rounded once to bf16 from fp32 logit gradients
        assert a.dtype == torch.bfloat16 and rel_err(a, r) < torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("plan", ["chunked", "streaming"])
def test_filter_skips_tiles_and_stays_close(plan):
    """Peaked distributions, as in trained LMs: a few frequent tokens hold the mass, so most vocabulary
    columns (chunked) or tiles (streaming) fall below the threshold; skipping them barely changes the
    gradient. Filtering is opt-in: exact gradients by default."""
    hs, ws, ht, wt = _pair((32,), 16, 16, 512, torch.float32, scale=0.3)
    with torch.no_grad():
        ws[:8] *= 60.0
        wt[:8] *= 60.0
    exact = linear_divergence(hs, ws, ht, wt, backend="triton", filter_eps=0.0, plan=plan)
    exact_g = grads(exact, (hs, ws))
    filtered = linear_divergence(hs, ws, ht, wt, backend="triton", filter_eps=1e-3, plan=plan)
    filtered_g = grads(filtered, (hs, ws))
    stats = last_filter_stats()
    assert stats["tiles"] > 0 and stats["skipped_fraction"] > 0.3, stats
    assert torch.equal(filtered, exact)  # filtering touches the backward only
    for a, b in zip(filtered_g, exact_g):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_backward_is_bitwise_deterministic(divergence, beta):
    hs, ws, ht, wt = _pair((40,), 16, 24, 150, torch.float32)
    first = grads(linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, backend="triton"), (hs, ws))
    for _ in range(3):
        again = grads(linear_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, backend="triton"), (hs, ws))
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("temperature", [0.8, 1.0])
@pytest.mark.parametrize("lead", [(23,), (2, 3, 4)])
def test_token_logprobs(lead, temperature):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(*lead, 20, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(133, 20, generator=g) * 0.7).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 133, lead, generator=g).to(DEVICE)
    with chunk_budget(2):
        ours = linear_token_logprobs(h, w, ids, temperature=temperature, backend="triton", filter_eps=0.0)
        grad_output = torch.randn_like(ours)
        ours_g = grads(ours, (h, w), grad_output)
    exact = _exact(h, w)
    ref = materialized_token_logprobs(*exact, ids, temperature=temperature)
    assert ours.shape == torch.Size(lead) and rel_err(ours, ref) < 2e-5
    for a, b in zip(ours_g, grads(ref, exact, grad_output.double())):
        assert rel_err(a, b) < 2e-5


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


def test_fp64_is_refused_with_a_pointer_to_torch():
    hs, ws, ht, wt = (t.detach().double() for t in _pair((3,), 16, 16, 40, torch.float32))
    with pytest.raises(TypeError, match=r"backend='torch' for torch\.float64"):
        linear_divergence(hs, ws, ht, wt, backend="triton")
