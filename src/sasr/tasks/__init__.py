"""Task registry: ``get_task(name, **options)``. Adding a task is one module and one line here."""

from __future__ import annotations

from typing import Any

from sasr.errors import SasrError, unknown
from sasr.tasks.arithmetic import Arithmetic
from sasr.tasks.base import Example, Score, Task, extract_answer, split_of
from sasr.tasks.generated import GSMSymbolic, KnightsKnaves
from sasr.tasks.gsm8k import GSM8K
from sasr.tasks.jsonl import JsonlTask
from sasr.tasks.math import Math
from sasr.tasks.verl import VerlTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Arithmetic, GSM8K, Math, KnightsKnaves, GSMSymbolic, JsonlTask, VerlTask)
}


def get_task(name: str, **options: Any) -> Task:
    """A task by registry name, with its options checked. ``jsonl:PATH`` (``verl:PATH``) is the jsonl (verl)
    task on PATH."""
    for cls in (JsonlTask, VerlTask):
        if name.startswith(f"{cls.name}:"):
            return cls(**{**options, "path": name.removeprefix(f"{cls.name}:")})
    if name == "dataset":
        raise SasrError(
            "task 'dataset' was a datasets.Dataset handed over from Python, which a run directory does not "
            "hold; pass it again (SASRTrainer(..., train_dataset=ds)), or name its rows in a file (--task jsonl:FILE)"
        )
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name](**options)


__all__ = ["TASKS", "Example", "Score", "Task", "extract_answer", "get_task", "split_of"]
