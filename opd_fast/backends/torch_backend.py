"""The pure-PyTorch backend: the CPU path of every op and the readable spec of what the kernels compute.

Memory plan (see :mod:`opd_fast.chunking`): tokens are processed in chunks of ``plan.rows`` and each
chunk's vocabulary in tiles of ``plan.cols``; no tensor holds more than ``budget`` logits. When one tile
spans the whole vocabulary (the usual case) each chunk's logits are computed once and the log-softmax,
the divergence and its gradient all come from that tile. Otherwise a first sweep over the tiles finds
each row's log-sum-exp and later sweeps recompute the tiles with it.

Numerics: everything is computed in fp32 (fp64 for fp64 inputs). Low-precision hidden states and weights
are upcast once per call, which costs O((N + V)·H) memory and never O(N·V). The temperature is folded
into the hidden states, z = (h / τ) Wᵀ, so ∂/∂W = Gᵀ (h / τ) and ∂/∂h = (G W) / τ for a logit gradient G.

Gradients w.r.t. the student logits z_s of the per-token divergence D (DESIGN.md §2):

* reverse KL  D = Σ p_s (log p_s − log p_t):           G = p_s ⊙ (log p_s − log p_t − D)
* forward KL  D = Σ p_t (log p_t − log p_s):           G = p_s − p_t
* JSD(β)      D = β KL(p_t‖m) + (1−β) KL(p_s‖m), m = β p_t + (1−β) p_s:
              ∂D/∂p_s = (1−β) log(p_s / m)  ⇒        G = p_s ⊙ ((1−β) log(p_s/m) − (1−β) KL(p_s‖m))
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.chunking import TilePlan, get_chunk_budget, plan_tiles
from opd_fast.types import DivergenceStats


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(hidden: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """h / τ in the compute dtype (a copy only when a cast or a scale is needed)."""
    hidden = _upcast(hidden, dtype)
    return hidden if temperature == 1.0 else hidden / temperature


class _LogProbTiles:
    """Log-probability tiles of one token chunk under one or more models.

    ``models`` holds (hidden chunk already divided by τ, weight) pairs. With a single vocabulary tile the
    logits are computed once, normalized and cached; iterating yields that tile. With several, the
    log-sum-exp comes from a first sweep (unless given) and every iteration recomputes the tiles.
    Consumers may overwrite the yielded tiles in place: each tile is yielded once per iteration and a
    cached tile must be iterated only once.
    """

    def __init__(self, models: list[tuple[torch.Tensor, torch.Tensor]], plan: TilePlan, lse=None):
        self.models = models
        self.plan = plan
        self._cached: list[torch.Tensor] | None = None
        if plan.vocab_tiles == 1 and lse is None:
            self._cached, self.lse = [], []
            for h, w in models:
                z = h @ w.T
                row_max = z.amax(dim=-1)
                log_probs = torch.log_softmax(z, dim=-1)  # one fused pass, faster than logsumexp + subtract
                del z
                self.lse.append(row_max - log_probs.amax(dim=-1))
                self._cached.append(log_probs)
        elif plan.vocab_tiles == 1:
            self.lse = lse
            self._cached = [(h @ w.T).sub_(row_lse[:, None]) for (h, w), row_lse in zip(models, lse)]
        elif lse is not None:
            self.lse = lse
        else:
            self.lse = [self._sweep_lse(h, w) for h, w in models]

    def _sweep_lse(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        lse = hidden.new_full((hidden.shape[0],), -math.inf)
        for cols in self.plan.col_tiles():
            lse = torch.logaddexp(lse, torch.logsumexp(hidden @ weight[cols].T, dim=-1))
        return lse

    def __iter__(self) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        if self._cached is not None:
            cached, self._cached = self._cached, None
            yield slice(0, self.plan.vocab), cached
            return
        for cols in self.plan.col_tiles():
            yield cols, [(h @ w[cols].T).sub_(lse[:, None]) for (h, w), lse in zip(self.models, self.lse)]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v] · b[n, v]."""
    return (a * b).sum(dim=-1)


