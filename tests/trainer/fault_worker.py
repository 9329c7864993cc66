"""A training process that SIGKILLs itself at a chosen moment (tests/trainer/test_faults.py).

    python tests/trainer/fault_worker.py MOMENT STEP OUT_DIR OVERRIDE...

MOMENT is where, while writing checkpoint STEP (or, for ``mid-step``, while computing step STEP + 1),
the process kills itself with SIGKILL — no handler, no cleanup, as the OOM killer or a preempted node does:

* ``model-file``: half of ``model.safetensors`` written;
* ``optimizer-file``: half of ``optimizer.pt`` written;
* ``before-rename``: every file written and fsync'ed, the staging directory not yet renamed;
* ``before-pointer``: the checkpoint directory in place, ``latest`` not yet updated;
* ``mid-step``: in the middle of a training step, no checkpoint being written.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import opd_fast.trainer.checkpoint as ckpt
from opd_fast.trainer import Trainer, load_config, run

MOMENT, STEP, OUT_DIR, OVERRIDES = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
writing: list[int] = []  # the step of the checkpoint being written


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def write_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    die()


def save_checkpoint(directory, step, *args, **kwargs):
    writing[:] = [step]
    return original_save_checkpoint(directory, step, *args, **kwargs)


def save_file(tensors, path, *args, **kwargs):
    original_save_file(tensors, path, *args, **kwargs)
    if MOMENT == "model-file" and writing == [STEP] and Path(path).name == ckpt.MODEL_FILE:
        write_half(Path(path))


def torch_save(obj, path, *args, **kwargs):
    original_torch_save(obj, path, *args, **kwargs)
    if MOMENT == "optimizer-file" and writing == [STEP] and Path(path).name == ckpt.OPTIMIZER_FILE:
        write_half(Path(path))


def replace(source, target):
    source, target = Path(source), Path(target)
    if writing == [STEP]:
        if MOMENT == "before-rename" and ".tmp-" in source.name and source.is_dir():
            die()
        if MOMENT == "before-pointer" and target.name == ckpt.LATEST:
            die()
    original_replace(source, target)


def train_step(self, step, diagnostics):
    if MOMENT == "mid-step" and step == STEP:
        die()
    return original_train_step(self, step, diagnostics)


original_save_checkpoint, ckpt.save_checkpoint = ckpt.save_checkpoint, save_checkpoint
original_save_file, ckpt.save_file = ckpt.save_file, save_file
original_torch_save, torch.save = torch.save, torch_save
original_replace, os.replace = os.replace, replace
original_train_step, Trainer.train_step = Trainer.train_step, train_step

run(load_config(None, OVERRIDES, out_dir=OUT_DIR))
raise SystemExit(f"fault_worker: the run finished without reaching the {MOMENT} moment of step {STEP}")
