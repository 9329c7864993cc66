"""Prompts with verifiable answers: the built-in synthetic tasks, JSONL datasets and answer verifiers.

A task hands out training prompts (sampled with a caller-provided RNG, so every step's batch is a
pure function of the seed and the step), a fixed held-out evaluation set, and a verifier that decides
whether a completion answers its prompt.
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opd_fast.trainer.config import ConfigError

EVAL_SEED = 20261122  # the held-out set is fixed, and disjoint in practice from training draws


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


Verifier = Callable[[Example, str], bool]


class Task:
    """Base class: ``sample`` training prompts, a fixed ``eval_set``, ``verify`` completions, and
    ``format_ok``, a format-only check (no correctness) for filtering teacher samples."""

    name = "task"

    def __init__(self, verifier: Verifier) -> None:
        self.verify = verifier

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        raise NotImplementedError

    def eval_set(self, n: int) -> list[Example]:
        raise NotImplementedError

    def format_ok(self, example: Example, completion: str) -> bool:
        return bool(completion.strip())


class ReverseTask(Task):
    """Reverse a random string: ``"cabd="`` → ``"dbac"``. Small transformers learn it; how fast depends on size."""

    name = "reverse"

    def __init__(
        self, alphabet: str = "abcdefghij", min_len: int = 4, max_len: int = 9, verifier: Verifier | None = None
    ):
        super().__init__(verifier or exact_match)
        self.alphabet, self.min_len, self.max_len = alphabet, min_len, max_len
        self.characters = alphabet + "="

    def _text(self, rng: random.Random) -> str:
        return "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))

    def _one(self, rng: random.Random) -> Example:
        text = self._text(rng)
        return Example(prompt=f"{text}=", answer=text[::-1])

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [self._one(rng) for _ in range(n)]

    def eval_set(self, n: int) -> list[Example]:
        return self.sample(random.Random(EVAL_SEED), n)

    def format_ok(self, example: Example, completion: str) -> bool:
        """Letters of the alphabet only, at most as many as the longest input: a well-formed answer."""
        return 0 < len(completion) <= self.max_len and all(c in self.alphabet for c in completion)


class AnagramTask(ReverseTask):
    """Rearrange the letters of a random string: ``"cabd="`` → any arrangement of exactly c, a, b, d.

    Many answers are correct, so a teacher trained on random arrangements spreads its probability over every letter
    still to be placed. SFT on teacher samples sees one sampled arrangement per prompt and, like any forward KL, must
    cover every option; on-policy distillation trains on the student's own arrangements against the teacher's whole
    distribution with a mode-seeking reverse KL. The built-in demo's task (see opd_fast.trainer.demo)."""

    name = "anagram"

    def __init__(
        self, alphabet: str = "abcdefghij", min_len: int = 6, max_len: int = 12, verifier: Verifier | None = None
    ):
        super().__init__(alphabet, min_len, max_len, verifier or same_letters)

    def _one(self, rng: random.Random) -> Example:
        text = self._text(rng)
        letters = list(text)
        rng.shuffle(letters)  # the reference answer: one arrangement among the many correct ones
        return Example(prompt=f"{text}=", answer="".join(letters))


class AdditionTask(Task):
    """Add two numbers, answer written least-significant digit first: ``"123+45="`` → ``"861"``."""

    name = "addition"

    def __init__(self, digits: int = 3, verifier: Verifier | None = None):
        super().__init__(verifier or exact_match)
        self.digits = digits
        self.characters = "0123456789+="

    def _one(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b)[::-1])

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [self._one(rng) for _ in range(n)]

    def eval_set(self, n: int) -> list[Example]:
        return self.sample(random.Random(EVAL_SEED), n)

    def format_ok(self, example: Example, completion: str) -> bool:
        return 0 < len(completion) <= self.digits + 1 and completion.isdigit()


