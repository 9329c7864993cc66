"""One rank of the 2-process FSDP2 trainer test (tests/trainer/test_trainer.py), under torchrun on the CPU.

In one process group: two steps with DDP (train.fsdp=false) into <out>/ddp, the same two steps with
train.fsdp=true into <out>/fsdp (checkpoints after each step), then a resume of the FSDP run from its step-1
checkpoint into <out>/resume. The parent compares the logged losses and the saved weights."""

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for worker_exit: torchrun starts this file
from worker_exit import exit_without_finalizing

from opd_fast.trainer import Trainer, load_config


def tiny_trainer(student: str, teacher: str, out: Path, *overrides: str) -> Trainer:
    """Two CPU steps of the tiny models, a checkpoint after each (tests/trainer/ddp_worker.py uses it too)."""
    options = [
        f"student.path={student}",
        f"teacher.path={teacher}",
        "device=cpu",
        "rollout.batch_size=4",
        "rollout.max_new_tokens=10",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.save_every=1",
        "data.eval_size=8",
        "optim.lr=0.01",
        *overrides,
    ]
    return Trainer(load_config(None, options, out_dir=str(out)), progress=False)


def main(student: str, teacher: str, out: str) -> None:
    out = Path(out)
    tiny_trainer(student, teacher, out / "ddp").train()
    sharded = tiny_trainer(student, teacher, out / "fsdp", "train.fsdp=true")
    sharded.train()
    sharded.export(out / "fsdp" / "student_final")
    if dist.get_rank() == 0:  # the FSDP run as if it had stopped after step 1
        (out / "resume" / "checkpoints").mkdir(parents=True)
        shutil.copytree(out / "fsdp/checkpoints/step-00000001", out / "resume/checkpoints/step-00000001")
        (out / "resume/checkpoints/latest").write_text("step-00000001")
        shutil.copy(out / "fsdp/metrics.jsonl", out / "resume/metrics.jsonl")
    dist.barrier()
    tiny_trainer(student, teacher, out / "resume", "train.fsdp=true").train(resume=True)
    dist.destroy_process_group()
    exit_without_finalizing()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
