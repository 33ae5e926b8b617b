"""`verl:PATH`: rows as verl's ``examples/data_preprocess`` scripts write them, scored as verl scores them.

A row holds ``prompt`` (a list of chat messages, used as it is: no system prompt of sasr's own unless
``system_prompt`` is set), ``reward_model: {style, ground_truth}`` (the ground truth any JSON-like value,
handed to the scorer as it is), and ``data_source``, ``ability``, ``extra_info``, which travel with the row
to every reward function. The judge is the user's ``compute_score(data_source, solution_str, ground_truth,
extra_info=None)`` (``task.compute_score=PATH.py:NAME``: verl's ``custom_reward_function.path`` and ``.name``),
a completion correct when its score is above ``threshold``; without one, the ``numeric`` judge on the
extracted final answer against the ground truth. A demonstration, for methods with an SFT part, comes from
the field ``demo_field`` names (a string, or messages whose last assistant turn is it), e.g. LUFFY's
``target``; rows without one are RL prompts only.
"""

from __future__ import annotations

import json
from typing import Any

from sasr.errors import SasrError
from sasr.tasks.base import Example, Score, extract_answer
from sasr.tasks.file_task import FileTask
from sasr.tasks.judges import JUDGES

COLUMNS = ("data_source", "ability", "extra_info")  # what travels with a row besides its prompt and answer


class VerlTask(FileTask):
    name = "verl"
    description = "verl's parquet rows (prompt, reward_model.ground_truth): --task verl:PATH, a compute_score"
    options = {
        "path": None,  # set from the task name verl:PATH
        "test_path": None,
        "compute_score": None,  # PATH.py:NAME or module:function with verl's contract; null: the numeric judge
        "threshold": 0.5,  # a completion is correct when its score is above this
        "demo_field": None,  # a field holding each row's demonstration (text or messages)
        "system_prompt": None,  # prepended when the row's prompt has no system turn; null: none
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not self.opts["path"]:
            raise SasrError("task 'verl' needs a file: use --task verl:PATH")
        self.hub_name = self.opts["path"]
        self.system_prompt = self.opts["system_prompt"]
        self.scorer = None
        if self.opts["compute_score"]:
            from sasr.contracts import load_function, verl_contract

            self.scorer = load_function(self.opts["compute_score"])
            if not verl_contract(self.scorer):
                raise SasrError(
                    f"task.compute_score '{self.opts['compute_score']}' must take verl's arguments "
                    "(data_source, solution_str, ground_truth, extra_info=None)"
                )

    @property
    def reward_name(self) -> str:
        return self.opts["compute_score"] or "judge 'numeric'"

    def split_key(self, row: dict) -> str:
        return json.dumps(row.get("prompt"), sort_keys=True, default=str)

    def to_example(self, row: dict) -> Example:
        where = f"{self.opts['path']}:{row.get('_line', '?')}"
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(_is_turn(t) for t in prompt):
            raise SasrError(f"{where}: a verl row needs 'prompt', a list of {{role, content}} chat messages")
        reward_model = row.get("reward_model")
        if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
            raise SasrError(f"{where}: a verl row needs 'reward_model' with a 'ground_truth'")
        truth = reward_model["ground_truth"]
        question = next((t["content"] for t in reversed(prompt) if t["role"] == "user"), None)
        if question is None:
            raise SasrError(f"{where}: the prompt has no user turn")
        columns = {k: v for k, v in row.items() if k not in ("_line", "prompt", "reward_model")}
        metadata = {"row": {**columns, "ground_truth": truth}, "messages": prompt, "ground_truth": truth}
        answer = truth if isinstance(truth, str) else json.dumps(truth, default=str)
        return Example(question, self._demonstration(row, where), answer, metadata)

    def _demonstration(self, row: dict, where: str) -> str:
        field = self.opts["demo_field"]
        value = row.get(field) if field else None
        if value is None:
            return ""
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, list) and value and all(_is_turn(t) for t in value):
            if value[-1]["role"] != "assistant":
                raise SasrError(
                    f"{where}: '{field}' is a conversation whose last turn is not the assistant's"
                )
            return value[-1]["content"].strip()
        raise SasrError(f"{where}: '{field}' must be a string or a list of chat messages")

    def messages(self, example: Example) -> list[dict[str, str]]:
        turns = list(example.metadata["messages"])
        if self.system_prompt and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.system_prompt}, *turns]
        return turns

    def has_demonstration(self, example: Example) -> bool:
        return bool(example.cot)

    def target(self, example: Example) -> str:
        return example.cot

    def columns(self, example: Example) -> dict[str, Any]:
        """The row's fields (data_source, ability, extra_info, ...) and its ground truth as it is."""
        return dict(example.metadata["row"])

    def score(self, completion: str, example: Example) -> Score:
        row = example.metadata["row"]
        if self.scorer is None:
            got = extract_answer(completion)
            correct = JUDGES["numeric"](got, example.answer)
            return Score(1.0 if correct else 0.0, correct, got is not None)
        from sasr.contracts import verl_score

        value, _ = verl_score(
            self.scorer,
            row.get("data_source"),
            completion,
            example.metadata["ground_truth"],
            row.get("extra_info"),
        )
        # a verl scorer says nothing of format: the final answer in one of the shapes sasr extracts
        return Score(value, value > self.opts["threshold"], extract_answer(completion) is not None)


def _is_turn(turn: Any) -> bool:
    return (
        isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
    )
