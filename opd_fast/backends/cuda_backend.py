"""CUDA C++ backend: cuBLAS GEMMs on bounded vocabulary chunks feeding the fused epilogues of ``opd_fast._C``.

Memory plan. The vocabulary is processed in chunks of ``width`` columns with N · width ≤
``WORKSPACE_FACTOR`` × chunk budget (never N · V; at least ``CHUNK_ALIGN`` columns, a multiple of it when
the budget allows, so the GEMMs stay efficient). For each chunk:

* forward: ``torch.mm`` (cuBLAS) writes the student's and the teacher's logits, fp32 [N, width], into
  reused workspaces (bf16/fp16 inputs accumulate and land in fp32: ``out_dtype=torch.float32``); the
  ``softmax_stats_update`` kernel merges the chunk into per-row online-softmax state (csrc/softmax_stats.cu).
  Only O(N) numbers persist. Reverse and forward KL take one sweep; JSD a second (``jsd_terms_update``)
  because its mixture needs the final log-sum-exps.
* backward: the chunk's logits are recomputed; ``logit_grad`` turns them into the logit gradient G,
  already scaled by the per-token weight and 1/τ, in the student weight's dtype (in place when fp32,
  csrc/logit_grad.cu); then dH += G W_chunk and dW_chunk = Gᵀ H with ``torch.mm``: fp32 accumulation, one
  writer per output element and a fixed order, so gradients are deterministic without atomics.
* top-k: ``topk_update`` streams each chunk through a per-row shared-memory buffer of packed
  (logit, id) keys with the row's entropy statistics (csrc/topk.cu); ``topk_finalize`` decodes them.

Workspace at the default budget (2²² elements, ``WORKSPACE_FACTOR`` = 4): two fp32 logits chunks (128 MB),
plus a gradient chunk in the weights' dtype for bf16/fp16 (32 MB) and an fp32 [N, H] product buffer
for dH (cuBLAS cannot add a bf16 × bf16 product into an fp32 tensor through torch), whatever V is.

Gradient filtering is not applied: the GEMMs are dense, so ``filter_eps`` is accepted and ignored and
the gradients are exact, like the torch backend's.

Inputs: fp32, bf16 or fp16 (each model's hidden states and weight are brought to a common dtype); fp64
is refused with a pointer to ``backend='torch'``. The raw kernels are registered as torch.library
custom ops (namespace ``opd_fast``) with fake implementations, so ``torch.compile`` can trace them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.backends import torch_backend
from opd_fast.chunking import get_chunk_budget
from opd_fast.types import DivergenceStats

# Op codes of csrc/epilogue.h (the same numbers as kernels/_common.py).
MODES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "token_logprob": 3, "logsumexp": 4}
TWO_MODEL_MODES = ("reverse_kl", "forward_kl", "jsd")
# Logits chunk = WORKSPACE_FACTOR × chunk budget elements per fp32 workspace.
WORKSPACE_FACTOR = 4
# Chunk widths are multiples of this many columns when the budget allows (tensor-core friendly GEMMs).
CHUNK_ALIGN = 128
# Longest top-k list the kernel keeps in shared memory (csrc/epilogue.h kMaxTopK); longer ones are
# streamed by the torch backend's implementation on the same device.
MAX_K = 1024
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXTENSION = "opd_fast._C"

Tensor = torch.Tensor
Grads = tuple[Tensor | None, Tensor | None]  # (dh fp32 [N, H] | None, dw [V, H] | None)


@functools.cache
def extension_error() -> str | None:
    """Why the compiled kernels cannot be used in this process (None when ``opd_fast._C`` imports)."""
    try:
        importlib.import_module(EXTENSION)
    except ImportError as exc:
        return (
            f"the CUDA extension {EXTENSION} is not built ({exc}); it is built by `pip install -e . "
            f"--no-build-isolation` with a CUDA build of torch and nvcc on the path (see csrc/README.md)"
        )
    if not hasattr(torch.ops.aten.mm, "dtype_out"):
        return f"torch {torch.__version__} lacks torch.mm(..., out_dtype=) (added in torch 2.8); upgrade torch"
    return None


def _ops_module() -> ModuleType:
    """The module with the raw kernels: opd_fast._C (tests substitute its host build on CPU tensors)."""
    return importlib.import_module(EXTENSION)


def _launch(name: str, like: torch.Tensor, *args):
    """Call the raw kernel ``name`` on ``like``'s device and its current CUDA stream (passed as an integer,
    so the C++ side needs no torch-CUDA headers). CPU tensors only come from the host build in tests."""
    fn = getattr(_ops_module(), name)
    if not like.is_cuda:
        return fn(*args, 0)
    with torch.cuda.device(like.device):
        return fn(*args, torch.cuda.current_stream().cuda_stream)


# ---- custom ops: the raw kernels as torch.library ops, with fake (meta) implementations ----------------


@torch.library.custom_op("opd_fast::softmax_stats_update", mutates_args=("state",))
def softmax_stats_update(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    ids: torch.Tensor | None,
    state: torch.Tensor,
    v_lo: int,
    inv_tau: float,
    kind: int,
) -> None:
    """Merge a chunk's online-softmax statistics into ``state`` (fp32 [5, N]: m_s, s_s, m_t, s_t, acc).

    ``zs``/``zt``: fp32 [N, width] logits of vocabulary columns [v_lo, v_lo + width) (``zt`` in two-model
    modes); ``ids``: int64 [N] in token mode; ``kind``: the op code (``MODES``). See csrc/epilogue.h for
    ``acc`` per mode.
    """
    _launch("softmax_stats_update", zs, zs, zt, ids, state, v_lo, inv_tau, kind)


@softmax_stats_update.register_fake
def _(zs, zt, ids, state, v_lo, inv_tau, kind) -> None:
    return None


@torch.library.custom_op("opd_fast::jsd_terms_update", mutates_args=("terms",))
def jsd_terms_update(
    zs: torch.Tensor,
    zt: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    terms: torch.Tensor,
    inv_tau: float,
    beta: float,
) -> None:
    """Add a chunk's (Σ p_s log(p_s/m), Σ p_t log(p_t/m)) to ``terms`` (fp32 [2, N]) given the final lse ([N])."""
    _launch("jsd_terms_update", zs, zs, zt, lse_s, lse_t, terms, inv_tau, beta)


