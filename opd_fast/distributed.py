"""Vocabulary parallelism: exact losses when each rank holds a contiguous shard of the lm_head's rows.

Every rank passes the same hidden states and its own shard of each weight (uneven shards allowed, in
rank order: the global vocabulary is the shards concatenated). The backends run unchanged on the local
shard; this module turns their local, per-token statistics into global ones with a few collectives:

* **log-sum-exp**: lse = logsumexp_r(lse_r) over the ranks' local values (an all-gather of [N] floats).
* **reverse / forward KL**: with shard weights w_r = e^{lse_s,r − lse_s} (student) and
  u_r = e^{lse_t,r − lse_t} (teacher), the local divergence D_r of the two renormalized shard
  distributions combines exactly: D_rev = Σ_r w_r (D_r + log w_r − log u_r) and
  D_fwd = Σ_r u_r (D_r + log u_r − log w_r). One sweep over the shard, then an all-gather of 3 × N.
* **JSD** needs the global log-sum-exps inside its mixture: a first sweep for them, then the shard's
  KL(p_s‖m), KL(p_t‖m) terms with the global values, all-reduced (2 × N).
* **gradients**: each rank forms the logit gradient of its own columns from the global statistics, so
  its weight gradient is exactly its shard's slice; the hidden-state gradient is the sum over shards,
  all-reduced so every rank holds the full one.
* **top-k**: local top-k candidates with global ids and global log-probs are all-gathered (N·k per
  rank) and merged; the entropy combines as H = Σ_r w_r (H_r − log w_r).

Bytes per call (fp32, N tokens, k top-k, H hidden, R ranks): the forward of a divergence all-gathers
3·N·R floats (JSD: 2·N·R + 2·N); a token log-prob or log-sum-exp N·R + N; the top-k 2·N·k·R + 2·N·R;
the backward all-reduces the [N, H] hidden-state gradient (as Megatron's vocabulary-parallel
cross-entropy does). Nothing is ever O(N·V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd_fast._rows import scatter_add_rows
from opd_fast._validation import DivergenceSpec, check_int, check_process_group, check_weight
from opd_fast.types import DivergenceStats


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [offset, offset + rows) of a global vocabulary of ``vocab`` rows."""

    group: object
    rank: int
    world: int
    offset: int
    rows: int
    vocab: int

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.offset) & (ids < self.offset + self.rows)


def vocab_shard(process_group, local_rows: int, device: torch.device) -> VocabShard:
    """Describe this rank's shard: all-gathers every rank's row count (R integers)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized; call init_process_group")
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local_rows], dtype=torch.int64, device=device), group=process_group)
    sizes = [int(c.item()) for c in counts]
    if sum(sizes) == 0:
        raise ValueError("every rank's lm_head shard is empty: the vocabulary needs at least one row somewhere")
    return VocabShard(process_group, rank, world, sum(sizes[:rank]), local_rows, sum(sizes))


def restrict_vocab(shard: VocabShard, vocab_size: int | None) -> VocabShard:
    """The shard cut to the global vocabulary [0, vocab_size) (padded rows dropped; may leave it empty)."""
    if vocab_size is None:
        return shard
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= shard.vocab:
        raise ValueError(f"vocab_size must be in [1, {shard.vocab}] (the shards' total rows), got {vocab_size}")
    rows = max(0, min(shard.rows, vocab_size - shard.offset))
    return VocabShard(shard.group, shard.rank, shard.world, shard.offset, rows, vocab_size)


def shard_rows(weight: torch.Tensor | torch.nn.Linear, process_group=None, sizes: list[int] | None = None):
    """This rank's contiguous slice of an lm_head ``weight`` [V, H] or ``nn.Linear`` (a view, so gradients
    reach the original).

    ``sizes`` (one per rank, summing to V) sets uneven shards; by default the rows are split as evenly
    as possible, the first V mod R ranks getting one more. Shard the student's and the teacher's heads
    with the same sizes: ``shard_rows(student.lm_head, group)``, ``shard_rows(teacher.lm_head, group)``.
    """
    if isinstance(weight, torch.nn.Linear):
        weight = weight.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"weight must be an lm_head weight tensor [V, H] or an nn.Linear (e.g. model.lm_head), "
            f"got {type(weight).__name__}"
        )
    weight = check_weight("weight", weight)
    if sizes is not None:
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
            raise TypeError(
                f"sizes must be a list of row counts, one int per rank, or None, got {type(sizes).__name__}"
            )
        sizes = [check_int(f"sizes[{i}]", size, "an int (a row count)") for i, size in enumerate(sizes)]
    check_process_group(process_group)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "shard_rows needs torch.distributed: call dist.init_process_group(...) first "
            "(process_group=None means the default group)"
        )
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    vocab = weight.shape[0]
    if sizes is None:
        sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    if len(sizes) != world or sum(sizes) != vocab or min(sizes) < 0:
        raise ValueError(
            f"sizes must give one non-negative row count per rank ({world}) summing to {vocab}, got {sizes}; "
            "or leave sizes=None for an even split"
        )
    start = sum(sizes[:rank])
    return weight[start : start + sizes[rank]]


def _gather(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[R, *x.shape]: every rank's ``x``, in rank order."""
    parts = [torch.empty_like(x) for _ in range(shard.world)]
    dist.all_gather(parts, x.contiguous(), group=shard.group)
    return torch.stack(parts)


