"""What a training run keeps besides the model: its metrics log, and the stop request of a signal."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist


class MetricsLog:
    """``metrics.jsonl``, one JSON object per logged step; written by the main rank only (``enabled``)."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def clear(self) -> None:
        if self.enabled:
            self.path.write_text("")

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop log lines past the checkpoint, so the file reads as one uninterrupted run."""
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))


class StopRequest:
    """While entered, SIGINT/SIGTERM only note a request to stop (the loop checkpoints the finished step, then
    stops); a second signal stops at once. :meth:`requested` agrees across data-parallel ranks, so they all
    stop after the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop right away
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> int | None:
        """The signal that asked to stop on any rank, or None (a collective call under data parallelism)."""
        if self.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