@jsd_terms_update.register_fake
def _(zs, zt, lse_s, lse_t, terms, inv_tau, beta) -> None:
    return None


@torch.library.custom_op("opd_fast::logit_grad", mutates_args=("zs", "g"))
def logit_grad(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    ids: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor | None,
    loss: torch.Tensor | None,
    center: torch.Tensor | None,
    row_weight: torch.Tensor,
    g: torch.Tensor | None,
    v_lo: int,
    inv_tau: float,
    beta: float,
    kind: int,
) -> None:
    """Write the chunk's logit gradient for op code ``kind`` (``MODES``), times ``row_weight`` ([N] fp32) / τ,
    into ``g`` ([N, width], the student weight's dtype), or over ``zs`` itself when ``g`` is None (fp32)."""
    _launch("logit_grad", zs, zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, v_lo, inv_tau, beta, kind)


@logit_grad.register_fake
def _(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, v_lo, inv_tau, beta, kind) -> None:
    return None


@torch.library.custom_op("opd_fast::topk_update", mutates_args=("keys", "state"))
def topk_update(z: torch.Tensor, keys: torch.Tensor, state: torch.Tensor, v_lo: int, inv_tau: float) -> None:
    """Merge a chunk (fp32 [N, width] logits of columns [v_lo, v_lo + width)) into the running top-k ``keys``
    (int64 [N, k] holding packed unsigned keys, descending) and entropy ``state`` (fp32 [3, N])."""
    _launch("topk_update", z, z, keys, state, v_lo, inv_tau)


@topk_update.register_fake
def _(z, keys, state, v_lo, inv_tau) -> None:
    return None


