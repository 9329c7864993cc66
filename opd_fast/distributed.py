"""Vocabulary parallelism: exact losses when each rank holds a contiguous shard of the lm_head's rows.

Every rank passes the same hidden states and its own shard of each weight (uneven shards allowed, in
rank order: the global vocabulary is the shards concatenated). The backends run unchanged on the local
shard; this module turns their local, per-token statistics into global ones with a few collectives:

* **log-sum-exp**: lse = logsumexp_r(lse_r) over the ranks' local values (an all-gather of [N] floats).
* **reverse / forward KL**: with shard weights w_r = e^{lse_s,r − lse_s} (student) and
  u_r = e^{lse_t,r − lse_t} (teacher), the local divergence D_r of the two renormalized shard
  distributions combines exactly: D_rev = Σ_r w_r (D_r + log w_r − log u_r) and
  D_fwd = Σ_r u_r (D_r + log u_r − log w_r). One sweep over the shard, then an all-gather of 3 × N.
* **JSD, the skew KLs, TVD** need the global log-sum-exps inside every term: a first sweep for them, then
  the shard's terms (online_softmax.terms_loss: KL(p_s‖m), KL(p_t‖m) or ½|p_s − p_t|, and the gradient's center)
  with the global values, all-reduced (3 × N).
* **gradients**: each rank forms the logit gradient of its own columns from the global statistics, so
  its weight gradient is exactly its shard's slice; the hidden-state gradient is the sum over shards,
  all-reduced so every rank holds the full one.
* **top-k**: local top-k candidates with global ids and global log-probs are all-gathered (N·k per
  rank) and merged; the entropy combines as H = Σ_r w_r (H_r − log w_r).
* **the student's entropy** of a divergence (``return_entropy``): the same combination of each shard's own, one
  all-reduce of N more floats.
* **logits at a few ids per token** (the top-k losses, :func:`gathered_logits`): each rank gathers the ids it
  owns, and the sum over the ranks (an all-reduce of N·M) is the global logit.

The library's custom ops run :func:`parallel`'s ops (a backend's, wrapped in :class:`VocabParallelOps` over a shard)
and take a shard by its :func:`shard_key`; everything that depends on whether the weights are sharded is here.

Bytes per call (fp32, N tokens, k top-k, H hidden, R ranks): the forward of a divergence all-gathers
3·N·R floats (JSD, skew KLs, TVD: 4·N·R + 3·N); a token log-prob or log-sum-exp N·R + N; the top-k 2·N·k·R + 2·N·R;
the backward all-reduces the [N, H] hidden-state gradient (as Megatron's vocabulary-parallel
cross-entropy does). Nothing is ever O(N·V).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd_fast._validation import DivergenceSpec, check_int, check_process_group, check_weight
from opd_fast.backends.epilogue import TERMS_MODES
from opd_fast.backends.online_softmax import lse_lo, split_lse, terms_loss
from opd_fast.types import DivergenceStats, Grads, Need, Side, accumulation_dtype


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


# Vocabulary shards by key: a shard holds its process group, which a custom op's schema cannot carry, so the ops of
# opd_fast.library take the key under which shard_key registered it.
_SHARDS: dict[str, VocabShard] = {}


def shard_key(shard: VocabShard | None) -> str:
    """The key a custom op takes for ``shard`` ("" for None: whole weights), registering it."""
    if shard is None:
        return ""
    key = f"{shard.group.group_name}/{shard.offset}/{shard.rows}/{shard.vocab}"
    _SHARDS.setdefault(key, shard)
    return key


def registered_shard(key: str) -> VocabShard | None:
    """The shard :func:`shard_key` registered under ``key`` (None for "")."""
    return _SHARDS[key] if key else None


def global_vocab(shard: VocabShard | None, local_rows: int) -> int:
    """The global vocabulary: the shards' total, or the ``local_rows`` of whole weights."""
    return local_rows if shard is None else shard.vocab


def local_rows(shard: VocabShard | None, rows: int) -> int:
    """This rank's rows of the vocabulary, of the ``rows`` of its weights: all of them for whole weights, fewer on a
    shard that a global ``vocab_size`` ends inside (or before)."""
    return rows if shard is None else shard.rows


def parallel(ops, shard: VocabShard | None):
    """A backend's ops (the contract of :mod:`opd_fast.backends`), vocabulary-parallel over ``shard`` when given."""
    return ops if shard is None else VocabParallelOps(ops, shard)


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


