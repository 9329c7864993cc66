"""The diagnose report: every common matrix of two or more checkpoints compared, summarized per layer type,
and written as a terminal table, JSON and PNG plots (docs/design.md §4)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from opd_fast._plotting import require_matplotlib, save_figure
from opd_fast.diagnostics.checkpoint import Checkpoint, DiagnosticsError, common_matrices
from opd_fast.diagnostics.metrics import DEFAULT_SETTINGS, DiagnoseSettings, compare_matrices, subspace_emergence

# Metrics averaged in the per-layer-type and overall summaries (update_sparsity weighted by parameters,
# as in the paper; the others unweighted over matrices).
SUMMARY_METRICS = (
    "update_sparsity",
    "principal_angle_max_deg",
    "principal_angle_mean_deg",
    "nss",
    "principal_mask_overlap",
    "principal_mask_overlap_ratio",
    "low_magnitude_mask_overlap",
    "low_magnitude_mask_overlap_ratio",
    "stable_rank",
    "frobenius_norm",
    "relative_update_norm",
    "hill_alpha",
)

# Table/plot order of the usual transformer layer types; other types follow in order of appearance.
_TYPE_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_PARAMETER_SUFFIXES = {"weight", "bias"}


def layer_type(name: str) -> str:
    """The layer type of a parameter name: its last component that is not an index or "weight"/"bias".

    "model.layers.3.self_attn.q_proj.weight" → "q_proj"; "model.embed_tokens.weight" → "embed_tokens";
    "lm_head.weight" → "lm_head"; a bare name such as "w1" is its own type.
    """
    parts = [part for part in name.split(".") if part and not part.isdigit()]
    if len(parts) > 1 and parts[-1] in _PARAMETER_SUFFIXES:
        parts = parts[:-1]
    return parts[-1] if parts else name


def _mean(values: Iterable[float | None], weights: Iterable[float] | None = None) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights or itertools.repeat(1.0)) if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def summarize(rows: Sequence[Mapping]) -> dict:
    """Per-layer-type and overall averages of the per-matrix rows (as in ``diagnose()["matrices"]``).

    update_sparsity is weighted by parameter count (the fraction of all parameters unchanged, as in the
    paper); the other metrics are unweighted means over matrices, skipping None. With ``sim_k`` in the
    rows, the mean Sim_K per checkpoint is added (key ``sim_k``: list per checkpoint t = 1 … T).
    """

    def block(group: Sequence[Mapping]) -> dict:
        out: dict = {"matrices": len(group), "parameters": sum(r["parameters"] for r in group)}
        for key in SUMMARY_METRICS:
            weights = [r["parameters"] for r in group] if key == "update_sparsity" else None
            out[key] = _mean((r[key] for r in group), weights)
        if group and "sim_k" in group[0]:
            out["sim_k"] = [_mean(r["sim_k"][t] for r in group) for t in range(len(group[0]["sim_k"]))]
        return out

    seen = list(dict.fromkeys(r["layer_type"] for r in rows))
    types = sorted(seen, key=lambda t: (_TYPE_ORDER.index(t) if t in _TYPE_ORDER else len(_TYPE_ORDER), seen.index(t)))
    return {
        "by_layer_type": {t: block([r for r in rows if r["layer_type"] == t]) for t in types},
        "overall": block(rows),
    }


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU here; use device='cpu'")
    return device


def diagnose(
    checkpoints: Sequence[str | os.PathLike],
    settings: DiagnoseSettings = DEFAULT_SETTINGS,
    *,
    include: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Update-geometry diagnostics between checkpoints (docs/design.md §4), one matrix at a time.

    ``checkpoints``: BEFORE, AFTER (paths: model directories, .safetensors files or shard indices), or a
    series BEFORE, …, AFTER in training order, which adds Sim_K(t, AFTER) per matrix. The pairwise
    metrics (:func:`compare_matrices`) always compare the first with the last. Every 2-D float tensor
    present in all checkpoints with one shape is compared; ``include`` (a regex searched in the name)
    narrows that. ``settings``: the metrics' knobs (:class:`DiagnoseSettings`). ``device``: where the
    float64 math runs; the paper's numbers use the CPU (GPU SVDs of near-identical matrices can differ in
    the last digits of the angles).

    Returns ``{"matrices": [row, ...], "summary": {...}}``: a row per matrix with ``name``,
    ``layer_type``, ``shape``, ``parameters``, the metrics of :func:`compare_matrices` and, for a series,
    ``sim_k`` (one value per checkpoint after the first); the summary holds :func:`summarize`'s averages plus
    ``checkpoints``, ``settings``, ``skipped`` (with reasons), ``mismatched`` (same name, other shape) and
    ``ignored_files`` (.safetensors files of the checkpoint directories that are not model weights, not read).
    Raises :class:`DiagnosticsError` naming the file for missing/unreadable checkpoints or when no matrix is
    common to all, ValueError for a bad include or device.
    """
    from tqdm import tqdm

    device = _resolve_device(device)
    if len(checkpoints) < 2:
        raise ValueError(f"checkpoints needs at least two paths (BEFORE AFTER), got {len(checkpoints)}")
    try:
        pattern = re.compile(include) if include is not None else None
    except re.error as exc:
        raise ValueError(f"include={include!r} is not a valid regular expression: {exc}") from None
    opened = [Checkpoint(path) for path in checkpoints]
    names, skipped, mismatched = common_matrices(opened, pattern)
    if not names:
        counts = ", ".join(f"{c.path} ({len(c.names)} tensors, e.g. {c.names[:2]})" for c in opened)
        raise DiagnosticsError(
            "no 2-D weight matrix has the same name and shape in all checkpoints"
            + (f" matching include={include!r}" if include else "")
            + f": {counts}; are they the same architecture, saved with the same name prefixes?"
        )
    series = len(opened) > 2
    rows = []
    bar = tqdm(names, desc="diagnose (SVDs)", unit="matrix", file=sys.stderr, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name, refresh=False)
        before, after = (c.load(name).to(device) for c in (opened[0], opened[-1]))
        bad = [str(c.path) for c, w in ((opened[0], before), (opened[-1], after)) if not torch.isfinite(w).all()]
        if bad:
            skipped.append({"name": name, "reason": f"non-finite values in {', '.join(bad)}"})
            continue
        try:
            metrics = compare_matrices(before, after, settings)
        except torch.linalg.LinAlgError as exc:
            skipped.append({"name": name, "reason": f"SVD failed: {exc}"})
            continue
        row = {"name": name, "layer_type": layer_type(name), "shape": list(before.shape)}
        row.update(parameters=before.numel(), **metrics)
        del before, after
        if series:
            row["sim_k"] = subspace_emergence([c.load(name).to(device) for c in opened], settings.sim_k)
        rows.append(row)
    if not rows:
        raise DiagnosticsError(f"no matrix could be compared: {skipped[-1]['reason']} (and others, see skipped)")
    summary = summarize(rows)
    summary.update(
        checkpoints=[str(c.path) for c in opened],
        settings={**asdict(settings), "sim_k": settings.sim_k if series else None, "device": str(device)},
        skipped=skipped,
        mismatched=mismatched,
        ignored_files=[str(file) for c in opened for file in c.ignored],
    )
    return {"matrices": rows, "summary": summary}


