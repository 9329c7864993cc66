"""One rank of the 2-process DDP test (tests/trainer/test_trainer.py): trains two steps under torchrun on the CPU
and writes a checksum of its weights, before and after, to <out>/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_train_worker import tiny_trainer  # beside this file; it puts tests/ on sys.path for worker_exit
from worker_exit import exit_without_finalizing


def checksum(model) -> str:
    return repr(sum(float(p.detach().double().sum()) for p in model.parameters()))


def main(student: str, teacher: str, out: str) -> None:
    trainer = tiny_trainer(student, teacher, Path(out), "train.save_every=2")
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