class JsonlTask(Task):
    """Prompts from JSONL files, one ``{"prompt": str, "answer": str}`` object per line."""

    name = "jsonl"

    def __init__(self, train_path: str, eval_path: str | None, verifier: Verifier):
        super().__init__(verifier)
        self.train = _read_jsonl(train_path, "data.train_path")
        self.eval = _read_jsonl(eval_path, "data.eval_path") if eval_path else self.train

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [rng.choice(self.train) for _ in range(n)]

    def eval_set(self, n: int) -> list[Example]:
        return self.eval[:n]


def _read_jsonl(path: str, key: str) -> list[Example]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: {file} does not exist")
    examples = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            examples.append(Example(prompt=str(record["prompt"]), answer=str(record["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{key}: {file} line {number} is not a JSON object with 'prompt' and 'answer' ({exc})"
            ) from None
    if not examples:
        raise ConfigError(f"{key}: {file} holds no examples")
    return examples


def exact_match(example: Example, completion: str) -> bool:
    return completion.strip() == example.answer.strip()


def same_letters(example: Example, completion: str) -> bool:
    """The completion uses exactly the answer's letters, in any order (AnagramTask)."""
    return sorted(completion.strip()) == sorted(example.answer.strip())


def contains(example: Example, completion: str) -> bool:
    return example.answer.strip() in completion


def last_boxed(example: Example, completion: str) -> bool:
    """The content of the last ``\\boxed{...}`` equals the answer (math-style completions)."""
    start = completion.rfind("\\boxed{")
    if start < 0:
        return False
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(completion)):
        depth += {"{": 1, "}": -1}.get(completion[j], 0)
        if depth < 0:
            return completion[i:j].strip() == example.answer.strip()
    return False


VERIFIERS: dict[str, Verifier] = {
    "exact": exact_match,
    "same_letters": same_letters,
    "contains": contains,
    "boxed": last_boxed,
}


def import_function(spec: str, key: str) -> Callable:
    """The callable named by ``"package.module:function"`` (``key`` names the config entry in errors)."""
    if ":" not in spec:
        raise ConfigError(f"{key} must be 'package.module:function'; got {spec!r}")
    module_name, function_name = spec.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key} {spec!r} cannot be imported: {exc}") from None
    if not callable(function):
        raise ConfigError(f"{key} {spec!r} is not callable")
    return function


def resolve_verifier(spec: str | None) -> Verifier | None:
    """A verifier by name (exact, same_letters, contains, boxed) or ``"package.module:function"``; None: the task's
    own (exact match, except for the anagram task)."""
    if spec is None or spec in VERIFIERS:
        return VERIFIERS.get(spec)
    if ":" not in spec:
        raise ConfigError(f"data.verifier must be one of {', '.join(VERIFIERS)} or 'module:function'; got {spec!r}")
    return import_function(spec, "data.verifier")


def resolve_format_filter(spec: str | None, task: Task) -> Verifier | None:
    """None (keep every teacher sample), the task's own format check ("task"), or a "module:function"."""
    if spec is None:
        return None
    return task.format_ok if spec == "task" else import_function(spec, "data.format_filter")


def resolve_reward(spec: str | None, task: Task) -> Callable[[Example, str], float]:
    """The verifiable reward of a completion: the task's verifier as 1/0, or a "module:function"."""
    if spec is None:
        return lambda example, completion: float(task.verify(example, completion))
    return import_function(spec, "loss.reward")


BUILTIN_TASKS = {"reverse": ReverseTask, "anagram": AnagramTask, "addition": AdditionTask}


def build_task(task: str, train_path: str | None, eval_path: str | None, verifier: str | None) -> Task:
    """The task named by the data config: a built-in synthetic one, or ``jsonl`` with train_path."""
    verify = resolve_verifier(verifier)
    if task == "jsonl":
        if not train_path:
            raise ConfigError("data.task=jsonl needs data.train_path (a JSONL file of {'prompt', 'answer'})")
        return JsonlTask(train_path, eval_path, verify or exact_match)
    if task not in BUILTIN_TASKS:
        raise ConfigError(f"data.task must be one of {', '.join([*BUILTIN_TASKS, 'jsonl'])}; got {task!r}")
    return BUILTIN_TASKS[task](verifier=verify)
