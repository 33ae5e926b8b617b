"""`gsm8k`: grade-school math word problems in the `openai/gsm8k` format.

Rows: ``question``, ``answer`` = worked solution ending in ``#### n``. The chain of thought is the
solution with its ``<<48/2=24>>`` calculator notes removed; the final number is compared numerically.
"""

from __future__ import annotations

import re

from sasr.tasks.base import Example
from sasr.tasks.file_task import FileTask
from sasr.tasks.judges import NumericAnswer

_CALC = re.compile(r"<<[^>]*>>")


class GSM8K(NumericAnswer, FileTask):
    name = "gsm8k"
    description = "GSM8K word problems (openai/gsm8k format) from the hub or a local JSONL/Parquet file"
    options = {
        "path": None,  # local .jsonl/.json/.parquet file or a hub dataset id (default openai/gsm8k)
        "test_path": None,  # optional separate test file; otherwise one file is split by a hash
        "correct_reward": 1.0,
        "format_reward": 0.1,
    }
    hub_name, hub_config = "openai/gsm8k", "main"
    fields = ("question", "answer")
    system_prompt = "Solve the problem step by step. End with 'Answer: <number>'."

    def to_example(self, row: dict) -> Example:
        solution, _, final = str(row["answer"]).rpartition("####")
        cot = _CALC.sub("", solution).strip()
        return Example(question=str(row["question"]).strip(), cot=cot, answer=final.strip().replace(",", ""))
