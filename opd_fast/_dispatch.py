"""From validated public arguments to the ops that compute them: the backend, the plan and vocabulary sharding.

Every public function takes ``backend=``, ``plan=`` and ``process_group=``; a :class:`Placement` holds the
three, checked once, and answers the two questions the functions ask: which vocabulary shard this rank holds
(:meth:`Placement.shard`) and which ops object computes the op (:meth:`Placement.ops`).
:func:`checked_pair` is the whole preamble of the two-model functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opd_fast import _validation as check
from opd_fast import distributed as vp
from opd_fast.backends import Ops, get_backend
from opd_fast.chunking import check_plan


class Placement(NamedTuple):
    """Where an op runs: ``backend`` (a name, possibly "auto"; checked when the ops are picked), ``plan``, and
    the ``process_group`` over which the weights are vocabulary shards (None = whole weights)."""

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

    def ops(self, device: torch.device, shard: vp.VocabShard | None = None) -> Ops:
        return get_backend(self.backend, device, shard, self.plan)


def checked_pair(
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, where: Placement
) -> tuple[check.CheckedPair, Ops]:
    """Validate a student/teacher pair (:func:`opd_fast._validation.check_pair`), find this rank's vocabulary
    shard and pick the ops; returns (the :class:`opd_fast._validation.CheckedPair` cut to this rank's rows,
    the ops)."""
    sharded = where.process_group is not None
    pair = check.check_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, sharded=sharded
    )
    shard = where.shard(pair.ws.shape[0], pair.hs.device, vocab_size)
    if shard is not None:
        cut = slice(0, shard.rows)
        pair = pair._replace(
            ws=pair.ws[cut],
            wt=pair.wt[cut],
            bs=None if pair.bs is None else pair.bs[cut],
            bt=None if pair.bt is None else pair.bt[cut],
        )
    return pair, where.ops(pair.hs.device, shard)
