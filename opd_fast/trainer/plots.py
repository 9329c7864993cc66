"""PNG plots of a run's metrics.jsonl: loss, evaluation accuracy, top-k overlap and the entropy gap."""

from __future__ import annotations

import json
from pathlib import Path

from opd_fast._plotting import require_matplotlib, save_figure

PANELS = (
    ("loss", ["loss"], "training loss"),
    ("accuracy", ["eval/student_accuracy", "rollout/accuracy"], "accuracy"),
    (
        "overlap",
        ["overlap/mass_student", "overlap/mass_student_nonempty", "overlap/mass_teacher", "overlap/ratio"],
        "top-k overlap",
    ),
    ("entropy", ["entropy/gap", "entropy/student", "entropy/teacher"], "entropy (nats)"),
)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    """One PNG with a panel per metric family; panels without data are dropped. None if nothing to plot."""
    records = read_metrics(metrics_path)
    panels = [(name, keys, label) for name, keys, label in PANELS if any(_series(records, k)[0] for k in keys)]
    if not panels:
        return None
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (_, keys, label) in zip(axes[0], panels):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_path, dpi=110)


def plot_accuracy_comparison(
    curves: dict[str, tuple[list[int], list[float]]],
    out_path: Path,
    title: str,
    reference: dict[str, float] | None = None,
    ylabel: str = "held-out accuracy",
    legend_outside: bool = False,
) -> Path:
    """A metric in [0, 1] (by default held-out accuracy) vs steps for several runs on one axis, with optional
    horizontal reference lines; ``legend_outside`` puts a long legend to the right of the axes."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(11.5, 4.6) if legend_outside else (6.4, 4.2))
    for index, (label, (steps, values)) in enumerate(curves.items()):
        style = ("-", "--", ":")[index // 10 % 3]  # the colour cycle has 10 colours: vary the line after that
        ax.plot(steps, values, marker="o", markersize=3, linestyle=style, label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.text(
            1.0, value, f"{label} ", va="top", ha="right", fontsize=8, color="gray", transform=ax.get_yaxis_transform()
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    if legend_outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(loc="center right")
    ax.set_title(title)
    return save_figure(fig, out_path, dpi=110)
