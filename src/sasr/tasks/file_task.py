"""Base for tasks whose rows come from a local file or a hub dataset (gsm8k, math, jsonl:PATH)."""

from __future__ import annotations

from sasr.tasks.base import Example, Task
from sasr.tasks.records import hash_split, load_rows, require_fields, take


class FileTask(Task):
    """A task whose rows come from a local file or the hub; subclasses say how a row becomes an Example."""

    hub_name: str = ""
    hub_config: str | None = None
    fields: tuple[str, ...] = ()
    question_field: str = "question"

    def to_example(self, row: dict) -> Example:
        raise NotImplementedError

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        self.check_split(split)
        rows, explicit = load_rows(
            self.opts["path"], self.opts["test_path"], self.hub_name, self.hub_config, split
        )
        source = self.opts["path"] or self.hub_name
        require_fields(rows, self.required_fields(), source)
        if not explicit:
            rows = hash_split(rows, self.split_key, split)
        return take([self.to_example(r) for r in rows], n, seed)

    def required_fields(self) -> tuple[str, ...]:
        return self.fields

    def split_key(self, row: dict) -> str:
        """What the train/test hash is taken of: the question."""
        return str(row.get(self.question_field, ""))