def _divergence_tile(lps, lpt, spec: DivergenceSpec, center=None, want_grad: bool = False):
    """One tile of the divergence: (loss share, center share, logit gradient G or None).

    Consumes ``lps`` and ``lpt`` (they are overwritten). Without ``center`` the tile's shares of D and of
    the center are computed, and G too if ``want_grad`` (valid only when this tile is the whole
    vocabulary, so that the shares are final). With ``center`` (from a full sweep) only G is formed.
    """
    loss = None
    if spec.kind == "reverse_kl":
        ps = lps.exp()
        diff = lps.sub_(lpt)  # log p_s − log p_t
        if center is None:
            loss = center = _rowdot(ps, diff)
        grad = diff.sub_(center[:, None]).mul_(ps) if want_grad else None
        return loss, center, grad
    if spec.kind == "forward_kl":
        pt = lpt.exp()
        if center is None:
            loss, center = _rowdot(pt, lpt - lps), torch.zeros_like(lps[:, 0])
        grad = lps.exp_().sub_(pt) if want_grad else None
        return loss, center, grad
    beta = spec.beta
    log_m = torch.logaddexp(lps + math.log1p(-beta), lpt + math.log(beta))
    ps = lps.exp()
    student_term = lps.sub_(log_m)  # log(p_s / m)
    if center is None:
        kl_student = _rowdot(ps, student_term)
        kl_teacher = _rowdot(lpt.exp(), lpt.sub_(log_m))
        loss, center = beta * kl_teacher + (1.0 - beta) * kl_student, (1.0 - beta) * kl_student
    grad = student_term.mul_(1.0 - beta).sub_(center[:, None]).mul_(ps) if want_grad else None
    return loss, center, grad


def _accumulate_grads(grad, weight, row_grad, rows, cols, hs, dh, dw) -> None:
    """dh[rows] += w ⊙ (G W[cols]) and dw[cols] += Gᵀ (w ⊙ hs[rows]); the per-token weights w scale the
    small [rows, H] factors instead of the [rows, cols] tile."""
    if dh is not None:
        dh[rows] += (grad @ weight[cols]).mul_(row_grad[:, None])
    if dw is not None:
        dw[cols] += grad.T @ (hs[rows] * row_grad[:, None])


def _entry_terms(lps: torch.Tensor, lpt: torch.Tensor, spec: DivergenceSpec) -> torch.Tensor:
    """The divergence's per-entry terms ℓ_v (summing to D over the vocabulary), as a differentiable tile."""
    if spec.kind == "reverse_kl":
        return lps.exp() * (lps - lpt)
    if spec.kind == "forward_kl":
        return lpt.exp() * (lpt - lps)
    log_m = torch.logaddexp(lps + math.log1p(-spec.beta), lpt + math.log(spec.beta))
    return spec.beta * lpt.exp() * (lpt - log_m) + (1.0 - spec.beta) * lps.exp() * (lps - log_m)


def _clipped_sweep(hs, ws, ht, wt, spec, grad, need_dh, need_dw):
    """D = Σ_v min(ℓ_v, entry_clip) per token, with its gradient (zero where clipped) by autograd on each
    token chunk's logits; a whole vocabulary row per chunk (the clip breaks the closed-form gradient)."""
    dtype = _compute_dtype(hs, ws, ht, wt)
    tau = spec.temperature
    hs, ht = _scaled(hs, tau, dtype), _scaled(ht, tau, dtype)
    ws, wt = _upcast(ws, dtype), _upcast(wt, dtype)
    n_tokens, vocab = hs.shape[0], ws.shape[0]
    rows_per_chunk = max(1, get_chunk_budget() // vocab)
    out = DivergenceStats(*(hs.new_zeros(n_tokens) for _ in range(4)))
    dh = hs.new_zeros(hs.shape) if grad is not None and need_dh else None
    dw = ws.new_zeros(ws.shape) if grad is not None and need_dw else None
    for start in range(0, n_tokens, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n_tokens))
        with torch.enable_grad():
            zs = (hs[rows] @ ws.T).detach().requires_grad_(grad is not None)
            lps, lpt = torch.log_softmax(zs, dim=-1), torch.log_softmax(ht[rows] @ wt.T, dim=-1)
            loss = _entry_terms(lps, lpt, spec).clamp(max=spec.entry_clip).sum(dim=-1)
            if grad is not None:
                (g,) = torch.autograd.grad(loss, zs, grad_outputs=_upcast(grad[rows], dtype))
        out.loss[rows] = loss.detach()
        out.student_lse[rows] = torch.logsumexp(zs.detach(), dim=-1)
        out.teacher_lse[rows] = torch.logsumexp(ht[rows] @ wt.T, dim=-1)
        if grad is not None:
            if dh is not None:
                dh[rows] = g @ ws
            if dw is not None:
                dw += g.T @ hs[rows]
    if dh is not None:
        dh /= tau
    return out, dh, dw


