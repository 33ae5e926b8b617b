"""`jsonl:PATH`: the user's own data, with a built-in judge or the user's reward function.

Fields default to ``question``, ``solution`` (chain of thought) and ``answer`` and can be renamed. Rows may
instead be in TRL's dataset formats: conversations in a ``messages`` field (the turns before the last
assistant turn are the prompt, that turn is the demonstration), or TRL's prompt-only and prompt-completion
rows, standard or conversational: a ``prompt`` (text, or chat messages used as they are) and optionally a
``completion`` (text, or the assistant's turn), which is the demonstration. The answer comes from the
``answer`` field, else ``solution`` (the gold answer, as TRL's math datasets name it), else the
demonstration's final answer. TRL's language-modelling rows (a ``text`` field alone) are demonstrations
only, trained as plain text: SFT, or any method's SFT part through ``demos.task``. The
judge is built in (``exact``, ``numeric``, ``math``, on the extracted final answer); reward functions
(``reward_funcs``, ``sasr.rewards``) receive every field of the rows as a column.
"""

from __future__ import annotations

import json
from typing import Any

from sasr.errors import SasrError, unknown
from sasr.tasks.base import Example, Score, extract_answer
from sasr.tasks.file_task import FileTask
from sasr.tasks.judges import JUDGES, MathJudge


class JsonlTask(FileTask):
    name = "jsonl"
    description = (
        "your own JSONL/JSON/Parquet file: --task jsonl:PATH, a judge and/or --reward module:function"
    )
    options = {
        "path": None,  # set from the task name jsonl:PATH
        "test_path": None,
        "question_field": "question",
        "messages_field": "messages",  # conversational rows: [{"role": ..., "content": ...}, ...]
        "prompt_field": "prompt",  # TRL's prompt-only / prompt-completion rows
        "completion_field": "completion",
        "text_field": "text",  # TRL's language-modelling rows: plain text, SFT only
        "solution_field": "solution",
        "answer_field": "answer",
        "judge": "numeric",  # exact | numeric | math: correctness, and the reward unless reward_funcs say
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
        self.system_prompt = self.opts["system_prompt"]
        self.hub_name = self.opts["path"]

    @property
    def reward_name(self) -> str:
        return f"judge '{self.opts['judge']}'"

    def required_fields(self) -> tuple[str, ...]:
        return ()  # checked row by row in to_example: flat rows and conversations need different fields

    def split_key(self, row: dict) -> str:
        """The question, or a conversation's turns before its last assistant turn, or TRL's prompt."""
        if self._trl_prompt(row):
            return json.dumps(row[self.opts["prompt_field"]], sort_keys=True)
        turns = row.get(self.opts["messages_field"])
        if isinstance(turns, list):
            prompt = (
                turns[:-1]
                if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant"
                else turns
            )
            return json.dumps(prompt, sort_keys=True)
        if self._text_row(row):
            return str(row[self.opts["text_field"]])
        return str(row.get(self.opts["question_field"], ""))

    def to_example(self, row: dict) -> Example:
        o = self.opts
        columns = {k: v for k, v in row.items() if k != "_line"}
        if row.get(o["messages_field"]) is not None:
            return self._conversation(row, columns)
        if self._trl_prompt(row):
            return self._prompt_completion(row, columns)
        if self._text_row(row):
            text = row[o["text_field"]]
            if not isinstance(text, str) or not text.strip():
                raise SasrError(
                    f"{o['path']}:{row.get('_line', '?')}: '{o['text_field']}' must be non-empty text"
                )
            return Example(text, text, "", {"row": columns, "text": True})
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

    def _trl_prompt(self, row: dict) -> bool:
        """A TRL prompt row: it has the prompt field, and that field is not the one named as the question."""
        o = self.opts
        return o["prompt_field"] != o["question_field"] and row.get(o["prompt_field"]) is not None

    def _text_row(self, row: dict) -> bool:
        """TRL's language-modelling row: the text field and no question field."""
        o = self.opts
        return row.get(o["text_field"]) is not None and row.get(o["question_field"]) is None

    def _prompt_completion(self, row: dict, columns: dict) -> Example:
        """TRL's prompt-only or prompt-completion row, standard (text) or conversational (messages)."""
        o = self.opts
        where = f"{o['path']}:{row.get('_line', '?')}"
        prompt = row[o["prompt_field"]]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not _turns(prompt) or not any(t["role"] == "user" for t in prompt):
            raise SasrError(f"{where}: '{o['prompt_field']}' must be text or chat messages with a user turn")
        completion = row.get(o["completion_field"])
        if isinstance(completion, list):
            if not _turns(completion) or completion[-1]["role"] != "assistant":
                raise SasrError(f"{where}: '{o['completion_field']}' must be the assistant's turn")
            completion = completion[-1]["content"]
        elif completion is not None and not isinstance(completion, str):
            raise SasrError(f"{where}: '{o['completion_field']}' must be text or the assistant's turn")
        demonstration = (completion or "").strip()
        answer = next((row[f] for f in (o["answer_field"], "solution") if row.get(f) is not None), None)
        answer = extract_answer(demonstration) if answer is None else answer
        if answer is None:
            raise SasrError(
                f"{where} has no field '{o['answer_field']}' or 'solution', and no completion with a final answer"
            )
        question = next(t["content"] for t in reversed(prompt) if t["role"] == "user")
        return Example(question, demonstration, str(answer).strip(), {"row": columns, "messages": prompt})

    def messages(self, example: Example) -> list[dict[str, str]]:
        """A conversation's own turns; else the system prompt and the question."""
        return example.metadata.get("messages") or super().messages(example)

    def is_text(self, example: Example) -> bool:
        return bool(example.metadata.get("text"))

    def has_demonstration(self, example: Example) -> bool:
        return bool(example.cot)

    def target(self, example: Example) -> str:
        """A conversation's last assistant turn as it is; else the chain of thought and 'Answer: ...'."""
        if "messages" in example.metadata or self.is_text(example):
            return example.cot
        return f"{example.cot}\nAnswer: {example.answer}"

    def columns(self, example: Example) -> dict[str, Any]:
        """The row's own fields."""
        return dict(example.metadata["row"])

    def score(self, completion: str, example: Example) -> Score:
        got = extract_answer(completion)
        correct = self.judge(got, example.answer)
        return Score(1.0 if correct else 0.0, correct, got is not None)


def _turns(value: Any) -> bool:
    """A non-empty list of {role, content} chat messages."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in value
        )
    )