# ----------------------------------------------------------------------------------------------------------------
# Output: table, JSON, plots


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# Table columns: header, summary key, number format.
_COLUMNS = (
    ("sparsity", "update_sparsity", ".4f"),
    ("angle max°", "principal_angle_max_deg", ".3g"),
    ("angle mean°", "principal_angle_mean_deg", ".3g"),
    ("NSS", "nss", ".2e"),
    ("srank", "stable_rank", ".3g"),
    ("|dW|_F", "frobenius_norm", ".3g"),
    ("rel |dW|", "relative_update_norm", ".2e"),
    ("Hill a", "hill_alpha", ".3g"),
    ("princ/a", "principal_mask_overlap_ratio", ".3f"),
    ("low/a", "low_magnitude_mask_overlap_ratio", ".3f"),
)


def format_table(report: Mapping) -> str:
    """Terminal table of a :func:`diagnose` report: one line per layer type plus the overall line, then
    Sim_K per checkpoint (series) and what was skipped."""
    summary = report["summary"]
    header = f"{'layer type':<16} {'n':>4} {'params':>7} " + " ".join(f"{h:>{max(len(h), 8)}}" for h, _, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for name, b in [*summary["by_layer_type"].items(), ("all", summary["overall"])]:
        if name == "all":
            lines.append("-" * len(header))
        cells = " ".join(f"{_fmt(b[key], spec):>{max(len(h), 8)}}" for h, key, spec in _COLUMNS)
        lines.append(f"{name:<16} {b['matrices']:>4} {_count(b['parameters']):>7} {cells}")
    settings = summary["settings"]
    lines.append(
        f"sparsity: bf16-unchanged fraction (eta={settings['eta']:g}, parameter-weighted); angles: top-k="
        f"{settings['top_k']} (clipped to the matrix) singular subspaces, left and right; princ/a, low/a: "
        f"update-mask overlap over the random baseline alpha={settings['alpha']:g} (principal mask from rank "
        f"{settings['rank']}); other columns: means over matrices"
    )
    angle_note = _full_rank_note(report["matrices"], settings["top_k"])
    if angle_note:
        lines.append(f"angles: {angle_note}")
    if "sim_k" in summary["overall"]:
        types = list(summary["by_layer_type"])
        lines.append("")
        lines.append(f"Sim_K(t, end), K={settings['sim_k']}: subspace emergence of the cumulative update")
        lines.append(f"{'checkpoint':<40} {'mean':>6} " + " ".join(f"{t[:12]:>12}" for t in types))
        for i, path in enumerate(summary["checkpoints"][1:]):
            cells = " ".join(f"{_fmt(summary['by_layer_type'][t]['sim_k'][i], '.3f'):>12}" for t in types)
            lines.append(f"{path[-40:]:<40} {_fmt(summary['overall']['sim_k'][i], '.3f'):>6} {cells}")
    skipped, mismatched, ignored = summary["skipped"], summary["mismatched"], summary["ignored_files"]
    if skipped or mismatched or ignored:
        lines.append("")
    if skipped:
        examples: dict[str, list[str]] = {}
        for item in skipped:
            reason = re.sub(r"^\d+-D, not a matrix$", "not a 2-D matrix", item["reason"])
            examples.setdefault(reason, []).append(item["name"])
        detail = "; ".join(f"{len(names)} {reason} (e.g. {names[0]})" for reason, names in examples.items())
        lines.append(f"skipped {len(skipped)} tensors: {detail}")
    if mismatched:
        lines.append(f"skipped {len(mismatched)} matrices whose shape differs between checkpoints:")
        lines.extend(f"  {m['name']} {m['shapes']}" for m in mismatched[:10])
    if ignored:
        names = ", ".join(dict.fromkeys(Path(file).name for file in ignored))
        lines.append(
            f"not read: {len(ignored)} files of the checkpoint directories that are not model weights ({names})"
        )
    return "\n".join(lines)


def _full_rank_note(rows: Sequence[Mapping], top_k: int) -> str | None:
    """Why angles are missing where top-k covers a whole side of a matrix (None if it covers none)."""
    either = [r for r in rows if r["principal_angle_left_full_rank"] or r["principal_angle_right_full_rank"]]
    if not either:
        return None
    both = sum(r["principal_angle_full_rank"] for r in rows)
    smallest = min(min(r["shape"]) for r in rows)
    advice = f"; --top-k {smallest - 1} or less measures every side" if smallest > 1 else ""
    return (
        f"top-k={top_k} spans a whole side of {len(either)} of {len(rows)} matrices (both sides of {both}): angles "
        "there are 0 by construction, so they are not measured and left out (-: no side left; JSON null, "
        f"principal_angle_*_full_rank true){advice}"
    )


def write_json(path: str | os.PathLike, report: Mapping) -> None:
    """Write a :func:`diagnose` report as JSON (strict: no NaN/Infinity; undefined values are null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


_PLOTTED = (
    ("update_sparsity", "bf16 update sparsity", False, None),
    ("principal_angle_max_deg", "max principal angle (°)", False, None),
    ("nss", "normalized spectral shift", True, None),
    ("stable_rank", "stable rank of ΔW", False, None),
    ("frobenius_norm", "‖ΔW‖_F", True, None),
    ("hill_alpha", "Hill tail index of σ(ΔW)", False, None),
    ("principal_mask_overlap_ratio", "principal-mask overlap / α", False, 1.0),
    ("low_magnitude_mask_overlap_ratio", "low-magnitude overlap / α", False, 1.0),
)


def plot(report: Mapping, directory: str | os.PathLike) -> list[Path]:
    """PNG plots of a :func:`diagnose` report into ``directory``; returns the files written.

    ``metrics_by_layer_type.png``: per layer type, a box plot over its matrices of each metric (ratios
    with the random baseline 1 dashed). For a series also ``sim_k.png``: Sim_K(t, end) vs checkpoint,
    one line per layer type and the mean. Titles name the checkpoints compared (:func:`_short_names`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, directory / name, dpi=110) for name, fig in _figures(report)]