def _divergence_sweep(hs, ws, ht, wt, spec, grad, stats, need_dh, need_dw):
    """Shared driver: per-token statistics and, when ``grad`` is given, the student gradients.

    ``stats`` (from an earlier forward) lets the gradient sweep skip recomputing the log-sum-exps.
    """
    if spec.entry_clip is not None:
        return _clipped_sweep(hs, ws, ht, wt, spec, grad, need_dh, need_dw)
    dtype = _compute_dtype(hs, ws, ht, wt)
    tau = spec.temperature
    hs, ht = _scaled(hs, tau, dtype), _scaled(ht, tau, dtype)
    ws, wt = _upcast(ws, dtype), _upcast(wt, dtype)
    n_tokens = hs.shape[0]
    plan = plan_tiles(n_tokens, ws.shape[0])
    single_tile = plan.vocab_tiles == 1
    out = DivergenceStats(*(hs.new_zeros(n_tokens) for _ in range(4)))
    dh = hs.new_zeros(hs.shape) if grad is not None and need_dh else None
    dw = ws.new_zeros(ws.shape) if grad is not None and need_dw else None
    for rows in plan.row_chunks(n_tokens):
        lse = None if stats is None else [stats.student_lse[rows], stats.teacher_lse[rows]]
        tiles = _LogProbTiles([(hs[rows], ws), (ht[rows], wt)], plan, lse)
        out.student_lse[rows], out.teacher_lse[rows] = tiles.lse
        row_grad = None if grad is None else _upcast(grad[rows], dtype)
        if stats is not None:
            out.loss[rows], out.center[rows] = stats.loss[rows], stats.center[rows]
        elif single_tile:  # the only tile: loss and gradient from one pass over these logits
            for cols, (lps, lpt) in tiles:
                out.loss[rows], out.center[rows], g = _divergence_tile(lps, lpt, spec, want_grad=grad is not None)
                if g is not None:
                    _accumulate_grads(g, ws, row_grad, rows, cols, hs, dh, dw)
            continue
        else:
            for _, (lps, lpt) in tiles:
                loss, center, _ = _divergence_tile(lps, lpt, spec)
                out.loss[rows] += loss
                out.center[rows] += center
        if grad is None:
            continue
        for cols, (lps, lpt) in tiles:
            _, _, g = _divergence_tile(lps, lpt, spec, out.center[rows], want_grad=True)
            _accumulate_grads(g, ws, row_grad, rows, cols, hs, dh, dw)
    if dh is not None:
        dh /= tau
    return out, dh, dw


def jsd_terms(hs, ws, ht, wt, lse_s, lse_t, spec: DivergenceSpec):
    """(KL(p_s ‖ m), KL(p_t ‖ m)) per row over these vocabulary rows, with the rows' log-sum-exps given
    (the global ones when the weights are a vocabulary shard)."""
    dtype = _compute_dtype(hs, ws, ht, wt)
    tau = spec.temperature
    hs, ht = _scaled(hs, tau, dtype), _scaled(ht, tau, dtype)
    ws, wt = _upcast(ws, dtype), _upcast(wt, dtype)
    plan = plan_tiles(hs.shape[0], ws.shape[0])
    loss, center = hs.new_zeros(hs.shape[0]), hs.new_zeros(hs.shape[0])
    for rows in plan.row_chunks(hs.shape[0]):
        lse = [_upcast(lse_s[rows], dtype), _upcast(lse_t[rows], dtype)]
        for _, (lps, lpt) in _LogProbTiles([(hs[rows], ws), (ht[rows], wt)], plan, lse):
            tile_loss, tile_center, _ = _divergence_tile(lps, lpt, spec)
            loss[rows] += tile_loss
            center[rows] += tile_center
    kl_student = center / (1.0 - spec.beta)  # center = (1 − β)·KL(p_s ‖ m), loss = β·KL(p_t ‖ m) + center
    return kl_student, (loss - center) / spec.beta


