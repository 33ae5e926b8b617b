"""`math`: competition math in the MATH / MATH-500 formats, graded with math-verify.

Rows: ``problem``, ``solution`` (with ``\\boxed{}``), optional ``answer``, ``level``, ``type``/``subject``.
The target is the solution itself; a completion is right when its last ``\\boxed{}`` (or other answer
marker) is mathematically equal to the reference. A verifier timeout scores 0 and is counted.
"""

from __future__ import annotations

from sasr.errors import SasrError
from sasr.tasks.base import Example, Score, _boxed, extract_answer
from sasr.tasks.file_task import FileTask
from sasr.tasks.judges import MathJudge


class Math(FileTask):
    name = "math"
    description = "MATH / MATH-500 problems, \\boxed{} answers graded by math-verify"
    options = {
        "path": None,  # local file or hub id (default HuggingFaceH4/MATH-500, which has only 'test')
        "test_path": None,
        "levels": None,  # e.g. [1, 2]: keep only these levels ('Level 3' or 3)
        "types": None,  # e.g. [Algebra]: keep only these subjects
        "timeout_seconds": 5,
        "correct_reward": 1.0,
        "format_reward": 0.1,
    }
    hub_name, hub_config = "HuggingFaceH4/MATH-500", None
    fields = ("problem", "solution")
    question_field = "problem"
    system_prompt = "Solve the problem step by step. Put the final answer in \\boxed{}."

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.judge = MathJudge(self.opts["timeout_seconds"])

    @property
    def timeouts(self) -> int:
        return self.judge.timeouts

    def to_example(self, row: dict) -> Example:
        solution = str(row["solution"]).strip()
        answer = row.get("answer")
        if answer is None:
            boxed = _boxed(solution)
            if not boxed:
                raise SasrError(
                    f"{self.opts['path'] or self.hub_name}:{row.get('_line', '?')} has no \\boxed{{}} answer"
                )
            answer = boxed[-1][1]
        level = row.get("level")
        subject = row.get("type", row.get("subject"))
        return Example(
            str(row["problem"]).strip(), solution, str(answer).strip(), {"level": level, "type": subject}
        )

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        exs = super().examples(split, None, seed)
        levels, types = self.opts["levels"], self.opts["types"]
        if levels:
            wanted = {str(x).removeprefix("Level ").strip() for x in levels}
            exs = [e for e in exs if str(e.metadata["level"]).removeprefix("Level ").strip() in wanted]
        if types:
            exs = [e for e in exs if e.metadata["type"] in set(types)]
        return exs if n is None else exs[:n]

    def target(self, example: Example) -> str:
        if _boxed(example.cot):
            return example.cot
        return f"{example.cot}\n\\boxed{{{example.answer}}}"

    def score(self, completion: str, example: Example) -> Score:
        got = extract_answer(completion)
        formatted = got is not None
        correct = formatted and self.judge(got, example.answer)
        reward = (
            self.opts["correct_reward"] if correct else (self.opts["format_reward"] if formatted else 0.0)
        )
        return Score(float(reward), correct, formatted)
