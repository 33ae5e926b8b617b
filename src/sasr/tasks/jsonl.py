"""`jsonl:PATH`: the user's own data, with a built-in judge or the user's reward function.

Fields default to ``question``, ``solution`` (chain of thought) and ``answer`` and can be renamed. Rows may
instead be conversations: a ``messages`` field of system/user/assistant turns, as TRL's conversational
datasets hold them; the turns before the last assistant turn are the prompt, that turn is the demonstration,
and the answer comes from the ``answer`` field or else from the demonstration's final answer. The
reward is either a built-in judge (``exact``, ``numeric``, ``math``) on the extracted final answer, or
a function with TRL's reward signature ``f(prompts, completions, **columns) -> list[float]`` named as
``module:function`` or ``path/to/file.py:function``; it receives the questions as ``prompts``, the
completion strings, and every field of the rows as lists.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

from sasr.errors import SasrError, unknown
from sasr.tasks.base import Example, Score, extract_answer
from sasr.tasks.file_task import FileTask
from sasr.tasks.judges import JUDGES, MathJudge


def load_function(spec: str) -> Callable:
    """'module:function' or 'file.py:function' -> the function, or one sentence saying what is missing."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise SasrError(f"reward '{spec}' must look like module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise SasrError(f"reward file '{path}' does not exist")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SasrError(f"cannot import reward module '{module_name}' ({exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SasrError(f"reward module '{module_name}' has no function '{func_name}'")
    return func


class JsonlTask(FileTask):
    name = "jsonl"
    description = "your own JSONL/JSON/Parquet file: --task jsonl:PATH, a judge or --reward module:function"
    options = {
        "path": None,  # set from the task name jsonl:PATH
        "test_path": None,
        "question_field": "question",
        "messages_field": "messages",  # conversational rows: [{"role": ..., "content": ...}, ...]
        "solution_field": "solution",
        "answer_field": "answer",
        "judge": "numeric",  # exact | numeric | math, used when no reward function is given
        "reward": None,  # module:function with TRL's reward signature
        "correct_threshold": 1.0,  # with a reward function: reward >= this counts as correct
        "system_prompt": "Solve the problem step by step. End with 'Answer: <answer>'.",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not self.opts["path"]:
            raise SasrError("task 'jsonl' needs a file: use --task jsonl:PATH")
        if self.opts["judge"] not in JUDGES:
            raise unknown("judge", self.opts["judge"], JUDGES)
        judge = JUDGES[self.opts["judge"]]
        self.judge = judge() if judge is MathJudge else judge
        self.reward_fn = load_function(self.opts["reward"]) if self.opts["reward"] else None
        self.system_prompt = self.opts["system_prompt"]
        self.hub_name = self.opts["path"]

    @property
    def reward_name(self) -> str:
        return self.opts["reward"] or f"judge '{self.opts['judge']}'"

    def required_fields(self) -> tuple[str, ...]:
        return ()  # checked row by row in to_example: flat rows and conversations need different fields

    def split_key(self, row: dict) -> str:
        """The question, or a conversation's turns before its last assistant turn."""
        turns = row.get(self.opts["messages_field"])
        if isinstance(turns, list):
            prompt = (
                turns[:-1]
                if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant"
                else turns
            )
            return json.dumps(prompt, sort_keys=True)
        return str(row.get(self.opts["question_field"], ""))

    def to_example(self, row: dict) -> Example:
        o = self.opts
        columns = {k: v for k, v in row.items() if k != "_line"}
        if row.get(o["messages_field"]) is not None:
            return self._conversation(row, columns)
        for name in (o["question_field"], o["answer_field"]):  # no chain of thought: RL prompts only
            if row.get(name) is None:
                raise SasrError(f"{o['path']}:{row.get('_line', '?')} has no field '{name}'")
        return Example(
            str(row[o["question_field"]]),
            str(row.get(o["solution_field"]) or "").strip(),
            str(row[o["answer_field"]]).strip(),
            {"row": columns},
        )

    def _conversation(self, row: dict, columns: dict) -> Example:
        """A ``messages`` row: the turns before the last assistant turn are the prompt, that turn (if any) the
        demonstration; the answer is the row's answer field, else the demonstration's final answer."""
        o = self.opts
        where = f"{o['path']}:{row.get('_line', '?')}"
        turns = row[o["messages_field"]]
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in turns
        ):
            raise SasrError(f"{where}: '{o['messages_field']}' must be a list of {{role, content}} turns")
        last = len(turns) - 1 if turns and turns[-1]["role"] == "assistant" else len(turns)
        prompt, demonstration = turns[:last], turns[last]["content"].strip() if last < len(turns) else ""
        if not any(t["role"] == "user" for t in prompt):
            raise SasrError(f"{where}: the conversation has no user turn before its last assistant turn")
        answer = row.get(o["answer_field"])
        if answer is None:
            answer = extract_answer(demonstration)
        if answer is None:
            raise SasrError(
                f"{where} has no field '{o['answer_field']}' and its last assistant turn no final answer "
                "(\\boxed{}, 'Answer:', '####' or <answer>)"
            )
        question = next(t["content"] for t in reversed(prompt) if t["role"] == "user")
        return Example(question, demonstration, str(answer).strip(), {"row": columns, "messages": prompt})

    def messages(self, example: Example) -> list[dict[str, str]]:
        """A conversation's own turns; else the system prompt and the question."""
        return example.metadata.get("messages") or super().messages(example)

    def has_demonstration(self, example: Example) -> bool:
        return bool(example.cot)

    def target(self, example: Example) -> str:
        """A conversation's last assistant turn as it is; else the chain of thought and 'Answer: ...'."""
        if "messages" in example.metadata:
            return example.cot
        return f"{example.cot}\nAnswer: {example.answer}"

    def score(self, completion: str, example: Example) -> Score:
        return self.score_batch([completion], [example])[0]

    def score_batch(self, completions: list[str], examples: list[Example]) -> list[Score]:
        answers = [extract_answer(c) for c in completions]
        if self.reward_fn is None:
            out = []
            for got, ex in zip(answers, examples):
                correct = self.judge(got, ex.answer)
                out.append(Score(1.0 if correct else 0.0, correct, got is not None))
            return out
        columns = {k: [ex.metadata["row"].get(k) for ex in examples] for k in examples[0].metadata["row"]}
        rewards = self.reward_fn(
            prompts=[ex.question for ex in examples], completions=list(completions), **columns
        )
        name = self.opts["reward"]
        if not isinstance(rewards, (list, tuple)) or len(rewards) != len(completions):
            got = len(rewards) if isinstance(rewards, (list, tuple)) else type(rewards).__name__
            raise SasrError(
                f"reward function '{name}' returned {got} values for {len(completions)} completions"
            )
        for i, r in enumerate(rewards):
            if isinstance(r, bool) or not isinstance(r, Real) or not math.isfinite(r):
                raise SasrError(
                    f"reward function '{name}' returned {r!r}, not a finite number, for completion {i}"
                )
        threshold = self.opts["correct_threshold"]
        return [Score(float(r), float(r) >= threshold, a is not None) for r, a in zip(rewards, answers)]