def divergence_forward(hs, ws, ht, wt, spec: DivergenceSpec) -> DivergenceStats:
    return _divergence_sweep(hs, ws, ht, wt, spec, None, None, False, False)[0]


def divergence_backward(hs, ws, ht, wt, stats: DivergenceStats, grad, spec: DivergenceSpec, need_dh, need_dw):
    _, dh, dw = _divergence_sweep(hs, ws, ht, wt, spec, grad, stats, need_dh, need_dw)
    return dh, dw


def divergence_forward_backward(hs, ws, ht, wt, grad, spec: DivergenceSpec, need_dh, need_dw):
    return _divergence_sweep(hs, ws, ht, wt, spec, grad, None, need_dh, need_dw)


def logsumexp_forward(h, w, temperature: float) -> torch.Tensor:
    """lse of softmax(h Wᵀ / τ) per row."""
    dtype = _compute_dtype(h, w)
    h, w = _scaled(h, temperature, dtype), _upcast(w, dtype)
    n_tokens = h.shape[0]
    plan = plan_tiles(n_tokens, w.shape[0])
    lse = h.new_empty(n_tokens)
    for rows in plan.row_chunks(n_tokens):
        lse[rows] = _LogProbTiles([(h[rows], w)], plan).lse[0]
    return lse


def logsumexp_backward(h, w, lse, grad, temperature: float, need_dh: bool, need_dw: bool, filter_eps=None):
    """∂ lse / ∂z_v = p_v, weighted per token by ``grad``; exact (``filter_eps`` is ignored)."""
    dtype = _compute_dtype(h, w)
    h, w = _scaled(h, temperature, dtype), _upcast(w, dtype)
    grad = _upcast(grad, dtype)
    n_tokens = h.shape[0]
    plan = plan_tiles(n_tokens, w.shape[0])
    dh = h.new_zeros(h.shape) if need_dh else None
    dw = w.new_zeros(w.shape) if need_dw else None
    for rows in plan.row_chunks(n_tokens):
        for cols, (lp,) in _LogProbTiles([(h[rows], w)], plan, [lse[rows]]):
            _accumulate_grads(lp.exp_(), w, grad[rows], rows, cols, h, dh, dw)
    if dh is not None:
        dh /= temperature
    return dh, dw


def token_logprobs_forward(h, w, ids, temperature: float):
    lse = logsumexp_forward(h, w, temperature)
    dtype = _compute_dtype(h, w)
    return _rowdot(_scaled(h, temperature, dtype), _upcast(w, dtype)[ids]) - lse, lse


def token_logprobs_backward(h, w, ids, lse, grad, temperature: float, need_dh: bool, need_dw: bool, filter_eps=None):
    """∂ log p(y)/∂z_v = [v = y] − p_v: the log-sum-exp gradient, negated, plus the one-hot part."""
    dh, dw = logsumexp_backward(h, w, lse, -grad, temperature, need_dh, need_dw)
    dtype = _compute_dtype(h, w)
    grad = _upcast(grad, dtype)[:, None] / temperature
    if dh is not None:
        dh += grad * _upcast(w, dtype)[ids]
    if dw is not None:
        dw.index_add_(0, ids, grad * _upcast(h, dtype))
    return dh, dw


