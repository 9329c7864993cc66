"""linear_divergence / linear_reverse_kl / OPDLoss on the torch backend against the float64 materialized reference."""

from __future__ import annotations

import pytest
import torch
from conftest import grads, make_pair, rel_err

from opd_fast import OPDLoss, chunk_budget, linear_divergence, linear_reverse_kl
from opd_fast.backends import torch_backend
from opd_fast.reference import materialized_divergence

DIVERGENCES = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.9),
    ("skew_forward_kl", 0.5),
    ("skew_reverse_kl", 0.5),
    ("tvd", 0.5),
]
# Budgets: one that fits whole vocabulary rows (single-tile path) and one that forces vocabulary tiling.
BUDGETS = [pytest.param(1 << 22, id="rows"), pytest.param(48, id="tiled")]


def _compare(hs, ws, ht, wt, *, grad_output=None, tol=1e-10, **kwargs):
    """Ours vs the materialized reference: value, d/d student_hidden, d/d student_weight."""
    ours = linear_divergence(hs, ws, ht, wt, backend="torch", **kwargs)
    ref = materialized_divergence(hs, ws, ht, wt, **kwargs)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < tol, (ours, ref)
    if grad_output is None:
        grad_output = torch.randn_like(ref) if ref.dim() else torch.tensor(1.7, dtype=ref.dtype)
    ours_g = grads(ours, (hs, ws), grad_output)
    ref_g = grads(ref, (hs, ws), grad_output)
    for name, a, b in zip(("student_hidden", "student_weight"), ours_g, ref_g):
        assert rel_err(a, b) < tol, name
    return ours, ours_g


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_matches_reference_with_mask_and_temperature(divergence, beta, reduction, budget):
    hs, ws, ht, wt = make_pair(lead=(3, 11), hs_dim=12, ht_dim=20, vocab=97)
    mask = torch.rand(3, 11) > 0.3
    mask[1] = False  # a fully masked row
    with chunk_budget(budget):
        _compare(hs, ws, ht, wt, divergence=divergence, beta=beta, mask=mask, temperature=1.7, reduction=reduction)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3])
def test_temperatures(divergence, beta, temperature):
    hs, ws, ht, wt = make_pair(lead=(9,), vocab=53)
    _compare(hs, ws, ht, wt, divergence=divergence, beta=beta, temperature=temperature)


@pytest.mark.parametrize(
    ("lead", "hs_dim", "ht_dim", "vocab"),
    [
        pytest.param((1,), 8, 8, 131, id="N1-primeV"),
        pytest.param((4,), 8, 12, 70001, id="V>65536"),
        pytest.param((2, 3, 5), 6, 10, 67, id="4D-lead"),
        pytest.param((), 8, 4, 29, id="single-token-1D"),
        pytest.param((5,), 3, 40, 1, id="V1"),
    ],
)
def test_awkward_shapes(lead, hs_dim, ht_dim, vocab):
    hs, ws, ht, wt = make_pair(lead=lead, hs_dim=hs_dim, ht_dim=ht_dim, vocab=vocab)
    for reduction in ("mean", "none"):
        out, _ = _compare(hs, ws, ht, wt, reduction=reduction)
        assert out.shape == (torch.Size(lead) if reduction == "none" else torch.Size([]))


