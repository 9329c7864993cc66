"""The last call of a distributed test worker that has finished its work."""

from __future__ import annotations

import os
import sys


def exit_without_finalizing() -> None:
    """End the process with status 0, skipping the interpreter's finalization. Called once the worker's results are
    on disk and its process group destroyed: during finalization gloo's threads occasionally abort the process
    ("terminate called without an active exception", SIGABRT, the main thread in no Python frame), about one run in
    six of test_vocabulary_shard_layouts on a 2-core machine, failing a run whose results were all written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
