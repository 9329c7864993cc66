"""The vLLM teacher for real: a vLLM server (one per test session, on 127.0.0.1) and an in-process engine scoring a
tiny random teacher, against the teacher's own hidden states through linear_topk_target_divergence.

Needs vLLM (marker ``vllm``), which lives in its own environment on the CPU: ``bash scripts/install_vllm_cpu.sh
VENV`` then ``VENV/bin/pytest -m vllm tests/trainer/test_vllm_teacher.py`` (``.ci/vllm`` does both). Elsewhere every
test here is skipped. ``OPD_FAST_RECORD_VLLM=1`` rewrites tests/trainer/data/vllm_tiny_teacher.json, the server's
answers that tests/trainer/test_teacher_server.py replays in the main environment; without it the recording is checked
against the live server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import rel_err

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; the vllm tier runs in its own environment (bash .ci/vllm)"
)

from opd_fast import linear_topk_overlap, linear_topk_target_divergence
from opd_fast.heads import LMHead
from opd_fast.integrations.transformers import final_hidden_states
from opd_fast.trainer import Trainer, load_config
from opd_fast.trainer.checkpoint import latest_checkpoint
from opd_fast.trainer.demo import build_tokenizer
from opd_fast.trainer.teacher_server import TeacherServer, TeacherServerError
from opd_fast.trainer.vllm_engine import VllmScorer

pytestmark = pytest.mark.vllm

RECORDING = Path(__file__).parent / "data" / "vllm_tiny_teacher.json"
# The reverse task's letters and "=", then more characters so that the top-k leaves a real tail: 41 tokens.
CHARACTERS = "abcdefghij=klmnopqrstuvwxyz0123456789"
K = 8
SERVED_NAME = "tiny-teacher"
SERVER_START_LIMIT_S = 300


def _sequences() -> tuple[list[list[int]], list[int]]:
    """Prompt + completion id sequences of several lengths, and where each completion starts."""
    generator = torch.Generator().manual_seed(1)
    sequences, starts = [], []
    for prompt, completion in ((5, 12), (9, 3), (3, 20), (12, 7), (6, 1)):
        ids = torch.randint(4, len(CHARACTERS) + 4, (prompt + completion,), generator=generator).tolist()
        sequences.append([1, *ids])  # <bos> first, as the tokenizer puts it
        starts.append(1 + prompt)
    return sequences, starts


def _llama(directory: Path, tokenizer, hidden: int, heads: int, seed: int, head_gain: float) -> Path:
    """A random fp32 Llama saved with the tokenizer; head_dim = hidden / heads (vLLM's CPU attention takes 32, 64,
    80, ...); the lm_head scaled by ``head_gain`` so that the distributions are peaked, as a trained model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_gain)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    tokenizer = build_tokenizer(CHARACTERS)
    teacher = _llama(root / "teacher", tokenizer, hidden=128, heads=4, seed=0, head_gain=20.0)
    student = _llama(root / "student", tokenizer, hidden=64, heads=2, seed=1, head_gain=5.0)
    return {"teacher": teacher, "student": student, "tokenizer": tokenizer}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 in its own process group (its engine runs in a
    child process), started from a temporary folder: a Python started in the repository root would import its
    kernels/ folder as Hugging Face's `kernels`, which transformers < 5.20 imports when it finds one."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "vllm_server.log"
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *("--model", str(model), "--served-model-name", SERVED_NAME),
            *("--dtype", "float32", "--max-model-len", "128", "--max-logprobs", "20", "--enforce-eager"),
            *("--kv-cache-memory-bytes", str(256 << 20), "--host", "127.0.0.1", "--port", str(self.port)),
        ]
        started = time.monotonic()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() - started > SERVER_START_LIMIT_S:
                self.kill()
                tail = self.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the vLLM server did not become healthy in {SERVER_START_LIMIT_S} s:\n{tail}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - started
        print(f"\nvLLM server healthy after {self.start_s:.1f} s")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL to the server's process group (the API server and its engine), as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def server(models, tmp_path_factory):
    server = Server(models["teacher"], tmp_path_factory.mktemp("vllm_server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engine(models):
    started = time.monotonic()
    scorer = VllmScorer(models["teacher"], K, kv_cache_gb=0.25)
    print(f"\nin-process vLLM engine started in {time.monotonic() - started:.1f} s")
    yield scorer
    scorer.close()


# ------------------------------------------------------------------------------------------------------ recording
def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _volatile(answer):
    """The answer without what changes from run to run: ids, times, the model directory."""
    if isinstance(answer, dict):
        return {k: _volatile(v) for k, v in answer.items() if k not in ("id", "created", "root", "permission")}
    if isinstance(answer, list):
        return [_volatile(v) for v in answer]
    return answer


def _recording(server: Server, tokenizer) -> dict:
    """What the main tier replays: /v1/models, the completions of the probe and of the test sequences (each
    sequence's choice, for k = K), and the refusal of k above --max-logprobs."""
    sequences, starts = _sequences()
    size = len(tokenizer)
    probe = [min(size - 1, i * size // 16) for i in range(16)]  # TeacherServer.check_tokenizer's
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        models = json.loads(response.read())
    for model in models["data"]:
        model["root"] = "/models/tiny-teacher"  # not the session's temporary directory
    status, answer = _post(
        server.url, {"model": SERVED_NAME, "prompt": [probe, *sequences], "max_tokens": 1, "prompt_logprobs": K}
    )
    assert status == 200, answer
    refused_status, refused = _post(
        server.url, {"model": SERVED_NAME, "prompt": [probe], "max_tokens": 1, "prompt_logprobs": 25}
    )
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    return {
        "about": "answers of vLLM's OpenAI-compatible server (tests/trainer/test_vllm_teacher.py records them) "
        "for a random tiny Llama; tests/trainer/test_teacher_server.py replays them",
        "characters": CHARACTERS,
        "k": K,
        "models": models,
        "completion_envelope": {key: answer[key] for key in ("id", "object", "created", "model")},
        "choice_template": {k: v for k, v in choices[0].items() if k not in ("index", "prompt_logprobs", "text")},
        "scored": [
            {"prompt": seq, "start": start, "text": c["text"], "prompt_logprobs": c["prompt_logprobs"]}
            for seq, start, c in zip([probe, *sequences], [1, *starts], choices)
        ],
        "refused": {"k": 25, "status": refused_status, "answer": refused},
    }


def test_recorded_answers_are_the_live_servers(server, models):
    """tests/trainer/data/vllm_tiny_teacher.json holds what this vLLM answers (OPD_FAST_RECORD_VLLM=1 rewrites it)."""
    live = _recording(server, models["tokenizer"])
    if os.environ.get("OPD_FAST_RECORD_VLLM") == "1":
        RECORDING.parent.mkdir(exist_ok=True)
        RECORDING.write_text(json.dumps(live, indent=1) + "\n")
    recorded = json.loads(RECORDING.read_text())
    assert _volatile(live) == _volatile(recorded)


# ------------------------------------------------------------------------------------------------------ exactness
def _student_loss_and_grads(student_hidden, student_head: LMHead, ids, logprobs, mask, divergence):
    """Per-token losses, and the student's hidden and head gradients of their mean (the training loss)."""
    hidden = student_hidden.detach().requires_grad_(True)
    weight = student_head.weight.detach().requires_grad_(True)
    losses = linear_topk_target_divergence(
        hidden, weight, ids, logprobs, divergence=divergence, mask=mask, reduction="none", backend="torch"
    )
    (losses.sum() / mask.sum()).backward()
    return losses.detach()[mask], hidden.grad, weight.grad


def _completion_positions(sequences, starts):
    """[B, L] positions predicting the completion tokens (the one before each), and the mask of real ones."""
    longest = max(len(s) - start for s, start in zip(sequences, starts))
    positions = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        positions[row, : len(seq) - start] = torch.arange(start - 1, len(seq) - 1)
        mask[row, : len(seq) - start] = True
    return positions, mask


def _hidden_at(model, sequences, positions):
    longest = max(map(len, sequences))
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], attention[row, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, attention)
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _aligned(scores, mask):
    ids = torch.zeros((*mask.shape, K), dtype=torch.long)
    logprobs = torch.zeros((*mask.shape, K))
    for row, s in enumerate(scores):
        ids[row, : s.ids.shape[0]], logprobs[row, : s.ids.shape[0]] = s.ids, s.logprobs
    return ids, logprobs


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_loss_and_gradients_from_server_and_engine_equal_the_teachers_own(server, engine, models, divergence):
    """The top-k target loss and the student's gradients from the served and the in-process engine's top-k equal
    those from the teacher's hidden states through opd_fast's own top-k, in fp32, within 1e-5."""
    from transformers import AutoModelForCausalLM

    sequences, starts = _sequences()
    positions, mask = _completion_positions(sequences, starts)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float32).eval()
    student_hidden, student_head = _hidden_at(student, sequences, positions), LMHead.from_model(student)
    teacher_hidden, teacher_head = _hidden_at(teacher, sequences, positions), LMHead.from_model(teacher)
    own = linear_topk_overlap(student_hidden, student_head, teacher_hidden, teacher_head, k=K, mask=mask)
    reference = _student_loss_and_grads(
        student_hidden, student_head, own.teacher_topk_ids, own.teacher_topk_logprobs, mask, divergence
    )
    client = TeacherServer(server.url, K, tokenizer=models["tokenizer"], model=str(models["teacher"]))
    for name, scorer in (("server", client), ("engine", engine)):
        ids, logprobs = _aligned(scorer.score(sequences, starts), mask)
        assert torch.equal(ids[mask], own.teacher_topk_ids[mask]), name
        logprob_error = (logprobs[mask] - own.teacher_topk_logprobs[mask]).abs().max().item()
        ours = _student_loss_and_grads(student_hidden, student_head, ids, logprobs, mask, divergence)
        errors = [rel_err(a, b) for a, b in zip(ours, reference)]
        print(f"\n{name} {divergence}: max |Δ log p| {logprob_error:.2e}, loss/dH/dW relative errors {errors}")
        assert max(errors) <= 1e-5, (name, errors)


def test_served_top_k_is_the_in_process_engines_and_throughput(server, engine):
    """Both paths are one vLLM: on 64 sequences of 64 tokens, the same ids and log-probs within fp32 rounding. The
    scoring rates (tokens per second, after a warm-up request) are printed for the README."""
    generator = torch.Generator().manual_seed(2)
    sequences = [[1, *torch.randint(4, 41, (63,), generator=generator).tolist()] for _ in range(64)]
    starts = [16] * len(sequences)
    tokens = sum(map(len, sequences))
    results = {}
    for name, scorer in (("server", TeacherServer(server.url, K)), ("engine", engine)):
        scorer.score(sequences[:4], starts[:4])
        began = time.perf_counter()
        results[name] = scorer.score(sequences, starts)
        seconds = time.perf_counter() - began
        print(f"\n{name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s (k={K})")
    for a, b in zip(results["server"], results["engine"]):
        assert torch.equal(a.ids, b.ids)
        assert (a.logprobs - b.logprobs).abs().max() < 1e-5
        assert (a.token_logprobs - b.token_logprobs).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------- errors
def test_live_server_refuses_k_above_max_logprobs(server, models):
    with pytest.raises(TeacherServerError, match=r"refuses prompt_logprobs=25.*--max-logprobs 25"):
        TeacherServer(server.url, 25, tokenizer=models["tokenizer"])


def test_live_server_with_another_tokenizer_is_refused(server):
    with pytest.raises(TeacherServerError, match="uses another tokenizer"):
        TeacherServer(server.url, K, tokenizer=build_tokenizer(CHARACTERS[::-1]))


def test_live_server_of_another_model_is_refused(server, models):
    with pytest.raises(TeacherServerError, match=rf"serves {SERVED_NAME}.*not teacher.path="):
        TeacherServer(server.url, K, model=str(models["student"]))


# -------------------------------------------------------------------------------------------- offline top-k shards
def test_offline_shards_from_the_engine_train_as_the_engine_and_the_teacher(engine, models, tmp_path):
    """``opd-fast teacher-topk --teacher-path`` (its own in-process engine, in its own process: closing an in-process
    engine tears down vLLM's process-wide parallel state, which the session's engine still uses) writes shards; the
    top-k target loss and the student's gradients from them equal those from the session's engine scoring the same
    sequences directly and those from the teacher's own hidden states, in fp32, within 1e-5 relative."""
    from transformers import AutoModelForCausalLM

    from opd_fast.trainer.teacher_topk import TopKShards

    sequences, starts = _sequences()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"input_ids": s, "start": t}) + "\n" for s, t in zip(sequences, starts)))
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "opd_fast.cli", "teacher-topk", str(source), "--out", str(out)]
    command += ["--teacher-path", str(models["teacher"]), "--k", str(K), "--shard-size", "2", "--kv-cache-gb", "0.25"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher top-k: 100%" in result.stderr  # the progress bar
    stored = TopKShards(out)
    assert [s.ids for s in stored.sequences] == sequences and [s.start for s in stored.sequences] == starts

    positions, mask = _completion_positions(sequences, starts)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.float32).eval()
    student_hidden, student_head = _hidden_at(student, sequences, positions), LMHead.from_model(student)
    teacher_hidden, teacher_head = _hidden_at(teacher, sequences, positions), LMHead.from_model(teacher)
    own = linear_topk_overlap(student_hidden, student_head, teacher_hidden, teacher_head, k=K, mask=mask)
    ids, logprobs = _aligned([s.scores for s in stored.sequences], mask)
    assert torch.equal(ids[mask], own.teacher_topk_ids[mask])
    direct = _aligned(engine.score(sequences, starts), mask)
    for divergence in ("forward_kl", "reverse_kl"):
        shards = _student_loss_and_grads(student_hidden, student_head, ids, logprobs, mask, divergence)
        reference = _student_loss_and_grads(
            student_hidden, student_head, own.teacher_topk_ids, own.teacher_topk_logprobs, mask, divergence
        )
        scored = _student_loss_and_grads(student_hidden, student_head, *direct, mask, divergence)
        for name, other in (("engine", scored), ("teacher's own", reference)):
            errors = [rel_err(a, b) for a, b in zip(shards, other)]
            print(f"\nshards vs {name} {divergence}: loss/dH/dW relative errors {errors}")
            assert max(errors) <= 1e-5, (name, divergence, errors)


