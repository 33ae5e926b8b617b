"""Small data files in the published formats, written by the tests (GSM8K, MATH, a user's JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

from sasr.tasks import get_task


def arithmetic_rows(n: int, seed: int = 0):
    """n distinct problems with a worked solution, from the arithmetic generator (both of its splits)."""
    task = get_task("arithmetic", max_terms=4, max_value=50)
    return task.examples("train", n - n // 10, seed) + task.examples("test", n // 10, seed)


def write_gsm8k(path: Path, n: int = 2500) -> Path:
    """openai/gsm8k rows: question, answer with <<calc>> notes and a final '#### n' (with commas)."""
    with path.open("w") as f:
        for ex in arithmetic_rows(n):
            steps = [f"{line} <<{line.replace(' ', '')}>>" for line in ex.cot.splitlines()]
            final = f"{int(ex.answer):,}"
            f.write(
                json.dumps({"question": ex.question, "answer": "\n".join(steps) + f"\n#### {final}"}) + "\n"
            )
    return path


MATH_ROWS = [
    (
        "What is $\\frac{1}{4} + \\frac{1}{4}$?",
        "Adding, $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
        "\\frac{1}{2}",
    ),
    ("Simplify $\\sqrt{50}$.", "$\\sqrt{50} = \\sqrt{25 \\cdot 2} = \\boxed{5\\sqrt{2}}$.", "5\\sqrt{2}"),
    ("Expand $(x+1)^2$.", "$(x+1)^2 = \\boxed{x^2+2x+1}$.", "x^2+2x+1"),
]


def write_math(path: Path, n: int = 2500) -> Path:
    """MATH rows: problem, solution with \\boxed{}, level, type (answer only on MATH-500-style rows)."""
    with path.open("w") as f:
        for problem, solution, answer in MATH_ROWS:
            f.write(
                json.dumps(
                    {
                        "problem": problem,
                        "solution": solution,
                        "answer": answer,
                        "level": 2,
                        "type": "Algebra",
                    }
                )
                + "\n"
            )
        for i, ex in enumerate(arithmetic_rows(n)):
            row = {
                "problem": ex.question,
                "solution": f"{ex.cot}\nSo the value is $\\boxed{{{ex.answer}}}$.",
                "level": f"Level {1 + i % 5}",
                "type": "Prealgebra",
            }
            f.write(json.dumps(row) + "\n")
    return path


def write_user_jsonl(path: Path, n: int = 2500, fields=("question", "solution", "answer")) -> Path:
    q, s, a = fields
    with path.open("w") as f:
        for ex in arithmetic_rows(n):
            f.write(json.dumps({q: ex.question, s: ex.cot, a: ex.answer, "source": "arith"}) + "\n")
    return path
