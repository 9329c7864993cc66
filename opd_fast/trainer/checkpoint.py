"""Checkpoints written atomically and read back safely.

Layout of ``<out_dir>/checkpoints/``::

    step-00000100/
        model.safetensors      trainable student weights (full model, or the LoRA adapters)
        optimizer.pt           optimizer state dict (torch.save; loaded with weights_only=True)
        rng.safetensors        torch CPU (and CUDA) generator states
        rollout.safetensors    the rollout being reused (rollout.reuse > 1), so a resumed run trains on it
        subspace.safetensors   the captured bases of subspace-locked training (empty before the capture)
        trainer_state.json     step, scheduler, Python RNG state, config, that rollout's texts
    latest                     the name of the newest complete checkpoint

A checkpoint is written into ``step-XXXXXXXX.tmp-<pid>`` and renamed only once every file is flushed
and fsync'ed, then ``latest`` is replaced atomically; a process killed at any moment leaves the previous
``latest`` intact. Loading checks every file and names the one that is missing or corrupt.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = (
    "model.safetensors",
    "optimizer.pt",
    "rng.safetensors",
    "trainer_state.json",
)
ROLLOUT_FILE, SUBSPACE_FILE = "rollout.safetensors", "subspace.safetensors"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights that training changes: all of them, or only the LoRA adapters under peft."""
    if hasattr(model, "get_base_model"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    return _unique_storages(state)


def _unique_storages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): store each storage once."""
    seen: dict[tuple[int, int], str] = {}
    unique = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen[key] = name
        unique[name] = tensor.detach().cpu().contiguous()
    return unique


def fsdp_full_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(model, optimizer) state dicts of an FSDP2 student, unsharded, on the CPU of rank 0 (empty elsewhere).
    A collective: every rank calls it. The model's keys are the plain model's, so its checkpoint reads as any
    other; the optimizer's state is keyed by parameter name (torch.distributed.checkpoint's full format)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def fsdp_full_model_state(model) -> dict[str, torch.Tensor]:
    """:func:`fsdp_full_state` of the model alone (e.g. to export it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_fsdp_state(model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Every rank shards the full state dicts it read into its FSDP2 student and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    if hasattr(model, "get_base_model"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not match the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _is_tied(model, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    tensor = params.get(name)
    return tensor is not None and any(other is tensor for key, other in params.items() if key != name)


# Teacher tensors that are the student's own (same prompts) are stored once and restored from these.
_SHARED_WITH_STUDENT = {
    "teacher_input_ids": "input_ids",
    "teacher_attention_mask": "attention_mask",
    "teacher_positions": "student_positions",
}


def _rollout_tensors(rollouts) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, batch in enumerate(rollouts):
        for name in batch.TENSORS:
            value = getattr(batch, name)
            shared = _SHARED_WITH_STUDENT.get(name)
            if value is None or (shared is not None and value is getattr(batch, shared)):
                continue
            tensors[f"{i}.{name}"] = value.detach().cpu().contiguous()
    return tensors


def _rollout_texts(rollouts) -> list[dict]:
    return [
        {
            "prompts": [e.prompt for e in b.examples],
            "answers": [e.answer for e in b.examples],
            "completions": b.completions,
            "correct": b.correct,
        }
        for b in rollouts
    ]


def _restore_rollouts(tensors: dict[str, torch.Tensor], texts: list[dict], device) -> list:
    from opd_fast.trainer.rollout import Batch
    from opd_fast.trainer.tasks import Example

    batches = []
    for i, text in enumerate(texts):
        fields = {name: tensors[f"{i}.{name}"].to(device) for name in Batch.TENSORS if f"{i}.{name}" in tensors}
        for teacher_name, student_name in _SHARED_WITH_STUDENT.items():
            fields.setdefault(teacher_name, fields[student_name])
        examples = [Example(p, a) for p, a in zip(text["prompts"], text["answers"])]
        batches.append(Batch(**fields, examples=examples, completions=text["completions"], correct=text["correct"]))
    return batches


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _remove_leftovers(directory: Path, step: int) -> None:
    """Before writing checkpoint ``step``: drop what killed runs left behind — staging directories and
    pointer files (``*.tmp-<pid>``), and checkpoints of steps ≥ ``step`` that ``latest`` never pointed to
    (renamed into place just before a kill; this run is redoing those steps)."""
    current = latest_checkpoint(directory)
    for path in directory.iterdir():
        if ".tmp-" in path.name:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif path.is_dir() and path.name.startswith("step-") and path != current and _step_of(path) >= step:
            shutil.rmtree(path)


def save_checkpoint(
    directory: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    config: dict,
    keep: int,
    rollouts=(),
    subspace=None,
    full_state: tuple[dict, dict] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``directory``; keep the newest ``keep`` ones.

    ``full_state``: the (model, optimizer) state dicts to write instead of ``model``'s and ``optimizer``'s
    (an FSDP2 student's, gathered on every rank first by :func:`fsdp_full_state`).

    Crash safety: every file goes into a staging directory, is fsync'ed, the directory is renamed into place
    and only then is ``latest`` replaced (atomically, via a fsync'ed temporary file). A kill at any moment
    leaves ``latest`` pointing at a complete checkpoint, and nothing ``latest`` points to is ever deleted
    or overwritten.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = directory / name
    if latest_checkpoint(directory) == final:
        raise CheckpointError(f"{final} is the latest checkpoint already; a step is saved once")
    _remove_leftovers(directory, step)
    staging = directory / f"{name}.tmp-{os.getpid()}"
    staging.mkdir()
    if full_state is None:
        save_file(trainable_state(model), staging / MODEL_FILE)
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
    else:
        save_file(_unique_storages(full_state[0]), staging / MODEL_FILE)
        torch.save(full_state[1], staging / OPTIMIZER_FILE)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, staging / RNG_FILE)
    save_file(_rollout_tensors(rollouts), staging / ROLLOUT_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in (subspace or {}).items()}, staging / SUBSPACE_FILE)
    python_state = random.getstate()
    _write_json(
        staging / STATE_FILE,
        {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "python_random": [python_state[0], list(python_state[1]), python_state[2]],
            "config": config,
            "rollout": _rollout_texts(rollouts),
        },
    )
    for file in staging.iterdir():
        _fsync_file(file)
    _fsync_dir(staging)
    os.replace(staging, final)
    _fsync_dir(directory)
    pointer = directory / f"{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name)
    _fsync_file(pointer)
    os.replace(pointer, directory / LATEST)
    _fsync_dir(directory)
    complete = sorted((p for p in directory.glob("step-*") if p.is_dir() and ".tmp-" not in p.name), key=_step_of)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points to {path}, which does not exist")
    return path


def _read_safetensors(file: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file} (truncated or corrupt?): {exc}") from None


def load_checkpoint(
    path: Path, model, optimizer, scheduler, device, fsdp: bool = False
) -> tuple[int, list, dict[str, torch.Tensor]]:
    """Restore model, optimizer, scheduler and RNG states from ``path`` (``fsdp``: into an FSDP2 student, from
    the full state dicts :func:`fsdp_full_state` saved).

    Returns (step, the reused rollout, the subspace-lock bases {} if none were captured)."""
    for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, ROLLOUT_FILE, SUBSPACE_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {path / name} is missing")
    weights = _read_safetensors(path / MODEL_FILE)
    try:
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several types for bad pickles
        raise CheckpointError(f"cannot read {path / OPTIMIZER_FILE} (truncated or corrupt?): {exc}") from None
    rng, rollout_tensors = _read_safetensors(path / RNG_FILE), _read_safetensors(path / ROLLOUT_FILE)
    subspace = _read_safetensors(path / SUBSPACE_FILE, device)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        step = int(state["step"])
        rollouts = _restore_rollouts(rollout_tensors, state["rollout"], device)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read {path / STATE_FILE} (truncated or corrupt?): {exc!r}") from None
    if fsdp:
        _restore(path, "this FSDP student", lambda: _load_fsdp_state(model, optimizer, weights, optimizer_state))
    else:
        _restore(path / MODEL_FILE, "this model", lambda: load_trainable_state(model, weights))
        _restore(path / OPTIMIZER_FILE, "this optimizer", lambda: optimizer.load_state_dict(optimizer_state))
    _restore(path / STATE_FILE, "this scheduler", lambda: scheduler.load_state_dict(state["scheduler"]))
    _restore(path / RNG_FILE, "torch's generator", lambda: torch.set_rng_state(rng["torch_cpu"]))
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_random"]
    _restore(path / STATE_FILE, "Python's generator", lambda: random.setstate((version, tuple(internal), gauss)))
    return step, rollouts, subspace


def _restore(file: Path, what: str, apply) -> None:
    """Run ``apply``, naming ``file`` when its content does not fit (another model, a hand-edited file)."""
    try:
        apply()
    except CheckpointError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{file} does not fit {what}: {exc!r}") from None
