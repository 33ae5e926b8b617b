"""Which examples a run trains on: the RL prompts (scarce demonstrations first, where set) and the source of
the demonstrations its SFT parts draw."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sasr.config import TrainConfig
from sasr.errors import SasrError
from sasr.tasks import Example, Task, get_task
from sasr.tasks.dataset import ExampleView, any_text

if TYPE_CHECKING:
    from sasr.methods import Method

SCARCE_SEED = 0  # demos.size's demonstrations are drawn with this seed, whatever the run's


def with_demonstration(task: Task, examples: Sequence[Example], limit: int | None = None):
    """The first ``limit`` of ``examples`` that hold a demonstration (a view: read from its flags)."""
    if isinstance(examples, ExampleView):
        return examples.take(np.flatnonzero(examples.has_demo)[:limit])
    return [ex for ex in examples if task.has_demonstration(ex)][:limit]


def _scarce(task: Task, n_total: int, size: int) -> Sequence[Example]:
    """``demos.size``: the first ``size`` training examples with a demonstration, drawn at SCARCE_SEED."""
    have = with_demonstration(task, task.examples("train", n_total, seed=SCARCE_SEED))
    if len(have) < size:
        raise SasrError(
            f"demos.size is {size}, but task '{task.name}' has only {len(have)} training examples with a "
            "demonstration; lower demos.size"
        )
    return have.take(np.arange(size)) if isinstance(have, ExampleView) else have[:size]


def training_examples(config: TrainConfig, task: Task) -> Sequence[Example]:
    """The RL prompts: ``task.train_size`` training examples of the run's seed. With ``demos.size`` and no
    ``demos.task``, the scarce demonstrations come first and the seed's draw (without them) fills the rest,
    so every run holds the same demonstrated prompts."""
    c = config
    examples = task.examples("train", c.task.train_size, seed=c.seed)
    if c.demos.size is None or c.demos.task is not None:
        return examples
    scarce = _scarce(task, c.task.train_size, c.demos.size)
    known = {ex.question for ex in scarce}
    if isinstance(examples, ExampleView):  # the same order, as row numbers
        rest = np.array([i for i, ex in enumerate(examples) if ex.question not in known], dtype=np.int64)
        rest = rest[: len(examples) - len(scarce)]
        rows = np.concatenate([scarce.rows, examples.rows[rest]])
        has_demo = np.concatenate([scarce.has_demo, examples.has_demo[rest]])
        is_text = np.concatenate([scarce.is_text, examples.is_text[rest]])
        return ExampleView(task, examples.dataset, rows, has_demo, is_text)
    return scarce + [ex for ex in examples if ex.question not in known][: len(examples) - len(scarce)]


def check_prompts(config: TrainConfig, task: Task, examples: Sequence[Example], method: Method) -> None:
    """A method that samples rollouts needs prompts with an answer to judge, which plain text rows lack."""
    if method.uses_reference and any_text(task, examples):
        raise SasrError(
            f"method '{config.method}' samples rollouts, but task '{task.name}' holds language-modelling rows "
            "(text alone: no prompt, no answer to judge); train on them with --method sft, or as another "
            "method's demonstrations with demos.task"
        )


def demonstration_source(
    config: TrainConfig, task: Task, examples: Sequence[Example], method: Method, demos: Task | None = None
) -> tuple[Task, Sequence[Example]]:
    """The demonstrations SFT parts draw from: the RL task's examples that hold one (the first
    ``demos.size`` of them where set: ``training_examples`` put the scarce ones first), or ``demos.task``'s
    (which the configuration refuses for a method that pairs each prompt with its own)."""
    c = config
    if demos is not None or c.demos.task is not None:
        task = demos or get_task(c.demos.task, **c.demos.options())
        if c.demos.size is not None:
            return task, _scarce(task, c.demos.train_size, c.demos.size)
        examples = task.examples("train", c.demos.train_size, seed=c.seed)
    if not examples:
        raise SasrError(f"demonstration task '{task.name}' produced no examples")
    have = with_demonstration(task, examples, c.demos.size)
    if method.uses_demos and not have:
        raise SasrError(
            f"method '{c.method}' trains on demonstrations, but no example of task '{task.name}' has one; "
            "name the field that holds them (task.demo_field) or give demos.task"
        )
    return task, have