def merge_lse(lse_r: torch.Tensor, lo_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global (lse, lse_lo) [N] of every rank's local (lse_r, lo_r) [R, N], each shard's log Σ e^z being
    lse_r + lo_r: shifted by the largest lse_r, m, the global one is m + log Σ_r e^{(lse_r − m) + lo_r}, split as
    opd_fast.backends.online_softmax.split_lse does, so that log p = (z − lse) − lse_lo keeps ~ulp(log p) across ranks
    (z − lse alone carries ~ulp(lse)). Empty shards (lse_r = −inf) add nothing."""
    m = lse_r.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, 0.0)
    mass = torch.where(lse_r > -torch.inf, torch.exp((lse_r - m) + lo_r), 0.0).sum(dim=0)
    return split_lse(m, mass)


def _empty_stats(n_rows: int, like: torch.Tensor, dtype: torch.dtype) -> DivergenceStats:
    """Local statistics of a shard without rows: no mass, nothing to add."""
    lse = like.new_full((n_rows,), -torch.inf, dtype=dtype)
    zero = like.new_zeros(n_rows, dtype=dtype)
    return DivergenceStats(zero, lse, lse.clone(), zero)


def _entropy_share(log_w: torch.Tensor, local_entropy: torch.Tensor) -> torch.Tensor:
    """A shard's share w_k (H_k − log w_k) of the entropy −Σ_v p log p, from its mass w_k = e^{lse_k − lse} and its
    entropy H_k over its own rows (relative to lse_k); the shares add up to the entropy (all ≥ 0; 0 for a shard
    without mass, log w_k = −inf)."""
    return torch.where(log_w > -torch.inf, log_w.exp() * (local_entropy - log_w), 0.0)


def _zero_grads(side: Side, need: Need) -> Grads:
    """A shard without rows contributes nothing (its weight and bias gradients are empty slices)."""
    dtype = accumulation_dtype(side.hidden, side.weight)
    return Grads(
        side.hidden.new_zeros(side.hidden.shape, dtype=dtype) if need.hidden else None,
        torch.zeros_like(side.weight) if need.weight else None,
        side.weight.new_zeros(0, dtype=dtype) if need.bias else None,
    )


class VocabParallelOps:
    """The ops contract of :mod:`opd_fast.backends` over a vocabulary shard: ``inner`` runs on this rank's
    rows and the collectives of the module docstring make every result (and the hidden-state gradient)
    global; weight and bias gradients are this rank's own slices."""

    def __init__(self, inner, shard: VocabShard):
        self.inner, self.shard = inner, shard
        self.name, self.plan = inner.name, inner.plan

    def _reduce_hidden(self, grads: Grads) -> Grads:
        if grads.hidden is None:
            return grads
        return grads._replace(hidden=_all_reduce(grads.hidden.contiguous(), self.shard))

    def divergence(self, s: Side, t: Side, spec: DivergenceSpec, row_weight, need: Need, labels=None):
        stats = self._divergence_stats(s, t, spec)
        if labels is not None:  # the label's logit from the shard that holds it (the others give 0)
            z_y = self.inner.divergence_label_logits(s, spec, self._local_ids(labels)) if self.shard.rows else None
            z_y = torch.zeros_like(stats.loss) if z_y is None else z_y.to(stats.loss.dtype)
            stats = stats._replace(label_logit=_all_reduce(z_y, self.shard))
        if row_weight is None or not need.any:
            return stats, Grads()
        return stats, self.divergence_backward(s, t, spec, stats, row_weight, need, labels)

    def _divergence_stats(self, s: Side, t: Side, spec: DivergenceSpec) -> DivergenceStats:
        shard, inner = self.shard, self.inner
        n_rows, dtype = s.hidden.shape[0], accumulation_dtype(s.hidden, s.weight, t.hidden, t.weight)

        def local(local_spec):
            if not shard.rows:
                return _empty_stats(n_rows, s.hidden, dtype)
            return inner.divergence(s, t, local_spec, None, Need())[0]

        if spec.kind in TERMS_MODES:
            local_lse = local(dataclasses.replace(spec, kind="reverse_kl", entry_clip=None))
            fields = [*local_lse[1:3], *lse_lo(local_lse)]
            lse_s_r, lse_t_r, lo_s_r, lo_t_r = _gather(torch.stack(fields).to(dtype), shard).unbind(1)  # [R, N]
            (lse_s, lo_s), (lse_t, lo_t) = merge_lse(lse_s_r, lo_s_r), merge_lse(lse_t_r, lo_t_r)
            terms = torch.zeros((3, n_rows), dtype=dtype, device=s.hidden.device)
            if shard.rows:
                terms.copy_(inner.divergence_terms(s, t, spec, lse_s, lse_t, lo_s, lo_t))
            loss, center = terms_loss(_all_reduce(terms, shard), spec.kind, spec.beta)
            entropy = self._entropy(local_lse, lse_s, lo_s, spec)
            return DivergenceStats(loss, lse_s, lse_t, center, lo_s, lo_t, entropy)
        stats = local(spec)
        fields = [stats.loss, stats.student_lse, stats.teacher_lse, *lse_lo(stats)]
        loss_r, lse_s_r, lse_t_r, lo_s_r, lo_t_r = _gather(torch.stack(fields).to(dtype), shard).unbind(1)  # [R, N]
        (lse_s, lo_s), (lse_t, lo_t) = merge_lse(lse_s_r, lo_s_r), merge_lse(lse_t_r, lo_t_r)
        # the shards' masses from the lse's with their residuals: log w_r = (lse_r − lse) + (lo_r − lo)
        log_w, log_u = (lse_s_r - lse_s) + (lo_s_r - lo_s), (lse_t_r - lse_t) + (lo_t_r - lo_t)
        if spec.kind == "reverse_kl":
            weight, terms = log_w.exp(), loss_r + log_w - log_u
        else:
            weight, terms = log_u.exp(), loss_r + log_u - log_w
        loss = torch.where(weight > 0, weight * terms, 0.0).sum(dim=0)
        center = loss if spec.kind == "reverse_kl" else torch.zeros_like(loss)
        return DivergenceStats(loss, lse_s, lse_t, center, lo_s, lo_t, self._entropy(stats, lse_s, lo_s, spec))

    def _entropy(
        self, local_stats: DivergenceStats, lse: torch.Tensor, lo: torch.Tensor, spec: DivergenceSpec
    ) -> torch.Tensor | None:
        """The student's global entropy, the shards' :func:`_entropy_share` summed (one all-reduce); None unless
        ``spec.entropy``."""
        if not spec.entropy:
            return None
        local_entropy = local_stats.student_entropy
        local_entropy = torch.zeros_like(lse) if local_entropy is None else local_entropy.to(lse.dtype)
        local_lo = lse_lo(local_stats)[0].to(lse.dtype)
        log_w = (local_stats.student_lse.to(lse.dtype) - lse) + (local_lo - lo)
        return _all_reduce(_entropy_share(log_w, local_entropy), self.shard)

    def divergence_backward(
        self, s: Side, t: Side, spec, stats: DivergenceStats, row_weight, need: Need, labels=None
    ) -> Grads:
        """This shard's logit gradients from the global statistics (with ``labels``, the cross-entropy's one-hot
        part on the shard that holds each label); dh summed over the shards."""
        if self.shard.rows:
            local = None if labels is None else self._local_ids(labels)
            grads = self.inner.divergence_backward(s, t, spec, stats, row_weight, need, local)
        else:
            grads = _zero_grads(s, need)
        return self._reduce_hidden(grads)

    def _local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global token ids → this shard's rows, −1 where another shard owns the token."""
        return torch.where(self.shard.owned(ids), ids - self.shard.offset, -1)

    def logsumexp(self, side: Side, temperature: float) -> torch.Tensor:
        dtype = accumulation_dtype(side.hidden, side.weight)
        if self.shard.rows:
            local = self.inner.logsumexp(side, temperature).to(dtype)
        else:
            local = side.hidden.new_full((side.hidden.shape[0],), -torch.inf, dtype=dtype)
        return global_lse(local, self.shard)[0]

    def token_logits(self, side: Side, ids: torch.Tensor, temperature: float):
        """(z_y, global lse, its residual): z_y from the shard that owns y (0 elsewhere), all-reduced; the lse
        merged from the shards' (lse, residual) by :func:`merge_lse`."""
        dtype = accumulation_dtype(side.hidden, side.weight)
        n_rows = side.hidden.shape[0]
        if self.shard.rows:
            picked, local_lse, local_lo = self.inner.token_logits(side, self._local_ids(ids), temperature)
            picked, local_lse, local_lo = picked.to(dtype), local_lse.to(dtype), local_lo.to(dtype)
        else:
            picked = side.hidden.new_zeros(n_rows, dtype=dtype)
            local_lse = side.hidden.new_full((n_rows,), -torch.inf, dtype=dtype)
            local_lo = torch.zeros_like(local_lse)
        lse, residual = merge_lse(*_gather(torch.stack([local_lse, local_lo]), self.shard).unbind(1))
        return _all_reduce(picked.contiguous(), self.shard), lse, residual

    def logits_backward(
        self, side: Side, ids, lse, row_weight, temperature, need: Need, filter_eps=None, lse_lo=None
    ) -> Grads:
        """∂lse/∂z_v = p_v on this shard's columns, plus [v = y] where this shard owns y; dh summed over
        the shards (``lse_lo``: the global lse's residual from :meth:`token_logits`)."""
        if self.shard.rows:
            local_ids = None if ids is None else self._local_ids(ids)
            grads = self.inner.logits_backward(
                side, local_ids, lse, row_weight, temperature, need, filter_eps, lse_lo=lse_lo
            )
        else:
            grads = _zero_grads(side, need)
        return self._reduce_hidden(grads)

    def entropy_backward(
        self, side: Side, lse, lse_lo, entropy, row_weight, temperature, need: Need, filter_eps=None
    ) -> Grads:
        """∂H/∂z_v = −p_v (log p_v + H) on this shard's columns from the global (lse, lse_lo, H); dh summed over
        the shards."""
        if self.shard.rows:
            grads = self.inner.entropy_backward(side, lse, lse_lo, entropy, row_weight, temperature, need, filter_eps)
        else:
            grads = _zero_grads(side, need)
        return self._reduce_hidden(grads)

    def topk(self, side: Side, k: int, temperature: float):
        """Global (ids, log-probs, lse, entropy) from this rank's shard.

        Each rank's candidates are its local top-min(k, rows), with global ids and global log-probs; the
        all-gathered lists are concatenated in rank order (so ids ascend across ranks) and a stable sort by
        log-prob keeps ties ordered by the smaller id.
        """
        shard = self.shard
        n_rows, dtype = side.hidden.shape[0], accumulation_dtype(side.hidden, side.weight)
        local_k = min(k, shard.rows)
        ids = side.hidden.new_full((n_rows, k), shard.vocab, dtype=torch.int64)
        logprobs = side.hidden.new_full((n_rows, k), -torch.inf, dtype=dtype)
        local_lse = side.hidden.new_full((n_rows,), -torch.inf, dtype=dtype)
        local_entropy = side.hidden.new_zeros(n_rows, dtype=dtype)
        if local_k:
            l_ids, l_lp, l_lse, l_entropy = self.inner.topk(side, local_k, temperature)
            ids[:, :local_k] = l_ids + shard.offset
            logprobs[:, :local_k] = l_lp.to(dtype)
            local_lse, local_entropy = l_lse.to(dtype), l_entropy.to(dtype)
        lse, lse_r = global_lse(local_lse, shard)
        logprobs = logprobs + (local_lse - lse)[:, None]  # local → global log-probs (−inf stays −inf)
        all_lp = _gather(logprobs, shard).permute(1, 0, 2).reshape(n_rows, -1)
        all_ids = _gather(ids, shard).permute(1, 0, 2).reshape(n_rows, -1)
        all_lp, order = all_lp.sort(dim=-1, descending=True, stable=True)
        ids, logprobs = all_ids.gather(1, order[:, :k]), all_lp[:, :k]
        entropy = _entropy_share(lse_r - lse, _gather(local_entropy, shard)).sum(dim=0)
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


def gathered_logits(gather, side: Side, ids: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """h·W[ids]ᵀ + b[ids] ``[N, M]`` of ``side`` at global ``ids`` (-1 = padding, 0 there), differentiable w.r.t. h,
    W and b, from ``gather(h, w, local_ids)``, the differentiable h·W[local_ids]ᵀ on whole weights (local ids < 0
    give 0). Under a vocabulary shard each rank gathers the ids it owns and the sum over the ranks is global
    (Megatron's vocabulary-parallel pattern: :class:`CopyToShards` sums the hidden-state gradient back)."""
    h, w, bias, _ = side
    if shard is None:
        raw = gather(h, w, ids)
        local_ids = ids
    else:
        local_ids = torch.where(shard.owned(ids), ids - shard.offset, -1)
        raw = ReduceFromShards.apply(gather(CopyToShards.apply(h, shard), w, local_ids), shard)
    if bias is None:
        return raw
    owned = local_ids >= 0
    picked = torch.where(owned, bias[local_ids.clamp(min=0)].to(raw.dtype), 0.0) if bias.numel() else 0.0 * raw
    if shard is not None:
        picked = ReduceFromShards.apply(picked, shard)
    return raw + picked
