"""The synthetic world of the reproduction: a character vocabulary, three skills, three answer styles.

Skills (each prompt starts with its tag letter):

* ``R``: reverse a string of 3–9 letters a–j: ``Rcabd`` → ``dbac``;
* ``S``: sort such a string: ``Scabd`` → ``abcd``;
* ``A``: add two numbers below 100, the sum written least-significant digit first: ``A23+45`` → ``86``.

Styles of the same problem:

* **direct** (prompt ends with ``=``): the answer right away, ``Rcabd=`` → ``dbac``;
* **think** (prompt ends with ``?``): a "thinking pattern" first, restating the operands, then ``>`` and
  the answer: ``Rcabd?`` → ``cabd>dbac``. Both styles solve the same problem; the verifier reads the text
  after the last ``>``, so a direct answer and a thought-out one are both checked on their final answer;
* **hinted** (privileged context, used by OPSD): the answer is written before the prompt, ``dbac|Rcabd=``
  → ``dbac``, so a model that learned to read its context can use it.

The base model is pretrained on a mixture of all three (see :data:`PRETRAIN_MIXTURE`), so it can read a hint
and knows both styles; fine-tuning then works on direct-style prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opd_fast.trainer.tasks import Example, Task

LETTERS = "abcdefghij"
DIGITS = "0123456789"
SKILLS = ("R", "S", "A")
CHARACTERS = LETTERS + DIGITS + "".join(SKILLS) + "+=?>|"
MIN_LETTERS, MAX_LETTERS, MAX_NUMBER = 3, 9, 99
EVAL_SEED = 20261201
# The longest completion: a thought-out 9-letter answer, "abcdefghi>ihgfedcba", plus EOS.
MAX_COMPLETION_TOKENS = 2 * MAX_LETTERS + 2
# Documents of the pretraining corpus by style: direct answers, thought-out answers, answers with a hint.
PRETRAIN_MIXTURE = {"direct": 0.5, "think": 0.25, "hinted": 0.25}


@dataclass(frozen=True)
class Problem:
    skill: str
    operands: str  # "cabd" or "123+45"
    answer: str


def draw_problem(rng: random.Random, skill: str) -> Problem:
    if skill == "A":
        x, y = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
        return Problem(skill, f"{x}+{y}", str(x + y)[::-1])
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
    return Problem(skill, text, text[::-1] if skill == "R" else "".join(sorted(text)))


def render(problem: Problem, style: str) -> Example:
    """The problem as a prompt and its reference completion in ``style`` (direct, think or hinted)."""
    if style == "direct":
        return Example(f"{problem.skill}{problem.operands}=", problem.answer)
    if style == "think":
        return Example(f"{problem.skill}{problem.operands}?", f"{problem.operands}>{problem.answer}")
    if style == "hinted":
        return Example(f"{problem.answer}|{problem.skill}{problem.operands}=", problem.answer)
    raise ValueError(f"style must be direct, think or hinted, got {style!r}")


def final_answer(completion: str) -> str:
    """The answer a completion commits to: the text after its last ``>`` (all of it when there is none)."""
    return completion.rsplit(">", 1)[-1].strip()


def verify(example: Example, completion: str) -> bool:
    return final_answer(completion) == final_answer(example.answer)


def pretraining_document(rng: random.Random) -> str:
    """One document of the pretraining corpus: prompt + reference completion of a random skill and style."""
    style = rng.choices(list(PRETRAIN_MIXTURE), weights=list(PRETRAIN_MIXTURE.values()))[0]
    example = render(draw_problem(rng, rng.choice(SKILLS)), style)
    return example.prompt + example.answer


class SkillTask(Task):
    """Prompts of every skill with the prompt template of ``prompt_style`` (direct, think, or mixed: either,
    half the time each) and reference completions in ``answer_style`` (a teacher that always thinks is trained
    on mixed prompts with thought-out answers).

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
