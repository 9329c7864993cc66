"""From validated public arguments to where an op runs: the backend, the plan and vocabulary sharding.

Every public function takes ``backend=``, ``plan=`` and ``process_group=``; a :class:`Placement` holds the
three, checked once, and answers the two questions the functions ask: which vocabulary shard this rank holds
(:meth:`Placement.shard`) and which backend computes the op (:meth:`Placement.route`, a :class:`Route` holding
the concrete backend name, resolved here once per call; the custom ops of :mod:`opd_fast.library` take it as plain
values). :meth:`CheckedPair.make` is the whole preamble of the two-model functions: the pair validated, this rank's
shard found and the route resolved.

Under ``torch.compile`` the backend name is resolved once, when the function is traced
(``assume_constant_result``: the availability checks import modules, which a graph cannot hold), so
``OPD_FAST_BACKEND`` is read at that time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opd_fast import _validation as check
from opd_fast import distributed as vp
from opd_fast.backends import resolve_backend
from opd_fast.chunking import check_plan
from opd_fast.types import HeadTransform


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device)


class Route(NamedTuple):
    """A resolved placement: the concrete backend name, the plan and this rank's vocabulary shard (None = whole
    weights)."""

    backend: str
    plan: str
    shard: vp.VocabShard | None = None

    @property
    def args(self) -> tuple[str, str, str]:
        """(backend, plan, shard key) as the custom ops of :mod:`opd_fast.library` take them."""
        return self.backend, self.plan, vp.shard_key(self.shard)


class Placement(NamedTuple):
    """Where an op runs: ``backend`` (a name, possibly "auto"; resolved by :meth:`route`), ``plan``, and the
    ``process_group`` over which the weights are vocabulary shards (None = whole weights)."""

    backend: str
    plan: str
    process_group: object = None

    @classmethod
    def make(cls, backend: str, plan: str, process_group: object) -> Placement:
        check.check_process_group(process_group)
        return cls(backend, check_plan(plan), process_group)

    def shard(self, local_rows: int, device: torch.device, vocab_size: int | None = None) -> vp.VocabShard | None:
        """This rank's shard of a global vocabulary cut to ``vocab_size`` (None when not sharded)."""
        if self.process_group is None:
            return None
        return vp.restrict_vocab(vp.vocab_shard(self.process_group, local_rows, device), vocab_size)

    def route(self, device: torch.device, shard: vp.VocabShard | None = None) -> Route:
        """The backend that computes on ``device`` (raises when ``backend`` cannot run there)."""
        return Route(_backend_name(self.backend, device), self.plan, shard)


def _rows(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``t``'s first ``rows`` rows: ``t`` itself when it has no more (a slice would be a needless view)."""
    return t if t is None or t.shape[0] == rows else t[:rows]


class CheckedPair(NamedTuple):
    """A validated student/teacher pair and where it runs: 2-D hidden states, each head's weight, bias and
    transform, the leading shape of the tokens, the flattened mask (None = all count), this rank's vocabulary rows
    and the :class:`Route`.

    The student's weight and bias are the caller's own tensors, of which the first ``vocab`` rows are the
    vocabulary: cutting them here would make autograd's SliceBackward zero-fill a full-size weight gradient,
    so the ops cut them (:func:`opd_fast.library.divergence.divergence`), or :meth:`narrowed` does where a slice is
    fine. The teacher's (no gradient) come cut to ``vocab`` rows.
    """

    hs: torch.Tensor
    ws: torch.Tensor
    bs: torch.Tensor | None
    ht: torch.Tensor
    wt: torch.Tensor
    bt: torch.Tensor | None
    heads: tuple[HeadTransform, HeadTransform]
    lead: torch.Size
    mask: torch.Tensor | None
    vocab: int
    route: Route

    @classmethod
    def make(
        cls, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, refuse_non_finite,
        where: Placement,
    ) -> CheckedPair:  # fmt: skip
        """Validate a student/teacher pair (weights may be tensors or :class:`opd_fast.LMHead` objects), find this
        rank's vocabulary shard and resolve the backend.

        The teacher's head is cut to the shared vocabulary and comes back detached; the student's is not cut (see
        the class). Under ``where.process_group`` the weights are this rank's vocabulary shards: they must have the
        same number of rows, and ``vocab_size`` (a global size) cuts them once the shards' offsets are known.
        """
        sharded = where.process_group is not None
        refuse_non_finite = check.check_flag("check_finite", refuse_non_finite)
        ws, bs, head_s = check.check_head("student_weight", student_weight, sharded)
        wt, bt, head_t = check.check_head("teacher_weight", teacher_weight, sharded)
        hs = check.check_hidden("student_hidden", student_hidden, ws, "student_weight")
        ht = check.check_hidden("teacher_hidden", teacher_hidden, wt, "teacher_weight")
        if hs.shape[:-1] != ht.shape[:-1]:
            raise ValueError(
                "student_hidden and teacher_hidden must have the same leading shape (one row per token), got "
                f"{tuple(hs.shape[:-1])} and {tuple(ht.shape[:-1])}"
            )
        mask = check.check_mask(mask, hs.shape[:-1])
        check.check_same_device(
            student_hidden=hs,
            student_weight=ws,
            student_bias=bs,
            teacher_hidden=ht,
            teacher_weight=wt,
            teacher_bias=bt,
            mask=mask,
        )
        if sharded:
            if ws.shape[0] != wt.shape[0]:
                raise ValueError(
                    f"student_weight's shard has {ws.shape[0]} rows but teacher_weight's has {wt.shape[0]} on this "
                    "rank; shard both lm_heads the same way (opd_fast.shard_rows)"
                )
            vocab = ws.shape[0]
        else:
            vocab = check.check_vocab(ws, wt, vocab_size)
            wt, bt = _rows(wt, vocab), _rows(bt, vocab)
        if refuse_non_finite:
            biases = (("student_bias", _rows(bs, vocab)), ("teacher_bias", bt))
            biases = {name: b for name, b in biases if b is not None}
            check.check_finite(
                student_hidden=hs, student_weight=_rows(ws, vocab), teacher_hidden=ht, teacher_weight=wt, **biases
            )
        shard = where.shard(ws.shape[0], hs.device, vocab_size)
        vocab = vp.local_rows(shard, vocab)  # a global vocab_size may end inside (or before) this rank's shard
        wt, bt = _rows(wt, vocab), _rows(bt, vocab)
        return cls(
            check.flatten(hs),
            ws,
            bs,
            check.flatten(ht).detach(),
            wt.detach(),
            None if bt is None else bt.detach(),
            (head_s, head_t),
            hs.shape[:-1],
            None if mask is None else mask.reshape(-1),
            vocab,
            where.route(hs.device, shard),
        )

    @property
    def cut(self) -> int | None:
        """``vocab`` where it narrows the student's head, else None (every row)."""
        return self.vocab if self.vocab < self.ws.shape[0] else None

    def narrowed(self) -> CheckedPair:
        """The pair with the student's head cut to ``vocab`` rows (a slice only where it narrows)."""
        if self.cut is None:
            return self
        return self._replace(ws=self.ws[: self.vocab], bs=None if self.bs is None else self.bs[: self.vocab])
