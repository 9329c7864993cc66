"""The bundled trainer: every loss mode on tiny real models loaded from disk, exact resume after a signal,
LoRA, gradient checkpointing, bad configurations, the CLI and a 2-process DDP run on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TASK, tiny_config

from opd_fast.trainer import ConfigError, Trainer, TrainingInterrupted, load_config, run
from opd_fast.trainer.checkpoint import CheckpointError
from opd_fast.trainer.config import overlap_k
from opd_fast.trainer.demo import ModelSpec, build_tokenizer, create_model


def _losses(out_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([], id="reverse_kl"),
        pytest.param(["loss.mode=forward_kl"], id="forward_kl"),
        pytest.param(["loss.mode=jsd", "loss.beta=0.3"], id="jsd"),
        pytest.param(["loss.mode=topk", "loss.top_k=3", "loss.support=union"], id="topk"),
        pytest.param(
            ["loss.mode=topk", "loss.top_k=2", "loss.renormalize=false", "loss.topk_divergence=forward_kl"],
            id="topk-full-logprobs",
        ),
        pytest.param(["loss.mode=sampled_token", "loss.discount=0.9"], id="sampled_token"),
        pytest.param(["loss.mode=sampled_token", "rollout.reuse=2", "loss.ratio_clip=2.0"], id="sampled_token-stale"),
        pytest.param(["loss.mode=sft", "rollout.source=teacher"], id="sft-teacher-samples"),
        pytest.param(["loss.mode=sft", "rollout.source=reference", "teacher.path=null"], id="sft-references"),
        pytest.param(
            ["loss.temperature=2.0", "loss.teacher_temperature=1.5", "optim.grad_accum=2", "optim.schedule=linear"],
            id="temperatures-accum",
        ),
    ],
)
def test_every_loss_mode_trains(models, tmp_path, overrides):
    config = tiny_config(models, tmp_path, *overrides)
    summary = run(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert records[0] == {"step": 0, "eval/student_accuracy": records[0]["eval/student_accuracy"]}
    if config.rollout.source != "reference":
        assert all("overlap/mass_student" in r and 0 <= r["overlap/ratio"] <= 1 for r in records if "loss" in r)
    if config.loss.mode in ("reverse_kl", "forward_kl", "jsd"):  # the student's entropy from the loss's sweep
        assert all(0 < r["entropy"] < 10 for r in records if "loss" in r)
    assert set(summary) >= {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after"}
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "training_curves.png").is_file()
    assert (tmp_path / "student_final" / "config.json").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000004"


@pytest.mark.parametrize(
    "overrides", [[], ["loss.mode=sampled_token", "rollout.reuse=2"]], ids=["rkl", "stale-rollouts"]
)
def test_resume_after_sigterm_reproduces_the_uninterrupted_run(models, tmp_path, monkeypatch, overrides):
    straight = tmp_path / "straight"
    run(tiny_config(models, straight, "train.steps=6", "train.save_every=6", *overrides))

    interrupted = tmp_path / "interrupted"
    config = tiny_config(models, interrupted, "train.steps=6", "train.save_every=6", *overrides)
    original = Trainer.train_step

    def train_step(self, step, diagnostics):
        metrics = original(self, step, diagnostics)
        if step == 2:  # a real SIGTERM mid-run (after 3 steps, in the middle of a reused rollout)
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted) as info:
        run(config)
    assert info.value.step == 3 and (interrupted / "checkpoints" / "step-00000003").is_dir()
    monkeypatch.setattr(Trainer, "train_step", original)
    run(config, resume=True)
    assert _losses(interrupted) == _losses(straight)  # bit for bit


def test_lora_trains_only_adapters(models, tmp_path):
    pytest.importorskip("peft")
    config = tiny_config(models, tmp_path, "lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj, v_proj]")
    trainer = Trainer(config, task=TASK, progress=False)
    frozen = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if not p.requires_grad}
    trainer.train()
    assert frozen and all(torch.equal(frozen[n], p) for n, p in trainer.student.named_parameters() if n in frozen)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoints" / "step-00000004" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    exported = trainer.export(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(exported)
    assert not any("lora_" in name for name, _ in merged.named_parameters())


def test_subspace_locked_training_projects_gradients_and_survives_resume(models, tmp_path):
    config = tiny_config(
        models,
        tmp_path,
        "train.subspace_lock_step=2",
        "train.subspace_lock_rank=2",
        "train.subspace_lock_include=q_proj",
        "train.save_every=3",
    )
    trainer = Trainer(config, task=TASK, progress=False)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["subspace/locked_matrices"] for r in records if "subspace/locked_matrices" in r] == [1]
    ((name, basis),) = trainer.lock.bases.items()
    assert "q_proj" in name and basis.shape[1] == 2
    param = dict(trainer.student.named_parameters())[name]
    trainer.train_step(4, diagnostics=False)  # its backward ran through the projection hooks
    resumed = Trainer(
        tiny_config(
            models,
            tmp_path,
            "train.subspace_lock_step=2",
            "train.subspace_lock_rank=2",
            "train.subspace_lock_include=q_proj",
            "train.save_every=3",
            "train.steps=5",
        ),
        task=TASK,
        progress=False,
    )
    resumed.train(resume=True)
    torch.testing.assert_close(resumed.lock.bases[name], basis)
    grad = torch.randn_like(param)
    projected = resumed.lock.project(name, grad)
    residual = projected - projected @ basis @ basis.T
    assert residual.abs().max() < 1e-5


def test_gradient_checkpointing_gives_the_same_losses(models, tmp_path):
    plain = tiny_config(models, tmp_path / "plain", "train.steps=2")
    checkpointed = tiny_config(models, tmp_path / "ckpt", "train.steps=2", "student.gradient_checkpointing=true")
    run(plain)
    run(checkpointed)
    torch.testing.assert_close(_losses(tmp_path / "ckpt"), _losses(tmp_path / "plain"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["loss.mod=jsd"], r"unknown config key 'loss.mod'; valid keys here: .*mode"),
        (["loss.mode=kl"], r"loss.mode must be one of reverse_kl, forward_kl"),
        (["optim.lr=-1"], r"optim.lr must be in \(0.0, inf\]"),
        (["optim.lr=fast"], r"optim.lr must be a number"),
        (["train.steps=0"], r"train.steps must be a positive integer"),
        (["rollout.top_p=1.5"], r"rollout.top_p must be in"),
        (["loss.mode=sft"], r"loss.mode=sft learns from someone else's completions"),
        (["rollout.source=reference"], r"rollout.source=reference .* only works with loss.mode=sft"),
        (["student.dtype=fp8"], r"student.dtype must be one of fp32, bf16"),
        (["lora.target_modules=q_proj"], r"lora.target_modules must be a list of str"),
        (["student=3"], r"student must be a mapping"),
        (["noequals"], r"must look like section.key=value"),
        (["train.fsdp=true", "lora.enabled=true"], r"train.fsdp shards the student's full weights"),
        (["train.fsdp=true", "train.subspace_lock_step=1"], r"train.subspace_lock_step .* not with train.fsdp"),
    ],
)
def test_bad_configs_are_refused_with_the_key(models, tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(models, tmp_path, *overrides)


def test_bad_paths_and_mismatched_tokenizers(models, tmp_path):
    with pytest.raises(ConfigError, match=r"not a local transformers model directory"):
        Trainer(tiny_config(models, tmp_path, f"teacher.path={tmp_path / 'nowhere'}"), task=TASK)
    other_tokenizer = build_tokenizer(TASK.characters + "k")  # one character more
    other = create_model(ModelSpec(16, 1, 2, 0), other_tokenizer, tmp_path / "other", seed=0)
    with pytest.raises(ConfigError, match="student and teacher tokenizers differ"):
        Trainer(tiny_config(models, tmp_path, f"teacher.path={other}"), task=TASK)
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("loss: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(yaml_file)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["loss.mode=topk", "loss.top_k=100"], r"loss\.top_k=100 exceeds the vocabulary .*\(15 tokens\)"),
        (
            ["train.overlap_k=100"],
            r"train\.overlap_k=100 exceeds the vocabulary .*\(15 tokens\); use train\.overlap_k=15",
        ),
    ],
)
def test_top_k_beyond_the_vocabulary_is_refused_before_training(models, tmp_path, overrides, pattern):
    # Not validate()'s job: the vocabulary is known only once the tokenizer is loaded. Nothing may be written yet.
    with pytest.raises(ConfigError, match=pattern):
        Trainer(tiny_config(models, tmp_path / "run", *overrides), task=TASK)
    assert not (tmp_path / "run").exists()


def test_overlap_k_default_fits_the_vocabulary():
    assert overlap_k(load_config(None), 151665) == 16
    assert overlap_k(load_config(None), 15) == 3  # top-16 of 15 tokens would log 1.0 for every overlap metric
    assert overlap_k(load_config(None, ["train.overlap_k=5"]), 15) == 5


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_model_directory_without_tokenizer_files_is_named(models, tmp_path, role):
    student, teacher = models
    bare = tmp_path / f"{role}_without_tokenizer"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy((student if role == "student" else teacher) / name, bare / name)
    with pytest.raises(ConfigError, match=rf"{role}\.path: .*{bare.name} holds no tokenizer files .*save_pretrained"):
        Trainer(tiny_config(models, tmp_path / "run", f"{role}.path={bare}"), task=TASK)


def test_cpu_threads_follow_the_model_size_unless_set(models, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert Trainer(tiny_config(models, tmp_path / "auto"), task=TASK).cpu_threads == 1  # hidden 16/24: tiny
        torch.set_num_threads(2)
        assert Trainer(tiny_config(models, tmp_path / "set", "train.cpu_threads=2"), task=TASK).cpu_threads == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert Trainer(tiny_config(models, tmp_path / "env"), task=TASK).cpu_threads == 2  # the user's choice stays
    finally:
        torch.set_num_threads(before)


def test_corrupt_checkpoint_is_named(models, tmp_path):
    run(tiny_config(models, tmp_path, "train.steps=2"))
    weights = tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        run(tiny_config(models, tmp_path, "train.steps=3"), resume=True)


def test_cli_train_with_yaml_and_overrides(models, tmp_path):
    student, teacher = models
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"student: {{path: {student}}}\nteacher: {{path: {teacher}}}\nloss: {{mode: jsd, beta: 0.7}}\n"
        "rollout: {batch_size: 4, max_new_tokens: 10}\ndata: {eval_size: 8}\ndevice: cpu\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "opd_fast.cli",
            "train",
            "--config",
            str(config_file),
            "--out",
            str(tmp_path / "run"),
            "train.steps=2",
            "train.log_every=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["loss_mode"] == "jsd"
    bad = subprocess.run([sys.executable, "-m", "opd_fast.cli", "train", "optim.lr=0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.lr must be in" in bad.stderr and "Traceback" not in bad.stderr


def _torchrun(script: str, *args) -> subprocess.CompletedProcess:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(Path(__file__).with_name(script)),
        *map(str, args),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_ddp_two_processes_on_cpu(models, tmp_path):
    student, teacher = models
    out = tmp_path / "ddp"
    result = _torchrun("ddp_worker.py", student, teacher, out)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert checksums[0]["weights"] == checksums[1]["weights"]  # DDP kept the replicas identical
    assert checksums[0]["weights"] != checksums[0]["initial"]  # and they trained
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([json.loads(line) for line in lines if "loss" in json.loads(line)]) == 2  # rank 0 logs, once


def test_fsdp_two_processes_match_ddp_and_resume(models, tmp_path):
    """train.fsdp=true under torchrun: the losses and the saved (full) weights of two steps equal the DDP run's,
    the exported model loads as a plain one, and a resume from the step-1 checkpoint reproduces step 2."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    student, teacher = models
    result = _torchrun("fsdp_train_worker.py", student, teacher, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp, resumed = (_losses(tmp_path / run) for run in ("ddp", "fsdp", "resume"))
    assert len(ddp) == 2 and torch.allclose(torch.tensor(fsdp), torch.tensor(ddp), rtol=1e-5, atol=0)
    assert resumed == fsdp  # exact: the same sharded state, re-read from the full checkpoint
    weights = {
        run: load_file(tmp_path / run / "checkpoints" / "step-00000002" / "model.safetensors")
        for run in ("ddp", "fsdp", "resume")
    }
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    for name, tensor in weights["ddp"].items():
        assert torch.allclose(weights["fsdp"][name], tensor, rtol=1e-4, atol=1e-6), name
        assert torch.equal(weights["resume"][name], weights["fsdp"][name]), name
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "student_final")
    assert type(exported).__name__ == "LlamaForCausalLM"
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, weights["fsdp"][name]), name


def test_fsdp_needs_torchrun(models, tmp_path):
    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(tiny_config(models, tmp_path, "train.fsdp=true"), progress=False)
