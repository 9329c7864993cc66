"""The synthetic world of the reproduction: a character vocabulary, three skills, worked traces in two thinking
patterns, and answers given in context.

Skills (each prompt starts with its tag letter):

* ``R``: reverse a string of 3–9 letters a–j: ``Rcabd`` → ``dbac``;
* ``S``: sort such a string: ``Scabd`` → ``abcd``;
* ``A``: add two numbers below 1000, the sum written least-significant digit first: ``A275+348`` → ``326``.

Every completion is a **worked trace**: a chain of steps, each written from the one before it, then ``>`` and the
answer. A trace is long (:func:`mean_reference_tokens`: 34 tokens on average, 64 at most) and sequential: a wrong
letter or carry in an early step is copied into every later step and into the answer, which is the regime in
which off-policy training's train/inference mismatch compounds (GKD; the OPD papers' long reasoning traces).
The verifier reads the text after the last ``>`` only, so any trace is checked on its final answer.

Two thinking patterns, the same problems, equally hard (the same number of steps, the same information per step),
worded differently:

* **direct** (prompt ends with ``=``; the template the fine-tuning runs train and evaluate on, the base's dominant
  pattern and the compatible teacher's): the answer is built from its front, one unit per step. Reverse appends
  the input's letters from its end, ``Rcabd=`` → ``d,db,dba,dbac>dbac``; sort appends the smallest letter left
  (selection), ``Scabd=`` → ``a,ab,abc,abcd>abcd``; add works column by column from the ones, each step
  ``x+y+carry=`` then the sum digit and the carry out, ``A275+348=`` → ``5+8+0=31,7+4+1=21,2+3+1=60>326``;
* **think** (prompt ends with ``?``; the incompatible teacher's pattern): the same chains worded the other way.
  Reverse prepends the input's letters from its front (the answer grows from its back), ``Rcabd?`` →
  ``c,ac,bac,dbac>dbac``; sort inserts the input's letters in order (insertion), ``Scabd?`` →
  ``c,ac,abc,abcd>abcd``; add writes each column carry first and its result carry first,
  ``A275+348?`` → ``0+8+5=13,1+4+7=12,1+3+2=06>326``. A student of the direct pattern and a teacher of this one
  disagree on the first token of almost every step (the paper's incompatible thinking patterns: similar
  accuracy, different tokens);
* **hinted** (privileged context, used by OPSD): the final answer written before the prompt, ``dbac|Rcabd=`` →
  ``d,db,dba,dbac>dbac``, so a model that learned to read its context can build the trace from it (a reverse or
  sort trace is the answer's prefixes; an addition's digits are the answer's). Tasks for OPSD use the bare answer
  as :attr:`Example.answer` (``answer_style="answer"``), which the privileged template puts in the context.

The base model is pretrained on a mixture of the three (see :data:`PRETRAIN_MIXTURE`), so it can read a hint
and knows both patterns; fine-tuning then works on direct-template prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opd_fast.trainer.tasks import Example, Task

LETTERS = "abcdefghij"
DIGITS = "0123456789"
SKILLS = ("R", "S", "A")
CHARACTERS = LETTERS + DIGITS + "".join(SKILLS) + "+=?>|,"
MIN_LETTERS, MAX_LETTERS, MAX_NUMBER = 3, 9, 999
EVAL_SEED = 20261201
# The corpus's version, part of the base model's cache key: a changed corpus (round 2: worked traces instead of
# bare answers) pretrains a new base instead of reusing one cached for the old corpus.
CORPUS_VERSION = "traces-1"
# The longest completion: the trace of a 9-letter reversal or sort, 45 letters in 9 steps, 8 commas, ">", the
# 9-letter answer and EOS (an addition's trace is at most 3 columns of 8 characters, 2 commas, ">", 4 digits, EOS).
MAX_COMPLETION_TOKENS = MAX_LETTERS * (MAX_LETTERS + 1) // 2 + (MAX_LETTERS - 1) + 1 + MAX_LETTERS + 1
# Documents of the pretraining corpus by style: the direct pattern, the think pattern, traces with the answer given.
PRETRAIN_MIXTURE = {"direct": 0.5, "think": 0.25, "hinted": 0.25}
STYLES = ("direct", "think", "hinted", "answer")


@dataclass(frozen=True)
class Problem:
    skill: str
    operands: str  # "cabd" or "275+348"
    answer: str


def draw_problem(rng: random.Random, skill: str) -> Problem:
    if skill == "A":
        x, y = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
        return Problem(skill, f"{x}+{y}", str(x + y)[::-1])
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
    return Problem(skill, text, text[::-1] if skill == "R" else "".join(sorted(text)))


def _columns(operands: str) -> list[tuple[str, str, str, str, str]]:
    """(x digit, y digit, carry in, sum digit, carry out) per column of ``x+y``, ones first; the shorter operand is
    padded with zeros."""
    x, y = (part[::-1] for part in operands.split("+"))
    width, carry, out = max(len(x), len(y)), 0, []
    for i in range(width):
        a, b = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        total = a + b + carry
        out.append((str(a), str(b), str(carry), str(total % 10), str(total // 10)))
        carry = total // 10
    return out


def trace(problem: Problem, pattern: str) -> str:
    """The worked trace of ``problem`` in ``pattern`` ("direct" or "think"), ending with ``>`` and the answer."""
    if pattern not in ("direct", "think"):
        raise ValueError(f"a trace's pattern is direct or think, got {pattern!r}")
    text, n = problem.operands, len(problem.operands)
    if problem.skill == "A":
        if pattern == "direct":
            steps = [f"{a}+{b}+{c}={d}{e}" for a, b, c, d, e in _columns(text)]
        else:
            steps = [f"{c}+{b}+{a}={e}{d}" for a, b, c, d, e in _columns(text)]
    elif pattern == "direct":  # the answer's prefixes: reverse appends from the end, sort appends the smallest left
        steps = [problem.answer[:i] for i in range(1, n + 1)]
    elif problem.skill == "R":  # the reversed prefixes of the input: each step prepends the next letter
        steps = [text[:i][::-1] for i in range(1, n + 1)]
    else:  # insertion sort: the sorted prefixes of the input
        steps = ["".join(sorted(text[:i])) for i in range(1, n + 1)]
    return ",".join(steps) + ">" + problem.answer


def render(problem: Problem, style: str) -> Example:
    """The problem as a prompt and its reference completion in ``style``: direct, think, hinted, or answer (the
    direct template with the bare answer as the completion, for tasks whose answer goes into a privileged context).
    """
    question = f"{problem.skill}{problem.operands}"
    if style == "direct":
        return Example(f"{question}=", trace(problem, "direct"))
    if style == "think":
        return Example(f"{question}?", trace(problem, "think"))
    if style == "hinted":
        return Example(f"{problem.answer}|{question}=", trace(problem, "direct"))
    if style == "answer":
        return Example(f"{question}=", problem.answer)
    raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


def final_answer(completion: str) -> str:
    """The answer a completion commits to: the text after its last ``>`` (all of it when there is none)."""
    return completion.rsplit(">", 1)[-1].strip()


def verify(example: Example, completion: str) -> bool:
    return final_answer(completion) == final_answer(example.answer)


def mean_reference_tokens(style: str = "direct", n: int = 3000) -> float:
    """The mean length in tokens (characters and EOS) of reference completions in ``style`` over the held-out
    problems: the length the fine-tuning runs' rollouts aim at."""
    return sum(len(e.answer) + 1 for e in SkillTask("direct", style).eval_set(n)) / n


