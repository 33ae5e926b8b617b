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


def write_verl_gsm8k(path: Path, n: int = 64, target: bool = True) -> Path:
    """A parquet file as verl's examples/data_preprocess/gsm8k.py writes one: data_source, prompt (chat
    messages), ability, reward_model {style, ground_truth}, extra_info; and LUFFY's ``target`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    instruction = 'Let\'s think step by step and output the final answer after "####".'
    rows = []
    for i, ex in enumerate(arithmetic_rows(n)):
        row = {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{ex.question} {instruction}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ex.answer},
            "extra_info": {"split": "train", "index": i, "question": ex.question},
        }
        if target:
            row["target"] = [{"role": "assistant", "content": f"{ex.cot}\n#### {ex.answer}"}]
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


VERL_SCORE = '''
import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """verl's gsm8k scorer's shape: the number after '####' against the ground truth."""
    found = re.search(r"#### *(-?[0-9]+)", solution_str)
    pred = found.group(1) if found else ""
    return {"score": 1.0 if pred == ground_truth else 0.0, "has_answer": float(bool(found)), "pred": pred}


def plain_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if ground_truth in solution_str else 0.0


def no_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}


def neither(text):
    return 1.0
'''
