"""What a task is: examples (question, chain of thought, answer), chat messages, an SFT target, a judge."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sasr.errors import SasrError, nearest

SPLITS = ("train", "test")  # every task has these; a task with shifted test sets adds them ("ood", ...)


@dataclass(frozen=True)
class Example:
    question: str
    cot: str  # chain of thought, without the final answer line
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    reward: float
    correct: bool
    formatted: bool


def split_of(question: str, test_fraction: float = 0.1) -> str:
    """The split a question belongs to, from a stable hash: train and test can never share a question."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


_ANSWER_PATTERNS = [
    re.compile(r"<answer>(.*?)</answer>", re.S),
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"answer\s*(?:is)?\s*:\s*([^\n]*)", re.I),
]


def _boxed(text: str) -> list[tuple[int, str]]:
    """Contents of every \\boxed{...}, with balanced braces, and where each starts."""
    found = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((m.start(), text[m.end() : i - 1]))
    return found


def extract_answer(text: str) -> str | None:
    """The last final answer in a completion: \\boxed{}, <answer>..</answer>, '####' or 'Answer:'."""
    found = _boxed(text)
    for pat in _ANSWER_PATTERNS:
        found += [(m.start(), m.group(1)) for m in pat.finditer(text)]
    if not found:
        return None
    return max(found, key=lambda f: f[0])[1].strip()


class Task:
    """Base class: a subclass sets ``name``, ``options`` (defaults) and implements the four methods."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    system_prompt: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = SPLITS
    shifts: ClassVar[dict[str, str]] = {}  # how each shifted split ("ood", ...) differs from training

    def __init__(self, **options: Any) -> None:
        for key in options:
            if key not in self.options:
                raise SasrError(
                    f"task '{self.name}' has no option '{key}'{nearest(key, self.options)}; "
                    f"options: {', '.join(self.options) or 'none'}"
                )
        self.opts = {**self.options, **options}

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        raise NotImplementedError

    def messages(self, example: Example) -> list[dict[str, str]]:
        """Chat messages of the prompt: the answer-format instruction, then the question."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": example.question}]

    def is_text(self, example: Example) -> bool:
        """Whether the example is a language-modelling row (TRL's ``text``): a demonstration only, trained as
        plain text after a start-of-text token, with no prompt, no answer and no judge."""
        return False

    def has_demonstration(self, example: Example) -> bool:
        """Whether ``target(example)`` is a demonstration to train on (a file of RL prompts may hold none)."""
        return True

    def target(self, example: Example) -> str:
        """The SFT completion: chain of thought, then the answer in the expected format."""
        raise NotImplementedError

    def score(self, completion: str, example: Example) -> Score:
        raise NotImplementedError

    def columns(self, example: Example) -> dict[str, Any]:
        """The row's columns a reward function receives (TRL passes every dataset column but the prompt);
        ``solution`` is the gold answer, as TRL's math datasets and ``trl.rewards.accuracy_reward`` use it."""
        return {"question": example.question, "answer": example.answer, "solution": example.answer}

    def score_batch(self, completions: list[str], examples: list[Example]) -> list[Score]:
        """Score many completions at once; tasks with a batched reward function override this."""
        return [self.score(c, e) for c, e in zip(completions, examples)]

    @property
    def reward_name(self) -> str:
        """How errors name the reward function."""
        return f"{type(self).__name__}.score"

    @property
    def held_out_splits(self) -> tuple[str, ...]:
        """The splits evaluation reports: "test" (the training distribution) and "ood" where the task has one."""
        return tuple(s for s in self.splits if s != "train")

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise SasrError(
                f"task '{self.name}' has no split '{split}'; its splits: {', '.join(self.splits)}"
            )