def _short_names(paths: Sequence[str]) -> list[str]:
    """Names of checkpoints for plot titles: the fewest trailing path components that tell the distinct paths
    apart (two when the file name is transformers' generic model*.safetensors or index), without the
    .safetensors extension and cut to 40 characters from the left."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = 1
    while depth < max(map(len, parts)) and len({p[-depth:] for p in parts}) < len(set(parts)):
        depth += 1
    names = []
    for p in parts:
        generic = re.fullmatch(r"model.*\.safetensors(\.index\.json)?", p[-1]) is not None
        name = "/".join(p[-max(depth, 2 if generic else 1) :])
        name = re.sub(r"\.safetensors(\.index\.json)?$", "", name)
        names.append(name if len(name) <= 40 else "…" + name[-39:])
    return names


def _figures(report: Mapping) -> list[tuple[str, object]]:
    """The figures of :func:`plot`, as (file name, matplotlib figure)."""
    plt = require_matplotlib()
    rows = report["matrices"]
    summary = report["summary"]
    types = list(summary["by_layer_type"])
    checkpoints = summary["checkpoints"]
    names = _short_names(checkpoints)
    pair = f"{names[0]} → {names[-1]}"
    full_sides = sum(r["principal_angle_left_full_rank"] or r["principal_angle_right_full_rank"] for r in rows)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, log, baseline) in zip(axes.flat, _PLOTTED):
        data = [[r[key] for r in rows if r["layer_type"] == t and r[key] is not None] for t in types]
        shown = [(t, d) for t, d in zip(types, data) if d]
        sides_left_out = full_sides > 0 and key == "principal_angle_max_deg"
        if shown:
            ax.boxplot([d for _, d in shown])
            ax.set_xticks(range(1, len(shown) + 1), [t for t, _ in shown])
        elif sides_left_out:
            ax.text(
                0.5,
                0.5,
                "top-k spans the whole space\non both sides of every matrix:\nangles 0 by construction, not measured",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        else:
            ax.text(0.5, 0.5, "undefined for every matrix", ha="center", va="center", transform=ax.transAxes)
        if log and any(v > 0 for _, d in shown for v in d):
            ax.set_yscale("log")
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
        if sides_left_out:
            ax.set_xlabel(
                f"left out: sides where top-k spans the whole space\n({full_sides} of {len(rows)} matrices; "
                "0 by construction there)",
                fontsize="small",
            )
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"update geometry: {pair} ({len(rows)} matrices)")
    figures = [("metrics_by_layer_type.png", fig)]
    if "sim_k" in summary["overall"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        steps = list(range(1, len(checkpoints)))
        for t in types:
            values = summary["by_layer_type"][t]["sim_k"]
            ax.plot(steps, [math.nan if v is None else v for v in values], marker="o", label=t, alpha=0.7)
        mean = [math.nan if v is None else v for v in summary["overall"]["sim_k"]]
        ax.plot(steps, mean, marker="s", color="black", linewidth=2.5, label="mean")
        ax.set_xticks(steps, names[1:], rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("checkpoint")
        ax.set_ylabel(f"Sim_K(t, end), K={summary['settings']['sim_k']}")
        ax.set_title(f"subspace emergence of the cumulative update: {pair}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        figures.append(("sim_k.png", fig))
    return figures
