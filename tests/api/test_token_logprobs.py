"""linear_token_logprobs on the torch backend against the float64 materialized reference."""

import pytest
import torch
from conftest import grads, rel_err

from opd_fast import chunk_budget, linear_token_logprobs
from opd_fast.reference import materialized_token_logprobs


def _inputs(lead, hidden, vocab, dtype=torch.float64):
    h = torch.randn(*lead, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) * (4 / hidden**0.5)
    ids = torch.randint(0, vocab, lead)
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), ids


@pytest.mark.parametrize("budget", [pytest.param(1 << 22, id="rows"), pytest.param(40, id="tiled")])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.9])
@pytest.mark.parametrize(
    ("lead", "hidden", "vocab"),
    [((13,), 16, 97), ((2, 5), 8, 211), ((1,), 4, 2), ((), 6, 31), ((3,), 8, 65537 + 12)],
    ids=["N13", "3D", "N1-V2", "1D", "V>65536"],
)
def test_matches_reference(lead, hidden, vocab, temperature, budget):
    h, w, ids = _inputs(lead, hidden, vocab)
    with chunk_budget(budget):
        ours = linear_token_logprobs(h, w, ids, temperature=temperature, backend="torch")
    ref = materialized_token_logprobs(h, w, ids, temperature=temperature)
    assert ours.shape == torch.Size(lead)
    assert rel_err(ours, ref) < 1e-12
    grad_output = torch.randn_like(ref)
    with chunk_budget(budget):
        ours_g = grads(ours, (h, w), grad_output)
    for a, b in zip(ours_g, grads(ref, (h, w), grad_output)):
        assert rel_err(a, b) < 1e-10


def test_int32_ids_and_repeated_tokens():
    h, w, _ = _inputs((6,), 8, 17)
    ids = torch.tensor([3, 3, 3, 0, 16, 3], dtype=torch.int32)
    ours = linear_token_logprobs(h, w, ids, backend="torch")
    ref = materialized_token_logprobs(h, w, ids.long())
    assert rel_err(ours, ref) < 1e-12
    for a, b in zip(grads(ours, (h, w)), grads(ref, (h, w))):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_pytorch_error(dtype):
    h, w, ids = _inputs((64,), 32, 1000, dtype)
    exact = [h.detach().double().requires_grad_(), w.detach().double().requires_grad_()]
    ref = materialized_token_logprobs(*exact, ids)
    ours = linear_token_logprobs(h, w, ids, backend="torch")
    plain = materialized_token_logprobs(h, w, ids)
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6
    g = torch.randn(64, dtype=torch.float64)
    for a, p, r in zip(grads(ours, (h, w), g.float()), grads(plain, (h, w), g.float()), grads(ref, exact, g)):
        assert rel_err(a, r) <= 2 * rel_err(p, r) + 1e-6


def test_no_grad_saves_nothing_and_returns_plain_tensor():
    h, w, ids = _inputs((4,), 8, 11)
    with torch.no_grad():
        out = linear_token_logprobs(h, w, ids, backend="torch")
    assert not out.requires_grad
