"""The built-in demo that ``opd-fast train`` runs when no model is given: on-policy distillation end to end
on a 2-core CPU in about a minute and a half, with real transformers models and nothing downloaded.

The task rearranges the letters of random strings (``"cabdeb="`` → ``"bdcbae"``; any arrangement of exactly the
prompt's letters is correct, :class:`~opd_fast.trainer.tasks.AnagramTask`), with a character tokenizer built in
code. Because many answers are correct, the teacher spreads its probability over every letter still to be placed:
SFT on teacher samples learns from one sampled arrangement per prompt, OPD from the teacher's whole distribution
at the states the student itself visits, and the small student cannot copy everything the teacher does. Stages,
each cached in ``<out_dir>/demo/`` so a re-run skips what is done:

1. **Teacher**: a 2-layer Llama (hidden 128) trained by SFT on random arrangements to ≥ 90% held-out accuracy.
   Its lm_head is padded to 32 rows while the tokenizer has 15 tokens, like real model pairs (151936 vs 152064),
   so the padded-vocabulary handling runs for real.
2. **Student**: a smaller 2-layer Llama (hidden 64), briefly cold-started by SFT on teacher samples (it learns
   the format, not yet the task).
3. **OPD**: the student trains on its own samples against the teacher with the configured loss
   (reverse KL by default); this is the run in ``<out_dir>`` (metrics.jsonl, checkpoints, plots).
4. **SFT-only baseline**: the cold-started student trained for the same number of steps by SFT on
   teacher samples (as many teacher tokens per step as OPD's scoring), evaluated on the same schedule.

``<out_dir>/summary.json`` holds the accuracies and ``accuracy_vs_steps.png`` both students' curves;
``benchmarks/demo_seeds.py`` runs the demo for several seeds and states what varies between them.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_fast.trainer.config import TrainConfig
from opd_fast.trainer.config_loader import load_config
from opd_fast.trainer.loop import Trainer
from opd_fast.trainer.plots import plot_accuracy_comparison, read_metrics
from opd_fast.trainer.tasks import AnagramTask

DEMO_TASK = AnagramTask()
# Defaults of the OPD stage, applied under the user's config file and overrides.
DEMO_DEFAULTS = [
    "rollout.batch_size=64",
    f"rollout.max_new_tokens={DEMO_TASK.max_len + 1}",
    "optim.lr=0.003",
    "optim.warmup_steps=10",
    "optim.min_lr_ratio=0.1",
    "train.steps=200",
    "train.eval_every=20",
    "train.log_every=10",
    "train.save_every=50",
    "data.eval_size=256",
]
TEACHER_TARGET_ACCURACY = 0.9


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    vocab_rows: int


TEACHER = ModelSpec(hidden=128, layers=2, heads=4, vocab_rows=32)
STUDENT = ModelSpec(hidden=64, layers=2, heads=4, vocab_rows=0)  # 0: exactly the tokenizer's size
TEACHER_STEPS, TEACHER_LR = 600, 3e-3
COLD_START_STEPS = 30


def build_tokenizer(characters: str):
    """A character-level transformers tokenizer: <pad>, <bos>, <eos>, <unk>, then one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(characters))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def demo_vocab_size() -> int:
    """The number of tokens of the demo's tokenizer (known before any model exists)."""
    return len(build_tokenizer(DEMO_TASK.characters))


