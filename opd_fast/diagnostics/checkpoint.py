"""Reading checkpoints for the diagnostics: safetensors only, one tensor at a time.

Checkpoints are read with ``safetensors`` only (never ``torch.load``, which can run code from a file), one
matrix at a time, so memory stays at a few copies of the largest matrix. In a directory only the model's
weights are read: the shards its index names, else transformers' ``model*.safetensors`` files; the bundled
trainer's checkpoint folders keep RNG states, the reused rollout and subspace-lock bases in other
.safetensors files next to ``model.safetensors``, which are not weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class DiagnosticsError(ValueError):
    """A checkpoint cannot be read or compared; the message names the file and the fix."""


def _safe_open(file: Path):
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise DiagnosticsError("reading checkpoints needs safetensors: pip install safetensors") from None
    try:
        return safe_open(str(file), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise DiagnosticsError(
            f"cannot read {file}: {exc} (is it a complete, uncorrupted .safetensors file?)"
        ) from None


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DiagnosticsError(
            f"cannot read the shard index {index}: {type(exc).__name__}: {exc} "
            "(expected JSON with a 'weight_map' of tensor name -> shard file)"
        ) from None
    files = [index.parent / shard for shard in shards]
    for file in files:
        if not file.is_file():
            raise DiagnosticsError(f"{index} lists the shard {file.name}, but {file} does not exist")
    return files


def _checkpoint_files(path: Path) -> list[Path]:
    """The .safetensors files that make up the checkpoint at ``path``."""
    if not path.exists():
        raise DiagnosticsError(
            f"checkpoint not found: {path} (pass a model directory with *.safetensors or a .safetensors file)"
        )
    if path.is_file():
        if path.name.endswith(".safetensors"):
            return [path]
        if path.name.endswith(".safetensors.index.json"):
            return _index_shards(path)
        raise DiagnosticsError(
            f"{path} is not a .safetensors file; diagnose reads only safetensors (torch.load can run code "
            "from the file): re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    indices = sorted(path.glob("*.safetensors.index.json"))
    if len(indices) > 1:
        names = ", ".join(index.name for index in indices)
        raise DiagnosticsError(f"{path} holds several shard indices ({names}); pass the index file to use")
    if indices:
        return _index_shards(indices[0])
    # Without transformers' names (a lone adapter_model.safetensors, files saved by hand) every file is weights.
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(others)}: re-save with save_pretrained(..., safe_serialization=True); "
            "diagnose never uses torch.load)"
            if others
            else ""
        )
        raise DiagnosticsError(f"no *.safetensors file in the directory {path}{hint}")
    return files


class Checkpoint:
    """Lazy, read-only view of the tensors of a safetensors checkpoint.

    ``path``: a .safetensors file, a shard index (``*.safetensors.index.json``), or a model directory
    holding either (sharded checkpoints are found through their index; see the module docstring for which
    files of a directory are weights). Only headers are read here; :meth:`load` memory-maps one tensor at a
    time. ``ignored``: the directory's other .safetensors files, which are not read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        files = _checkpoint_files(self.path)
        self.ignored = sorted(set(self.path.glob("*.safetensors")) - set(files)) if self.path.is_dir() else []
        for file in files:
            handle = _safe_open(file)
            names = handle.keys()  # a safe_open handle is not iterable
            for name in names:
                if name in self._file_of:
                    raise DiagnosticsError(
                        f"tensor {name!r} is stored twice, in {self._file_of[name]} and {file}; "
                        "pass the one file or the shard index to use"
                    )
                self._file_of[name] = file
            self._handles[file] = handle

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype code, e.g. "BF16", "F32"."""
        return self._handles[self._file_of[name]].get_slice(name).get_dtype()

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, on the CPU."""
        file = self._file_of[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as exc:  # SafetensorError and friends: report which file is broken
            raise DiagnosticsError(f"cannot read tensor {name!r} from {file}: {exc}") from None


def _natural_key(name: str) -> list[int | str]:
    # layers.2 before layers.10; split() alternates text and digits, so positions never mix int and str.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def common_matrices(
    checkpoints: Sequence[Checkpoint], include: re.Pattern | None
) -> tuple[list[str], list[dict], list[dict]]:
    """(names of the 2-D float matrices in every checkpoint with one shape, skipped, mismatched)."""
    names = sorted(set().union(*(c.names for c in checkpoints)), key=_natural_key)
    common, skipped, mismatched = [], [], []
    for name in names:
        if include is not None and not include.search(name):
            continue
        missing = [str(c.path) for c in checkpoints if name not in c]
        if missing:
            skipped.append({"name": name, "reason": f"missing from {', '.join(missing)}"})
            continue
        shapes = [c.shape(name) for c in checkpoints]
        dtypes = {c.dtype(name) for c in checkpoints}
        if any(len(shape) != 2 for shape in shapes):
            skipped.append({"name": name, "reason": f"{len(shapes[0])}-D, not a matrix"})
        elif not dtypes <= _FLOAT_DTYPES:
            skipped.append({"name": name, "reason": f"dtype {'/'.join(sorted(dtypes))} is not floating point"})
        elif len(set(shapes)) > 1:
            mismatched.append({"name": name, "shapes": [list(shape) for shape in shapes]})
        else:
            common.append(name)
    return common, skipped, mismatched
