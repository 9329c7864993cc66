"""The trainer's OPD recipes on the built-in demo task, each switch against the plain OPD run, measured.

    python benchmarks/recipes_demo.py [--out runs/recipes] [--steps 200] [--docs docs]

Builds (or reuses, from ``--out``) the demo's teacher and cold-started student, runs the OPD stage once per
variant with the same seed, steps and evaluation schedule, and writes ``<docs>/recipes.json`` (final
accuracy, curves and wall time per variant), ``<docs>/recipes_accuracy.png`` and ``<docs>/recipes_overlap.png``.
Not a test: it takes several minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from opd_fast.trainer import Trainer, load_config
from opd_fast.trainer.demo import DEMO_DEFAULTS, prepare_models
from opd_fast.trainer.plots import plot_accuracy_comparison, read_metrics

PRIVILEGED = ["teacher.self_distill=true", "data.teacher_template={answer}={prompt}"]

# name -> (starting student: "cold" (the cached cold start) or "init" (random), overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "OPD reverse KL (baseline)": ("cold", []),
    "OPSD: self-distillation, answer as privileged context": ("cold", PRIVILEGED),
    "OPSD, forward KL with entry clip 0.05": ("cold", [*PRIVILEGED, "loss.mode=forward_kl", "loss.entry_clip=0.05"]),
    "no cold start (random-init student)": ("init", []),
    "in-run cold start: 30 format-filtered SFT steps": (
        "init",
        ["train.cold_start_steps=30", "data.format_filter=task"],
    ),
    "λ = 0.5: half the batches teacher-sampled": ("cold", ["rollout.on_policy_fraction=0.5"]),
    "prompt selection: best 50% of 1024 by overlap, dedup": (
        "cold",
        ["data.select_pool=1024", "data.select_keep=0.5", "data.dedup_threshold=0.5"],
    ),
    "token sparsification ρ=0.5, top divergence": ("cold", ["loss.token_keep=0.5"]),
    "token sparsification ρ=0.5, random": ("cold", ["loss.token_keep=0.5", "loss.token_select=random"]),
    "sampled-token OPD": ("cold", ["loss.mode=sampled_token"]),
    "sampled-token + verifiable reward, α = 0.5": ("cold", ["loss.mode=sampled_token", "loss.reward_mix=0.5"]),
}


def _curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot(results: dict, steps: int, docs: Path) -> None:
    plot_accuracy_comparison(
        {name: tuple(r["accuracy_curve"]) for name, r in results.items()},
        docs / "recipes_accuracy.png",
        f"demo task: held-out accuracy per recipe ({steps} steps)",
        legend_outside=True,
    )
    plot_accuracy_comparison(
        {name: tuple(r["overlap_mass_curve"]) for name, r in results.items()},
        docs / "recipes_overlap.png",
        "student's top-3 overlap mass with its teacher",
        ylabel="overlap mass (student)",
        legend_outside=True,
    )


def main(out: Path, steps: int, docs: Path) -> dict:
    base = load_config(None, [*DEMO_DEFAULTS, f"train.steps={steps}", "device=cpu"], out_dir=str(out))
    models = prepare_models(base)
    results = {}
    for index, (name, (start, overrides)) in enumerate(VARIANTS.items()):
        student = models.student_cold_start if start == "cold" else models.student_init
        teacher = [] if "teacher.self_distill=true" in overrides else [f"teacher.path={models.teacher}"]
        config = load_config(
            None,
            [*DEMO_DEFAULTS, f"train.steps={steps}", "device=cpu", f"student.path={student}", *teacher, *overrides],
            out_dir=str(out / f"variant{index:02d}"),
        )
        started = time.perf_counter()
        trainer = Trainer(config, task=models.task, progress=False)
        trainer.train()
        records = read_metrics(Path(config.out_dir) / "metrics.jsonl")
        results[name] = {
            "overrides": overrides,
            "start": start,
            "accuracy_before": records[0]["eval/student_accuracy"],
            "accuracy_after": trainer.evaluate(),
            "accuracy_curve": _curve(records, "eval/student_accuracy"),
            "overlap_mass_curve": _curve(records, "overlap/mass_student"),
            "seconds": round(time.perf_counter() - started, 1),
            **{k: v for k, v in records[0].items() if k.startswith("selection/")},
        }
        print(
            f"{name}: {results[name]['accuracy_before']:.3f} -> {results[name]['accuracy_after']:.3f} "
            f"({results[name]['seconds']} s)",
            flush=True,
        )
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "recipes.json").write_text(json.dumps({"steps": steps, "variants": results}, indent=2))
    plot(results, steps, docs)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--steps", type=int, default=200)  # the demo's OPD steps
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from <docs>/recipes.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.docs / "recipes.json").read_text())
        plot(saved["variants"], saved["steps"], args.docs)
    else:
        main(args.out, args.steps, args.docs)
