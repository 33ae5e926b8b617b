"""Task registry: ``get_task(name, **options)``. Adding a task is one module and one line here."""

from __future__ import annotations

from typing import Any

from sasr.errors import unknown
from sasr.tasks.arithmetic import Arithmetic
from sasr.tasks.base import Example, Score, Task, extract_answer, split_of
from sasr.tasks.generated import GSMSymbolic, KnightsKnaves
from sasr.tasks.gsm8k import GSM8K
from sasr.tasks.jsonl import JsonlTask
from sasr.tasks.math import Math

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Arithmetic, GSM8K, Math, KnightsKnaves, GSMSymbolic, JsonlTask)
}


def get_task(name: str, **options: Any) -> Task:
    """A task by registry name, with its options checked. ``jsonl:PATH`` is the jsonl task on PATH."""
    if name.startswith("jsonl:"):
        return JsonlTask(**{**options, "path": name.removeprefix("jsonl:")})
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name](**options)


__all__ = ["TASKS", "Example", "Score", "Task", "extract_answer", "get_task", "split_of"]