# --------------------------------------------------------------------------------------------------------- trainer
def _config(models, out_dir: Path, **teacher):
    overrides = [
        "loss.mode=topk",
        "loss.topk_divergence=forward_kl",
        f"teacher.top_k={K}",
        "data.task=reverse",
        "data.eval_size=4",
        "rollout.batch_size=4",
        "rollout.max_new_tokens=8",
        "train.steps=3",
        "train.log_every=1",
        "train.eval_every=100",
        "train.save_every=1",
        "train.keep_checkpoints=5",
        "optim.lr=0.01",
        *(f"teacher.{key}={value}" for key, value in teacher.items()),
    ]
    return load_config(None, [f"student.path={models['student']}", *overrides], out_dir=str(out_dir), device="cpu")


def test_trainer_with_the_in_process_engine(models, tmp_path):
    config = _config(models, tmp_path, engine="vllm", path=models["teacher"])
    trainer = Trainer(config, progress=False)
    try:
        last = trainer.train()
    finally:
        trainer.close()
    assert last["step"] == 3 and torch.isfinite(torch.tensor(last["loss"])) and last["loss"] > 0


def test_trainer_with_a_served_teacher_survives_a_dead_server_with_its_checkpoints(server, models, tmp_path):
    """Trains against the server; the server is killed before step 3's scoring: after teacher.retries tries the
    step fails with a message naming the server, and the checkpoints of steps 1 and 2 are intact. Last in this
    file: it kills the session's server."""
    config = _config(models, tmp_path, server=server.url, path=models["teacher"], retries=2, timeout_s=10)
    trainer = Trainer(config, progress=False)
    scorer, calls = trainer.topk_teacher.scorer, []
    score = scorer.score

    def score_then_kill(sequences, starts):
        calls.append(len(sequences))
        if len(calls) == 3:
            server.kill()
        return score(sequences, starts)

    scorer.score = score_then_kill
    try:
        with pytest.raises(TeacherServerError, match=rf"teacher server unreachable: 3 tries.*{server.url}"):
            trainer.train()
    finally:
        trainer.close()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000002"
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2] and all(m["loss"] > 0 for m in metrics[1:])
