"""The committed report: ``results.json`` (every measurement), PNG plots and ``claims.md`` (the README table)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from opd_fast._plotting import require_matplotlib

from .claims import THRESHOLDS
from .corpus import SKILLS
from .measure import mean_and_standard_error
from .runs import RUNS

RESULTS_FILE, TABLE_FILE = "results.json", "claims.md"
MAIN_RUNS = ("sft", "opd", "rlvr", "opsd", "offpolicy_sd")
PATTERN_RUNS = ("opd", "opd_incompatible", "opd_incompatible_cold_start", "opd_incompatible_aligned", "opd_same_data")
LOCK_RUNS = ("opd", "opd_lock", "sft", "sft_lock")
GEOMETRY_RUNS = ("sft", "opd_geo", "rlvr_geo", "opd_geo_sparse", "opd_geo_offpolicy", "opd_geo_rlvr_mix")
COLORS = {run.name: f"C{index}" for index, run in enumerate(RUNS)}  # one colour per run in every figure


def _bits(correct: list[bool]) -> str:
    return "".join("1" if c else "0" for c in correct)


def _convert(data: dict, convert) -> dict:
    out = copy.deepcopy(data)
    out["reference_correct"] = {k: convert(v) for k, v in data["reference_correct"].items()}
    for run in out["runs"].values():
        for seed in run["seeds"]:
            if "final_correct" in seed:
                seed["final_correct"] = convert(seed["final_correct"])
    return out


def to_json(data: dict) -> dict:
    """``data`` with the per-problem correctness lists as strings of 0/1 (one character per problem)."""
    return _convert(data, _bits)


def from_json(data: dict) -> dict:
    """The inverse of :func:`to_json`."""
    return _convert(data, lambda bits: [c == "1" for c in bits])


def _seed_accuracies(data: dict, name: str) -> list[float]:
    if name in data["reference_correct"]:
        correct = data["reference_correct"][name]
        return [sum(correct) / len(correct)]
    return [sum(s["final_correct"]) / len(s["final_correct"]) for s in data["runs"][name]["seeds"]]


def _accuracy(data: dict, name: str) -> float:
    values = _seed_accuracies(data, name)
    return sum(values) / len(values)


def _mean_pm(values: list[float], scale: float = 100.0, digits: int = 1, unit: str = "%") -> str:
    """'mean ± standard error over seeds' (the mean alone for one seed)."""
    mean, se = mean_and_standard_error(values)
    return f"{scale * mean:.{digits}f}" + ("" if se is None else f" ± {scale * se:.{digits}f}") + unit


def rollout_tokens(data: dict, name: str) -> list[float]:
    """Mean completion tokens per rollout of run ``name``, per seed (its completions over steps × batch)."""
    finetune = data["settings"]["finetune"]
    steps = finetune["geometry_steps"] if data["runs"][name]["regime"] == "geometry" else finetune["steps"]
    return [s["completion_tokens"] / (steps * finetune["batch"]) for s in data["runs"][name]["seeds"]]


def _time_note(data: dict) -> str:
    """How much of the total went into the models, and the time from an empty cache (stage times recorded when each
    model was trained)."""
    if "prepare_seconds" not in data:
        return ""
    stages = sum((info or {}).get("seconds", 0.0) for info in data["models"].values())
    warm = data["seconds"] - data["prepare_seconds"]
    return (
        f", of which {data['prepare_seconds']:.0f} s preparing the base and the teachers; with every model cached "
        f"about {warm:.0f} s, from an empty cache about {warm + stages:.0f} s (their training took {stages:.0f} s)"
    )


def completion_summary(data: dict) -> str:
    """One sentence: the completions' length in the references and in the accuracy runs' rollouts."""
    settings = data["settings"]
    reference = settings.get("reference_completion_tokens")
    main = [name for name, run in data["runs"].items() if run["regime"] == "main"]
    per_run = {name: sum(rollout_tokens(data, name)) / len(data["runs"][name]["seeds"]) for name in main}
    every = [t for name in main for t in rollout_tokens(data, name)]
    shortest, longest = min(per_run, key=per_run.get), max(per_run, key=per_run.get)
    text = "Completions are worked traces"
    if reference:
        text += (
            f" ({reference['direct']:.1f} tokens on average in the direct pattern's references, "
            f"{reference['think']:.1f} in the think pattern's, {settings['max_completion_tokens']} at most)"
        )
    return (
        text + f"; the accuracy runs' rollouts averaged {sum(every) / len(every):.1f} tokens (per run from "
        f"{per_run[shortest]:.1f}, `{shortest}`, to {per_run[longest]:.1f}, `{longest}`)."
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(data: dict) -> str:
    """The claims as a markdown table: claim (source), the paper's words, our protocol and rule, our numbers (mean ±
    standard error over seeds where there are seeds) and the verdict with its reason."""
    lines = ["| Claim | Paper | Protocol and rule | Ours | Verdict |", "| --- | --- | --- | --- | --- |"]
    for claim in data["claims"]:
        verdict = f"**{claim['verdict']}**" + (f": {claim['reason']}" if claim["reason"] else "")
        thresholds = ", ".join(f"{k} = {v:g}" for k, v in claim["thresholds"].items())
        protocol = f"{claim['protocol']}. *Rule*: {claim['rule']} ({thresholds})"
        cells = [f"{claim['claim']} ({claim['source']})", claim["paper"], protocol, claim["ours"], verdict]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def runs_table(data: dict) -> str:
    """One line per run: seeds, final accuracy (mean ± standard error over seeds), completion tokens, the overlap
    and the update geometry at its end (seed 0), training time (all seeds)."""
    lines = [
        "| Run | seeds | final accuracy | completion tokens | tokens per rollout | overlap ratio, step 0 → end "
        "| bf16 sparsity | srank ΔW | train time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in data["runs"].items():
        seeds = run["seeds"]
        geometry = seeds[0]["geometry"]["overall"]
        if "final_correct" in seeds[0]:
            accuracy = _mean_pm(_seed_accuracies(data, name))
            first, last = seeds[0]["visited_states"][0], seeds[0]["visited_states"][-1]
            overlap = f"{100 * first['overlap_ratio_all']:.1f}% → {100 * last['overlap_ratio_all']:.1f}%"
        else:
            accuracy, overlap = "(geometry run)", "n/a"
        lines.append(
            f"| {run['label'].strip()} (`{name}`) | {len(seeds)} | {accuracy} "
            f"| {_mean_pm([s['completion_tokens'] for s in seeds], 1.0, 0, '')} "
            f"| {_mean_pm(rollout_tokens(data, name), 1.0, 1, '')} | {overlap} "
            f"| {100 * geometry['update_sparsity']:.1f}% | {geometry['stable_rank']:.2f} "
            f"| {sum(s['seconds'] for s in seeds):.0f} s |"
        )
    return "\n".join(lines)


def thresholds_table() -> str:
    """The named thresholds of the verdict rules."""
    return "\n".join(["| threshold | value |", "| --- | --- |"] + [f"| {k} | {v:g} |" for k, v in THRESHOLDS.items()])


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
            f"Base LM: Llama, {base['layers']} layers, hidden {base['hidden']}, pretrained {base['steps']} steps. "
            f"Accuracy runs: {finetune['steps']} steps × {finetune['batch']} rollouts from the base, lr "
            f"{finetune['lr']:g}, the main ones over {settings['seeds']} seeds; held-out accuracy on "
            f"{settings['final_eval_size']} problems (greedy). Geometry runs (the geometry paper's protocol): OPD, "
            f"RLVR and the controls for {finetune['geometry_steps']} steps from the SFT run's final checkpoint at lr "
            f"{finetune['geometry_lr']:g}. RLVR is GRPO with {settings['grpo_group']} samples per prompt. "
            f"Total time {data['seconds']:.0f} s{_time_note(data)}.",
            "",
            completion_summary(data),
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
            "Thresholds of the rules (science/opd_science/claims.py, where their history is kept):",
            "",
            thresholds_table(),
            "",
        ]
    )


def _finite(values):
    return [math.nan if v is None else v for v in values]


def _mean_curve(run: dict) -> list[dict]:
    curves = [s["accuracy_curve"] for s in run["seeds"]]
    keys = ("step", "tokens", "accuracy")
    return [{k: sum(p[k] for p in points) / len(points) for k in keys} for points in zip(*curves)]


def _plot_accuracy(ax, data: dict, names, x: str) -> None:
    """Accuracy curves, averaged over a run's seeds."""
    for name in names:
        run = data["runs"][name]
        points = _mean_curve(run)
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
        visited = data["runs"][name]["seeds"][0]["visited_states"]
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
    for name in ("opd", "sft", "rlvr", "opsd", "opd_incompatible"):
        visited = data["runs"][name]["seeds"][0]["visited_states"]
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
        run = data["runs"][name]["seeds"][0]
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

    names = [n for n in GEOMETRY_RUNS if n in data["runs"]]
    geometry = {n: data["runs"][n]["seeds"][0]["geometry"] for n in names}
    metrics = (
        ("update_sparsity", "bf16 update sparsity"),
        ("principal_mask_overlap_ratio", "principal-mask overlap / α"),
        ("principal_angle_mean_deg", "mean principal angle (°)"),
        ("nss", "normalised spectral shift"),
    )
    fig, axes = plt.subplots(1, len(metrics) + 2, figsize=(24, 4.2))
    for ax, (key, title) in zip(axes, metrics):
        values = _finite([geometry[n]["overall"][key] for n in names])
        ax.bar(range(len(names)), values, color=[COLORS[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[3].set_yscale("log")
    for name in names:
        ranks = [t["stable_rank"] for t in geometry[name]["trajectory"]]
        axes[-2].plot(range(1, len(ranks) + 1), _finite(ranks), marker="o", color=COLORS[name], label=name)
    axes[-2].set_title("stable rank of the cumulative ΔW")
    axes[-2].set_xlabel("checkpoint")
    axes[-2].legend(fontsize=7)
    axes[-2].grid(True, alpha=0.3)
    for name in names:
        sims = geometry[name]["overall"]["sim_k"]
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
