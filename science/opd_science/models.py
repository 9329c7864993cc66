"""The models of the reproduction: a small base LM pretrained on the synthetic corpus, and teachers derived from it.

* **Base**: a transformers Llama (a few layers, hidden 128 in the full run) pretrained from random weights by
  next-token prediction on whole documents of :func:`corpus.pretraining_document` (prompt and worked trace
  alike, as pretraining does), with its own short loop: the trainer only trains on completions.
* **Teachers**, each the base trained further by the trainer's SFT on reference completions
  (``rollout.source=reference``), at the pretraining learning rate:
  - ``teacher``: direct-pattern traces to direct prompts: the same "thinking pattern" as the base, stronger;
  - ``incompatible_teacher``: think-pattern traces (the same steps worded the other way, see :mod:`.corpus`) to
    prompts of both templates: a teacher that always thinks its own way, the paper's incompatible pattern, as
    accurate but differently worded.
* ``same_data_teacher``: the base pretrained further on its own corpus (:class:`ContinuedPretrainingSpec`):
  stronger by more of the same data only, nothing the student has not seen (the OPD-success paper's second
  condition: Qwen3-4B (non-thinking) shares its student's training distribution and transfers little).

Everything is cached under ``cache_dir`` in directories named by a hash of what made them, so a second run
(or the same settings in another ``--out``) reuses them and a changed setting retrains only what it affects.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from opd_fast.trainer import Trainer, load_config
from opd_fast.trainer.demo import build_tokenizer

from .corpus import CHARACTERS, CORPUS_VERSION, MAX_COMPLETION_TOKENS, SkillTask, pretraining_document


@dataclass(frozen=True)
class BaseSpec:
    """Architecture and pretraining of the base model."""

    hidden: int
    layers: int
    heads: int
    steps: int
    batch: int
    lr: float
    seed: int = 0


@dataclass(frozen=True)
class TeacherSpec:
    """How a teacher is derived from the base: trainer SFT on reference completions of ``task``."""

    prompt_style: str  # direct, think or mixed
    answer_style: str
    steps: int
    batch: int
    lr: float


@dataclass(frozen=True)
class ContinuedPretrainingSpec:
    """A teacher that is the base pretrained ``steps`` more steps on the same corpus (same recipe, fresh schedule)."""

    steps: int
    batch: int
    lr: float
    seed: int = 1


TEACHERS = ("teacher", "incompatible_teacher", "same_data_teacher")
# Positions of the model: the longest sequence is a hinted prompt (21 characters and BOS) and the longest trace
# (corpus.MAX_COMPLETION_TOKENS = 64), 86 tokens.
MAX_POSITIONS = 128


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_cache_key(spec: BaseSpec) -> str:
    """The base's cache key: its spec, the characters, the corpus's version and the positions, so a base pretrained
    on another corpus (round 1's bare answers) is never reused; the teachers' keys include it."""
    return _key(asdict(spec), CHARACTERS, CORPUS_VERSION, MAX_POSITIONS)


def _done(directory: Path) -> dict | None:
    marker = directory / "science_stage.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(directory: Path, info: dict) -> None:
    (directory / "science_stage.json").write_text(json.dumps(info, indent=2) + "\n")


def _batch(tokenizer, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> document <eos>`` ids and attention mask, [B, T]."""
    ids = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in documents]
    longest = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, sequence in enumerate(ids):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
    return input_ids, attention


def _llama_config(spec: BaseSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def pretrain(spec, directory: Path, *, init: Path | None = None, progress: bool = True) -> dict:
    """Pretrain the base LM from random weights (``spec``: a :class:`BaseSpec`), or the model in ``init`` further
    (a :class:`ContinuedPretrainingSpec`), and save it (model + tokenizer) to ``directory``.

    AdamW (β = 0.9, 0.95, weight decay 0.01), 5% linear warm-up, cosine decay to 10%, gradient clipping 1.
    Returns the stage info (steps, final loss, seconds).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    tokenizer = build_tokenizer(CHARACTERS)
    torch.manual_seed(spec.seed)
    if init is not None:
        model = AutoModelForCausalLM.from_pretrained(init, local_files_only=True)
    else:
        model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, spec.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(spec.seed)
    started = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="pretraining the base LM", file=sys.stderr, disable=not progress)
    for _ in bar:
        input_ids, attention = _batch(tokenizer, [pretraining_document(rng) for _ in range(spec.batch)])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=input_ids.masked_fill(attention == 0, -100))
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.loss.item():.3f}", refresh=False)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "steps": spec.steps,
        "final_loss": loss.loss.item(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def derive_teacher(base: Path, spec: TeacherSpec, directory: Path, work: Path, *, progress: bool = True) -> dict:
    """The base trained further by the trainer's SFT on reference completions; exported to ``directory``."""
    config = load_config(
        None,
        [
            f"student.path={base}",
            "loss.mode=sft",
            "rollout.source=reference",
            f"rollout.batch_size={spec.batch}",
            f"rollout.max_new_tokens={MAX_COMPLETION_TOKENS}",
            f"optim.lr={spec.lr}",
            f"optim.warmup_steps={max(1, spec.steps // 20)}",
            f"train.steps={spec.steps}",
            f"train.eval_every={spec.steps}",
            f"train.save_every={spec.steps}",
            f"train.log_every={max(1, spec.steps // 10)}",
            "data.eval_size=32",
            "device=cpu",
        ],
        out_dir=str(work),
    )
    started = time.perf_counter()
    trainer = Trainer(config, task=SkillTask(spec.prompt_style, spec.answer_style), progress=progress)
    trainer.train()
    trainer.export(directory)
    return {"steps": spec.steps, "seconds": round(time.perf_counter() - started, 1)}


@dataclass(frozen=True)
class Models:
    base: Path
    teachers: dict[str, Path]
    info: dict


def prepare(
    base_spec: BaseSpec,
    teacher_specs: dict[str, TeacherSpec | ContinuedPretrainingSpec],
    cache_dir: Path,
    *,
    progress: bool = True,
    log=print,
) -> Models:
    """The base and the teachers, each trained once and cached under ``cache_dir`` by a hash of its settings."""
    base_key = base_cache_key(base_spec)
    base_dir = cache_dir / f"base-{base_key}"
    info = {"base": _done(base_dir)}
    if info["base"] is None:
        log(f"pretraining the base LM ({base_spec.layers} layers, hidden {base_spec.hidden}) into {base_dir}")
        info["base"] = {"spec": asdict(base_spec), **pretrain(base_spec, base_dir, progress=progress)}
        _mark_done(base_dir, info["base"])
    else:
        log(f"base LM cached in {base_dir}")
    teachers = {}
    for name, spec in teacher_specs.items():
        directory = cache_dir / f"{name}-{_key(base_key, asdict(spec))}"
        info[name] = _done(directory)
        if info[name] is None and isinstance(spec, ContinuedPretrainingSpec):
            log(f"pretraining the base {spec.steps} steps more into the {name.replace('_', ' ')} in {directory}")
            stage = pretrain(spec, directory, init=base_dir, progress=progress)
        elif info[name] is None:
            log(f"deriving the {name.replace('_', ' ')} from the base ({spec.answer_style} answers) into {directory}")
            stage = derive_teacher(
                base_dir, spec, directory, directory.with_name(directory.name + "-work"), progress=progress
            )
        if info[name] is None:
            info[name] = {"spec": asdict(spec), **stage}
            _mark_done(directory, info[name])
        else:
            log(f"{name.replace('_', ' ')} cached in {directory}")
        teachers[name] = directory
    return Models(base_dir, teachers, info)