def create_model(spec: ModelSpec, tokenizer, directory: Path, seed: int) -> Path:
    """A randomly initialized Llama saved with its tokenizer as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_rows or len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def stage_config(base: TrainConfig, out_dir: Path, **sections) -> TrainConfig:
    """A copy of ``base`` with out_dir and the given ``section={key: value}`` changes."""
    config = copy.deepcopy(base)
    config.out_dir = str(out_dir)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config.validate()


def _done(directory: Path) -> dict | None:
    marker = directory / "demo_stage.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(directory: Path, info: dict) -> None:
    (directory / "demo_stage.json").write_text(json.dumps(info, indent=2))


def accuracy_curve(metrics_path: Path) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r["eval/student_accuracy"]) for r in read_metrics(metrics_path) if "eval/student_accuracy" in r
    ]
    return [p[0] for p in points], [p[1] for p in points]


@dataclass(frozen=True)
class DemoModels:
    """The demo's cached models: the trained teacher, the student's random init and its cold start."""

    task: AnagramTask
    teacher: Path
    student_init: Path
    student_cold_start: Path
    teacher_info: dict
    cold_info: dict


def _plain_demo_config(config: TrainConfig) -> TrainConfig:
    """The demo's defaults with the user's device, seed and backend, and none of the user's recipe switches:
    stages 1 and 2 are the same for every OPD variant run on top of them (and cached once)."""
    plain = load_config(None, DEMO_DEFAULTS, out_dir=config.out_dir, seed=config.seed, device=config.device)
    plain.loss.backend = config.loss.backend
    return plain


def prepare_models(config: TrainConfig, *, log=print) -> DemoModels:
    """Stages 1 and 2 of the demo (teacher SFT, student cold start), each skipped when cached."""
    config = _plain_demo_config(config)
    demo_dir = Path(config.out_dir) / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    task = DEMO_TASK
    tokenizer = build_tokenizer(task.characters)

    teacher_dir = demo_dir / "teacher"
    teacher_info = _done(teacher_dir)
    if teacher_info is None:
        log(f"demo 1/4: training the teacher by SFT on the task's answers ({TEACHER_STEPS} steps)")
        init = create_model(TEACHER, tokenizer, demo_dir / "teacher_init", seed=config.seed)
        stage = stage_config(
            config,
            demo_dir / "teacher_sft",
            student={"path": str(init)},
            teacher={"path": None},
            loss={"mode": "sft"},
            rollout={"source": "reference"},
            optim={"lr": TEACHER_LR},
            train={"steps": TEACHER_STEPS, "eval_every": 100, "save_every": TEACHER_STEPS},
        )
        trainer = Trainer(stage, task=task, label="demo 1/4 teacher SFT")
        trainer.train()
        trainer.export(teacher_dir)
        teacher_info = {"accuracy": trainer.evaluate(), "steps": TEACHER_STEPS}
        if teacher_info["accuracy"] < TEACHER_TARGET_ACCURACY:
            raise RuntimeError(
                f"the demo teacher reached only {teacher_info['accuracy']:.1%} held-out accuracy "
                f"(target {TEACHER_TARGET_ACCURACY:.0%}); rerun with another seed=..."
            )
        _mark_done(teacher_dir, teacher_info)
    else:
        log(f"demo 1/4: teacher cached in {teacher_dir}")

    init_dir, cold_dir = demo_dir / "student_init", demo_dir / "student_cold_start"
    cold_info = _done(cold_dir)
    if cold_info is None:
        log(f"demo 2/4: creating the student and cold-starting it on teacher samples ({COLD_START_STEPS} steps)")
        create_model(STUDENT, tokenizer, init_dir, seed=config.seed + 1)
        stage = stage_config(
            config,
            demo_dir / "cold_start",
            student={"path": str(init_dir)},
            teacher={"path": str(teacher_dir)},
            loss={"mode": "sft"},
            rollout={"source": "teacher"},
            train={"steps": COLD_START_STEPS, "eval_every": COLD_START_STEPS, "save_every": COLD_START_STEPS},
        )
        trainer = Trainer(stage, task=task, label="demo 2/4 cold start")
        initial = trainer.evaluate()
        trainer.train()
        trainer.export(cold_dir)
        cold_info = {"initial_accuracy": initial, "accuracy": trainer.evaluate(), "steps": COLD_START_STEPS}
        _mark_done(cold_dir, cold_info)
    else:
        log(f"demo 2/4: cold-started student cached in {cold_dir}")
    return DemoModels(task, teacher_dir, init_dir, cold_dir, teacher_info, cold_info)


def run_demo(config: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """All stages of the demo; returns the summary written to ``<out_dir>/summary.json``."""
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    demo_dir = out_dir / "demo"
    steps = config.train.steps
    log(f"demo: writing to {out_dir} (choose with --out DIR); teacher and cold-started student cached in {demo_dir}")
    models = prepare_models(config, log=log)
    task, teacher_dir, cold_dir = models.task, models.teacher, models.student_cold_start
    summary: dict = {
        "task": f"rearrange the letters of strings of {task.min_len}-{task.max_len} letters "
        f"({task.alphabet[0]}-{task.alphabet[-1]}); any arrangement of exactly those letters is correct",
        "steps": steps,
        "loss_mode": config.loss.mode,
        "seed": config.seed,
        "teacher_accuracy": models.teacher_info["accuracy"],
        "student_accuracy_initial": models.cold_info["initial_accuracy"],
        "student_accuracy_before": models.cold_info["accuracy"],
        "cold_start_steps": models.cold_info["steps"],
    }

    log(f"demo 3/4: on-policy distillation ({config.loss.mode}) for {steps} steps")
    teacher = {"path": None} if config.teacher.self_distill else {"path": str(teacher_dir)}
    opd_config = stage_config(config, out_dir, student={"path": str(cold_dir)}, teacher=teacher)
    opd = Trainer(opd_config, task=task, label=f"demo 3/4 OPD {config.loss.mode}")
    opd.train(resume=resume and (out_dir / "checkpoints" / "latest").is_file())
    opd.export(out_dir / "student_final")
    summary["student_accuracy_after"] = opd.evaluate()

    log(f"demo 4/4: SFT-only baseline on teacher samples for {steps} steps")
    sft_dir = demo_dir / "sft_only"
    sft_config = stage_config(
        config,
        sft_dir,
        student={"path": str(cold_dir)},
        teacher={"path": str(teacher_dir), "self_distill": False},
        data={"teacher_template": "{prompt}"},
        loss={"mode": "sft", "token_keep": 1.0, "reward_mix": 1.0, "entry_clip": None},
        rollout={"source": "teacher", "on_policy_fraction": 1.0},
    )
    sft = Trainer(sft_config, task=task, label="demo 4/4 SFT-only")
    sft.train(resume=resume and (sft_dir / "checkpoints" / "latest").is_file())
    sft.export(sft_dir / "student_final")
    summary["sft_only_accuracy_after"] = sft.evaluate()
    summary["demo_seconds"] = round(time.perf_counter() - started, 1)

    plot_accuracy_comparison(
        {
            f"OPD ({config.loss.mode})": accuracy_curve(out_dir / "metrics.jsonl"),
            "SFT-only on teacher samples": accuracy_curve(sft_dir / "metrics.jsonl"),
        },
        out_dir / "accuracy_vs_steps.png",
        "demo: held-out accuracy of the cold-started student",
        reference={f"teacher {summary['teacher_accuracy']:.0%}": summary["teacher_accuracy"]},
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