def _tile_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``z`` in canonical order: value descending, ties by smaller column first.

    torch.topk picks arbitrarily among values tied with the k-th largest; such a tie exists exactly when
    the (k+1)-th largest equals the k-th, and those rows are re-selected exactly (all values above the
    k-th, then the tied ones with the smallest columns).
    """
    width = z.shape[1]
    values, cols = torch.topk(z, min(k + 1, width), dim=-1)
    if width > k:
        tied_rows = (values[:, k] == values[:, k - 1]).nonzero().view(-1)
        values, cols = values[:, :k], cols[:, :k]
        if tied_rows.numel():
            sub, sub_kth = z[tied_rows], values[tied_rows, k - 1 :]
            above = sub > sub_kth
            at = sub == sub_kth
            needed = k - above.sum(dim=-1, keepdim=True)
            chosen = above | (at & (at.cumsum(dim=-1) <= needed))
            sub_cols = chosen.nonzero()[:, 1].view(-1, k)
            cols[tied_rows] = sub_cols
            values[tied_rows] = sub.gather(1, sub_cols)
    cols, order = cols.sort(dim=-1)
    values = values.gather(1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, cols.gather(1, order)


def _merge_topk(best, tile_best, k: int):
    """Merge running and tile top-k lists; running ids are all smaller, so a stable sort keeps ties canonical."""
    if best is None:
        return tile_best
    values = torch.cat([best[0], tile_best[0]], dim=1)
    ids = torch.cat([best[1], tile_best[1]], dim=1)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values[:, :k], ids.gather(1, order[:, :k])


def _stream_topk_entropy(hidden: torch.Tensor, weight: torch.Tensor, plan: TilePlan, k: int):
    """One sweep over the vocabulary tiles: running top-k logits plus the softmax's lse and entropy.

    Everything is kept relative to the running max m, which keeps the entropy accurate for peaked rows:
    ℓ = log Σ e^{z−m} and μ = E_p[z] − m. A tile with max m_t, softmax p and ℓ_t = −log max(p),
    μ_t = Σ p (z − m_t), merges as a two-part mixture with weights ∝ e^{ℓ + m} and e^{ℓ_t + m_t}.
    At the end lse = m + ℓ and the entropy H = lse − E_p[z] = ℓ − μ.
    """
    n_rows = hidden.shape[0]
    m = hidden.new_full((n_rows,), -math.inf)
    ell = hidden.new_full((n_rows,), -math.inf)
    mu = hidden.new_zeros(n_rows)
    best = None
    for cols in plan.col_tiles():
        z = hidden @ weight[cols].T
        values, ids = _tile_topk(z, min(k, cols.stop - cols.start))
        best = _merge_topk(best, (values, ids + cols.start), k)
        m_t = z.amax(dim=-1)
        z -= m_t[:, None]
        p = torch.softmax(z, dim=-1)
        ell_t, mu_t = -torch.log(p.amax(dim=-1)), _rowdot(p, z)
        m_new = torch.maximum(m, m_t)
        log_old, log_new = ell + (m - m_new), ell_t + (m_t - m_new)
        ell = torch.logaddexp(log_old, log_new)
        w_old, w_new = torch.exp(log_old - ell), torch.exp(log_new - ell)
        mu = torch.where(w_old > 0, w_old * (mu + m - m_new), 0.0) + w_new * (mu_t + m_t - m_new)
        m = m_new
    lse = m + ell
    return best[1], best[0] - lse[:, None], lse, ell - mu


def topk(h, w, k: int, temperature: float):
    """(ids int64 [N, k], log-probs [N, k] descending, ties by smaller id; lse [N]; entropy [N])."""
    dtype = _compute_dtype(h, w)
    h, w = _scaled(h, temperature, dtype), _upcast(w, dtype)
    n_tokens = h.shape[0]
    plan = plan_tiles(n_tokens, w.shape[0])
    ids = h.new_empty((n_tokens, k), dtype=torch.int64)
    logprobs, lse, entropy = h.new_empty((n_tokens, k)), h.new_empty(n_tokens), h.new_empty(n_tokens)
    for rows in plan.row_chunks(n_tokens):
        ids[rows], logprobs[rows], lse[rows], entropy[rows] = _stream_topk_entropy(h[rows], w, plan, k)
    return ids, logprobs, lse, entropy
