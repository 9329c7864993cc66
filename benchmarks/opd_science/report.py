"""The committed report: ``results.json`` (every measurement), PNG plots and ``claims.md`` (the README table)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from opd_fast._plotting import require_matplotlib

from .corpus import SKILLS
from .runs import RUNS

RESULTS_FILE, TABLE_FILE = "results.json", "claims.md"
MAIN_RUNS = ("sft", "opd", "rlvr", "opsd", "offpolicy_sd")
PATTERN_RUNS = ("opd", "opd_incompatible", "opd_incompatible_cold_start", "opd_incompatible_aligned")
LOCK_RUNS = ("opd", "opd_lock", "sft", "sft_lock")
COLORS = {run.name: f"C{index}" for index, run in enumerate(RUNS)}  # one colour per run in every figure


def _bits(correct: list[bool]) -> str:
    return "".join("1" if c else "0" for c in correct)


def to_json(data: dict) -> dict:
    """``data`` with the per-problem correctness lists as strings of 0/1 (one character per problem)."""
    out = copy.deepcopy(data)
    out["reference_correct"] = {k: _bits(v) for k, v in data["reference_correct"].items()}
    for run in out["runs"].values():
        run["final_correct"] = _bits(run["final_correct"])
    return out


def from_json(data: dict) -> dict:
    """The inverse of :func:`to_json`."""
    out = copy.deepcopy(data)
    out["reference_correct"] = {k: [c == "1" for c in v] for k, v in data["reference_correct"].items()}
    for run in out["runs"].values():
        run["final_correct"] = [c == "1" for c in run["final_correct"]]
    return out


def _accuracy(data: dict, name: str) -> float:
    correct = data["runs"][name]["final_correct"] if name in data["runs"] else data["reference_correct"][name]
    return sum(correct) / len(correct)


def table(data: dict) -> str:
    """The claims as a markdown table: claim, paper, ours, verdict (with the reason where not reproduced)."""
    lines = ["| Claim | Paper | Ours | Verdict |", "| --- | --- | --- | --- |"]
    for claim in data["claims"]:
        verdict = f"**{claim['verdict']}**" + (f": {claim['reason']}" if claim["reason"] else "")
        cells = [f"{claim['claim']} ({claim['source']})", claim["paper"], claim["ours"], verdict]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def runs_table(data: dict) -> str:
    """One line per run: final accuracy, completion tokens, the overlap and the update geometry at its end."""
    lines = [
        "| Run | final accuracy | completion tokens | overlap ratio, step 0 → end | bf16 sparsity | srank ΔW "
        "| train time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in data["runs"].items():
        first, last = run["visited_states"][0], run["visited_states"][-1]
        geometry = run["geometry"]["overall"]
        lines.append(
            f"| {run['label'].strip()} (`{name}`) | {100 * _accuracy(data, name):.1f}% "
            f"| {run['completion_tokens']:,.0f} "
            f"| {100 * first['overlap_ratio_all']:.1f}% → {100 * last['overlap_ratio_all']:.1f}% "
            f"| {100 * geometry['update_sparsity']:.1f}% | {geometry['stable_rank']:.2f} | {run['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def markdown(data: dict) -> str:
    settings = data["settings"]
    base, finetune = settings["base"], settings["finetune"]
    reference = "\n".join(
        f"| {name.replace('_', ' ')} | {100 * _accuracy(data, name):.1f}% | "
        + " | ".join(f"{100 * sum(c[i :: len(SKILLS)]) / len(c[i :: len(SKILLS)]):.1f}%" for i in range(len(SKILLS)))
        + " |"
        for name, c in data["reference_correct"].items()
    )
    return "\n".join(
        [
            f"# Reproducing the OPD papers' findings ({data['preset']} preset)",
            "",
            f"Base LM: Llama, {base['layers']} layers, hidden {base['hidden']}, pretrained {base['steps']} steps; "
            f"fine-tuning: {finetune['steps']} steps × {finetune['batch']} rollouts, lr {finetune['lr']:g}; "
            f"held-out accuracy on {settings['final_eval_size']} problems (greedy). "
            f"Total time {data['seconds']:.0f} s.",
            "",
            "Held-out accuracy of the base and the teachers (the held-out set cycles through the skills):",
            "",
            "| model | all | reverse | sort | add |",
            "| --- | --- | --- | --- | --- |",
            reference,
            "",
            table(data),
            "",
            runs_table(data),
            "",
        ]
    )


def _finite(values):
    return [math.nan if v is None else v for v in values]


def _plot_accuracy(ax, data: dict, names, x: str) -> None:
    for name in names:
        run = data["runs"][name]
        points = run["accuracy_curve"]
        ax.plot(
            [p[x] for p in points],
            [p["accuracy"] for p in points],
            marker="o",
            markersize=3,
            color=COLORS[name],
            label=run["label"].strip(),
        )
    ax.set_xlabel("completion tokens trained on" if x == "tokens" else "training step")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)


def plot(data: dict, directory: Path) -> list[Path]:
    """The report's figures into ``directory``; returns the files written."""
    plt = require_matplotlib()
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(10, 4.8))
    _plot_accuracy(ax, data, MAIN_RUNS, "tokens")
    for name, style in (("teacher", "--"), ("base_with_answer_in_context", ":"), ("base", "-.")):
        ax.axhline(_accuracy(data, name), color="gray", linestyle=style, linewidth=1, label=name.replace("_", " "))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title("held-out accuracy vs training tokens, from the same base")
    save(fig, "accuracy_vs_tokens.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    _plot_accuracy(axes[0], data, PATTERN_RUNS, "step")
    axes[0].set_title("thinking-pattern (in)compatibility: accuracy")
    for name in PATTERN_RUNS:
        visited = data["runs"][name]["visited_states"]
        axes[1].plot(
            [v["step"] for v in visited],
            [v["overlap_ratio_all"] for v in visited],
            marker="o",
            color=COLORS[name],
            label=name,
        )
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel(f"top-{data['settings']['finetune']['overlap_k']} overlap ratio at student-visited states")
    axes[1].grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    save(fig, "thinking_patterns.png")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for name in ("opd", "sft", "rlvr", "opsd"):
        visited = data["runs"][name]["visited_states"]
        steps = [v["step"] for v in visited]
        label = "opsd (vs its privileged self)" if name == "opsd" else name
        values = [v["overlap_mass_student_nonempty"] for v in visited]
        axes[0].plot(steps, _finite(values), marker="o", color=COLORS[name], label=f"{label}, non-empty I")
        values = [v["overlap_mass_student_all"] for v in visited]
        axes[0].plot(steps, _finite(values), linestyle="--", color=COLORS[name], label=f"{label}, all tokens")
        values = [v["overlap_ratio_all"] for v in visited]
        axes[1].plot(steps, _finite(values), marker="o", color=COLORS[name], label=label)
        axes[2].plot(steps, _finite([v["reverse_kl"] for v in visited]), marker="o", color=COLORS[name], label=label)
    axes[0].axhspan(0.97, 0.99, color="green", alpha=0.1, label="papers: 97–99%")
    for ax, title in zip(
        axes, ("student's overlap mass", "overlap ratio |I|/k", "reverse KL(student ‖ teacher), nats")
    ):
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "overlap.png")

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name in ("sft", "opd"):
        run = data["runs"][name]
        for key, style, what in (
            ("visited_states", "-", "own rollouts"),
            ("final_on_teacher_samples", "--", "teacher samples"),
        ):
            stats = run[key][-1] if key == "visited_states" else run[key]
            values = _finite(stats["reverse_kl_by_position"])
            ax.plot(
                range(1, len(values) + 1),
                values,
                linestyle=style,
                marker=".",
                color=COLORS[name],
                label=f"{name}: {what}",
            )
    ax.set_xlabel("completion position")
    ax.set_ylabel("reverse KL(student ‖ teacher), nats")
    ax.set_title("drift: the final students on their own rollouts vs the teacher's samples")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "drift.png")

    names = [n for n in data["runs"] if n in ("sft", "opd", "rlvr", "opsd", "offpolicy_sd", "opd_incompatible")]
    metrics = (
        ("update_sparsity", "bf16 update sparsity"),
        ("principal_mask_overlap_ratio", "principal-mask overlap / α"),
        ("principal_angle_mean_deg", "mean principal angle (°)"),
        ("stable_rank", "stable rank of ΔW"),
    )
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(20, 4.2))
    for ax, (key, title) in zip(axes, metrics):
        values = _finite([data["runs"][n]["geometry"]["overall"][key] for n in names])
        ax.bar(range(len(names)), values, color=[COLORS[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    for name in names:
        sims = data["runs"][name]["geometry"]["overall"]["sim_k"]
        axes[-1].plot(range(1, len(sims) + 1), _finite(sims), marker="o", color=COLORS[name], label=name)
    axes[-1].set_title(f"subspace emergence Sim_{data['settings']['sim_k']}(t, end)")
    axes[-1].set_xlabel("checkpoint")
    axes[-1].set_ylim(0, 1.05)
    axes[-1].legend(fontsize=7)
    axes[-1].grid(True, alpha=0.3)
    save(fig, "geometry.png")

    fig, ax = plt.subplots(figsize=(8, 4.4))
    _plot_accuracy(ax, data, LOCK_RUNS, "step")
    lock_step = data["settings"]["finetune"]["steps"] // 5
    ax.axvline(lock_step, color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"rank-{data['settings']['finetune']['lock_rank']} subspace lock from step {lock_step}")
    ax.legend(fontsize=8)
    save(fig, "subspace_lock.png")
    return written


def write(data: dict, directory: Path) -> list[Path]:
    """results.json, claims.md and the plots into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULTS_FILE).write_text(json.dumps(to_json(data), indent=1) + "\n")
    (directory / TABLE_FILE).write_text(markdown(data))
    return [directory / RESULTS_FILE, directory / TABLE_FILE, *plot(data, directory)]
