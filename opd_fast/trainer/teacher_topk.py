"""Offline teacher top-k: a JSONL of sequences scored once by a teacher (in-process vLLM or a server, any
:class:`~opd_fast.trainer.teacher_server.TopKScorer`), stored in shards, and read back by the trainer
(``teacher.topk_dir``) for off-policy distillation on those sequences or as a cold start.

Input, one JSON object a line, either
  * ``{"input_ids": [ids], "start": s}``: token ids; tokens ``s`` onwards are scored (``start`` defaults to 1), or
  * ``{"prompt": text, "completion": text}``: tokenized as the trainer does (the prompt with the tokenizer's special
    tokens, the completion without, then EOS); the completion's tokens are scored, or
  * ``{"text": text}``: tokenized with special tokens; every token after the first is scored.

Output, in ``--out DIR``: ``manifest.json`` (the input's SHA-256, k, the shard size, the number of sequences and
shards, the teacher) and ``shard-00000.safetensors``, ... holding ``shard_size`` sequences each, ragged, packed:

    input_ids      int64   [Σ len]          the sequences, concatenated; sequence_offsets int64 [n + 1]
    starts         int64   [n]              the first scored token of each
    topk_ids       int32   [Σ (len − start), k]   the teacher's top-k ids at each scored token, by log-prob descending
    topk_logprobs  float32 [Σ (len − start), k]   their log-probs
    token_logprobs float32 [Σ (len − start)]      the log-prob of the sequence's own token

Why safetensors rather than Arrow (``datasets``): the trainer needs tensors, and safetensors hands them to torch
as they are (typed, shaped arrays read through mmap), with no conversion from Arrow's nested list columns; it is
already installed with transformers, so the main environment gains no dependency; and one file per shard,
written to a temporary name and renamed when complete, makes resuming trivial: a shard whose file exists is done,
anything else is redone. A killed run, started again with the same command, skips the finished shards (the manifest
must match: same input, k and shard size). ``score_offsets`` int64 [n + 1] delimits each sequence's scored rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from opd_fast.trainer.teacher_server import TopKScores

FORMAT = "opd_fast.teacher_topk/1"
MANIFEST = "manifest.json"


class TopKShardError(ValueError):
    """The input or the shard folder cannot be used; the message names the file, the line or the shard."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sequences(path: str | Path, tokenizer=None) -> list[tuple[list[int], int]]:
    """(token ids, first scored token) of every line of the JSONL ``path`` (formats in the module docstring);
    ``tokenizer`` is needed for text lines."""
    sequences = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TopKShardError(f"{where}: not JSON ({exc})") from None
            sequences.append(_sequence(row, tokenizer, where))
    if not sequences:
        raise TopKShardError(f"{path} holds no sequences")
    return sequences


def _sequence(row, tokenizer, where: str) -> tuple[list[int], int]:
    if not isinstance(row, dict):
        raise TopKShardError(f"{where}: expected an object, got {type(row).__name__}")
    if "input_ids" in row:
        ids, start = row["input_ids"], row.get("start", 1)
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TopKShardError(f"{where}: input_ids must be a list of integers")
    elif "prompt" in row or "text" in row:
        if tokenizer is None:
            raise TopKShardError(f"{where}: a text line needs a tokenizer (--tokenizer, or the teacher's directory)")
        if "prompt" in row:
            prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
            completion = tokenizer(row.get("completion", ""), add_special_tokens=False)["input_ids"]
            ids, start = prompt + completion + [tokenizer.eos_token_id], len(prompt)
        else:
            ids, start = tokenizer(row["text"], add_special_tokens=True)["input_ids"], 1
    else:
        raise TopKShardError(f"{where}: expected input_ids, prompt (+ completion) or text; got keys {sorted(row)}")
    if not isinstance(start, int) or not 1 <= start < len(ids):
        raise TopKShardError(f"{where}: start={start!r} must lie in [1, {len(ids) - 1}] (something to score)")
    return list(ids), start


def _pack(sequences: Sequence[tuple[list[int], int]], scores: Sequence[TopKScores], k: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(ids) for ids, _ in sequences])
    scored = torch.tensor([len(ids) - start for ids, start in sequences])
    return {
        "input_ids": torch.tensor([i for ids, _ in sequences for i in ids], dtype=torch.int64),
        "sequence_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "starts": torch.tensor([start for _, start in sequences], dtype=torch.int64),
        "score_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), scored.cumsum(0)]),
        "topk_ids": torch.cat([s.ids for s in scores]).to(torch.int32).reshape(-1, k),
        "topk_logprobs": torch.cat([s.logprobs for s in scores]).to(torch.float32).reshape(-1, k),
        "token_logprobs": torch.cat([s.token_logprobs for s in scores]).to(torch.float32),
    }


