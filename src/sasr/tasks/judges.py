"""Answer judges shared by tasks: exact text, numbers (commas, dollars, trailing '.0'), math-verify."""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalise_number(text: str | None) -> Decimal | None:
    """'$1,234.50' -> Decimal('1234.5'); the last number in the text, or None if there is none."""
    if text is None:
        return None
    found = _NUMBER.findall(text.replace("$", "").replace("\\$", ""))
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "")).normalize()
    except InvalidOperation:
        return None


def numeric_equal(pred: str | None, gold: str) -> bool:
    a, b = normalise_number(pred), normalise_number(gold)
    return a is not None and b is not None and a == b


def exact_equal(pred: str | None, gold: str) -> bool:
    return pred is not None and pred.strip().lower() == gold.strip().lower()


def _as_latex(answer: str) -> str:
    """math-verify reads LaTeX inside $...$ or \\boxed{}; a bare answer gets the dollars."""
    return answer if "\\boxed" in answer or answer.startswith("$") else f"${answer}$"


class MathJudge:
    """math-verify with a timeout; a timeout scores 0 and is counted in ``timeouts``.

    math-verify's timeouts use signals, so they work only in the main thread (where the trainer scores).
    """

    def __init__(self, timeout_seconds: int = 5) -> None:
        self.timeout_seconds = timeout_seconds
        self.timeouts = 0

    def __call__(self, pred: str | None, gold: str) -> bool:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException

        if pred is None:
            return False
        try:
            gold_parsed = parse(_as_latex(gold), parsing_timeout=self.timeout_seconds, raise_on_error=True)
            pred_parsed = parse(_as_latex(pred), parsing_timeout=self.timeout_seconds, raise_on_error=True)
            return bool(
                verify(gold_parsed, pred_parsed, timeout_seconds=self.timeout_seconds, raise_on_error=True)
            )
        except TimeoutException:
            self.timeouts += 1
            log.warning("math-verify timed out on %r (counted; scored 0)", pred[:80])
            return False
        except Exception:  # an unparsable answer is a wrong answer
            return False


JUDGES = {"exact": exact_equal, "numeric": numeric_equal, "math": MathJudge}


class NumericAnswer:
    """Mixin for tasks whose target ends 'Answer: <number>' and whose judge compares numbers.
    Reads ``correct_reward`` and ``format_reward`` from the task's options."""

    def target(self, example) -> str:
        return f"{example.cot}\nAnswer: {example.answer}"

    def score(self, completion: str, example):
        from sasr.tasks.base import Score, extract_answer

        got = extract_answer(completion)
        formatted = normalise_number(got) is not None
        correct = formatted and numeric_equal(got, example.answer)
        reward = (
            self.opts["correct_reward"] if correct else (self.opts["format_reward"] if formatted else 0.0)
        )
        return Score(float(reward), correct, formatted)
