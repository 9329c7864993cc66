"""The student's rollouts sampled by an in-process vLLM engine (``rollout.engine: vllm``), kept in step with training.

:class:`VllmRollout` saves the student (LoRA adapters merged) to ``<out_dir>/vllm_student/`` once, builds a
``vllm.LLM`` on it (:func:`~opd_fast.trainer.vllm_engine.build_llm`, in this process), and after every optimizer step
:meth:`VllmRollout.sync` pushes the student's new weights into the running engine:

* ``llm.collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)``: the weights go in under
  their checkpoint (transformers) names, and vLLM's loader fuses them (q/k/v, gate/up) and repacks them for its CPU
  kernels. The GPU recipe's ``model.load_weights(...)`` fails on the CPU backend, whose linear layers hold prepacked
  weights; ``reload_weights`` works on both. It needs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  as :func:`build_llm` sets): the iterator is a Python object, not bytes.
* ``reset_prefix_cache()`` afterwards: cached KV blocks of the old weights must not serve the new ones.
* LoRA: the adapters are merged into the pushed weights (W + scale·B·A per adapted matrix, computed without touching
  the trainer's model), so the engine serves plain weights and needs no LoRA support of its own.

Sampling maps ``rollout.*``: temperature, top_p, top_k (0: off), max_new_tokens, stop at the tokenizer's EOS (kept,
as transformers' generate keeps it) and a seed per prompt, derived from the trainer's (seed, rank, step). Padded lm_head
rows (ids ≥ the tokenizer's size) are never sampled (``allowed_token_ids``). With ``logprobs=True`` the engine also
returns log p(y) of each sampled token under the weights that sampled it (vLLM's ``raw_logprobs``: a log-softmax of
the unprocessed logits at temperature 1), the behaviour log-probs of ``loss.mode=sampled_token``.

Under torchrun every rank runs its own engine on its own copy of the student (each rank samples its own prompts, and
the weights are the same on every rank after the optimizer step), so no rank waits for another to sample; the engines
start from one directory that rank 0 writes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from opd_fast.integrations.transformers import causal_lm
from opd_fast.trainer.vllm_engine import build_llm, import_vllm


def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every weight of ``model`` as ``save_pretrained`` names them; a peft (LoRA) model's
    adapters merged into their base weights (W + Δ, Δ from peft's ``get_delta_weight``), its own weights untouched."""
    if not hasattr(model, "peft_config"):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            deltas[name] = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
            if leaf == "weight" and owner in deltas:
                tensor = tensor + deltas[owner].to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def save_for_engine(model, tokenizer, directory: str | Path) -> Path:
    """``model`` (LoRA merged) and ``tokenizer`` as a transformers directory an engine starts from (replaced)."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    causal_lm(model).save_pretrained(directory, state_dict=dict(merged_weights(model)))
    tokenizer.save_pretrained(directory)
    return directory


class VllmRollout:
    """An in-process vLLM engine that samples the student's completions (see the module docstring).

    ``model``: the student (a transformers causal LM, possibly peft-wrapped); ``directory``: where its weights are
    saved for the engine to start from (replaced), unless ``save`` is False: then another process saved the same
    weights there (under torchrun rank 0 does, as transformers' save_pretrained writes on rank 0 only);
    ``vocab_size``: the tokenizer's size (ids at or past it are never sampled); ``max_model_len``: the longest
    prompt + completion (None: the model's).
    """

    def __init__(
        self,
        model,
        tokenizer,
        directory: str | Path,
        *,
        vocab_size: int,
        max_model_len: int | None,
        dtype: str = "fp32",
        kv_cache_gb: float = 0.25,
        seed: int = 0,
        save: bool = True,
    ) -> None:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError(
                "rollout.engine=vllm pushes the student's weights into an engine in this process, as Python objects: "
                "unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        self.vllm = import_vllm()
        lm = causal_lm(model)
        if save:
            save_for_engine(model, tokenizer, directory)
        self.eos_token_id = tokenizer.eos_token_id
        head_rows = lm.get_output_embeddings().weight.shape[0]
        self.allowed = list(range(vocab_size)) if head_rows > vocab_size else None
        self.llm = build_llm(directory, dtype=dtype, max_model_len=max_model_len, kv_cache_gb=kv_cache_gb, seed=seed)

    @torch.no_grad()
    def sync(self, model) -> None:
        """Push ``model``'s current weights (LoRA merged) into the engine; cached prefixes of the old ones go."""
        weights = ((name, tensor.detach()) for name, tensor in merged_weights(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        greedy: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        logprobs: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """(completion ids per prompt, ending with EOS when the model stopped; the log-prob of each sampled token
        under the engine's weights when ``logprobs``, else None). Prompt i samples with seed ``seed + i``."""
        from vllm.inputs import TokensPrompt

        params = [
            self.vllm.SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else top_k,  # 0: off
                seed=None if greedy else seed + i,
                stop_token_ids=[self.eos_token_id],
                logprobs=0 if logprobs else None,
                allowed_token_ids=self.allowed,
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions, token_logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            completions.append(list(sample.token_ids))
            if logprobs:
                token_logprobs.append([entry[t].logprob for t, entry in zip(sample.token_ids, sample.logprobs)])
        return completions, token_logprobs if logprobs else None

    def close(self) -> None:
        """Shut the engine down and free its KV cache."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None
