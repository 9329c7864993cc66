"""torch.compile: a transformers model plus an opd_fast loss compiles as one graph (fullgraph=True) on every
backend, and gives eager's loss and gradients; every custom op of opd_fast.library passes torch.library.opcheck.

The fused entry points are custom ops (opd_fast/library/) with fake implementations and registered
gradients, so dynamo sees one opaque node per op and never traces the backends' Python loops. CPU tier: the
torch backend and the Triton kernels under the interpreter (conftest.py sets TRITON_INTERPRET=1), with the
"aot_eager" compiler backend and Inductor. GPU tier: the same for the cuda backend.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from conftest import DEVICE
from transformers import LlamaConfig, LlamaForCausalLM

import opd_fast
from opd_fast import library
from opd_fast.backends import unavailable_reason
from opd_fast.library import divergence as divergence_ops
from opd_fast.library import gathered as gathered_ops
from opd_fast.library import logits as logits_ops
from opd_fast.library import topk as topk_ops

VOCAB, BATCH, SEQ, TEACHER_HIDDEN = 37, 2, 5, 24
CPU_BACKENDS = ["torch", "triton"]


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # logits of std ≈ 3, not the near-zero ones of the random init
        model.lm_head.weight.normal_(0.0, 3.0 / 16**0.5)
    return model


class StudentLosses(torch.nn.Module):
    """The student model's forward plus every differentiable opd_fast quantity from its final hidden states."""

    def __init__(self, backend: str):
        super().__init__()
        self.student, self.backend = _tiny_llama(), backend

    def forward(self, input_ids, teacher_hidden, teacher_weight, mask, token_weight):
        hidden = self.student.model(input_ids=input_ids).last_hidden_state
        weight, backend = self.student.lm_head.weight, self.backend
        reverse_kl = opd_fast.linear_reverse_kl(
            hidden, weight, teacher_hidden, teacher_weight, mask=mask, backend=backend
        )
        jsd_per_token = opd_fast.linear_divergence(
            hidden, weight, teacher_hidden, teacher_weight, divergence="jsd", beta=0.3, mask=mask, reduction="none",
            backend=backend, labels=input_ids, hard_label_weight=0.2,
        )  # fmt: skip
        logprobs = opd_fast.linear_token_logprobs(hidden, weight, input_ids, temperature=0.8, backend=backend)
        topk = opd_fast.linear_topk_divergence(
            hidden, weight, teacher_hidden, teacher_weight, k=4, support="union", renormalize=False, backend=backend
        )
        return reverse_kl, (jsd_per_token * token_weight).sum(), (logprobs * token_weight).sum(), topk


LOSS_WEIGHTS = (1.0, 0.5, 0.25, 2.0)  # distinct, so that a wrong gradient of one loss cannot hide in the sum


def _inputs(device):
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    teacher_hidden = torch.randn(BATCH, SEQ, TEACHER_HIDDEN, device=device)
    teacher_weight = torch.randn(VOCAB, TEACHER_HIDDEN, device=device) * (3.0 / TEACHER_HIDDEN**0.5)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool, device=device)
    mask[1, 3:] = False  # right padding
    token_weight = torch.rand(BATCH, SEQ, device=device)
    return input_ids, teacher_hidden, teacher_weight, mask, token_weight


def _losses_and_grads(module, inputs, run=None):
    """The losses of ``run`` (default: the module itself; or its compiled form) and the module's gradients of
    their weighted sum."""
    module.zero_grad(set_to_none=True)
    losses = (module if run is None else run)(*inputs)
    sum(w * loss for w, loss in zip(LOSS_WEIGHTS, losses)).backward()
    return [loss.detach() for loss in losses], {name: p.grad.clone() for name, p in module.named_parameters()}