@torch.library.custom_op("opd_fast::topk_finalize", mutates_args=())
def topk_finalize(
    keys: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int64 [N, k], log-probs fp32 [N, k], lse fp32 [N], entropy fp32 [N]) from the running keys/state."""
    ids, logprobs, lse, entropy = _topk_outputs(keys)
    _launch("topk_finalize", keys, keys, state, ids, logprobs, lse, entropy)
    return ids, logprobs, lse, entropy


@topk_finalize.register_fake
def _(keys, state):
    return _topk_outputs(keys)


def _topk_outputs(keys: torch.Tensor):
    n_rows, k = keys.shape
    return (
        torch.empty((n_rows, k), dtype=torch.int64, device=keys.device),
        torch.empty((n_rows, k), dtype=torch.float32, device=keys.device),
        torch.empty(n_rows, dtype=torch.float32, device=keys.device),
        torch.empty(n_rows, dtype=torch.float32, device=keys.device),
    )


# ---- GEMMs and the chunk plan ------------------------------------------------------------------------------


def _prepare(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One dtype per model and unit stride along H, as the GEMMs want."""
    for name, t in (("hidden states", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='cuda' takes float32, bfloat16 or float16 {name}, got {t.dtype}; "
                f"use backend='torch' for {t.dtype}"
            )
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return (
        hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
    )


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b with fp32 accumulation for every input dtype."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.is_cuda:
        torch.mm(a, b, out_dtype=torch.float32, out=out)  # cuBLAS: bf16/fp16 in, fp32 accumulate and out
    else:  # CPU tensors (the host build in tests): the same math through an fp32 copy
        torch.mm(a.float(), b.float(), out=out)


def _addmm_fp32(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, product: torch.Tensor | None) -> None:
    """target (fp32) += a @ b; ``product`` (fp32, target's shape) holds a bf16/fp16 product on CUDA."""
    if a.dtype == torch.float32:
        target.addmm_(a, b)
    elif a.is_cuda:
        torch.mm(a, b, out_dtype=torch.float32, out=product)
        target.add_(product)
    else:
        target.addmm_(a.float(), b.float())


def chunk_width(n_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk: N · width ≤ WORKSPACE_FACTOR × chunk budget, at least one column."""
    width = max(1, WORKSPACE_FACTOR * get_chunk_budget() // max(n_rows, 1))
    if width >= CHUNK_ALIGN:
        width = width // CHUNK_ALIGN * CHUNK_ALIGN
    return min(width, vocab)


def _chunks(n_rows: int, vocab: int, n_buffers: int, device: torch.device) -> Iterator:
    """(v_lo, v_hi, [fp32 contiguous [N, v_hi − v_lo] views]) per chunk; the views reuse ``n_buffers`` workspaces."""
    width = chunk_width(n_rows, vocab)
    flat = [torch.empty(n_rows * width, dtype=torch.float32, device=device) for _ in range(n_buffers)]
    for v_lo in range(0, vocab, width):
        v_hi = min(v_lo + width, vocab)
        yield v_lo, v_hi, [buf[: n_rows * (v_hi - v_lo)].view(n_rows, v_hi - v_lo) for buf in flat]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, v_lo: int, v_hi: int, out: torch.Tensor) -> torch.Tensor:
    _mm_fp32(hidden, weight[v_lo:v_hi].T, out)
    return out


# ---- the sweeps ----------------------------------------------------------------------------------------------


def _softmax_stats(hs, ws, ht, wt, ids, mode: str, inv_tau: float) -> torch.Tensor:
    """fp32 [5, N] (m_s, s_s, m_t, s_t, acc) after one sweep over the vocabulary (csrc/epilogue.h)."""
    n_rows = hs.shape[0]
    two = mode in TWO_MODEL_MODES
    state = torch.zeros((5, n_rows), dtype=torch.float32, device=hs.device)
    state[0] = state[2] = -torch.inf
    for v_lo, v_hi, bufs in _chunks(n_rows, ws.shape[0], 2 if two else 1, hs.device):
        zs = _logits(hs, ws, v_lo, v_hi, bufs[0])
        zt = _logits(ht, wt, v_lo, v_hi, bufs[1]) if two else None
        softmax_stats_update(zs, zt, ids, state, v_lo, inv_tau, MODES[mode])
    return state


def _jsd_terms(hs, ws, ht, wt, lse_s, lse_t, inv_tau: float, beta: float) -> torch.Tensor:
    """fp32 [2, N]: (KL(p_s ‖ m), KL(p_t ‖ m)) per row from a second sweep."""
    terms = torch.zeros((2, hs.shape[0]), dtype=torch.float32, device=hs.device)
    for v_lo, v_hi, (zs, zt) in _chunks(hs.shape[0], ws.shape[0], 2, hs.device):
        jsd_terms_update(
            _logits(hs, ws, v_lo, v_hi, zs), _logits(ht, wt, v_lo, v_hi, zt), lse_s, lse_t, terms, inv_tau, beta
        )
    return terms


def _logit_grads(
    hs, ws, ht, wt, ids, lse_s, lse_t, loss, center, row_weight, *, mode, temperature, beta, need_dh, need_dw
):
    """(dh fp32 [N, Hs] | None, dw in ws.dtype [V, Hs] | None) for the given mode.

    ``ht``/``wt``/``lse_t`` are unused (may be None) in one-model modes, ``ids`` outside token mode,
    ``loss`` outside reverse KL and ``center`` outside JSD.
    """
    n_rows, hidden = hs.shape
    vocab = ws.shape[0]
    device = hs.device
    dh = torch.zeros((n_rows, hidden), dtype=torch.float32, device=device) if need_dh else None
    dw = torch.empty(ws.shape, dtype=ws.dtype, device=device) if need_dw else None
    if not (need_dh or need_dw):
        return dh, dw
    two = mode in TWO_MODEL_MODES
    inv_tau = 1.0 / temperature
    in_place = ws.dtype == torch.float32
    width = chunk_width(n_rows, vocab)
    g_flat = None if in_place else torch.empty(n_rows * width, dtype=ws.dtype, device=device)
    product = torch.empty_like(dh) if dh is not None and not in_place and hs.is_cuda else None
    row_weight = row_weight.float().contiguous()
    for v_lo, v_hi, bufs in _chunks(n_rows, vocab, 2 if two else 1, device):
        zs = _logits(hs, ws, v_lo, v_hi, bufs[0])
        zt = _logits(ht, wt, v_lo, v_hi, bufs[1]) if two else None
        g = None if in_place else g_flat[: zs.numel()].view(zs.shape)
        logit_grad(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, v_lo, inv_tau, beta, MODES[mode])
        g = zs if g is None else g
        w_chunk = ws[v_lo:v_hi]
        if dh is not None:
            _addmm_fp32(dh, g, w_chunk, product)
        if dw is not None:
            torch.mm(g.T, hs, out=dw[v_lo:v_hi])  # fp32 accumulation inside cuBLAS, written once
    return dh, dw


def _row_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def _ids(ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.int64).contiguous()


def _lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return m + s.log()


# ---- the ops of opd_fast.backends (2-D inputs; see that module's docstring) ---------------------------------


def divergence_forward(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, spec: DivergenceSpec) -> DivergenceStats:
    """Per-token divergence statistics (fp32 [N] each) of student hs [N, Hs] · ws [V, Hs]ᵀ against the teacher's
    ht [N, Ht] · wt [V, Ht]ᵀ: one sweep for reverse/forward KL, two for JSD."""
    hs, ws = _prepare(hs, ws)
    ht, wt = _prepare(ht, wt)
    inv_tau = 1.0 / spec.temperature
    m_s, s_s, m_t, s_t, acc = _softmax_stats(hs, ws, ht, wt, None, spec.kind, inv_tau)
    lse_s, lse_t = _lse(m_s, s_s), _lse(m_t, s_t)
    if spec.kind == "reverse_kl":
        loss = acc / s_s - lse_s + lse_t
        return DivergenceStats(loss, lse_s, lse_t, loss)
    if spec.kind == "forward_kl":
        return DivergenceStats(acc / s_t - lse_t + lse_s, lse_s, lse_t, torch.zeros_like(lse_s))
    kl_student, kl_teacher = _jsd_terms(hs, ws, ht, wt, lse_s, lse_t, inv_tau, spec.beta)
    loss = spec.beta * kl_teacher + (1.0 - spec.beta) * kl_student
    return DivergenceStats(loss, lse_s, lse_t, (1.0 - spec.beta) * kl_student)


def jsd_terms(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, lse_s: Tensor, lse_t: Tensor, spec: DivergenceSpec):
    """(KL(p_s ‖ m), KL(p_t ‖ m)) per row, fp32 [N] each, over these vocabulary rows with the given
    log-sum-exps (the global ones when the weights are a vocabulary shard)."""
    hs, ws = _prepare(hs, ws)
    ht, wt = _prepare(ht, wt)
    terms = _jsd_terms(hs, ws, ht, wt, _row_vector(lse_s), _row_vector(lse_t), 1.0 / spec.temperature, spec.beta)
    return terms[0], terms[1]


def divergence_backward(
    hs: Tensor,
    ws: Tensor,
    ht: Tensor,
    wt: Tensor,
    stats: DivergenceStats,
    grad: Tensor,
    spec: DivergenceSpec,
    need_dh: bool,
    need_dw: bool,
) -> Grads:
    """(dh fp32 [N, Hs] | None, dw [V, Hs] in the weight's dtype | None) of Σ grad[n] · D[n]; ``grad`` [N]."""
    hs, ws = _prepare(hs, ws)
    ht, wt = _prepare(ht, wt)
    return _logit_grads(
        hs,
        ws,
        ht,
        wt,
        None,
        _row_vector(stats.student_lse),
        _row_vector(stats.teacher_lse),
        _row_vector(stats.loss),
        _row_vector(stats.center),
        grad,
        mode=spec.kind,
        temperature=spec.temperature,
        beta=spec.beta,
        need_dh=need_dh,
        need_dw=need_dw,
    )


def divergence_forward_backward(
    hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, grad: Tensor, spec: DivergenceSpec, need_dh: bool, need_dw: bool
) -> tuple[DivergenceStats, Tensor | None, Tensor | None]:
    """The forward, then the backward sweep (it needs the final lse and D)."""
    stats = divergence_forward(hs, ws, ht, wt, spec)
    dh, dw = divergence_backward(hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw)
    return stats, dh, dw


def logsumexp_forward(h: Tensor, w: Tensor, temperature: float) -> Tensor:
    """lse of softmax(h Wᵀ / τ) per row: fp32 [N] from h [N, H], w [V, H]."""
    h, w = _prepare(h, w)
    m, s = _softmax_stats(h, w, None, None, None, "logsumexp", 1.0 / temperature)[:2]
    return _lse(m, s)


def logsumexp_backward(
    h: Tensor,
    w: Tensor,
    lse: Tensor,
    grad: Tensor,
    temperature: float,
    need_dh: bool,
    need_dw: bool,
    filter_eps: float | None = None,
) -> Grads:
    """∂ lse / ∂z_v = p_v, weighted per token by ``grad`` [N]; exact (``filter_eps`` is ignored)."""
    h, w = _prepare(h, w)
    kw = dict(mode="logsumexp", temperature=temperature, beta=0.0, need_dh=need_dh, need_dw=need_dw)
    return _logit_grads(h, w, None, None, None, _row_vector(lse), None, None, None, grad, **kw)


def token_logprobs_forward(h: Tensor, w: Tensor, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p(ids[n]) fp32 [N], lse fp32 [N]) from h [N, H], w [V, H] and integer ids [N]."""
    h, w = _prepare(h, w)
    state = _softmax_stats(h, w, None, None, _ids(ids), "token_logprob", 1.0 / temperature)
    lse = _lse(state[0], state[1])
    return state[4] - lse, lse


def token_logprobs_backward(
    h: Tensor,
    w: Tensor,
    ids: Tensor,
    lse: Tensor,
    grad: Tensor,
    temperature: float,
    need_dh: bool,
    need_dw: bool,
    filter_eps: float | None = None,
) -> Grads:
    """∂ log p(y)/∂z_v = [v = y] − p_v, the one-hot part folded into the logit gradient; exact."""
    h, w = _prepare(h, w)
    kw = dict(mode="token_logprob", temperature=temperature, beta=0.0, need_dh=need_dh, need_dw=need_dw)
    return _logit_grads(h, w, None, None, _ids(ids), _row_vector(lse), None, None, None, grad, **kw)


def topk(h: Tensor, w: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids int64 [N, k], log-probs fp32 [N, k] descending, ties by smaller id; lse [N]; entropy [N]).

    Top-k lists longer than the kernel's shared-memory buffer (k > MAX_K) are streamed by the torch
    backend's implementation on the same device."""
    if k > MAX_K:
        return torch_backend.topk(h, w, k, temperature)
    h, w = _prepare(h, w)
    n_rows = h.shape[0]
    keys = torch.zeros((n_rows, k), dtype=torch.int64, device=h.device)  # 0 = the empty-slot sentinel
    state = torch.zeros((3, n_rows), dtype=torch.float32, device=h.device)
    state[0] = -torch.inf
    inv_tau = 1.0 / temperature
    for v_lo, v_hi, (z,) in _chunks(n_rows, w.shape[0], 1, h.device):
        topk_update(_logits(h, w, v_lo, v_hi, z), keys, state, v_lo, inv_tau)
    return topk_finalize(keys, state)