def pretraining_document(rng: random.Random) -> str:
    """One document of the pretraining corpus: prompt + reference completion of a random skill and style."""
    style = rng.choices(list(PRETRAIN_MIXTURE), weights=list(PRETRAIN_MIXTURE.values()))[0]
    example = render(draw_problem(rng, rng.choice(SKILLS)), style)
    return example.prompt + example.answer


class SkillTask(Task):
    """Prompts of every skill with the prompt template of ``prompt_style`` (direct, think, or mixed: either,
    half the time each) and reference completions in ``answer_style`` (the incompatible teacher is trained on
    mixed prompts with think-pattern traces; OPSD's tasks carry the bare answer, ``answer``, for the privileged
    context).

    The held-out set is fixed (seeded) and balanced over skills; the same problems underlie every style, so
    accuracies under different templates are on the same questions.
    """

    def __init__(self, prompt_style: str = "direct", answer_style: str | None = None) -> None:
        super().__init__(verify)
        self.prompt_style, self.answer_style = prompt_style, answer_style or prompt_style
        self.name = f"skills({self.prompt_style} prompts, {self.answer_style} answers)"
        self.characters = CHARACTERS

    def _example(self, problem: Problem, think_template: bool) -> Example:
        style = self.prompt_style if self.prompt_style != "mixed" else ("think" if think_template else "direct")
        return Example(render(problem, style).prompt, render(problem, self.answer_style).answer)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [self._example(draw_problem(rng, rng.choice(SKILLS)), rng.random() < 0.5) for _ in range(n)]

    def eval_set(self, n: int) -> list[Example]:
        rng = random.Random(EVAL_SEED)
        return [self._example(draw_problem(rng, SKILLS[i % len(SKILLS)]), i // len(SKILLS) % 2 == 1) for i in range(n)]

    def format_ok(self, example: Example, completion: str) -> bool:
        return bool(final_answer(completion))
