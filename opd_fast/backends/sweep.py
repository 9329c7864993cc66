"""The tile sweep every backend shares: GEMMs for the logits, a backend's epilogue for the math, GEMMs for
the gradients. A backend only writes the per-tile math (an :class:`epilogue.Epilogue`); the loops, the
chunk plan and, on CUDA, the overlap of memory-bound epilogues with the GEMMs on a side stream live here, the
GEMMs, gradient accumulation and filtering in :mod:`opd_fast.backends.gemms`.

For each token chunk (rows) and vocabulary tile (cols) of :func:`opd_fast.chunking.plan_tiles`:

1. logits: ``z = h[rows] · W[cols]ᵀ`` into a reused fp32 workspace (cuBLAS; bf16/fp16 inputs accumulate
   and land in fp32 through ``out_dtype``), rows a padded stride apart on CUDA (:mod:`opd_fast.chunking`).
   The bias and the head's scale, softcap and 1/τ are applied by the epilogue, on the fly.
2. statistics: ``Epilogue.stats_update`` folds each tile into per-row online-softmax state
   (m_s, s_s, m_t, s_t, acc; see :func:`online_softmax.finalize`), JSD takes one more pass for its mixture
   terms.
3. gradient: ``Epilogue.grad`` turns the tile into the logit gradient G (per-token weight, 1/τ and the
   head's chain rule folded in), then ``dH[rows] += G · W[cols]``, ``dW[cols] += Gᵀ · h[rows]`` (an fp32
   accumulator when several token chunks add into it, written by the first with β = 0: never zero-filled; or,
   with :func:`opd_fast.chunking.dw_gemm` "single", one GEMM over every row's G at the end) and
   ``db[cols] += Σ_rows G``.

With the chunked plan a tile is a whole vocabulary row, so steps 1–3 share one computation of the logits:
forward + backward cost exactly the floor's GEMM FLOPs, 2·N·V·(Hs + Ht) + 4·N·V·Hs, and the logits of a
chunk die with it. With vocabulary tiles (the streaming plan, or rows that do not fit the budget) the
gradient sweep recomputes the tiles once the row's statistics are final.

Gradient filtering (``filter_eps > 0``, opt-in): G is proportional to p_s (and p_t for forward KL), so in
a chunk many vocabulary columns carry a gradient below any resolution. Columns whose |G| (per token,
before the token's weight) is below ``filter_eps`` in every row of the chunk are left out of the gradient
GEMMs: the live columns are gathered and only they are multiplied. :func:`gemms.last_filter_stats` reports the
share skipped.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from opd_fast._validation import DivergenceSpec
from opd_fast.backends.epilogue import TERMS_MODES, Epilogue, Operand
from opd_fast.backends.gemms import GradientAccumulator, keeps_all_g, mm_out
from opd_fast.backends.hard_labels import HardLabels, add_one_hot, hard_labels_of, label_logits, shifted_center
from opd_fast.backends.online_softmax import (
    finalize,
    finalize_entropy,
    lse_lo,
    new_entropy_state,
    new_state,
    terms_loss,
)
from opd_fast.chunking import TilePlan, plan_tiles
from opd_fast.types import DivergenceStats, Grads, Need, Side, accumulation_dtype

Tensor = torch.Tensor


def _store_rows(out: DivergenceStats, stats: DivergenceStats, rows: slice) -> None:
    """Write a chunk's statistics into ``rows`` of the sweep's outputs (those it has: the entropy when asked)."""
    for field, value in zip(out, stats):
        if field is not None:
            field[rows] = value


def _select(stats: DivergenceStats, rows: slice) -> DivergenceStats:
    return DivergenceStats(*(None if t is None else t[rows] for t in stats))


STREAM_OVERLAP_ENV = "OPD_FAST_OVERLAP"


class _StreamOverlap:
    """On CUDA, each chunk's memory-bound epilogue runs on a side stream while the main stream runs the
    previous chunk's gradient GEMMs (dH, dW: about half of all GEMM FLOPs), with two G buffers:

        main:  Z(i) ─ dH/dW(i−1) ─ wait E(i) ─ Z(i+1) ─ dH/dW(i) ─ …
        side:      └ wait Z(i) ─ E(i) (stats, G(i)) ┘          └ E(i+1) …

    Disabled (everything in order on the current stream) off CUDA, for vocabulary-tiled plans, in place
    fp32 gradients, or with ``OPD_FAST_OVERLAP=0``.
    """

    def __init__(self, device: torch.device, wanted: bool):
        self.enabled = wanted and device.type == "cuda" and os.environ.get(STREAM_OVERLAP_ENV, "1") != "0"
        self.side = torch.cuda.Stream(device) if self.enabled else None
        self.main = torch.cuda.current_stream(device) if self.enabled else None
        self.done = None

    def mark(self):
        return self.main.record_event() if self.enabled else None

    @contextmanager
    def epilogue(self, logits_ready):
        if not self.enabled:
            yield
            return
        self.side.wait_event(logits_ready)
        with torch.cuda.stream(self.side):
            yield
        self.done = self.side.record_event()

    def wait_epilogue(self) -> None:
        if self.enabled and self.done is not None:
            self.main.wait_event(self.done)

    def finish(self) -> None:
        if self.enabled:
            self.main.wait_stream(self.side)


class Sweep:
    """The ops of :mod:`opd_fast.backends` for a plan, on an :class:`epilogue.Epilogue`."""

    def __init__(self, name: str, epilogue: Epilogue, plan: str = "chunked"):
        self.name, self.epilogue, self.plan = name, epilogue, plan
        # Tiles with the plan's (padded) row stride, or packed [r, c] for an epilogue that wants contiguous ones.
        self.strided = getattr(epilogue, "takes_row_stride", False)

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _plan(self, n_rows: int, vocab: int, device: torch.device) -> TilePlan:
        return plan_tiles(n_rows, vocab, plan=self.plan, device=device)

    def _view(self, buf: Tensor, plan: TilePlan, rows: slice, width: int) -> Tensor:
        """The [r, width] tile of token ``rows`` (counted from the buffer's first row) in a flat buffer: rows
        ``plan.stride`` elements apart, or packed when the epilogue takes no row stride."""
        ld = plan.stride if self.strided else width
        return buf[rows.start * ld : rows.stop * ld].view(rows.stop - rows.start, ld)[:, :width]

    def _workspace(self, plan: TilePlan, n_models: int, device: torch.device, dtype: torch.dtype):
        """Reused flat fp32 buffers, one per model, each big enough for one [rows, cols] tile."""
        return [torch.empty(plan.rows * plan.stride, device=device, dtype=dtype) for _ in range(n_models)]

    def _logits(self, op: Operand, rows: slice, cols: slice, buf: Tensor, plan: TilePlan) -> Tensor:
        tile = self._view(buf, plan, slice(0, rows.stop - rows.start), cols.stop - cols.start)
        return mm_out(op.hidden[rows], op.weight[cols].T, tile)

    def _grad_buffer(self, op: Operand, plan: TilePlan, acc_dtype: torch.dtype, n_rows: int | None = None):
        """A flat buffer for G of ``n_rows`` rows (one chunk's by default); None when G may overwrite the
        student's fp32 logits tile in place (only one chunk's G is kept)."""
        dtype = self.epilogue.grad_dtype(op)
        if dtype == acc_dtype and n_rows is None:
            return None
        return torch.empty((n_rows or plan.rows) * plan.stride, device=op.hidden.device, dtype=dtype)

    def _tile_source(self, plan: TilePlan, ops: list[Operand], bufs: list[Tensor], rows: slice):
        """A callable giving a token chunk's (cols, [logits per model]) tiles: computed once and handed out
        on every call when one tile spans the vocabulary, recomputed on every call otherwise."""
        if plan.vocab_tiles == 1:
            cols = slice(0, plan.vocab)
            tile = [self._logits(op, rows, cols, buf, plan) for op, buf in zip(ops, bufs)]
            return lambda: [(cols, tile)]
        return lambda: (
            (cols, [self._logits(op, rows, cols, buf, plan) for op, buf in zip(ops, bufs)]) for cols in plan.col_tiles()
        )

    def _chunk_stats(self, mode, s, t, tiles, ids, beta, r, dtype, entropy: bool = False) -> DivergenceStats:
        """One token chunk's statistics: a sweep of online-softmax merges (with ``entropy``, the student's entropy
        from the same tiles), plus the terms pass of the ``TERMS_MODES``."""
        epi = self.epilogue
        state = new_state(r, s.hidden.device, dtype)
        entropy_state = new_entropy_state(r, s.hidden.device, dtype) if entropy else None
        for cols, zz in tiles():
            zt, ht = (zz[1], t.tile(cols)) if t is not None else (None, None)
            epi.stats_update(state, zz[0], zt, ids, s.tile(cols), ht, cols.start, mode, entropy_state)
        stats = finalize(state, mode)
        if entropy:
            stats = stats._replace(student_entropy=finalize_entropy(entropy_state))
        if mode not in TERMS_MODES:
            return stats
        terms = torch.zeros((3, r), device=s.hidden.device, dtype=dtype)
        for cols, (zs, zt) in tiles():
            epi.terms_update(terms, zs, zt, stats, s.tile(cols), t.tile(cols), mode, beta)
        loss, center = terms_loss(terms, mode, beta)
        return stats._replace(loss=loss, center=center)

    # -- the generic sweep ---------------------------------------------------------------------------------------

    def _sweep(
        self,
        mode: str,
        ops: list[Operand],
        ids: Tensor | None,
        beta: float,
        row_weight: Tensor | None,
        given: DivergenceStats | None,
        need: Need,
        filter_eps: float,
        terms_lse: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
        entropy: bool = False,
        hard: HardLabels | None = None,
    ) -> tuple[DivergenceStats | None, Grads]:
        """Statistics (unless ``given``; with ``entropy``, the first model's entropy too) and, with ``row_weight``,
        the first model's gradients (with ``hard``, a cross-entropy term's folded in: :class:`HardLabels`; the row
        weights are then D's, (1 − w) times the loss's).

        ``terms_lse`` (vocabulary parallelism): the rows' global (lse_s, lse_t, lse_lo_s, lse_lo_t); the sweep then
        only adds up the terms of these vocabulary rows and returns them ([3, N], see :func:`terms_loss`) in place
        of the stats.
        """
        epi, s = self.epilogue, ops[0]
        t = ops[1] if len(ops) > 1 else None
        n_rows, vocab, device = s.hidden.shape[0], s.weight.shape[0], s.hidden.device
        plan = self._plan(n_rows, vocab, device)
        acc_dtype = accumulation_dtype(s.hidden.dtype)
        want_grad = row_weight is not None and need.any
        g_all = None  # every row's G, for the single dW GEMM
        if (
            want_grad
            and need.weight
            and keeps_all_g(plan, n_rows, s.hidden.shape[1], epi.grad_dtype(s), device, filter_eps)
        ):
            g_all = self._grad_buffer(s, plan, acc_dtype, n_rows)
        g_all_rows = None if g_all is None else self._view(g_all, plan, slice(0, n_rows), vocab)
        acc = GradientAccumulator(s, need, plan, n_rows, filter_eps, g_all_rows) if want_grad else None
        want_stats = given is None
        out = None
        if terms_lse is not None:
            out = torch.zeros((3, n_rows), device=device, dtype=acc_dtype)
        elif want_stats:
            out = DivergenceStats(*(torch.empty(n_rows, device=device, dtype=acc_dtype) for _ in range(6)))
            if entropy:
                out = out._replace(student_entropy=torch.empty(n_rows, device=device, dtype=acc_dtype))
        if n_rows == 0 or vocab == 0:
            return out, Grads() if acc is None else acc.result()
        bufs = self._workspace(plan, len(ops), device, acc_dtype)
        g_bufs = [self._grad_buffer(s, plan, acc_dtype)] if want_grad and g_all is None else [None]
        separate_g = g_all is not None or g_bufs[0] is not None
        overlap = _StreamOverlap(device, want_grad and plan.vocab_tiles == 1 and separate_g)
        if overlap.enabled and g_all is None:
            g_bufs.append(self._grad_buffer(s, plan, acc_dtype))  # chunk i's G is read while i + 1's is written

        def g_out(i: int, rows: slice, width: int) -> Tensor | None:
            """Where chunk i's G goes: its rows of ``g_all``, a G buffer, or (None) over the student's logits."""
            if g_all is not None:
                return self._view(g_all, plan, rows, width)
            g_buf = g_bufs[i % len(g_bufs)]
            return None if g_buf is None else self._view(g_buf, plan, slice(0, rows.stop - rows.start), width)

        pending = None  # the previous chunk's (G, rows, cols, weights), its gradient GEMMs not yet enqueued
        for i, rows in enumerate(plan.row_chunks(n_rows)):
            r = rows.stop - rows.start
            ids_r = None if ids is None else ids[rows]
            overlap.wait_epilogue()  # the logits workspace is free again
            tiles = self._tile_source(plan, ops, bufs, rows)
            logits_ready = overlap.mark()
            if pending is not None:
                acc.add(*pending)  # overlaps this chunk's epilogue on the side stream
                pending = None
            if terms_lse is not None:
                terms = torch.zeros((3, r), device=device, dtype=acc_dtype)
                zeros = terms[0].clone()
                row_lse = DivergenceStats(
                    zeros, *(x[rows] for x in terms_lse[:2]), zeros, *(x[rows] for x in terms_lse[2:])
                )
                for cols, (zs, zt) in tiles():
                    epi.terms_update(terms, zs, zt, row_lse, s.tile(cols), t.tile(cols), mode, beta)
                out[:, rows] = terms
                continue
            with overlap.epilogue(logits_ready):
                weight_r = row_weight[rows].to(acc_dtype) if want_grad else None
                if want_stats and plan.vocab_tiles == 1 and getattr(epi, "full_rows", None) is not None:
                    ((cols, zz),) = tiles()
                    g_to = g_out(i, rows, plan.vocab) if want_grad else None
                    zt, ht = (zz[1], t.tile(cols)) if t is not None else (None, None)
                    shift = 0.0 if hard is None else hard.shift
                    stats, g = epi.full_rows(
                        zz[0], zt, ids_r, s.tile(cols), ht, mode, beta, weight_r, g_to, entropy, shift
                    )
                    _store_rows(out, stats, rows)
                    if g is not None:
                        if hard is not None:
                            add_one_hot(g, hard.ids[rows], cols.start, weight_r * shift * hard.chain[rows])
                        pending = self._emit(g, rows, cols, weight_r, acc, overlap)
                    continue
                if want_stats:
                    stats = self._chunk_stats(mode, s, t, tiles, ids_r, beta, r, acc_dtype, entropy)
                    _store_rows(out, stats, rows)
                else:
                    stats = _select(given, rows)
                if not want_grad:
                    continue
                if hard is not None:
                    stats = shifted_center(stats, mode, hard.shift)
                for cols, zz in tiles():
                    g_to = g_out(i, rows, cols.stop - cols.start)
                    zt = zz[1] if t is not None else None
                    ht = t.tile(cols) if t is not None else None
                    g = epi.grad(zz[0], zt, ids_r, stats, weight_r, s.tile(cols), ht, cols.start, mode, beta, g_to)
                    if hard is not None:
                        add_one_hot(g, hard.ids[rows], cols.start, weight_r * hard.shift * hard.chain[rows])
                    pending = self._emit(g, rows, cols, weight_r, acc, overlap)
        overlap.wait_epilogue()
        if pending is not None:
            acc.add(*pending)
        overlap.finish()
        return out, Grads() if acc is None else acc.result()

    @staticmethod
    def _emit(g: Tensor, rows: slice, cols: slice, weight_r: Tensor, acc: GradientAccumulator, overlap: _StreamOverlap):
        """Hand a tile's logit gradient to the dH/dW GEMMs: now, or (overlapping) as the pending tile."""
        if overlap.enabled:
            weight_r.record_stream(overlap.main)  # made on the side stream, read on the main one
            return (g, rows, cols, weight_r)
        acc.add(g, rows, cols, weight_r)
        return None

    # -- the ops -------------------------------------------------------------------------------------------------

    def _operands(self, sides: list[Side], temperatures: list[float], fold: bool = True) -> list[Operand]:
        """Each model's operand, its logits divided by its own temperature."""
        return [self.epilogue.prepare(side, tau, fold) for side, tau in zip(sides, temperatures, strict=True)]

    def _pair(self, s: Side, t: Side, spec: DivergenceSpec) -> list[Operand]:
        """The student's and the teacher's operands at τ and τ_t."""
        return self._operands([s, t], [spec.temperature, spec.teacher_temperature])

    def divergence(
        self,
        s: Side,
        t: Side,
        spec: DivergenceSpec,
        row_weight: Tensor | None,
        need: Need,
        labels: Tensor | None = None,
    ) -> tuple[DivergenceStats, Grads]:
        """Per-token statistics and, when ``row_weight`` [N] is given, the gradients of Σ_n w_n L_n, L = D or, with
        ``labels`` (each row's label column in these vocabulary rows, −1 where another shard holds it), L =
        w · CE + (1 − w) · D for w = ``spec.hard_label_weight``; the statistics then hold the label's logit and D
        (the caller adds the cross-entropy, lse_s − z_y, once the lse is global)."""
        ops = self._pair(s, t, spec)
        hard, row_weight, z_y = hard_labels_of(ops[0], spec, labels, row_weight)
        stats, grads = self._sweep(
            spec.kind, ops, None, spec.beta, row_weight, None, need, spec.filter_eps or 0.0, None, spec.entropy, hard
        )
        return (stats if z_y is None else stats._replace(label_logit=z_y)), grads

    def divergence_label_logits(self, s: Side, spec: DivergenceSpec, labels: Tensor) -> Tensor:
        """The student's final logit at each row's label column (0 where ``labels`` is −1; :func:`label_logits`)."""
        return label_logits(self._operands([s], [spec.temperature])[0], labels)[0]

    def divergence_backward(
        self,
        s: Side,
        t: Side,
        spec: DivergenceSpec,
        stats: DivergenceStats,
        row_weight: Tensor,
        need: Need,
        labels: Tensor | None = None,
    ) -> Grads:
        """Gradients of Σ_n w_n L_n (:meth:`divergence`) from given (e.g. global) statistics; recomputes the
        logits."""
        ops = self._pair(s, t, spec)
        dtype = accumulation_dtype(ops[0].hidden.dtype)
        given = DivergenceStats(*(None if x is None else x.to(dtype) for x in stats))
        hard, row_weight, _ = hard_labels_of(ops[0], spec, labels, row_weight)
        filter_eps = spec.filter_eps or 0.0
        return self._sweep(spec.kind, ops, None, spec.beta, row_weight, given, need, filter_eps, hard=hard)[1]

    def divergence_terms(
        self, s: Side, t: Side, spec: DivergenceSpec, lse_s: Tensor, lse_t: Tensor, lo_s=None, lo_t=None
    ) -> Tensor:
        """The terms [3, N] of a ``TERMS_MODES`` divergence (see :func:`terms_loss`) summed over these vocabulary
        rows, given the rows' (global) lse and, when known, their residuals (None: 0)."""
        ops = self._pair(s, t, spec)
        dtype = accumulation_dtype(ops[0].hidden.dtype)
        zeros = torch.zeros_like(lse_s, dtype=dtype)
        lse = tuple(zeros if x is None else x.to(dtype) for x in (lse_s, lse_t, lo_s, lo_t))
        return self._sweep(spec.kind, ops, None, spec.beta, None, None, Need(), 0.0, terms_lse=lse)[0]

    def token_logits(self, side: Side, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """(z_y [N], lse [N], lse_lo [N]): the logit of each row's token (0 where ``ids`` is outside these rows,
        e.g. −1), the row's log-sum-exp and its residual."""
        ops = self._operands([side], [temperature])
        stats, _ = self._sweep("token_logprob", ops, ids, 0.0, None, None, Need(), 0.0)
        return stats.loss, stats.student_lse, lse_lo(stats)[0]

    def logsumexp(self, side: Side, temperature: float) -> Tensor:
        ops = self._operands([side], [temperature])
        return self._sweep("logsumexp", ops, None, 0.0, None, None, Need(), 0.0)[0].student_lse

    def logits_backward(
        self,
        side: Side,
        ids: Tensor | None,
        lse: Tensor,
        row_weight: Tensor,
        temperature: float,
        need: Need,
        filter_eps: float | None = None,
        lse_lo: Tensor | None = None,
    ) -> Grads:
        """Gradients of Σ_n w_n lse_n (``ids`` None) or of Σ_n w_n log p(ids_n) (``ids`` −1 where the token
        lies outside these rows: only the −p part). ``lse_lo``: the rows' lse residuals from :meth:`token_logits`
        (None: 0, where only the lse is known); with them p = e^{(z − lse) − lse_lo} is accurate to ~ulp(log p),
        without them to ~ulp(lse)."""
        ops = self._operands([side], [temperature])
        dtype = accumulation_dtype(ops[0].hidden.dtype)
        lse = lse.to(dtype)
        zeros = torch.zeros_like(lse)
        lo = None if lse_lo is None else lse_lo.to(dtype)
        given = DivergenceStats(zeros, lse, lse, zeros, lo, lo)
        mode = "logsumexp" if ids is None else "token_logprob"
        return self._sweep(mode, ops, ids, 0.0, row_weight, given, need, filter_eps or 0.0)[1]

    def entropy_backward(
        self,
        side: Side,
        lse: Tensor,
        lse_lo: Tensor,
        entropy: Tensor,
        row_weight: Tensor,
        temperature: float,
        need: Need,
        filter_eps: float | None = None,
    ) -> Grads:
        """Gradients of Σ_n w_n H_n, H = −Σ_v p log p the rows' (global) entropy with their (lse, lse_lo):
        ∂H/∂z = −p (log p + H), the gradient pass of mode "entropy" with center −H and row weights −w; recomputes
        the logits."""
        ops = self._operands([side], [temperature])
        dtype = accumulation_dtype(ops[0].hidden.dtype)
        lse, lo, center = lse.to(dtype), lse_lo.to(dtype), -entropy.to(dtype)
        given = DivergenceStats(torch.zeros_like(lse), lse, lse, center, lo, lo)
        return self._sweep("entropy", ops, None, 0.0, -row_weight, given, need, filter_eps or 0.0)[1]

    def topk(self, side: Side, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids int64 [N, k], log-probs [N, k] descending with ties by the smaller id, lse [N], entropy [N])."""
        (op,) = self._operands([side], [temperature], fold=False)
        n_rows, vocab, device = op.hidden.shape[0], op.weight.shape[0], op.hidden.device
        plan = self._plan(n_rows, vocab, device)
        dtype = accumulation_dtype(op.hidden.dtype)
        ids = torch.empty((n_rows, k), device=device, dtype=torch.int64)
        logprobs = torch.empty((n_rows, k), device=device, dtype=dtype)
        lse = torch.empty(n_rows, device=device, dtype=dtype)
        entropy = torch.empty(n_rows, device=device, dtype=dtype)
        (buf,) = self._workspace(plan, 1, device, dtype)
        for rows in plan.row_chunks(n_rows):
            state = self.epilogue.topk_state(rows.stop - rows.start, device, dtype)
            best = None
            for cols in plan.col_tiles():
                z = self._logits(op, rows, cols, buf, plan)
                best = self.epilogue.topk(z, op.tile(cols), k, cols.start, best, state)
            ids[rows], logprobs[rows], lse[rows], entropy[rows] = self.epilogue.topk_finalize(best, state)
        return ids, logprobs, lse, entropy
