"""A step's rows, as its plan's ``Gather`` asks: demonstrations from their source, the rows of the sources a
method asks for before the groups, each RL prompt's group (``sasr.collect.groups``), then the sources after
them. A gather in, rows out; no gradient here. Which examples a run trains on: ``sasr.collect.examples``.

The collector is also what a method's row makers (``sasr.batch``'s registries) are handed: its public
attributes and calls are theirs to use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
from accelerate import Accelerator

from sasr.batch import ROLLOUT, ROW_SOURCES, Gather, Rows, cat_rows
from sasr.collect.contexts import with_contexts
from sasr.collect.groups import outcomes, step_groups
from sasr.collect.sampling import in_chunks
from sasr.config import TrainConfig
from sasr.data import demonstration_rows, pick
from sasr.errors import SasrError
from sasr.rewards import Rewards
from sasr.tasks import Example, Task
from sasr.tasks.dataset import ExampleView


@dataclass
class Collected:
    """A step's rows and what collecting them measured."""

    rows: Rows
    stats: dict[str, float]  # rollout statistics, the reward functions' numbers, ``tokens``
    extra: dict[str, list]  # the reward functions' log_extra columns, one value per group row
    prompts: list[int] = field(default_factory=list)  # each group's RL example (its index)


class Collector:
    """Builds each step's rows. ``decoder()`` gives the model the rollout engine samples with."""

    def __init__(
        self,
        config: TrainConfig,
        task: Task,
        examples: Sequence[Example],
        demos: tuple[Task, Sequence[Example]],
        tokenizer,
        rewards: Rewards,
        stop_ids: list[int],
        accelerator: Accelerator,
        decoder: Callable[[], AbstractContextManager],
        cuda_graphs: bool = False,
    ) -> None:
        self.config, self.task, self.examples = config, task, examples
        self.demo_task, self.demo_examples = demos
        self.tokenizer, self.rewards, self.stop_ids = tokenizer, rewards, stop_ids
        self.accelerator, self.decoder, self.cuda_graphs = accelerator, decoder, cuda_graphs
        # the RL examples with a demonstration to pair (a method that pairs them has no demos.task)
        self._paired = np.zeros(len(examples), dtype=bool)
        self._paired_pool: list[Example] | None = None
        if isinstance(examples, ExampleView):  # a Dataset's: each example knows its index
            self._index = None
            if self.demo_task is task:
                self._paired[self.demo_examples.positions] = True
        else:
            self._index = {id(ex): i for i, ex in enumerate(examples)}  # an RL example's index, for outcomes
            self._paired[[self._index[id(ex)] for ex in self.demo_examples if id(ex) in self._index]] = True

    # --- what a row maker may use -------------------------------------------------------------------------

    def index_of(self, example: Example) -> int:
        """An RL example's index among the run's RL prompts (``examples``)."""
        return example.metadata["index"] if self._index is None else self._index[id(example)]

    def has_demonstration(self, index: int) -> bool:
        """Whether the RL example ``index`` has a demonstration of its own to pair with its prompt."""
        return bool(self._paired[index])

    def prompt_pool(self, gather: Gather) -> Sequence[Example] | None:
        """What the step's RL prompts are drawn from: every RL example (None), or with ``gather.paired_only``
        those with a demonstration of their own."""
        if not gather.paired_only:
            return None
        if self._paired_pool is None:
            self._paired_pool = [self.examples[int(i)] for i in np.flatnonzero(self._paired)]
        if not self._paired_pool:
            raise SasrError(
                "the method draws RL prompts only from those with a demonstration of their own, and none has "
                "one; give the task's examples demonstrations (task.demo_field)"
            )
        return self._paired_pool

    def draw(self, step: int, per_rank: int, kind: str, pool: list[Example] | None = None) -> list[Example]:
        """This rank's ``per_rank`` examples of the step, drawn for ``kind`` (a pure function of the step)."""
        acc, pool = self.accelerator, self.examples if pool is None else pool
        idx = pick(len(pool), per_rank, step, self.config.seed, kind, acc.process_index, acc.num_processes)
        return [pool[i] for i in idx]

    def share(self, pool: Sequence[int]) -> list[int]:
        """This process's share of ``pool``, every process at least one (a short pool is repeated)."""
        acc = self.accelerator
        n = max(len(pool), acc.num_processes)
        return [pool[i % len(pool)] for i in range(acc.process_index, n, acc.num_processes)]

    def demonstrations(self, examples: list[Example], task: Task | None = None, group=None) -> Rows:
        """DEMO rows of ``examples`` (of the RL task unless ``task`` says); ``group``: each row's RL prompt."""
        c = self.config
        return demonstration_rows(
            self.tokenizer,
            task or self.task,
            examples,
            c.sft.max_length,
            self.accelerator.device,
            group,
            c.model.chat_template_kwargs,
        )

    def sample(
        self, model, prompts: list[str], groups: list[int], num: int, starts=None, kind: int = ROLLOUT
    ) -> Rows:
        """``num`` rollouts of each prompt (``groups``: each prompt's group number); with ``starts`` (token ids,
        one list per prompt), rows of ``kind`` whose completions go on from those given tokens."""
        return in_chunks(self, model, prompts, groups, num, starts, kind)

    # --- a step -------------------------------------------------------------------------------------------

    def probe_rows(self, step: int) -> Rows:
        """A step's worth of demonstrations for SASR's probe: the SFT steps' batch, drawn apart from it."""
        n = self.config.sft.batch_size * self.config.gradient_accumulation_steps
        return self.demonstrations(self.draw(step, n, "probe", self.demo_examples), self.demo_task)

    def collect(self, step: int, gather: Gather) -> Collected:
        """The step's rows: demonstrations, the sources before the groups, each RL prompt's group (its
        rollouts, then the rows its method adds to it), the sources after the groups."""
        pieces, stats, extra, prompts = [], {}, {}, []
        if gather.demos:
            examples = self.draw(step, gather.demos, "sft", self.demo_examples)
            pieces.append(self.demonstrations(examples, self.demo_task))
        self._sources(step, gather, "before", [], pieces, stats)
        if gather.prompts:
            with self.decoder() as model:  # one gathering of the weights for every rollout of the step
                groups = step_groups(self, model, step, gather)
            group_rows = groups.rows
            if gather.contexts is not None:  # other prompts of the same completions, once scored
                group_rows, more = with_contexts(self, step, gather.contexts, groups.examples, group_rows)
                stats.update(more)
            pieces.append(group_rows)
            stats.update(groups.stats)
            extra = groups.extra
            prompts = [self.index_of(ex) for ex in groups.examples]
            self._sources(step, gather, "after", groups.examples, pieces, stats)
        rows = cat_rows(pieces, self.tokenizer.pad_token_id)
        stats["tokens"] = rows.completion_mask.sum().item()
        return Collected(rows, stats, extra, prompts)

    def more(self, got: Collected, step: int, before: Gather, grown: Gather) -> Collected:
        """``got`` with the rows of the row sources ``grown`` has beyond ``before`` (a method's follow-up, once
        the step's outcomes are known), after the step's other rows."""
        asks = tuple(a for a in grown.sources if a not in before.sources)
        examples = [self.examples[i] for i in got.prompts]
        pieces, stats = [got.rows], dict(got.stats)
        for ask in asks:
            rows, more = ROW_SOURCES[ask.name].make(self, step, examples, **ask.args)
            stats.update(more)
            if rows is not None:
                pieces.append(rows)
        rows = cat_rows(pieces, self.tokenizer.pad_token_id)
        stats["tokens"] = rows.completion_mask.sum().item()
        return Collected(rows, stats, got.extra, got.prompts)

    def _sources(self, step: int, gather: Gather, when: str, examples, pieces: list, stats: dict) -> None:
        for ask in gather.sources:
            source = ROW_SOURCES[ask.name]
            if source.when == when:
                rows, more = source.make(self, step, examples, **ask.args)
                stats.update(more)
                if rows is not None:
                    pieces.append(rows)

    def outcomes(self, got: Collected) -> list[tuple[int, int]]:
        """(RL example index, correct rollouts) of the step's groups that have a demonstration to pair, every
        process's in rank order (a collective with several processes)."""
        solved = outcomes(got.rows, got.prompts, self.accelerator)
        return [o for o in solved if self.has_demonstration(o[0])]
