"""Loading student and teacher models and their tokenizer, the vocabulary they share (every model's output head read
once, so that one the fused losses cannot compute is refused before training), and :class:`HiddenStates`, what
DistributedDataParallel wraps. The final hidden states and the output heads themselves come from
opd_fast.integrations.transformers.

Nothing is ever downloaded: paths must be local transformers model directories.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd_fast.heads import LMHead
from opd_fast.integrations.transformers import final_hidden_states
from opd_fast.trainer.config import ConfigError, LoraConfig, ModelConfig

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _local_dir(path: str, key: str) -> Path:
    directory = Path(path)
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise ConfigError(f"{key}: {directory} is not a local transformers model directory (no config.json there)")
    return directory


# The files a transformers tokenizer is saved as (fast, BPE, SentencePiece, WordPiece, tiktoken).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "vocab.txt",
    "*.tiktoken",
)


def load_tokenizer(model: ModelConfig, key: str):
    """The tokenizer saved beside the model. A directory without one is refused up front: transformers may then
    build an empty tokenizer, and training would die much later, in ``generate`` or in the tokenizer comparison."""
    from transformers import AutoTokenizer

    directory = _local_dir(model.path, key)
    fix = f"save it there with tokenizer.save_pretrained('{directory}')"
    if not any(next(directory.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {directory}: {exc}") from None
    if len(tokenizer) == 0:
        raise ConfigError(f"{key}: the tokenizer in {directory} has no tokens; {fix}")
    return tokenizer


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Distillation compares next-token distributions id by id: both models must tokenize identically."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise ConfigError(
            f"student and teacher tokenizers differ (student {len(s_vocab)} tokens, teacher {len(t_vocab)}; "
            f"only in student: {only_s}, only in teacher: {only_t}, different ids: {moved}); "
            "on-policy distillation needs the same tokenizer for both models"
        )
    for attribute in ("eos_token_id", "pad_token_id", "bos_token_id"):
        s_id, t_id = getattr(student_tokenizer, attribute), getattr(teacher_tokenizer, attribute)
        if s_id != t_id:
            raise ConfigError(f"student and teacher tokenizers disagree on {attribute}: {s_id} vs {t_id}")


def load_causal_lm(model_config: ModelConfig, key: str, device: torch.device):
    """The model of ``model_config.path``; repository code (``auto_map``) runs only with trust_remote_code."""
    from transformers import AutoModelForCausalLM

    directory = _local_dir(model_config.path, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            dtype=TORCH_DTYPES[model_config.dtype],
            local_files_only=True,
            trust_remote_code=model_config.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a causal LM from {directory}: {exc}") from None
    if model_config.gradient_checkpointing:  # renamed to activation checkpointing in transformers 5
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model.to(device)


def apply_lora(model, lora: LoraConfig):
    """Wrap the student's target modules with LoRA adapters; only they train."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("lora.enabled needs peft: pip install 'opd_fast[lora]'") from None
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"lora.target_modules {lora.target_modules} do not match the student's modules: {exc}"
        ) from None


class HiddenStates(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> final hidden states``; what DistributedDataParallel wraps, so
    its gradient hooks see the whole student even though the lm_head is applied inside the loss."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return final_hidden_states(self.model, input_ids, attention_mask)


def shared_vocab_size(tokenizer, student, teacher=None) -> int:
    """The number of real token ids: the tokenizer's length. lm_heads may have extra padded rows
    (e.g. 151936 vs 152064); those are excluded from every loss and from sampling.

    Reads each model's output head with :meth:`LMHead.from_model`, so a model whose head the fused losses
    cannot compute exactly is refused here, before any training."""
    size = len(tokenizer)
    for role, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        try:
            rows = LMHead.from_model(model).vocab_size
        except ValueError as exc:
            raise ConfigError(f"{role}.path: the fused losses cannot compute this model's output head: {exc}") from None
        if rows < size:
            raise ConfigError(
                f"the {role}'s lm_head has {rows} rows but the tokenizer has {size} tokens; the model cannot "
                "produce every token id"
            )
    return size