def write_topk_shards(
    input_path: str | Path,
    out_dir: str | Path,
    scorer,
    *,
    tokenizer=None,
    shard_size: int = 1024,
    teacher: str = "",
    progress: bool = True,
) -> dict:
    """Score every sequence of ``input_path`` with ``scorer`` (its ``k``) into shards in ``out_dir``; finished shards
    of an earlier run with the same input, k and shard size are kept. Returns the manifest."""
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise TopKShardError(f"the shard size must be positive, got {shard_size}")
    sequences = read_sequences(input_path, tokenizer)
    manifest = {
        "format": FORMAT,
        "input": str(input_path),
        "input_sha256": file_sha256(input_path),
        "k": scorer.k,
        "shard_size": shard_size,
        "sequences": len(sequences),
        "shards": -(-len(sequences) // shard_size),
        "teacher": teacher,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        earlier = json.loads(manifest_path.read_text())
        changed = [key for key in ("input_sha256", "k", "shard_size") if earlier.get(key) != manifest[key]]
        if changed:
            raise TopKShardError(
                f"{out_dir} holds shards of another run ({', '.join(f'{key}: {earlier.get(key)}' for key in changed)}"
                f" where this one has {', '.join(str(manifest[key]) for key in changed)}); use another --out"
            )
    else:
        _write_atomically(manifest_path, json.dumps(manifest, indent=2).encode())
    todo = [i for i in range(manifest["shards"]) if not (out_dir / shard_name(i)).exists()]
    done = len(sequences) - sum(len(sequences[i * shard_size : (i + 1) * shard_size]) for i in todo)
    with tqdm(total=len(sequences), initial=done, desc="teacher top-k", unit="seq", disable=not progress) as bar:
        for index in todo:
            chunk = sequences[index * shard_size : (index + 1) * shard_size]
            scores = scorer.score([ids for ids, _ in chunk], [start for _, start in chunk])
            metadata = {"format": FORMAT, "k": str(scorer.k), "first": str(index * shard_size)}
            path = out_dir / shard_name(index)
            partial = path.with_name(path.name + ".partial")
            save_file(_pack(chunk, scores, scorer.k), partial, metadata=metadata)
            os.replace(partial, path)  # atomic: a shard file exists only once it is whole
            bar.update(len(chunk))
    return manifest


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


@dataclass
class TopKSequence:
    """One stored sequence: its ids, its first scored token, and the teacher's :class:`TopKScores` there."""

    ids: list[int]
    start: int
    scores: TopKScores


class TopKShards:
    """The shards of ``directory`` (written by :func:`write_topk_shards`), all in memory: ``len()`` sequences,
    ``self[i]`` a :class:`TopKSequence`, ``k`` the teacher's top-k."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise TopKShardError(
                f"{directory} holds no {MANIFEST}: write the shards with opd-fast teacher-topk IN.jsonl --out "
                f"{directory} ..."
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TopKShardError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.k = int(self.manifest["k"])
        missing = [shard_name(i) for i in range(self.manifest["shards"]) if not (directory / shard_name(i)).exists()]
        if missing:
            raise TopKShardError(
                f"{directory} misses {len(missing)} of {self.manifest['shards']} shards ({missing[0]}, ...): the run "
                "that wrote them stopped; run the same opd-fast teacher-topk command again to finish them"
            )
        self.sequences: list[TopKSequence] = []
        for index in range(self.manifest["shards"]):
            self.sequences.extend(_unpack(load_file(directory / shard_name(index))))
        if len(self.sequences) != self.manifest["sequences"]:
            raise TopKShardError(
                f"{directory}: {len(self.sequences)} sequences in the shards, the manifest says "
                f"{self.manifest['sequences']}"
            )

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> TopKSequence:
        return self.sequences[index]


def _unpack(tensors: dict[str, torch.Tensor]) -> list[TopKSequence]:
    seq_offsets, score_offsets = tensors["sequence_offsets"].tolist(), tensors["score_offsets"].tolist()
    out = []
    for i, start in enumerate(tensors["starts"].tolist()):
        ids = tensors["input_ids"][seq_offsets[i] : seq_offsets[i + 1]].tolist()
        rows = slice(score_offsets[i], score_offsets[i + 1])
        scores = TopKScores(
            tensors["topk_ids"][rows].to(torch.int64),
            tensors["topk_logprobs"][rows],
            tensors["token_logprobs"][rows],
        )
        out.append(TopKSequence(ids, start, scores))
    return out
