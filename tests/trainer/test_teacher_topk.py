"""Offline teacher top-k (opd_fast.trainer.teacher_topk, ``opd-fast teacher-topk``): shards written from a real local
HTTP server that answers what vLLM answered (tests/trainer/test_teacher_server.py's replay), read back exactly, resumed
after the writing process is killed mid-run; and the trainer training from them (teacher.topk_dir), alone or as a cold
start. The in-process engine's path is in tests/trainer/test_vllm_teacher.py (vllm tier).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_teacher_server import (
    RECORDING,
    SEQUENCES,
    STARTS,
    TOKENIZER,
    K,
    RecordedVllm,
    _expected,
    _Handler,
    _read,
)

from opd_fast.cli import main
from opd_fast.trainer import Trainer, load_config
from opd_fast.trainer.config import ConfigError
from opd_fast.trainer.teacher_server import TeacherServer, scores_from_positions
from opd_fast.trainer.teacher_topk import MANIFEST, TopKShardError, TopKShards, shard_name, write_topk_shards

REPEATS = 2  # the 5 recorded sequences twice: 10 lines, 5 shards of 2


class _GatedHandler(_Handler):
    """Answers scoring requests only while the server's gate has permits left; the others wait for a release.
    ``server.arrivals`` counts the scoring requests that came, answered or waiting."""

    def _answer(self, body):
        if body is not None:
            self.server.arrivals += 1
            self.server.gate.acquire()
        super()._answer(body)


def _gated_server(permits: int) -> RecordedVllm:
    server = RecordedVllm()
    server.RequestHandlerClass = _GatedHandler
    server.gate, server.arrivals = threading.Semaphore(permits), 0
    # The request of a killed client is answered into a closed socket once released: a broken pipe, expected.
    server.handle_error = lambda request, address: None
    return server


def _write_input(path: Path) -> Path:
    lines = [{"input_ids": seq, "start": start} for _ in range(REPEATS) for seq, start in zip(SEQUENCES, STARTS)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _assert_shards_hold_the_recording(directory: Path) -> None:
    shards = TopKShards(directory)
    assert shards.k == K and len(shards) == REPEATS * len(SEQUENCES)
    for index, (expected, seq, start) in enumerate(zip(_expected() * REPEATS, SEQUENCES * REPEATS, STARTS * REPEATS)):
        item = shards[index]
        assert item.ids == seq and item.start == start
        assert torch.equal(item.scores.ids, expected.ids) and torch.equal(item.scores.logprobs, expected.logprobs)
        assert torch.equal(item.scores.token_logprobs, expected.token_logprobs)


@pytest.fixture
def server():
    server = RecordedVllm()
    yield server
    server.stop()


def test_shards_round_trip_and_text_lines(server, tmp_path):
    """Written from the server's answers and read back bit for bit; a text line scores as its token ids."""
    source = _write_input(tmp_path / "in.jsonl")
    manifest = write_topk_shards(source, tmp_path / "out", TeacherServer(server.url, K), shard_size=2, progress=False)
    assert manifest["shards"] == 5 and manifest["sequences"] == 10
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST] + [shard_name(i) for i in range(5)]
    _assert_shards_hold_the_recording(tmp_path / "out")

    text = TOKENIZER.decode(SEQUENCES[0], skip_special_tokens=True)
    assert TOKENIZER(text)["input_ids"] == SEQUENCES[0]
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    write_topk_shards(
        tmp_path / "text.jsonl", tmp_path / "text", TeacherServer(server.url, K), tokenizer=TOKENIZER, progress=False
    )
    item = TopKShards(tmp_path / "text")[0]
    expected = scores_from_positions(RECORDING["scored"][1]["prompt_logprobs"], SEQUENCES[0], 1, K, _read)
    assert item.ids == SEQUENCES[0] and item.start == 1
    assert torch.equal(item.scores.ids, expected.ids) and torch.equal(item.scores.logprobs, expected.logprobs)


def test_a_killed_run_resumes_with_the_finished_shards(tmp_path):
    """The CLI, in its own process, writes two shards and waits on the third request: SIGKILL. The reader names the
    missing shards; the same command again scores only the three missing ones, and the result is the recording."""
    server = _gated_server(permits=2)
    source, out = _write_input(tmp_path / "in.jsonl"), tmp_path / "out"
    command = [sys.executable, "-m", "opd_fast.cli", "teacher-topk", str(source), "--out", str(out)]
    command += ["--server", server.url, "--k", str(K), "--shard-size", "2", "--no-progress"]
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        began = time.monotonic()
        while server.arrivals < 3:  # the third waits at the gate
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() - began < 60
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST, shard_name(0), shard_name(1)]
        with pytest.raises(TopKShardError, match=r"misses 3 of 5 shards \(shard-00002.safetensors"):
            TopKShards(out)

        for _ in range(10):
            server.gate.release()
        assert main(command[3:]) == 0
        assert server.arrivals == 3 + 3  # the killed run's three, then shards 2, 3 and 4 only
        _assert_shards_hold_the_recording(out)
    finally:
        for _ in range(10):
            server.gate.release()
        server.stop()


