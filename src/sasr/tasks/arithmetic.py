"""`arithmetic`: multi-step integer expressions with a generated step-by-step chain of thought.

A question is e.g. "Compute (7 + 5) * 3 - 4." and its chain of thought evaluates one operation per
line in the usual order ("7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32"), then "Answer: 32".
"""

from __future__ import annotations

import random
import re

from sasr.errors import SasrError
from sasr.tasks.base import Example, Score, Task, extract_answer, split_of

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INT = re.compile(r"^[+-]?\d+$")


class Arithmetic(Task):
    name = "arithmetic"
    description = "multi-step integer arithmetic (+, -, *), chain of thought written by the generator"
    options = {
        "min_terms": 2,  # numbers per expression
        "max_terms": 4,
        "max_value": 20,  # operands are drawn from 1..max_value
        "operators": "+-*",
        "parentheses": 0.5,  # chance of grouping the first two terms
        "correct_reward": 1.0,
        "format_reward": 0.1,  # reward for a well-formed but wrong answer
        "ood_extra_terms": 1,  # the ood split: max_terms+1 .. max_terms+ood_extra_terms numbers
        "ood_value_scale": 2,  # ... drawn from 1..max_value*ood_value_scale
        "near_value_scale": 1.5,  # the near split: training's numbers per expression, operands up to
        # max_value*near_value_scale, at least one above max_value
    }
    splits = ("train", "test", "ood", "near")
    shifts = {
        "ood": "longer expressions (more numbers than any training question) with larger numbers",
        "near": "as many numbers as training questions, at least one of them larger than any in training",
    }
    system_prompt = "Solve the problem step by step, one operation per line. End with 'Answer: <integer>'."

    def _ood_opts(self) -> dict:
        o = self.opts
        return {
            **o,
            "min_terms": o["max_terms"] + 1,
            "max_terms": o["max_terms"] + max(1, o["ood_extra_terms"]),
            "max_value": o["max_value"] * o["ood_value_scale"],
        }

    def _near_opts(self) -> dict:
        o = self.opts
        top = int(o["max_value"] * o["near_value_scale"])
        if top <= o["max_value"]:
            raise SasrError(
                f"task 'arithmetic' option near_value_scale ({o['near_value_scale']}) leaves no operand above "
                f"max_value ({o['max_value']}); raise it"
            )
        return {**o, "max_value": top}

    def _generate(self, rng: random.Random, o: dict) -> Example:
        n = rng.randint(o["min_terms"], o["max_terms"])
        nums = [rng.randint(1, o["max_value"]) for _ in range(n)]
        ops = [rng.choice(o["operators"]) for _ in range(n - 1)]
        grouped = n > 2 and rng.random() < o["parentheses"]
        steps: list[str] = []
        # Token list in evaluation order: a grouped head is reduced first, then '*' before '+'/'-'.
        vals, rest_ops = list(nums), list(ops)
        if grouped:
            head = _OPS[ops[0]](nums[0], nums[1])
            steps.append(f"{nums[0]} {ops[0]} {nums[1]} = {head}")
            vals, rest_ops = [head, *nums[2:]], ops[1:]
        while "*" in rest_ops:
            i = rest_ops.index("*")
            v = vals[i] * vals[i + 1]
            steps.append(f"{vals[i]} * {vals[i + 1]} = {v}")
            vals[i : i + 2] = [v]
            del rest_ops[i]
        while rest_ops:
            v = _OPS[rest_ops[0]](vals[0], vals[1])
            steps.append(f"{vals[0]} {rest_ops[0]} {vals[1]} = {v}")
            vals[0:2] = [v]
            del rest_ops[0]
        expr = " ".join(f"{x} {op}" for x, op in zip(nums, ops)) + f" {nums[-1]}"
        if grouped:
            first = f"({nums[0]} {ops[0]} {nums[1]})"
            expr = " ".join([first] + [f"{op} {x}" for op, x in zip(ops[1:], nums[2:])])
        return Example(question=f"Compute {expr}.", cot="\n".join(steps), answer=str(vals[0]))

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        self.check_split(split)
        rng = random.Random(f"arithmetic/{split}/{seed}")
        opts = self._ood_opts() if split == "ood" else self._near_opts() if split == "near" else self.opts
        out: list[Example] = []
        seen: set[str] = set()
        for _ in range(200 * n + 1000):
            if len(out) == n:
                break
            ex = self._generate(rng, opts)
            # ood questions are longer than any training one, near ones hold a larger number: no hash split
            if split == "near" and max(map(int, re.findall(r"\d+", ex.question))) <= self.opts["max_value"]:
                continue
            if ex.question not in seen and (split in ("ood", "near") or split_of(ex.question) == split):
                seen.add(ex.question)
                out.append(ex)
        return out

    def target(self, example: Example) -> str:
        return f"{example.cot}\nAnswer: {example.answer}"

    def score(self, completion: str, example: Example) -> Score:
        got = extract_answer(completion)
        formatted = got is not None and bool(_INT.match(got.replace(",", "")))
        correct = formatted and int(got.replace(",", "")) == int(example.answer)
        reward = (
            self.opts["correct_reward"] if correct else (self.opts["format_reward"] if formatted else 0.0)
        )
        return Score(reward=float(reward), correct=correct, formatted=formatted)
