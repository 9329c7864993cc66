"""rollout.engine=vllm for real: the student's completions sampled by an in-process vLLM engine that receives the
student's weights after every optimizer step (LoRA merged), against the trainer's own forward.

Needs vLLM (marker ``vllm``), in its own environment on the CPU (``bash .ci/vllm``); skipped elsewhere.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; the vllm tier runs in its own environment (bash .ci/vllm)"
)

# tests/, for the conftest that test_vllm_teacher imports: torchrun starts this file by path (see the last test).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_vllm_teacher import CHARACTERS, _llama

from opd_fast.trainer import Trainer, load_config
from opd_fast.trainer.demo import build_tokenizer
from opd_fast.trainer.rollout import encode_prompts, generate

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_rollout_models")
    tokenizer = build_tokenizer(CHARACTERS)
    teacher = _llama(root / "teacher", tokenizer, hidden=128, heads=4, seed=0, head_gain=20.0)
    student = _llama(root / "student", tokenizer, hidden=64, heads=2, seed=1, head_gain=5.0)
    return {"teacher": str(teacher), "student": str(student)}


def _overrides(models, *extra) -> list[str]:
    return [
        f"student.path={models['student']}",
        f"teacher.path={models['teacher']}",
        "rollout.engine=vllm",
        "rollout.kv_cache_gb=0.125",
        "loss.mode=sampled_token",
        "rollout.reuse=2",
        "data.task=reverse",
        "data.eval_size=8",
        "rollout.batch_size=8",
        "rollout.max_new_tokens=8",
        "train.steps=4",
        "train.log_every=1",
        "train.eval_every=100",
        "train.save_every=100",
        "optim.lr=0.02",
        "optim.schedule=constant",
        *extra,
    ]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_behaviour_logprobs_equal_the_trainers_after_a_sync(models, tmp_path, lora):
    """Two optimizer steps (one rollout, reused), then a new rollout from the engine after the weight push: the
    engine's log-probs of its sampled tokens equal the trainer's own forward of the student within 1e-5, and differ
    from the initial weights' (so a missing push would fail). With LoRA the pushed weights are the merged ones. The
    engine's greedy completions are transformers' greedy ones."""
    extra = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"] if lora else []
    config = load_config(None, _overrides(models, *extra), out_dir=str(tmp_path), device="cpu")
    trainer = Trainer(config, progress=False)
    try:
        initial = copy.deepcopy(trainer.student.state_dict())
        for step in range(2):
            trainer.train_step(step, diagnostics=False)
        assert trainer._engine_stale
        batch = trainer.make_rollouts(trainer._seed_step(2), "student")[0]
        assert not trainer._engine_stale
        mask = batch.completion_mask
        engine, ours = batch.behaviour_logprobs, trainer._behaviour_logprobs(batch)
        error = (engine - ours)[mask].abs().max().item()
        print(f"\n{'lora' if lora else 'full'}: max |engine - trainer| behaviour log-prob {error:.2e}")
        assert error <= 1e-5

        prompts = encode_prompts(trainer.tokenizer, trainer.eval_examples)
        options = dict(max_new_tokens=8, greedy=True, vocab_size=trainer.vocab_size)
        greedy, _ = trainer._engine_generate(prompts, **options)
        assert greedy == generate(trainer.student, trainer.tokenizer, prompts, **options)

        trainer.student.load_state_dict(initial)
        assert (trainer._behaviour_logprobs(batch) - engine)[mask].abs().max().item() > 1e-3
    finally:
        trainer.close()


def test_every_rank_runs_its_own_engine_under_torchrun(models, tmp_path):
    """rollout.engine=vllm on 2 CPU ranks (torchrun, gloo): each rank samples its own prompts with its own engine,
    and after DDP's averaged steps both ranks hold the same weights."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    command += [__file__, models["student"], models["teacher"], str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["completions"] != ranks[1]["completions"]  # their own prompts and samples


def _ddp_rank(student: str, teacher: str, out: str) -> None:
    """One rank of the torchrun test: two optimizer steps with rollout.engine=vllm; writes its rollouts' first
    completions and a checksum of its weights to <out>/rank<r>.json."""
    import torch.distributed as dist

    config = load_config(None, _overrides({"student": student, "teacher": teacher}), out_dir=out, device="cpu")
    config.train.steps = 2
    trainer = Trainer(config, progress=False)
    trainer.train()
    record = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "weights": repr(sum(float(p.detach().double().sum()) for p in trainer.student.parameters())),
        "completions": [batch.completions for batch in trainer._rollouts],
    }
    Path(out, f"rank{record['rank']}.json").write_text(json.dumps(record))
    trainer.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_rank(*sys.argv[1:4])
