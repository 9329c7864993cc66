"""One rank of the 2-process DDP test (tests/test_trainer.py): trains two steps under torchrun on the CPU
and writes a checksum of its weights, before and after, to <out>/rank<r>.json."""

import json
import sys

import torch
import torch.distributed as dist
from worker_exit import exit_without_finalizing

from opd_fast.trainer import Trainer, load_config


def checksum(model) -> str:
    return repr(sum(float(p.detach().double().sum()) for p in model.parameters()))


def main(student: str, teacher: str, out: str) -> None:
    overrides = [
        f"student.path={student}",
        f"teacher.path={teacher}",
        "device=cpu",
        "rollout.batch_size=4",
        "rollout.max_new_tokens=10",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.save_every=2",
        "data.eval_size=8",
        "optim.lr=0.01",
    ]
    trainer = Trainer(load_config(None, overrides, out_dir=out), progress=False)
    initial = checksum(trainer.student)
    trainer.train()
    record = {"initial": initial, "weights": checksum(trainer.student), "world_size": dist.get_world_size()}
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as handle:
        json.dump(record, handle)
    trainer.close()  # the trainer made the process group (torchrun): it destroys it
    assert not dist.is_initialized()
    exit_without_finalizing()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
