"""From validated public arguments to where an op runs: the backend, the plan and vocabulary sharding.

Every public function takes ``backend=``, ``plan=`` and ``process_group=``; a :class:`Placement` holds the
three, checked once, and answers the two questions the functions ask: which vocabulary shard this rank holds
(:meth:`Placement.shard`) and which backend computes the op (:meth:`Placement.route`, a :class:`Route` that
the custom ops of :mod:`opd_fast.library` take as plain values). :func:`checked_pair` is the whole preamble
of the two-model functions.

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
from opd_fast.library import shard_key


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
        """(backend, plan, shard key) as the ops of :mod:`opd_fast.library` take them."""
        return self.backend, self.plan, shard_key(self.shard)


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

    def route(self, device: torch.device, shard: vp.VocabShard | None = None) -> Route:
        """The backend that computes on ``device`` (raises when ``backend`` cannot run there)."""
        return Route(_backend_name(self.backend, device), self.plan, shard)


def checked_pair(
    student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, where: Placement
) -> tuple[check.CheckedPair, Route]:
    """Validate a student/teacher pair (:func:`opd_fast._validation.check_pair`), find this rank's vocabulary
    shard and the backend; returns (the :class:`opd_fast._validation.CheckedPair` whose ``vocab`` is this rank's
    rows, the route)."""
    sharded = where.process_group is not None
    pair = check.check_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, vocab_size, check_finite, sharded=sharded
    )
    shard = where.shard(pair.ws.shape[0], pair.hs.device, vocab_size)
    if shard is not None and shard.rows < pair.vocab:  # vocab_size ends inside (or before) this rank's shard
        cut = slice(0, shard.rows)
        pair = pair._replace(wt=pair.wt[cut], bt=None if pair.bt is None else pair.bt[cut], vocab=shard.rows)
    return pair, where.route(pair.hs.device, shard)