def _all_reduce(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    dist.all_reduce(x, group=shard.group)
    return x


def global_lse(local_lse: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(global lse [N], every rank's local lse [R, N]); an empty shard's local lse is −inf."""
    gathered = _gather(local_lse, shard)
    return torch.logsumexp(gathered, dim=0), gathered


def _stat_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Statistics are fp32, or fp64 for fp64 inputs (as the backends compute them)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _empty_stats(n_rows: int, like: torch.Tensor, dtype: torch.dtype) -> DivergenceStats:
    """Local statistics of a shard without rows: no mass, nothing to add."""
    lse = like.new_full((n_rows,), -torch.inf, dtype=dtype)
    zero = like.new_zeros(n_rows, dtype=dtype)
    return DivergenceStats(zero, lse, lse.clone(), zero)


def divergence_stats(backend, hs, ws, ht, wt, spec: DivergenceSpec, shard: VocabShard) -> DivergenceStats:
    """Global per-token statistics (loss, lse_s, lse_t, center) from this rank's vocabulary shard."""
    n_rows, dtype = hs.shape[0], _stat_dtype(hs, ws, ht, wt)
    if spec.kind == "jsd":
        lse_spec = DivergenceSpec("reverse_kl", spec.beta, spec.temperature, spec.filter_eps)
        local = backend.divergence_forward(hs, ws, ht, wt, lse_spec) if shard.rows else _empty_stats(n_rows, hs, dtype)
        lse_s = global_lse(local.student_lse.to(dtype), shard)[0]
        lse_t = global_lse(local.teacher_lse.to(dtype), shard)[0]
        terms = torch.zeros((2, n_rows), dtype=dtype, device=hs.device)
        if shard.rows:
            kl_student, kl_teacher = backend.jsd_terms(hs, ws, ht, wt, lse_s, lse_t, spec)
            terms[0], terms[1] = kl_student, kl_teacher
        kl_student, kl_teacher = _all_reduce(terms, shard)
        loss = spec.beta * kl_teacher + (1.0 - spec.beta) * kl_student
        return DivergenceStats(loss, lse_s, lse_t, (1.0 - spec.beta) * kl_student)
    local = backend.divergence_forward(hs, ws, ht, wt, spec) if shard.rows else _empty_stats(n_rows, hs, dtype)
    gathered = _gather(torch.stack([local.loss, local.student_lse, local.teacher_lse]).to(dtype), shard)
    loss_r, lse_s_r, lse_t_r = gathered.unbind(1)  # [R, N] each
    lse_s, lse_t = torch.logsumexp(lse_s_r, dim=0), torch.logsumexp(lse_t_r, dim=0)
    log_w, log_u = lse_s_r - lse_s, lse_t_r - lse_t
    if spec.kind == "reverse_kl":
        weight, terms = log_w.exp(), loss_r + log_w - log_u
    else:
        weight, terms = log_u.exp(), loss_r + log_u - log_w
    loss = torch.where(weight > 0, weight * terms, 0.0).sum(dim=0)
    center = loss if spec.kind == "reverse_kl" else torch.zeros_like(loss)
    return DivergenceStats(loss, lse_s, lse_t, center)


def divergence_backward(backend, hs, ws, ht, wt, stats, grad, spec, need_dh: bool, need_dw: bool, shard: VocabShard):
    """This shard's logit gradients from the global statistics; dh summed over the shards."""
    if shard.rows:
        dh, dw = backend.divergence_backward(hs, ws, ht, wt, stats, grad, spec, need_dh, need_dw)
    else:
        dh = hs.new_zeros(hs.shape, dtype=_stat_dtype(hs, ws)) if need_dh else None
        dw = torch.zeros_like(ws) if need_dw else None
    if dh is not None:
        dh = _all_reduce(dh.contiguous(), shard)
    return dh, dw


def logsumexp_forward(backend, h, w, temperature: float, shard: VocabShard) -> torch.Tensor:
    dtype = _stat_dtype(h, w)
    if shard.rows:
        local = backend.logsumexp_forward(h, w, temperature).to(dtype)
    else:
        local = h.new_full((h.shape[0],), -torch.inf, dtype=dtype)
    return global_lse(local, shard)[0]


def logsumexp_backward(backend, h, w, lse, grad, temperature, need_dh, need_dw, filter_eps, shard: VocabShard):
    """∂lse/∂z_v = p_v on this shard's columns; dh summed over the shards."""
    if shard.rows:
        dh, dw = backend.logsumexp_backward(h, w, lse, grad, temperature, need_dh, need_dw, filter_eps)
    else:
        dh = h.new_zeros(h.shape, dtype=_stat_dtype(h, w)) if need_dh else None
        dw = torch.zeros_like(w) if need_dw else None
    if dh is not None:
        dh = _all_reduce(dh.contiguous(), shard)
    return dh, dw


def _owned_logits(h, w, ids, temperature, shard: VocabShard):
    """(z_y where this shard owns y, else 0; the owned mask; local ids) for token ids ``ids`` [N]."""
    owned = shard.owned(ids)
    local_ids = torch.where(owned, ids - shard.offset, 0)
    dtype = _stat_dtype(h, w)
    rows = w[local_ids].to(dtype) if shard.rows else h.new_zeros(h.shape, dtype=dtype)
    z = (h.to(dtype) * rows).sum(dim=-1) / temperature
    return torch.where(owned, z, 0.0), owned, local_ids


def token_logprobs_forward(backend, h, w, ids, temperature: float, shard: VocabShard):
    """(log p(y) [N], global lse [N]): z_y from the shard that owns y, all-reduced."""
    lse = logsumexp_forward(backend, h, w, temperature, shard)
    picked = _all_reduce(_owned_logits(h, w, ids, temperature, shard)[0].contiguous(), shard)
    return picked - lse, lse


def token_logprobs_backward(backend, h, w, ids, lse, grad, temperature, need_dh, need_dw, filter_eps, shard):
    """∂log p(y)/∂z_v = [v = y] − p_v: the negated log-sum-exp gradient plus the one-hot part of the
    shard that owns y; dh summed over the shards (inside logsumexp_backward plus the one-hot term)."""
    dtype = _stat_dtype(h, w)
    if shard.rows:
        dh, dw = backend.logsumexp_backward(h, w, lse, -grad, temperature, need_dh, need_dw, filter_eps)
    else:
        dh = h.new_zeros(h.shape, dtype=dtype) if need_dh else None
        dw = torch.zeros_like(w) if need_dw else None
    _, owned, local_ids = _owned_logits(h, w, ids, temperature, shard)
    scale = torch.where(owned, grad.to(dtype), 0.0)[:, None] / temperature
    if dh is not None and shard.rows:
        dh = dh.to(dtype) + scale * w[local_ids].to(dtype)
    if dw is not None and shard.rows:
        dw = dw.to(dtype)
        keep = owned.nonzero().view(-1)
        scatter_add_rows(dw, local_ids[keep], (scale * h.to(dtype))[keep])
    if dh is not None:
        dh = _all_reduce(dh.contiguous(), shard)
    return dh, dw


def topk(backend, h, w, k: int, temperature: float, shard: VocabShard):
    """Global (ids, log-probs, lse, entropy) like the backends' ``topk`` op, from this rank's shard.

    Each rank's candidates are its local top-min(k, rows), with global ids and global log-probs; the
    all-gathered lists are concatenated in rank order (so ids ascend across ranks) and a stable sort by
    log-prob keeps ties ordered by the smaller id.
    """
    n_rows, dtype = h.shape[0], _stat_dtype(h, w)
    local_k = min(k, shard.rows)
    ids = h.new_full((n_rows, k), shard.vocab, dtype=torch.int64)
    logprobs = h.new_full((n_rows, k), -torch.inf, dtype=dtype)
    local_lse = h.new_full((n_rows,), -torch.inf, dtype=dtype)
    local_entropy = h.new_zeros(n_rows, dtype=dtype)
    if local_k:
        l_ids, l_lp, l_lse, l_entropy = backend.topk(h, w, local_k, temperature)
        ids[:, :local_k] = l_ids + shard.offset
        logprobs[:, :local_k] = l_lp.to(dtype)
        local_lse, local_entropy = l_lse.to(dtype), l_entropy.to(dtype)
    lse, lse_r = global_lse(local_lse, shard)
    logprobs = logprobs + (local_lse - lse)[:, None]  # local → global log-probs (−inf stays −inf)
    all_lp = _gather(logprobs, shard).permute(1, 0, 2).reshape(n_rows, -1)
    all_ids = _gather(ids, shard).permute(1, 0, 2).reshape(n_rows, -1)
    all_lp, order = all_lp.sort(dim=-1, descending=True, stable=True)
    ids, logprobs = all_ids.gather(1, order[:, :k]), all_lp[:, :k]
    log_w = lse_r - lse
    entropy_r = _gather(local_entropy, shard)
    entropy = torch.where(log_w > -torch.inf, log_w.exp() * (entropy_r - log_w), 0.0).sum(dim=0)
    return ids, logprobs, lse, entropy


class CopyToShards(torch.autograd.Function):
    """Identity forward; the backward sums the hidden-state gradient over the ranks (each rank's ops only
    see their shard's share of it)."""

    @staticmethod
    def forward(ctx, x, shard: VocabShard):
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), ctx.shard), None


class ReduceFromShards(torch.autograd.Function):
    """Sum over the ranks forward (each holds the values of the ids it owns, 0 elsewhere); identity backward."""

    @staticmethod
    def forward(ctx, x, shard: VocabShard):
        return _all_reduce(x.contiguous().clone(), shard)

    @staticmethod
    def backward(ctx, grad):
        return grad, None
