"""Plotting helpers shared by the benchmark, the trainer and the diagnostics (matplotlib is an optional extra).

Kept apart from :mod:`opd_fast.bench` so that plotting a training run or a diagnose report does not import the
benchmark and its baselines.
"""

from __future__ import annotations

import os
from pathlib import Path


def require_matplotlib():
    """pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'opd_fast[plot]'") from None
    return plt


def save_figure(fig, path: str | os.PathLike, *, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating its directory) and close it; returns the path."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    require_matplotlib().close(fig)
    return path