def test_tiled_budget_smaller_than_a_row():
    """A budget below one row forces one token per chunk and many vocabulary tiles."""
    hs, ws, ht, wt = make_pair(lead=(6,), vocab=211)
    with chunk_budget(7):
        for divergence in ("reverse_kl", "forward_kl", "jsd"):
            _compare(hs, ws, ht, wt, divergence=divergence, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_counted_tokens_give_zero_loss_and_gradients(reduction):
    hs, ws, ht, wt = make_pair(lead=(2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    loss = linear_divergence(hs, ws, ht, wt, mask=mask, reduction=reduction, backend="torch")
    assert torch.all(loss == 0)
    dh, dw = grads(loss, (hs, ws))
    assert torch.all(dh == 0) and torch.all(dw == 0)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_masked_tokens_get_no_gradient():
    hs, ws, ht, wt = make_pair(lead=(8,))
    mask = torch.tensor([True, False] * 4)
    (dh,) = torch.autograd.grad(linear_reverse_kl(hs, ws, ht, wt, mask=mask, backend="torch"), hs)
    assert torch.all(dh[~mask] == 0) and torch.all(dh[mask].abs().sum(-1) > 0)


def test_identical_models_have_zero_divergence():
    hs, ws, _, _ = make_pair(lead=(5,), hs_dim=8, ht_dim=8)
    for divergence in ("reverse_kl", "forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        loss = linear_divergence(hs, ws, hs.detach(), ws.detach(), divergence=divergence, backend="torch")
        assert abs(loss.item()) < 1e-12
        dh, dw = grads(loss, (hs, ws))
        assert dh.abs().max() < 1e-12 and dw.abs().max() < 1e-12


def test_jsd_endpoints_are_forward_and_reverse_kl():
    hs, ws, ht, wt = make_pair(lead=(6,))
    kw = dict(reduction="none", backend="torch")
    fkl = linear_divergence(hs, ws, ht, wt, divergence="forward_kl", **kw)
    rkl = linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", **kw)
    assert torch.equal(linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=0.0, **kw), fkl)
    assert torch.equal(linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=1.0, **kw), rkl)


def test_skew_kl_endpoints_and_definition():
    """skew = 0 is the plain KL of each direction (resolved to it: bitwise); at 0 < α < 1 the values are DistiLLM's
    KL(p ‖ α p + (1 − α) q) straight from the softmaxes, with the teacher as p (forward) or the student (reverse)."""
    hs, ws, ht, wt = make_pair(lead=(6,))
    kw = dict(reduction="none", backend="torch")
    fkl = linear_divergence(hs, ws, ht, wt, divergence="forward_kl", **kw)
    rkl = linear_divergence(hs, ws, ht, wt, divergence="reverse_kl", **kw)
    assert torch.equal(linear_divergence(hs, ws, ht, wt, divergence="skew_forward_kl", skew=0.0, **kw), fkl)
    assert torch.equal(linear_divergence(hs, ws, ht, wt, divergence="skew_reverse_kl", skew=0.0, **kw), rkl)
    p_s, p_t = torch.softmax(hs @ ws.T, dim=-1), torch.softmax(ht @ wt.T, dim=-1)
    for alpha in (0.1, 0.5, 0.95):
        forward = (p_t * (p_t / (alpha * p_t + (1 - alpha) * p_s)).log()).sum(-1)
        reverse = (p_s * (p_s / (alpha * p_s + (1 - alpha) * p_t)).log()).sum(-1)
        ours_forward = linear_divergence(hs, ws, ht, wt, divergence="skew_forward_kl", skew=alpha, **kw)
        ours_reverse = linear_divergence(hs, ws, ht, wt, divergence="skew_reverse_kl", skew=alpha, **kw)
        assert rel_err(ours_forward, forward) < 1e-12 and rel_err(ours_reverse, reverse) < 1e-12


def test_skew_kls_stay_finite_where_the_other_model_has_no_mass():
    """Where the teacher puts (numerically) no mass on the student's tokens, the reverse KL is huge while the skew
    reverse KL is bounded by log(1 / α), and TVD by 1, with finite gradients."""
    hs, ws, ht, wt = make_pair(lead=(4,), vocab=31)
    with torch.no_grad():
        wt.mul_(60.0)  # a teacher peaked far from the student
    kw = dict(reduction="none", backend="torch")
    for divergence, bound in (("skew_reverse_kl", -torch.log(torch.tensor(0.1))), ("tvd", 1.0)):
        loss = linear_divergence(hs, ws, ht, wt, divergence=divergence, **kw)
        assert bool((loss <= bound + 1e-12).all()) and bool(torch.isfinite(loss).all())
        assert all(torch.isfinite(g).all() for g in grads(loss, (hs, ws), torch.ones_like(loss)))


def test_non_contiguous_inputs():
    hs = torch.randn(4, 6, 10, dtype=torch.float64).transpose(0, 1).requires_grad_()  # [6, 4, H], strided
    ws = (torch.randn(10, 41, dtype=torch.float64) * 0.5).T.requires_grad_()  # [V, H] with strides (1, V)
    ht = torch.randn(4, 6, 12, dtype=torch.float64).transpose(0, 1)
    wt = (torch.randn(41, 24, dtype=torch.float64) * 0.5)[:, ::2]  # every other column
    mask = (torch.rand(4, 6) > 0.3).T
    assert not any(t.is_contiguous() for t in (hs, ws, ht, wt, mask))
    for reduction in ("mean", "none"):
        _compare(hs, ws, ht, wt, mask=mask, reduction=reduction)


def test_teacher_never_receives_gradients():
    hs, ws, ht, wt = make_pair(lead=(4,))
    ht.requires_grad_()
    wt.requires_grad_()
    loss = linear_reverse_kl(hs, ws, ht, wt, backend="torch")
    dht, dwt = torch.autograd.grad(loss, (ht, wt), allow_unused=True)
    assert dht is None and dwt is None


def test_only_needed_gradients_are_computed(monkeypatch):
    """No gradient sweep under no_grad or when no student tensor requires grad; dW skipped for a frozen head."""
    calls = []
    for name in ("divergence", "divergence_backward"):
        original = getattr(torch_backend.TorchOps, name)

        def spy(self, s, t, spec, *rest, _name=name, _original=original):
            row_weight, need, _labels = rest[-3:]
            calls.append((_name, row_weight is not None, tuple(need)))
            return _original(self, s, t, spec, *rest)

        monkeypatch.setattr(torch_backend.TorchOps, name, spy)
    hs, ws, ht, wt = make_pair(lead=(4,))
    with torch.no_grad():
        linear_reverse_kl(hs, ws, ht, wt, backend="torch")
    linear_reverse_kl(hs.detach(), ws.detach(), ht, wt, backend="torch")
    linear_reverse_kl(hs, ws, ht, wt, reduction="none", backend="torch").sum()
    assert calls == [("divergence", False, (False, False, False))] * 3
    calls.clear()
    linear_reverse_kl(hs, ws.detach(), ht, wt, backend="torch").backward()
    assert calls == [("divergence", True, (True, False, False))]


def test_second_backward_is_refused_not_wrong():
    hs, ws, ht, wt = make_pair(lead=(4,))
    loss = linear_reverse_kl(hs, ws, ht, wt, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_opdloss_module_matches_functional():
    hs, ws, ht, wt = make_pair(lead=(2, 6))
    mask = torch.rand(2, 6) > 0.5
    module = OPDLoss(divergence="jsd", beta=0.3, temperature=0.8, reduction="sum", backend="torch")
    expected = linear_divergence(
        hs, ws, ht, wt, divergence="jsd", beta=0.3, mask=mask, temperature=0.8, reduction="sum", backend="torch"
    )
    assert torch.equal(module(hs, ws, ht, wt, mask), expected)
    assert "jsd" in repr(module) and "beta=0.3" in repr(module)


def test_vocab_size_truncates_padded_rows():
    hs, ws, ht, wt = make_pair(lead=(5,), vocab=60)
    padded_wt = torch.cat([wt, torch.randn(4, wt.shape[1], dtype=wt.dtype)])
    ours = linear_reverse_kl(hs, ws, ht, padded_wt, vocab_size=60, backend="torch")
    assert rel_err(ours, materialized_divergence(hs, ws, ht, wt)) < 1e-12
    padded_ws = torch.cat([ws.detach(), torch.zeros(4, ws.shape[1], dtype=ws.dtype)]).requires_grad_()
    loss = linear_reverse_kl(hs, padded_ws, ht, padded_wt, vocab_size=60, backend="torch")
    (dw,) = torch.autograd.grad(loss, padded_ws)
    assert torch.all(dw[60:] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES[:3])
def test_low_precision_within_twice_plain_pytorch_error(dtype, divergence, beta):
    """Error vs float64 at most 2x that of plain PyTorch in the same dtype (materialized logits)."""
    hs, ws, ht, wt = make_pair(lead=(64,), hs_dim=32, ht_dim=48, vocab=1000, dtype=dtype)
    kw = dict(divergence=divergence, beta=beta, reduction="mean")
    exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in (hs, ws, ht, wt)]
    ref = materialized_divergence(*exact_inputs, **kw)
    ref_g = grads(ref, exact_inputs[:2])
    ours = linear_divergence(hs, ws, ht, wt, backend="torch", **kw)
    ours_g = grads(ours, (hs, ws))
    plain = materialized_divergence(hs, ws, ht, wt, **kw)
    plain_g = grads(plain, (hs, ws))
    assert ours.dtype == torch.float32 and ours_g[0].dtype == dtype and ours_g[1].dtype == dtype
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6
    for a, p, r in zip(ours_g, plain_g, ref_g):
        assert rel_err(a, r) <= 2 * rel_err(p, r) + 1e-6


def test_fp32_accuracy():
    hs, ws, ht, wt = make_pair(lead=(32,), vocab=500, dtype=torch.float32)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in (hs, ws, ht, wt)]
    ref = materialized_divergence(*exact)
    ours = linear_reverse_kl(hs, ws, ht, wt, backend="torch")
    assert rel_err(ours, ref) < 1e-5
    for a, r in zip(grads(ours, (hs, ws)), grads(ref, exact[:2])):
        assert rel_err(a, r) < 1e-5