def test_resume_refuses_another_input_or_k(server, tmp_path):
    source = _write_input(tmp_path / "in.jsonl")
    write_topk_shards(source, tmp_path / "out", TeacherServer(server.url, K), shard_size=5, progress=False)
    with pytest.raises(TopKShardError, match=r"holds shards of another run .*shard_size: 5"):
        write_topk_shards(source, tmp_path / "out", TeacherServer(server.url, K), shard_size=2, progress=False)
    with source.open("a") as handle:
        handle.write(json.dumps({"input_ids": SEQUENCES[0], "start": 2}) + "\n")
    with pytest.raises(TopKShardError, match="input_sha256"):
        write_topk_shards(source, tmp_path / "out", TeacherServer(server.url, K), shard_size=5, progress=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "expected an object"),
        ('{"input_ids": [1, 2], "start": 2}', r"start=2 must lie in \[1, 1\]"),
        ('{"input_ids": ["a"]}', "input_ids must be a list of integers"),
        ('{"text": "abc"}', "a text line needs a tokenizer"),
        ('{"ids": [1, 2]}', "expected input_ids, prompt"),
        ("{", "not JSON"),
    ],
)
def test_bad_input_lines_are_named(server, tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(TopKShardError, match=rf"bad.jsonl:1: {message}"):
        write_topk_shards(tmp_path / "bad.jsonl", tmp_path / "out", TeacherServer(server.url, K), progress=False)


# ------------------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("topk_models")
    paths = {}
    for name, hidden, seed in (("student", 32, 1), ("teacher", 64, 0)):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(TOKENIZER),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=TOKENIZER.pad_token_id,
            bos_token_id=TOKENIZER.bos_token_id,
            eos_token_id=TOKENIZER.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(root / name)
        TOKENIZER.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    server = RecordedVllm()
    root = tmp_path_factory.mktemp("topk_shards")
    write_topk_shards(_write_input(root / "in.jsonl"), root / "out", TeacherServer(server.url, K), progress=False)
    server.stop()
    return root / "out"


def _config(models, shards, tmp_path, *extra):
    overrides = [
        f"student.path={models['student']}",
        f"teacher.topk_dir={shards}",
        "loss.mode=topk",
        "data.task=reverse",
        "data.eval_size=4",
        "rollout.batch_size=4",
        "rollout.max_new_tokens=4",
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=100",
        "train.save_every=100",
        "optim.lr=0.01",
        *extra,
    ]
    return load_config(None, overrides, out_dir=str(tmp_path), device="cpu")


def test_trainer_trains_on_the_shards_alone(models, shards, tmp_path):
    """teacher.topk_dir alone: every step's batch is stored sequences, with the stored top-k aligned to them."""
    trainer = Trainer(_config(models, shards, tmp_path), progress=False)
    stored = TopKShards(shards)
    batch = trainer.shard_rollouts(trainer._seed_step(0))[0]
    for row in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row, :length].tolist()
        item = next(s for s in stored.sequences if s.ids == ids)
        n = int(batch.completion_mask[row].sum())
        assert n == len(ids) - item.start and batch.targets[row, :n].tolist() == ids[item.start :]
        assert torch.equal(batch.teacher_topk_ids[row, :n], item.scores.ids)
        assert torch.equal(batch.teacher_topk_logprobs[row, :n], item.scores.logprobs)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    last = trainer.train()
    trainer.close()
    assert last["step"] == 2 and last["loss"] > 0 and "rollout/accuracy" not in last
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))


def test_shards_as_the_cold_start_of_on_policy_training(models, shards, tmp_path):
    """Beside a live teacher, the first train.cold_start_steps steps train on the shards, the rest on-policy."""
    config = _config(models, shards, tmp_path, f"teacher.path={models['teacher']}", "train.cold_start_steps=1")
    trainer = Trainer(config, progress=False)
    trainer.train()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1].get("cold_start") == 1.0 and "rollout/accuracy" not in records[1]
    assert "cold_start" not in records[2] and "rollout/accuracy" in records[2]


def test_topk_dir_configuration_errors(models, shards, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.topk_dir alone .* use loss.mode=topk"):
        _config(models, shards, tmp_path, "loss.mode=reverse_kl")
    with pytest.raises(ConfigError, match=r"is its cold start: set train.cold_start_steps"):
        _config(models, shards, tmp_path, f"teacher.path={models['teacher']}")
    with pytest.raises(ConfigError, match=r"not at loss.temperature=2.0 .*set loss.teacher_temperature=1"):
        _config(models, shards, tmp_path, "loss.temperature=2.0")
    student_only = _config(models, shards, tmp_path, "loss.temperature=2.0", "loss.teacher_temperature=1")
    assert (student_only.loss.temperature, student_only.loss.resolved_teacher_temperature) == (2.0, 1.0)
    with pytest.raises(TopKShardError, match=r"holds no manifest.json"):
        Trainer(_config(models, tmp_path, tmp_path / "run"), progress=False)
