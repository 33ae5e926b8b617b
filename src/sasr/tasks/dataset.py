"""A ``datasets.Dataset`` handed over from Python (``SASRTrainer(train_dataset=...)``) as a task, read where
it lies (Arrow, memory-mapped or in buffers), not copied into Python objects: an ``ExampleView`` holds the
selected rows' numbers and two flags per row, and builds an ``Example`` when one is read.

The rows are those the ``jsonl`` task reads (TRL's formats among them), split and drawn exactly as that task
draws them from the same rows in a file: the same hash split, the same seeded shuffle, the same cut; so a
run on a Dataset and a run on the same rows in a JSONL file train alike. A selected row that is not a valid
example is one sentence naming ``train_dataset:ROW`` before the run starts.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sasr.errors import SasrError
from sasr.tasks.base import Example, split_of
from sasr.tasks.jsonl import JsonlTask

BATCH = 4096  # rows per pass of Arrow reading: the Python objects held at once


class ExampleView(Sequence):
    """The examples of ``rows`` (row numbers of ``dataset``), in order. ``positions``: each one's place among
    the run's RL examples (what ``Collector.index_of`` answers), ``has_demo`` and ``is_text``: the task's
    verdicts, computed once."""

    def __init__(
        self,
        task: DatasetTask,
        dataset: Any,
        rows: np.ndarray,
        has_demo: np.ndarray,
        is_text: np.ndarray,
        positions: np.ndarray | None = None,
    ) -> None:
        self.task, self.dataset, self.rows = task, dataset, rows
        self.has_demo, self.is_text = has_demo, is_text
        self.positions = np.arange(len(rows)) if positions is None else positions

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self.rows[i])
        example = self.task.row_example(self.dataset[row], row)
        example.metadata["index"] = int(self.positions[i])
        return example

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), BATCH):
            stop = min(start + BATCH, len(self))
            for j, row in enumerate(_rows(self.dataset, self.rows[start:stop])):
                example = self.task.row_example(row, int(self.rows[start + j]))
                example.metadata["index"] = int(self.positions[start + j])
                yield example

    def take(self, keep: np.ndarray, renumber: bool = False) -> ExampleView:
        """The examples at ``keep`` (indices into this view), keeping their positions (``renumber``: a new
        run-wide order, positions 0..n-1)."""
        positions = None if renumber else self.positions[keep]
        return ExampleView(
            self.task, self.dataset, self.rows[keep], self.has_demo[keep], self.is_text[keep], positions
        )


def _rows(dataset: Any, rows: np.ndarray) -> list[dict[str, Any]]:
    """The rows ``rows`` of ``dataset`` as dicts (one Arrow read)."""
    batch = dataset[rows.tolist()]
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


class DatasetTask(JsonlTask):
    """The ``jsonl`` task over ``datasets.Dataset`` objects: ``train`` (split by a hash of the question unless
    ``test`` is given, as a single file is) and ``test``."""

    name = "jsonl"  # the jsonl task's rows and judge: a run on a Dataset logs what one on a file does
    description = "a datasets.Dataset passed from Python (SASRTrainer's train_dataset/eval_dataset)"

    def __init__(self, train: Any, test: Any = None, what: str = "train_dataset", **options: Any) -> None:
        super().__init__(**{**options, "path": what})
        self.data = {"train": check_dataset(train, what, self), "test": test}
        if test is not None:
            self.data["test"] = check_dataset(test, "eval_dataset", self)
        self.what = {"train": what, "test": "eval_dataset"}

    def row_example(self, row: dict[str, Any], number: int) -> Example:
        return self.to_example({**row, "_line": number + 1})

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> ExampleView:
        """``split``'s examples: a seeded shuffle of its rows cut to ``n``, as ``JsonlTask`` draws them from a
        file; each selected row is checked here."""
        self.check_split(split)
        explicit = self.data["test"] is not None
        dataset = self.data[split] if explicit else self.data["train"]
        rows = _split_rows(self, dataset, None if explicit else split)
        random.Random(seed).shuffle(rows)  # a permutation of len(rows) alone: the list's, without a list
        chosen = np.frombuffer(rows, dtype=np.int64)[:n]
        self.opts["path"] = self.what[split] if explicit else self.what["train"]
        has_demo = np.zeros(len(chosen), dtype=bool)
        is_text = np.zeros(len(chosen), dtype=bool)
        view = ExampleView(self, dataset, chosen, has_demo, is_text)
        for i, example in enumerate(view):  # every selected row checked, nothing half-loaded
            has_demo[i], is_text[i] = self.has_demonstration(example), self.is_text(example)
        return view


def _split_rows(task: DatasetTask, dataset: Any, split: str | None) -> array:
    """The row numbers of ``split`` by the hash of each row's question (all rows for ``None``), as int64."""
    rows = array("q")
    if split is None:
        rows.extend(range(len(dataset)))
        return rows
    for start in range(0, len(dataset), BATCH):
        batch = dataset[start : start + BATCH]
        for j, values in enumerate(zip(*batch.values())):
            if split_of(task.split_key(dict(zip(batch, values)))) == split:
                rows.append(start + j)
    return rows


KNOWN = ("messages_field", "prompt_field", "text_field", "question_field")


def check_dataset(dataset: Any, what: str, task: JsonlTask) -> Any:
    """A ``datasets.Dataset`` (an ``IterableDataset`` is refused: a run draws rows by number) whose columns
    hold one of the row formats the task reads."""
    from datasets import Dataset, DatasetDict, IterableDataset

    if isinstance(dataset, DatasetDict):
        raise SasrError(f"{what} is a DatasetDict; pass one split of it, e.g. {what}=ds['train']")
    if isinstance(dataset, IterableDataset):
        raise SasrError(f"{what} is an IterableDataset; pass it through sasr.tasks.dataset.materialise first")
    if not isinstance(dataset, Dataset):
        hint = " (Dataset.from_list(rows))" if isinstance(dataset, (list, tuple)) else ""
        raise SasrError(f"{what} must be a datasets.Dataset, not {type(dataset).__name__}{hint}")
    if len(dataset) == 0:
        raise SasrError(f"{what} has no rows")
    columns = set(dataset.column_names)
    names = [task.opts[k] for k in KNOWN]
    if not columns & set(names):
        raise SasrError(
            f"{what} has none of the columns sasr reads ({', '.join(names)}; with a question, an answer); its "
            f"columns are {', '.join(sorted(columns))}: rename one (ds.rename_column) or name it "
            "(task.question_field=...)"
        )
    return dataset


def materialise(dataset: Any, what: str, n: int | None, key: str) -> Any:
    """An ``IterableDataset``'s first ``n`` rows as an Arrow-backed ``Dataset`` in the datasets cache (a run
    draws rows by number at every step, so that a resume is exact); any other dataset as it is."""
    from datasets import Dataset, IterableDataset

    if not isinstance(dataset, IterableDataset):
        return dataset
    if n is None:
        raise SasrError(
            f"{what} is an IterableDataset, which may not end; set {key} to the number of rows to take from it"
        )
    return Dataset.from_generator(_first, gen_kwargs={"source": dataset, "n": n}, features=dataset.features)


def _first(source: Any, n: int) -> Iterator[dict[str, Any]]:
    yield from source.take(n)


def any_text(task: Any, examples: Sequence[Example]) -> bool:
    """Whether any of ``examples`` is a language-modelling row (read from a view's flags, not its rows)."""
    if isinstance(examples, ExampleView):
        return bool(examples.is_text.any())
    return any(task.is_text(ex) for ex in examples)