def _compare_compiled(backend: str, compiler: str, device: torch.device):
    torch._dynamo.reset()
    module = StudentLosses(backend).to(device)
    inputs = _inputs(device)
    eager_losses, eager_grads = _losses_and_grads(module, inputs)
    compiled = torch.compile(module, backend=compiler, fullgraph=True)  # fullgraph: any graph break raises
    compiled_losses, compiled_grads = _losses_and_grads(module, inputs, compiled)
    for got, want in zip(compiled_losses, eager_losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_model_and_losses_match_eager_aot_eager(backend):
    _compare_compiled(backend, "aot_eager", torch.device("cpu"))


@pytest.mark.slow  # Inductor's C++ code generation takes a minute or more on a small CPU
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_model_and_losses_match_eager_inductor(backend):
    _compare_compiled(backend, "inductor", torch.device("cpu"))


def test_no_graph_break_in_the_topk_overlap_diagnostic():
    hidden, weight = torch.randn(BATCH, SEQ, 16), torch.randn(VOCAB, 16)
    teacher_hidden, teacher_weight = _inputs("cpu")[1:3]

    def overlap(hidden, weight, teacher_hidden, teacher_weight):
        return tuple(opd_fast.linear_topk_overlap(hidden, weight, teacher_hidden, teacher_weight, k=3, backend="torch"))

    torch._dynamo.reset()
    explained = torch._dynamo.explain(overlap)(hidden, weight, teacher_hidden, teacher_weight)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = overlap(hidden, weight, teacher_hidden, teacher_weight)
    compiled = torch.compile(overlap, backend="aot_eager", fullgraph=True)(
        hidden, weight, teacher_hidden, teacher_weight
    )
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


# ---- opcheck: schemas, fake implementations, autograd registration, AOT dispatch ------------------------------


def _op_cases(backend: str, device):
    """(op, args) for every custom op of opd_fast.library, with a bias, a softcapped head and a mask."""
    n, hs_dim, ht_dim, vocab = 6, 8, 12, 29
    hs = torch.randn(n, hs_dim, device=device, requires_grad=True)
    ws = (torch.randn(vocab, hs_dim, device=device) * 0.8).requires_grad_()
    bs = torch.randn(vocab, device=device, requires_grad=True)
    ht, wt = torch.randn(n, ht_dim, device=device), torch.randn(vocab, ht_dim, device=device) * 0.6
    mask = torch.tensor([True, True, False, True, True, False], device=device)
    route = (backend, "chunked", "")
    head_s, head_t = [0.9, 5.0], [1.0, 0.0]
    need = [True, True, True]
    ids = torch.randint(0, vocab, (n,), device=device)
    lse = torch.randn(n, device=device)
    grad_out = torch.rand(n, device=device)
    stats = torch.randn(4, n, device=device)
    stats6, entropy = torch.randn(6, n, device=device), torch.rand(n, device=device)  # entropy_backward's
    # The backward ops run inside a backward (no double backward) and top-k under no_grad: detached inputs.
    hs_, ws_, bs_ = hs.detach(), ws.detach(), bs.detach()
    few_ids = torch.randint(-1, vocab, (n, 3), device=device)
    jsd = ("jsd", 0.3, 1.3, 0.8, None, None)  # kind, beta, temperature, teacher_temperature, filter_eps, entry_clip

    def divergence(kind, beta, reduction, with_mask=True, b=bs):
        options = (kind, beta, 1.3, 1.7, None, None, reduction, need if b is not None else [True, True, False])
        return (hs, ws, b, ht, wt, None, mask if with_mask else None, *route, head_s, head_t, *options)

    return [
        (divergence_ops.divergence, divergence("reverse_kl", 0.5, "mean")),
        (divergence_ops.divergence, divergence("jsd", 0.3, "sum", with_mask=False, b=None)),
        (divergence_ops.divergence, divergence("forward_kl", 0.5, "none")),
        (divergence_ops.divergence, (*divergence("tvd", 0.5, "mean"), None, False, ids, 0.3)),  # hard labels
        (divergence_ops.divergence, (*divergence("skew_reverse_kl", 0.9, "none"), None, True, ids, 0.3)),
        (
            divergence_ops.divergence_backward,
            (hs_, ws_, bs_, ht, wt, None, mask, stats, grad_out, *route, head_s, head_t, *jsd, need, None, ids, 0.3),
        ),
        (
            divergence_ops.divergence_backward,
            (hs_, ws_, bs_, ht, wt, None, mask, stats, grad_out, *route, head_s, head_t, *jsd, need),
        ),
        (
            divergence_ops.entropy_backward,
            (hs_, ws_, bs_, mask, stats6, entropy, grad_out, *route, head_s, 0.9, None, need),
        ),
        (logits_ops.token_logprobs, (hs, ws, bs, ids, *route, head_s, 0.7, None)),
        (logits_ops.logsumexp, (hs, ws, None, *route, head_t, 1.1, None)),
        (logits_ops.logits_backward, (hs_, ws_, bs_, ids, lse, grad_out, *route, head_s, 0.7, None, need)),
        (
            logits_ops.logits_backward,
            (hs_, ws_, None, None, lse, grad_out, *route, head_t, 1.0, None, [True, False, False]),
        ),
        (topk_ops.topk, (hs_, ws_, bs_, 4, *route, head_s, 0.9)),
        (gathered_ops.gathered_logits, (hs, ws, few_ids, 1.0)),
        (
            gathered_ops.gathered_logits_backward,
            (hs_, ws_, few_ids, torch.rand(n, 3, device=device), 1.0, [True, True]),
        ),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_custom_op_passes_opcheck(backend):
    cases = _op_cases(backend, torch.device("cpu"))
    modules = [importlib.import_module(f"opd_fast.library.{m.name}") for m in pkgutil.iter_modules(library.__path__)]
    assert {op for op, _ in cases} == {
        op
        for module in modules
        for op in vars(module).values()
        if isinstance(op, torch._library.custom_ops.CustomOpDef)
    }
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_ids_out_of_range_are_refused_inside_the_compiled_graph():
    """The range check reads the ids' values, so it runs inside the op, on real tensors, compiled or not."""
    hidden, weight = torch.randn(3, 16), torch.randn(VOCAB, 16)
    bad = torch.tensor([0, VOCAB, 2])
    compiled = torch.compile(opd_fast.linear_token_logprobs, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(hidden, weight, bad.clamp(max=3)), opd_fast.linear_token_logprobs(hidden, weight, bad.clamp(max=3))
    )
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 37\)"):
        compiled(hidden, weight, bad)


# ---- the cuda backend on the CPU: its host build (tests/conftest.py's fixtures) --------------------


@pytest.mark.slow  # builds csrc/ for the CPU once (~25 s, then cached)
@pytest.mark.usefixtures("cuda_on_cpu")
def test_cuda_host_build_compiles_without_graph_breaks_and_passes_opcheck():
    _compare_compiled("cuda", "aot_eager", torch.device("cpu"))
    for op, args in _op_cases("cuda", torch.device("cpu")):
        torch.library.opcheck(op, args)


# ---- GPU tier: the cuda backend -----------------------------------------------------------------------------

CUDA_READY = DEVICE.type == "cuda" and unavailable_reason("cuda", DEVICE) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and the built extension opd_fast._C")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_gpu_compiled_model_and_losses_match_eager_cuda(compiler):
    _compare_compiled("cuda", compiler, DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and the built extension opd_fast._C")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_every_custom_op_passes_opcheck(backend):
    for op, args in _op_cases(backend, DEVICE):
        torch.library.opcheck(op, args)
