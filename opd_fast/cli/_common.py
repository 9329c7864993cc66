"""Helpers shared by the ``opd-fast`` subcommands: one-line errors, output-path checks and the checks
before a command starts work."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from opd_fast._plotting import require_matplotlib


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``opd-fast bench: error: argument --tokens: ... (run ... --help)``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (run '{self.prog} --help' for usage)\n")


def one_line(message: object) -> str:
    """``message`` on one line: multi-line texts (YAML parser errors, OS errors) joined with spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: object) -> int:
    """Print ``error: message`` as one line on stderr; returns the exit status of bad input, 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return 2


def output_path_problem(path: str | os.PathLike, *, directory: bool = False) -> str | None:
    """Why ``path`` (a file to write, or a ``directory`` to create/fill) cannot be written; None when it can.

    Checked before any work starts, so a long benchmark or training run never fails at its very end.
    """
    target = Path(path)
    if target.exists():
        if directory and not target.is_dir():
            return f"{target} exists and is not a directory; choose a directory path"
        if not directory and target.is_dir():
            return f"{target} is a directory; give a file path such as {target / 'out'}"
        writable = target if directory else target.parent
        if not os.access(writable, os.W_OK):
            return f"{writable} is not writable; choose another path"
        return None
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory, so {target} cannot be created there; choose another path"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"the directory {ancestor} is not writable, so {target} cannot be created; choose another path"
    return None


def preflight_problem(device: str | None, outputs: Sequence[tuple[str, str | None, bool]], plot: bool) -> str | None:
    """Why a command cannot run, found before it starts any work; None when it can.

    ``device``: the --device option; ``outputs``: (option, path or None, whether it is a directory) per
    output option; ``plot``: whether plots were asked for (they need matplotlib).
    """
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but torch sees no CUDA GPU here; use --device cpu"
    for option, path, directory in outputs:
        problem = None if path is None else output_path_problem(path, directory=directory)
        if problem:
            return f"{option} {path}: cannot write there: {problem}"
    if plot:
        try:
            require_matplotlib()
        except RuntimeError as exc:
            return f"--plot: {exc}"
    return None
